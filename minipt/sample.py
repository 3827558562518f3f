"""``python -m minipt.sample --out_dir DIR``: use a trained run, or a Hugging Face model folder.

``DIR`` is a minipt run folder or a folder saved by ``save_pretrained``
(GPT2LMHeadModel, BertForPreTraining, BertForMaskedLM) with its tokenizer; see
:func:`load_run`, which ``train --init_from`` and ``eval`` share.

* GPT continues ``--prompt`` (an empty prompt starts a new document) with
  ``--temperature``, ``--top_k``, ``--max_new_tokens`` and ``--seed``.
* BERT fills every ``[MASK]`` of ``--text`` and prints the top candidates with
  their probabilities; with ``--text_a`` and ``--text_b`` it prints the NSP
  probability that B follows A.
* A fine-tune run (``python -m minipt.finetune``) classifies ``--text``, or the
  pair ``--text`` and ``--text_b``, and prints the probability of every label.

Examples::

    python -m minipt.sample --out_dir out --prompt "ROMEO:" --max_new_tokens 100
    python -m minipt.sample --out_dir out-bert --text "The cat sits on the [MASK]."
    python -m minipt.sample --out_dir out-bert --text_a "I like cats." --text_b "They are cute."
    python -m minipt.sample --out_dir out-finetune --text "Now is the winter of our discontent"
    python -m minipt.sample --out_dir ~/models/gpt2 --prompt "The cat sits on the" --temperature 0
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt import checkpoint as ckpt
from minipt import hf, runtime
from minipt.config import ConfigError, check_types, make_config, parse_overrides
from minipt.model import build_model
from minipt.tokenizer import TextTokenizer, TokenizerError, load_hf_tokenizer

PROG = "python -m minipt.sample"
CLASSIFIER = "bert_classifier"  # the model kind of a fine-tune run


@dataclass
class SampleConfig:
    # ---- run
    out_dir: str = "out"  # a minipt run folder, or a Hugging Face GPT-2 or BERT folder with its tokenizer
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU, else float32), float32 or bfloat16
    seed: int = 1337  # seeds the sampling
    # ---- GPT
    prompt: str = ""  # text to continue; empty: start a new document
    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = 0.8  # softmax temperature; 0: always the most likely token
    top_k: int | None = 200  # sample among the k most likely tokens; none: among all
    num_samples: int = 1  # samples to draw
    # ---- BERT
    text: str = ""  # text with [MASK] tokens to fill in; for a fine-tune run, the text to classify
    candidates: int = 5  # candidates shown for each [MASK]
    text_a: str = ""  # first segment for next sentence prediction
    text_b: str = ""  # second segment: the probability that it follows text_a, or the text_pair to classify

    def __post_init__(self):
        check_types(self)
        for name in ("max_new_tokens", "num_samples", "candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or none, got {self.top_k}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.text_a and not self.text_b:
            raise ConfigError("next sentence prediction needs both --text_a and --text_b")
        if self.text_b and not (self.text_a or self.text):
            raise ConfigError("--text_b needs --text_a (next sentence prediction) or --text (a fine-tune run's pair)")


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a Hugging Face model rather than a minipt run (whose config.json has a "train" entry)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ckpt.CheckpointError(f"{path} is not a folder: expected a minipt run or a Hugging Face model folder")
    if not (folder / ckpt.CONFIG).is_file():
        raise ckpt.CheckpointError(
            f"{path} is neither a minipt run nor a Hugging Face model: it holds no {ckpt.CONFIG}"
        )
    try:
        return "train" not in json.loads((folder / ckpt.CONFIG).read_text(encoding="utf-8"))
    except (ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{folder / ckpt.CONFIG} is corrupt: {exc}") from None


def read_model_config(path: str | Path, *, encoder: bool = False) -> tuple[str, dict]:
    """(kind, model config) of a minipt run or a Hugging Face model folder, from its config.json alone.

    With ``encoder``, a fine-tune run reads as the BERT it holds (kind ``bert``, no ``num_labels``).
    """
    if is_hf_folder(path):
        _, kind, config = hf.read_hf_config(path)
        return kind, dataclasses.asdict(config)
    config = ckpt.read_config(path)
    kind, model = config["model_type"], config["model"]
    if encoder and kind == CLASSIFIER:
        return "bert", {k: v for k, v in model.items() if k != "num_labels"}
    return kind, model


def check_vocabulary(tok: TextTokenizer, embedding_rows: int, source) -> None:
    """Refuse a tokenizer with ids past the model's embedding; fewer tokens than rows is normal (padded rows)."""
    if tok.vocab_size > embedding_rows:
        raise TokenizerError(
            f"the tokenizer of {source} has {tok.vocab_size} tokens but the model's embedding has {embedding_rows} "
            f"rows: ids {embedding_rows} to {tok.vocab_size - 1} would index past it"
        )


def load_run(
    path: str | Path, device: torch.device | str = "cpu", *, backend: str | None = None, dropout: float | None = None,
    encoder: bool = False,
) -> tuple[torch.nn.Module, TextTokenizer, dict]:
    """The model (in eval mode, on ``device``), tokenizer and config of a run or a Hugging Face model folder.

    The config is the run's config.json; for a Hugging Face folder, ``model_type``,
    ``model`` and ``notes`` (what did not come from the checkpoint, such as a fresh
    NSP head). ``backend`` and ``dropout`` replace the saved ones. With ``encoder``,
    a fine-tune run gives the BERT it fine-tuned (with the MLM and NSP heads it kept
    from its start, which the fine-tune did not train), as a ``bert`` config with a note.
    """
    kind, model_config = read_model_config(path)
    overrides = {k: v for k, v in (("backend", backend), ("dropout", dropout)) if v is not None}
    if is_hf_folder(path):
        tok = load_hf_tokenizer(path, kind)
        model, notes = hf.load_hf_folder(path, **overrides)
        config = {"model_type": kind, "model": dataclasses.asdict(model.config), "notes": notes}
    else:
        config = ckpt.read_config(path)
        tok = TextTokenizer.from_file(Path(path) / ckpt.TOKENIZER, "gpt" if kind == "gpt" else "bert")
        model = build_model(kind, {**model_config, **overrides})
        ckpt.load_weights(path, model, device)
        if encoder and kind == CLASSIFIER:
            bert = build_model("bert", read_model_config(path, encoder=True)[1] | overrides)
            bert.load_state_dict(model.bert.state_dict())
            model = bert
            config = {**config, "model_type": "bert", "model": dataclasses.asdict(bert.config), "notes": [
                f"{path} is a fine-tune run: its BERT encoder is read, without the classification layer; its MLM "
                "and NSP heads are those its fine-tune started from, untrained by it"]}
    check_vocabulary(tok, model.config.vocab_size, path)
    return model.to(device).eval(), tok, config


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_text(
    model, tok: TextTokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 200, seed: int = 1337, num_samples: int = 1, dtype: torch.dtype = torch.float32,
) -> list[str] | str:
    """GPT: ``prompt`` and its continuation; a list when ``num_samples > 1``."""
    ids = ([tok.eot_id] if tok.eot_id is not None else []) + tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no <|endoftext|> to start from; give a prompt")
    device = _device(model)
    was_training = model.training
    model.eval()
    context = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with runtime.autocast(device, dtype):
        out = model.generate(context, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    texts = [prompt + tok.decode(row[len(ids):].tolist()) for row in out]
    return texts if num_samples > 1 else texts[0]


def _encode_pair(tok: TextTokenizer, a: str, b: str | None, block_size: int) -> tuple[list[int], list[int]]:
    ids = [tok.cls_id, *tok.encode(a), tok.sep_id]
    types = [0] * len(ids)
    if b is not None:
        tail = [*tok.encode(b), tok.sep_id]
        ids, types = ids + tail, types + [1] * len(tail)
    if len(ids) > block_size:
        raise ValueError(
            f"the input is {len(ids)} tokens with [CLS] and [SEP], more than the model's block_size {block_size}"
        )
    return ids, types


def _bert_forward(model, ids: list[int], types: list[int], dtype: torch.dtype):
    device = _device(model)
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    with runtime.autocast(device, dtype):
        out = model(input_ids, token_type_ids=torch.tensor([types], device=device),
                    attention_mask=torch.ones_like(input_ids), return_logits=True)
    model.train(was_training)
    return out


@torch.no_grad()
def fill_mask(model, tok: TextTokenizer, text: str, *, top_k: int = 5, dtype: torch.dtype = torch.float32):
    """BERT: for each [MASK] of ``text``, the ``top_k`` (token, probability) candidates."""
    ids, types = _encode_pair(tok, text, None, model.config.block_size)
    positions = [i for i, t in enumerate(ids) if t == tok.mask_id]
    if not positions:
        raise ValueError(f"the text holds no [MASK] token to fill: {text!r}")
    logits = _bert_forward(model, ids, types, dtype).logits[0, positions, : tok.vocab_size].float()  # (M, V)
    probs, best = logits.softmax(-1).topk(min(top_k, tok.vocab_size), dim=-1)
    return [
        [(tok.id_to_token(i), p) for i, p in zip(row_ids.tolist(), row_p.tolist())]
        for row_ids, row_p in zip(best, probs)
    ]


@torch.no_grad()
def next_sentence_probability(model, tok: TextTokenizer, text_a: str, text_b: str, *, dtype=torch.float32) -> float:
    """BERT: the probability that ``text_b`` follows ``text_a`` (NSP label 0)."""
    ids, types = _encode_pair(tok, text_a, text_b, model.config.block_size)
    return float(_bert_forward(model, ids, types, dtype).nsp_logits[0].float().softmax(-1)[0])


@torch.no_grad()
def classify(model, tok: TextTokenizer, labels: list[str], text: str, text_b: str | None = None, *,
             dtype: torch.dtype = torch.float32) -> list[tuple[str, float]]:
    """A fine-tuned classifier: (label, probability) for every label, the likeliest first."""
    ids, types = _encode_pair(tok, text, text_b, model.config.block_size)
    device = _device(model)
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    with runtime.autocast(device, dtype):
        logits = model(input_ids, torch.tensor([types], device=device), torch.ones_like(input_ids))
    model.train(was_training)
    probs = logits[0].float().softmax(-1).tolist()
    return sorted(zip(labels, probs), key=lambda pair: -pair[1])


def show_trained(model, tok: TextTokenizer, kind: str, *, sample_tokens: int, seed: int, dtype: torch.dtype,
                 log=print) -> None:
    """What a training run ends with: a GPT sample of ``sample_tokens`` (0: none), or BERT filling a [MASK]."""
    if kind == "gpt":
        if sample_tokens:
            text = generate_text(model, tok, "", max_new_tokens=sample_tokens, temperature=0.8, top_k=200, seed=seed,
                                 dtype=dtype)
            log(f"\nsample:\n{text}\n")
        return
    text = "to be, or not to be, that is the [MASK]."
    log(f"\nfill-mask: {text}")
    for candidates in fill_mask(model, tok, text, top_k=5, dtype=dtype):
        log("  " + ", ".join(f"{token} {p:.3f}" for token, p in candidates))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(SampleConfig, parse_overrides(SampleConfig, argv, PROG, __doc__))
        rt = runtime.setup(cfg.device, cfg.dtype)
        model, tok, config = load_run(cfg.out_dir, rt.device)
        for note in config.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        if config["model_type"] == "gpt":
            texts = generate_text(
                model, tok, cfg.prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_k=cfg.top_k, seed=cfg.seed, num_samples=cfg.num_samples, dtype=rt.dtype,
            )
            for text in [texts] if isinstance(texts, str) else texts:
                print(text)
                print("-" * 40)
            return 0
        if config["model_type"] == CLASSIFIER:
            if not cfg.text or cfg.text_a:
                raise ConfigError(f"{cfg.out_dir} is a fine-tune run: give --text (and --text_b for a pair) to "
                                  "classify; --text_a belongs to next sentence prediction")
            print(f"text: {cfg.text!r}" + (f"   text_b: {cfg.text_b!r}" if cfg.text_b else ""))
            for label, p in classify(model, tok, config["labels"], cfg.text, cfg.text_b or None, dtype=rt.dtype):
                print(f"  {label} {p:.3f}")
            return 0
        if cfg.text_b and not cfg.text_a:
            raise ConfigError("--text_b without --text_a applies to a fine-tune run only")
        if not cfg.text and not cfg.text_a:
            raise ConfigError("a BERT run needs --text with [MASK] tokens, or --text_a and --text_b")
        if cfg.text:
            print(cfg.text)
            for n, candidates in enumerate(fill_mask(model, tok, cfg.text, top_k=cfg.candidates, dtype=rt.dtype), 1):
                print(f"  [MASK] {n}: " + ", ".join(f"{t} {p:.3f}" for t, p in candidates))
        if cfg.text_a:
            p = next_sentence_probability(model, tok, cfg.text_a, cfg.text_b, dtype=rt.dtype)
            print(f"P(B follows A) = {p:.3f}   A: {cfg.text_a!r}   B: {cfg.text_b!r}")
        return 0
    except (ConfigError, ckpt.CheckpointError, TokenizerError, ValueError) as exc:
        print(f"minipt.sample: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
