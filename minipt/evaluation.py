"""Scoring a model on held-out text: what ``python -m minipt.eval`` reports (``--task=hellaswag``: see
:mod:`minipt.multiple_choice`).

GPT: loss, perplexity and bits per byte. The documents are tokenized with the
model's tokenizer and joined with ``<|endoftext|>`` before each, as in training;
the stream is cut into consecutive windows of ``block_size`` tokens, each token
predicted from the tokens before it in its window (nanoGPT's validation loss; no
overlap, so every token is scored once). Every token of every document is
scored, the separators are not. Bits per byte is the total loss in nats / ln 2 /
the UTF-8 bytes of the documents' text as read (after ``--strip_markup``, the
separators not counted): it does not depend on the tokenizer, so models with
different vocabularies compare on it. Token files are one stream of ids, taken
to be the model's tokenizer's (each is checked against its vocabulary), scored
the same way; their bytes are those of the text the ids decode to.

BERT: MLM loss and accuracy at ``mlm_probability`` (80% [MASK], 10% random,
10% kept), with masks drawn from the seed, and NSP accuracy beside the share of
the commoner label (what always guessing it scores). The pairs are built as
training builds them (:func:`minipt.data.create_pair_instances`) from the same
seed, and scored by the trainer's own :class:`minipt.scoring.Scorer`.
``pad_share`` is the share of the scored positions that are padding; with
``pack`` the pairs are packed several to a row as a ``--pack`` run trains
(:mod:`minipt.data.packing`), and ``unpacked_pad_share`` is the share the same
pairs leave unpacked, so one command compares the two layouts.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch

from minipt import runtime
from minipt.config import ConfigError, EvalConfig, TrainConfig
from minipt.data import (
    DataError, create_pair_instances, find_sources, pair_batches, read_documents, segments, to_device,
)
from minipt.data.packing import check_pair_room
from minipt.data.sources import is_tokens
from minipt.data.tokens import token_files
from minipt.load import load_run
from minipt.multiple_choice import evaluate_hellaswag
from minipt.ops import IGNORE_INDEX, mlm_mask, resolve_backends
from minipt.scoring import VALIDATION_STEP, Scorer, mask_seed
from minipt.tokenizer import TextTokenizer, TokenizerError

# What a run's own settings give BERT's scoring where the command line does not; a Hugging Face folder has none.
TRAINED_DEFAULTS = {name: getattr(TrainConfig, name)
                    for name in ("mlm_probability", "short_seq_prob", "pack", "text_field", "strip_markup")}


def held_out_sources(cfg: EvalConfig) -> list:
    if not cfg.data:  # never the bundled plays by default: the trainer learns from them
        raise ConfigError("--data is required: the held-out text to score")
    return find_sources(cfg.data)


def read_texts(cfg: EvalConfig, sources: list | None = None) -> list[str]:
    """The documents of ``--data`` that hold text, every one of them, in the trainer's reading."""
    sources = held_out_sources(cfg) if sources is None else sources
    if is_tokens(sources):
        raise DataError(f"--data={cfg.data} names token files, which hold GPT token ids; BERT is scored on text, "
                        "whose segments make its pairs")
    field, strip = (TRAINED_DEFAULTS[k] if getattr(cfg, k) is None else getattr(cfg, k)
                    for k in ("text_field", "strip_markup"))
    texts = [text for source in sources for _, _, text in read_documents(source, field, strip)
             if text.strip()]  # a blank document is dropped, as training drops it
    if not texts:
        raise DataError(f"--data={cfg.data} holds no text to score: its documents are empty or whitespace only")
    return texts


# ----------------------------------------------------------------------------- GPT
def text_stream(texts: list[str], tok: TextTokenizer) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(ids, targets, bytes, documents) of ``<|endoftext|> doc <|endoftext|> doc ...``: separators get no target."""
    if tok.eot_id is None:
        raise TokenizerError("scoring GPT needs <|endoftext|> in the tokenizer, to separate the documents")
    ids, targets = [], []
    for piece in tok.encode_batch(texts):
        ids += [tok.eot_id, *piece]
        targets += [IGNORE_INDEX, *piece]
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return np.asarray(ids, np.int64), np.asarray(targets, np.int64), n_bytes, len(texts)


def token_stream(sources: list, tok: TextTokenizer) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(ids, targets, bytes, documents) of token files read whole, one stream in file order.

    The ids are taken to be the model's tokenizer's (a token file names no
    tokenizer); each is checked against its vocabulary. ``<|endoftext|>`` ids, if
    the tokenizer has one, get no target, as in :func:`text_stream`. The bytes are
    the UTF-8 bytes of the text the ids decode to, document by document.
    """
    files = token_files(sources, tok.vocab_size)
    ids = np.concatenate([np.memmap(f.path, dtype=np.uint16, mode="r", offset=f.offset, shape=(f.num_tokens,))
                          for f in files]).astype(np.int64)
    separators = ids == tok.eot_id if tok.eot_id is not None else np.zeros(len(ids), bool)
    targets = np.where(separators, IGNORE_INDEX, ids)
    documents = [doc for doc in np.split(ids, np.flatnonzero(separators)) if (doc != tok.eot_id).any()]
    n_bytes = sum(len(tok.decode(doc[doc != tok.eot_id].tolist()).encode("utf-8")) for doc in documents)
    if not n_bytes:
        raise DataError(f"--data: the token files {', '.join(f.path for f in files)} hold no text to score")
    return ids, targets, n_bytes, len(documents)


def gpt_windows(ids: np.ndarray, targets: np.ndarray, block_size: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Batches of consecutive windows over the stream, each token predicted from those before it in its window."""
    if len(ids) < 2:
        raise DataError(f"the held-out stream holds {len(ids)} token(s): nothing to predict")
    starts = range(0, len(ids) - 1, block_size)
    windows = [(ids[i:i + block_size], targets[i + 1:i + block_size + 1]) for i in starts]
    windows[-1] = (windows[-1][0][:len(windows[-1][1])], windows[-1][1])  # the last one ends with the text
    full = [w for w in windows if len(w[0]) == block_size]
    batches = [
        {"x": np.stack([x for x, _ in group]), "y": np.stack([y for _, y in group])}
        for group in (full[i:i + batch_size] for i in range(0, len(full), batch_size))
    ]
    if len(windows[-1][0]) < block_size:
        batches.append({"x": windows[-1][0][None], "y": windows[-1][1][None]})
    return batches


@torch.no_grad()
def score_gpt(scorer: Scorer, batches, n_bytes: int) -> dict:
    scorer.model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=scorer.rt.device)
    tokens = 0
    for arrays in batches:
        batch = to_device(arrays, scorer.rt.device)
        scored = int((arrays["y"] != IGNORE_INDEX).sum())
        nats += scorer.forward(batch, seed=0, model=scorer.model).loss.double() * scored
        tokens += scored
    total = nats.item()
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": total / math.log(2) / n_bytes,
            "tokens": tokens, "bytes": n_bytes}


# ----------------------------------------------------------------------------- BERT
def bert_pairs(texts: list[str], tok: TextTokenizer, block_size: int, batch_size: int, short_seq_prob: float,
               seed: int, pack: bool = False) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """Segment pairs, half of them with a random B, built as training builds them; with their padding figures."""
    documents = []
    for text in texts:
        pieces = [np.asarray(p, np.int32) for p in tok.encode_batch(segments(text)) if p]
        if pieces:
            documents.append(pieces)
    instances = create_pair_instances(documents, block_size, short_seq_prob, random.Random(seed))
    if not instances:
        raise DataError("the held-out text yields no segment pair: BERT is scored on pairs of paragraphs")
    return pair_batches(instances, tok, block_size, batch_size, pack)


def masked_positions(batches: list[dict[str, np.ndarray]], tok: TextTokenizer, mlm_probability: float,
                     seed: int) -> int:
    """How many positions the validation masks select, drawn as :meth:`Scorer.evaluate` draws them
    (``mlm_mask`` gives the same masks on every backend): none leaves MLM nothing to score."""
    count = 0
    for i, batch in enumerate(batches):
        _, labels = mlm_mask(
            torch.from_numpy(batch["input_ids"]), mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
            special_tokens_mask=torch.from_numpy(batch["special_tokens_mask"]), mlm_probability=mlm_probability,
            seed=mask_seed(seed, VALIDATION_STEP, i), backend="torch",
        )
        count += int((labels != IGNORE_INDEX).sum())
    return count


# ----------------------------------------------------------------------------- the command
def evaluate(cfg: EvalConfig, rt: runtime.Runtime) -> dict:
    """The metrics of the model in ``cfg.out_dir`` on ``cfg.data``, with what was scored."""
    resolve_backends(cfg.backend, rt.device)  # a backend that cannot serve is refused before the model is read
    model, tok, saved = load_run(cfg.out_dir, rt.device, backend=cfg.backend, encoder=True)
    if cfg.compile:
        model.compile()
    kind = saved["model_type"]
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ConfigError(f"block_size={block_size} exceeds the model's {model.config.block_size} positions")
    if cfg.task == "hellaswag":
        if kind != "gpt":
            raise ConfigError(f"--task=hellaswag scores a GPT, which continues text; {cfg.out_dir} holds a {kind} model")
        if not cfg.data:
            raise ConfigError("--data is required: HellaSwag's .jsonl (hellaswag_val.jsonl) or llm.c's eval .bin")
        return {"model": str(cfg.out_dir), "model_type": kind, "task": cfg.task, "data": cfg.data,
                "block_size": block_size, **evaluate_hellaswag(model, tok, cfg.data, rt, block_size=block_size,
                                                               batch_size=cfg.batch_size, backend=cfg.backend)}
    if kind == "gpt" and cfg.pack:
        raise ConfigError(f"--pack applies to BERT models only; {cfg.out_dir} holds a gpt model")
    if kind == "bert":
        check_pair_room(block_size)
    # A run's own masking rate, pair lengths and layout, unless given; a Hugging Face folder has none.
    trained = {**TRAINED_DEFAULTS, **{k: v for k, v in saved.get("train", {}).items() if k in TRAINED_DEFAULTS}}
    mlm_probability = cfg.mlm_probability or trained["mlm_probability"]
    short_seq_prob = trained["short_seq_prob"] if cfg.short_seq_prob is None else cfg.short_seq_prob
    pack = trained["pack"] if cfg.pack is None else cfg.pack
    # the held-out text is read as the run read its training text, unless told otherwise
    cfg = dataclasses.replace(cfg, **{name: trained[name] for name in ("text_field", "strip_markup")
                                      if getattr(cfg, name) is None})
    # an untrained NSP head's figures are no results: left out of the loss and the table
    nsp_trained = "nsp" not in saved["untrained_heads"]
    scorer = dict(backend=cfg.backend, mlm_probability=mlm_probability, seed=cfg.seed,
                  objective="mlm+nsp" if nsp_trained else "mlm")
    sources = held_out_sources(cfg)
    result = {"model": str(cfg.out_dir), "model_type": kind, "data": cfg.data}
    if kind == "gpt":
        stream = token_stream(sources, tok) if is_tokens(sources) else text_stream(read_texts(cfg, sources), tok)
        ids, targets, n_bytes, result["documents"] = stream
        batches = gpt_windows(ids, targets, block_size, cfg.batch_size)
        return {**result, "block_size": block_size, **score_gpt(Scorer(kind, model, tok, rt, **scorer), batches, n_bytes)}
    texts = read_texts(cfg, sources)
    result.update(documents=len(texts), block_size=block_size)
    batches, padding = bert_pairs(texts, tok, block_size, cfg.batch_size, short_seq_prob, cfg.seed, pack)
    if not masked_positions(batches, tok, mlm_probability, cfg.seed):
        raise DataError(f"--data={cfg.data}: the masks at mlm_probability={mlm_probability:g} select none of its "
                        "tokens: MLM has nothing to score; give more held-out text")
    metrics = Scorer(kind, model, tok, rt, **scorer, val_batches=batches, padding=padding).evaluate()
    pairs = sum(int((b["next_sentence_label"] != IGNORE_INDEX).sum()) for b in batches)
    if not nsp_trained:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("nsp_")}
        metrics["nsp"] = f"not scored: the NSP head of {cfg.out_dir} is untrained"
    return {**result, "mlm_probability": mlm_probability, "pack": pack, "pairs": pairs,
            **{k: v for k, v in metrics.items() if k != "val_loss"}}


def table(result: dict) -> str:
    width = max(map(len, result))
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in result.items())
