"""python -m minipt.sample --out_dir DIR: use a trained run, or a Hugging Face model folder.

DIR is a minipt run folder or a folder saved by save_pretrained
(GPT2LMHeadModel, BertForPreTraining, BertForMaskedLM) with its tokenizer.

* GPT continues --prompt (an empty prompt starts a new document) with
  --temperature, --top_k, --max_new_tokens and --seed.
* BERT fills every [MASK] of --text and prints the top candidates with
  their probabilities; with --text_a and --text_b it prints the NSP
  probability that B follows A.
* A fine-tune run (python -m minipt.finetune) classifies --text, or the
  pair --text and --text_b, and prints the probability of every label (a
  regression run: the number it predicts).

Examples::

    python -m minipt.sample --out_dir out-gpt --prompt "ROMEO:" --max_new_tokens 100
    python -m minipt.sample --out_dir out-bert --text "The cat sits on the [MASK]."
    python -m minipt.sample --out_dir out-bert --text_a "I like cats." --text_b "They are cute."
    python -m minipt.sample --out_dir out-finetune --text "Now is the winter of our discontent"
    python -m minipt.sample --out_dir ~/models/gpt2 --prompt "The cat sits on the" --temperature 0
"""

from __future__ import annotations

import sys

from minipt import runtime
from minipt.config import ConfigError, SampleConfig, make_config, parse_overrides
from minipt.errors import MiniptError, report
from minipt.inference import classify, fill_mask, generate_text, next_sentence_probability, percent
from minipt.load import load_run
from minipt.models import CLASSIFIER
from minipt.ops import resolve_backends

PROG = "python -m minipt.sample"


def show_gpt(cfg: SampleConfig, model, tok, dtype) -> None:
    if cfg.text or cfg.text_a or cfg.text_b:
        raise ConfigError(f"{cfg.out_dir} holds a GPT: it continues --prompt; --text, --text_a and --text_b "
                          "belong to BERT and fine-tune runs")
    texts = generate_text(model, tok, cfg.prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, seed=cfg.seed, num_samples=cfg.num_samples, dtype=dtype)
    for text in [texts] if isinstance(texts, str) else texts:
        print(text)
        print("-" * 40)


def show_classifier(cfg: SampleConfig, model, tok, labels: list[str], dtype) -> None:
    if not cfg.text or cfg.text_a or cfg.prompt:
        raise ConfigError(f"{cfg.out_dir} is a fine-tune run: give --text (and --text_b for a pair) to classify; "
                          "--text_a belongs to next sentence prediction, --prompt to GPT")
    probabilities = classify(model, tok, labels, cfg.text, cfg.text_b or None, dtype=dtype)
    print(f"text: {cfg.text!r}" + (f"   text_b: {cfg.text_b!r}" if cfg.text_b else ""))
    for label, p in probabilities:
        # a regressor predicts a number (its one "score"), a classifier each label's probability
        print(f"  {label} {p:.4f}" if labels is None else f"  {label} {percent(p)}")


def show_bert(cfg: SampleConfig, model, tok, dtype, untrained_heads: list[str]) -> None:
    if cfg.text_a and "nsp" in untrained_heads:
        raise ConfigError(f"the NSP head of {cfg.out_dir} is untrained (a BertForMaskedLM, or a run on MLM alone): "
                          "its P(B follows A) would mean nothing; --text with [MASK] tokens works")
    if cfg.prompt:
        raise ConfigError(f"{cfg.out_dir} holds a BERT, which fills [MASK]s instead of continuing a prompt: "
                          "give --text with [MASK] tokens, or --text_a and --text_b")
    if cfg.text_b and not cfg.text_a:
        raise ConfigError("--text_b without --text_a applies to a fine-tune run only")
    if not cfg.text and not cfg.text_a:
        raise ConfigError("a BERT run needs --text with [MASK] tokens, or --text_a and --text_b")
    # everything is computed before anything is printed, so that an error comes alone
    filled = fill_mask(model, tok, cfg.text, top_k=cfg.candidates, dtype=dtype) if cfg.text else []
    p = next_sentence_probability(model, tok, cfg.text_a, cfg.text_b, dtype=dtype) if cfg.text_a else None
    if cfg.text:
        print(cfg.text)
        for n, candidates in enumerate(filled, 1):
            print(f"  [MASK] {n}: " + ", ".join(f"{t} {percent(q)}" for t, q in candidates))
    if p is not None:
        print(f"P(B follows A) = {percent(p)}   A: {cfg.text_a!r}   B: {cfg.text_b!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(SampleConfig, parse_overrides(SampleConfig, argv, PROG, __doc__))
        rt = runtime.setup(cfg.device, cfg.dtype, cfg.tf32)
        resolve_backends(cfg.backend, rt.device)  # a backend that cannot serve is refused before the model is read
        model, tok, config = load_run(cfg.out_dir, rt.device, backend=cfg.backend)
        if cfg.compile:
            model.compile()
        for note in config.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        if config["model_type"] == "gpt":
            show_gpt(cfg, model, tok, rt.dtype)
        elif config["model_type"] == CLASSIFIER:
            show_classifier(cfg, model, tok, config["labels"], rt.dtype)
        else:
            show_bert(cfg, model, tok, rt.dtype, config["untrained_heads"])
        return 0
    except MiniptError as exc:
        return report("minipt.sample", exc)


if __name__ == "__main__":
    sys.exit(main())
