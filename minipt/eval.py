"""``python -m minipt.eval --out_dir DIR --data HELD_OUT``: score a model on held-out text.

``DIR`` is a minipt run (a fine-tune run is scored as the BERT it fine-tuned)
or a Hugging Face GPT-2/BERT folder (read by :func:`minipt.sample.load_run`);
``--data`` is in any format the trainer reads (txt, md, jsonl[.gz|.zst],
parquet, and for GPT nanoGPT/llm.c ``.bin`` token files; a file, folder or
glob), read whole: every document is held out. It prints a table, and ``--json
PATH`` writes it too.

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

BERT: MLM loss and accuracy at ``--mlm_probability`` (80% [MASK], 10% random,
10% kept), with masks drawn from ``--seed``, and NSP accuracy beside the share of
the commoner label (what always guessing it scores). The pairs are built as
training builds them (:func:`minipt.data.create_pair_instances`) from the same
seed, and scored by the trainer's own evaluation (:class:`minipt.train.Scorer`).
``pad_share`` is the share of the scored positions that are padding; with
``--pack`` the pairs are packed several to a row as a ``--pack`` run trains
(:mod:`minipt.data.packing`), and ``unpacked_pad_share`` is the share the same
pairs leave unpacked, so one command compares the two layouts.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minipt import checkpoint as ckpt
from minipt import runtime, sample
from minipt.config import ConfigError, TrainConfig, check_types, make_config, parse_overrides
from minipt.data import (
    DataError, create_pair_instances, find_sources, pair_batches, read_documents, segments, to_device,
)
from minipt.data.packing import check_pair_room
from minipt.data.sources import is_tokens
from minipt.data.tokens import token_files
from minipt.ops._loss import IGNORE_INDEX
from minipt.tokenizer import TextTokenizer, TokenizerError
from minipt.train import Scorer

PROG = "python -m minipt.eval"


@dataclass
class EvalConfig:
    # ---- model and data
    out_dir: str = "out"  # a minipt run folder, or a Hugging Face GPT-2 or BERT folder with its tokenizer
    data: str = ""  # the held-out text: file, folder or glob of txt, md, jsonl[.gz|.zst] or parquet
    text_field: str = "text"  # jsonl and parquet: the field (column) that holds a document's text
    strip_markup: bool = True  # bundled plays as "SPEAKER:" text, no headings or stage directions
    json: str = ""  # also write the results to this JSON file
    # ---- scoring
    block_size: int | None = None  # tokens per window (GPT) or pair (BERT); none: the model's block_size
    batch_size: int = 8  # windows or pairs per forward pass
    mlm_probability: float | None = None  # BERT: share of tokens masked; none: the run's, else 0.15
    short_seq_prob: float | None = None  # BERT: share of pairs built shorter; none: the run's, else 0.1
    pack: bool | None = None  # BERT: several pairs per row of block_size; none: as the run trained, else false
    seed: int = 1337  # BERT: seeds the pairs and the masks
    # ---- system
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU, else float32), float32 or bfloat16
    backend: str = "auto"  # minipt.ops backend: auto, torch, triton or native

    def __post_init__(self):
        check_types(self)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2 or none, got {self.block_size}")


def held_out_sources(cfg: EvalConfig) -> list:
    if not cfg.data:  # never the bundled plays by default: the trainer learns from them
        raise ConfigError("--data is required: the held-out text to score")
    return find_sources(cfg.data)


def read_texts(cfg: EvalConfig, sources: list | None = None) -> list[str]:
    """The documents of ``--data``, every one of them, in the trainer's reading."""
    sources = held_out_sources(cfg) if sources is None else sources
    if is_tokens(sources):
        raise DataError(f"--data={cfg.data} names token files, which hold GPT token ids; BERT is scored on text, "
                        "whose segments make its pairs")
    texts = [text for source in sources for _, _, text in read_documents(source, cfg.text_field, cfg.strip_markup)]
    if not any(texts):
        raise DataError(f"--data={cfg.data} holds no text to score")
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


# ----------------------------------------------------------------------------- the command
def evaluate(cfg: EvalConfig, rt: runtime.Runtime) -> dict:
    """The metrics of the model in ``cfg.out_dir`` on ``cfg.data``, with what was scored."""
    model, tok, saved = sample.load_run(cfg.out_dir, rt.device, backend=cfg.backend, encoder=True)
    kind = saved["model_type"]
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ConfigError(f"block_size={block_size} exceeds the model's {model.config.block_size} positions")
    if kind == "gpt" and cfg.pack:
        raise ConfigError(f"--pack applies to BERT models only; {cfg.out_dir} holds a gpt model")
    if kind == "bert":
        check_pair_room(block_size)
    trained = saved.get("train", {})  # a run's own masking rate and pair lengths; a Hugging Face folder has none
    settings = TrainConfig(
        model=kind, backend=cfg.backend, seed=cfg.seed,
        mlm_probability=cfg.mlm_probability or trained.get("mlm_probability", 0.15),
        short_seq_prob=trained.get("short_seq_prob", 0.1) if cfg.short_seq_prob is None else cfg.short_seq_prob,
        pack=trained.get("pack", False) if cfg.pack is None else cfg.pack,
    )
    sources = held_out_sources(cfg)
    result = {"model": str(cfg.out_dir), "model_type": kind, "data": cfg.data}
    if kind == "gpt":
        stream = token_stream(sources, tok) if is_tokens(sources) else text_stream(read_texts(cfg, sources), tok)
        ids, targets, n_bytes, result["documents"] = stream
        scorer = Scorer(settings, rt, tok, model, [])
        batches = gpt_windows(ids, targets, block_size, cfg.batch_size)
        return {**result, "block_size": block_size, **score_gpt(scorer, batches, n_bytes)}
    texts = read_texts(cfg, sources)
    result.update(documents=len(texts), block_size=block_size)
    batches, padding = bert_pairs(texts, tok, block_size, cfg.batch_size, settings.short_seq_prob, cfg.seed,
                                  settings.pack)
    metrics = Scorer(settings, rt, tok, model, batches, padding).evaluate()
    pairs = sum(int((b["next_sentence_label"] != IGNORE_INDEX).sum()) for b in batches)
    return {**result, "mlm_probability": settings.mlm_probability, "pack": settings.pack, "pairs": pairs,
            **{k: v for k, v in metrics.items() if k != "val_loss"}}


def table(result: dict) -> str:
    width = max(map(len, result))
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in result.items())


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(EvalConfig, parse_overrides(EvalConfig, argv, PROG, __doc__.split("\n\n")[0]))
        rt = runtime.setup(cfg.device, cfg.dtype)
        result = evaluate(cfg, rt)
        print(table(result))
        if cfg.json:
            ckpt.atomic_write_text(Path(cfg.json), json.dumps({**result, "settings": asdict(cfg)}, indent=2))
        return 0
    except (ConfigError, DataError, TokenizerError, ckpt.CheckpointError, ValueError) as exc:
        print(f"minipt.eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
