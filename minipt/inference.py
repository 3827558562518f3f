"""Using a trained model: GPT continues a prompt, BERT fills [MASK]s and judges a pair, a fine-tune classifies.

``python -m minipt.sample`` is the command around these; a training run ends
with :func:`show_trained`. Each function puts the model in eval mode for the
call and restores its mode after, and runs under the autocast of ``dtype``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import numpy as np
import torch

from minipt import runtime
from minipt.config import ConfigError
from minipt.tokenizer import TextTokenizer


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def document_start(tok: TextTokenizer, prompt: str) -> list[int]:
    """What a sample starts from before ``prompt``: <|endoftext|>, which opens every document; without one, an
    empty prompt starts at a newline, where nanoGPT's sample.py starts a character-level model."""
    if tok.eot_id is not None:
        return [tok.eot_id]
    newline = tok.tokenizer.token_to_id("\n")
    return [newline] if newline is not None and not prompt else []


@torch.no_grad()
def generate_text(
    model, tok: TextTokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 200, seed: int = 1337, num_samples: int = 1, dtype: torch.dtype = torch.float32,
) -> list[str] | str:
    """GPT: ``prompt`` and its continuation; a list when ``num_samples > 1``."""
    unknown = tok.unknown_characters(prompt)
    if unknown:
        raise ConfigError(f"the prompt holds characters the model's vocabulary lacks: {''.join(unknown)!r}")
    ids = document_start(tok, prompt) + tok.encode(prompt)
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer has no <|endoftext|> to start from; give a prompt")
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
        raise ConfigError(
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
        raise ConfigError(f"the text holds no [MASK] token to fill: {text!r}")
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
def classify(model, tok: TextTokenizer, labels: list[str] | None, text: str, text_b: str | None = None, *,
             dtype: torch.dtype = torch.float32) -> list[tuple[str, float]]:
    """A fine-tuned classifier: (label, probability) for every label, the likeliest first; a regressor
    (``labels`` None): ``[("score", the number it predicts)]``."""
    ids, types = _encode_pair(tok, text, text_b, model.config.block_size)
    device = _device(model)
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    with runtime.autocast(device, dtype):
        logits = model(input_ids, torch.tensor([types], device=device), torch.ones_like(input_ids))
    model.train(was_training)
    if model.config.problem_type == "regression":
        return [("score", float(logits[0, 0]))]
    probs = logits[0].float().softmax(-1).tolist()
    return sorted(zip(labels, probs), key=lambda pair: -pair[1])


def percent(p: float) -> str:
    """A probability as a percentage of 3 significant digits: a vocabulary's small probabilities stay apart."""
    return f"{100 * p:.3g}%"


DEMO_TOKENS = (8, 40)  # the length of a demo sentence, in tokens: a sentence, not a fragment or a paragraph
DEMO_CANDIDATES = 1000  # sentences of the validation text the demo draws from (read in order, not all of them)


def masked_sentence(tok: TextTokenizer, segments: Iterable[np.ndarray], seed: int) -> tuple[str, str] | None:
    """(a sentence with one word as [MASK], that word) from ``segments`` (token arrays, the validation text's),
    drawn by ``seed``; None when no segment of DEMO_TOKENS holds a word that is one token.

    The word is a whole word (not a ``##`` piece, and no ``##`` piece follows it) of letters, so that
    the answer is one token the model can name."""
    def maskable(pieces: list[str], i: int) -> bool:
        word, after = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else ""
        return word.isalpha() and len(word) > 1 and not after.startswith("##")

    lo, hi = DEMO_TOKENS
    found = []
    for ids in itertools.islice((s for s in segments if lo <= len(s) <= hi), DEMO_CANDIDATES):
        pieces = [tok.id_to_token(int(i)) for i in ids]
        positions = [i for i in range(len(pieces)) if maskable(pieces, i)]
        if positions:
            found.append((ids, positions))
    if not found:
        return None
    rng = random.Random(seed)
    ids, positions = rng.choice(found)
    at = rng.choice(positions)
    masked = [int(i) for i in ids]
    word, masked[at] = tok.id_to_token(masked[at]), tok.mask_id
    return tok.decode(masked), word


def show_trained(model, tok: TextTokenizer, kind: str, *, sample_tokens: int, seed: int, dtype: torch.dtype,
                 log=print, segments: Iterable[np.ndarray] = ()) -> None:
    """What a training run ends with: a GPT sample of ``sample_tokens`` (0: none), or BERT filling a [MASK]
    in a sentence of ``segments`` (the validation text's), drawn by ``seed``."""
    if kind == "gpt":
        if sample_tokens and not document_start(tok, ""):
            # token files bring ids without a tokenizer that marks where a document starts
            log("\nno sample: the tokenizer has no <|endoftext|> to start a document from; sample with a prompt: "
                "python -m minipt.sample --prompt \"...\"")
        elif sample_tokens:
            text = generate_text(model, tok, "", max_new_tokens=sample_tokens, temperature=0.8, top_k=200, seed=seed,
                                 dtype=dtype)
            log(f"\nsample:\n{text}\n")
        return
    demo = masked_sentence(tok, segments, seed)
    if demo is None:
        log(f"\nno fill-mask demo: no sentence of {DEMO_TOKENS[0]} to {DEMO_TOKENS[1]} tokens in the validation text "
            "has a whole word to mask; try: python -m minipt.sample --text \"... [MASK] ...\"")
        return
    text, word = demo
    log(f"\nfill-mask, a sentence of the validation text with {word!r} masked: {text}")
    for candidates in fill_mask(model, tok, text, top_k=5, dtype=dtype):
        log("  " + ", ".join(f"{token} {percent(p)}" for token, p in candidates))
