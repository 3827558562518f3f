"""Streaming tokenization into memory-mapped shards, and the cache that holds them.

Small and large corpora. A corpus is small when its text (estimated from file
sizes, see ``sources.EXPANSION``) fits in ``tokenizer_sample_mb``: the bundled
plays (5 MB) are. A small corpus is keyed on its content, split per document
(``split=auto`` means ``doc``) and its tokenizer trains on all of its training
text. A large corpus is keyed on its files' names, sizes, modification times
and a hash of each file's ends, split by whole documents (``auto`` means
``holdout``), and its tokenizer trains on a sample of about
``tokenizer_sample_mb`` taken as every k-th training document across all the
files, so the sample is not the corpus's head.

Splits. ``doc``: the last ``val_fraction`` of every document, from the start of
the line where that tail begins, so every document is seen in both splits (of
its bytes, for a .txt read in pieces). ``holdout``: whole documents, those whose name (``file:line``) hashes below
``val_fraction``: the same documents on every run, whatever the file order.
``stream``: the last ``val_fraction`` of the concatenated text, as nanoGPT's
``shakespeare_char`` does (small corpora only: it needs the total length first).

Shards. Documents stream in batches through the tokenizer's ``encode_batch``
(parallel across cores in Rust) while a reader thread parses the next batch. A
shard closes after the document that brings its training tokens to
``shard_tokens``, so shard bounds depend on the corpus alone and a resumed run
writes the same shards. Each split's shard ``n`` is ``<split>-n.bin`` (uint16,
uint32 past 65535 ids) with ``<split>-n.documents.npy``: GPT documents' token
offsets (each document ends with ``<|endoftext|>``); BERT documents' offsets in
``<split>-n.segments.npy``, the segments' token offsets.

Pieces. A text longer than ``sources.PIECE_BYTES`` (a .txt file is never read
whole) is tokenized a piece at a time, cut where it tokenizes as the whole does
(see ``sources.pieces``): the tokenizers' memory, about 100 bytes per byte of a
text, stays bounded whatever the longest line.

Cache (:mod:`minipt.data.cache`). ``cache_dir/<key>/`` appears only once
complete: it is written as ``<key>.partial/``, where each finished shard is
recorded by ``part-n.json`` (written last), and then renamed, under a lock that
makes a second process wait for it. An interrupted run resumes after its last
recorded shard, and so does a run after a full disk; bad input removes the
partial folder, so nothing half-written stays behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minipt.atomic import atomic_write
from minipt.data import cache as C
from minipt.data import sources as S
from minipt.data import tokens as TF
from minipt.tokenizer import (
    DEFAULT_VOCAB_SIZE, GPT2_VOCAB_SIZE, KINDS, TextTokenizer, char_tokenizer, id_tokenizer, train_tokenizer,
)

CACHE_VERSION = 5  # part of the cache key: a change of layout or file names never reads an old cache
SHARD_TOKENS = 1 << 23  # training tokens per shard: 16 MB of uint16; BERT holds one shard's pairs at a time
BATCH_BYTES = 1 << 20  # text per encode_batch call: large enough to keep the cores busy, small enough to bound memory
MB = 1 << 20


# ----------------------------------------------------------------------------- tokenized splits
@dataclass
class TokenShard:
    tokens: np.ndarray  # (N,) uint16/uint32 memmap
    document_offsets: np.ndarray | None = None  # (D + 1,) GPT: token offsets; BERT: segment indexes
    segment_offsets: np.ndarray | None = None  # (S + 1,) BERT: segment s is tokens[off[s]:off[s + 1]]

    def documents(self) -> list[list[np.ndarray]]:
        """BERT: each document of this shard as a list of its segments' token arrays."""
        so, do = self.segment_offsets, self.document_offsets
        tokens = np.asarray(self.tokens)  # plain views of the map: a memmap slice costs several times more
        return [[tokens[so[s]:so[s + 1]] for s in range(do[d], do[d + 1])] for d in range(len(do) - 1)]


@dataclass
class TokenSplit:
    shards: list[TokenShard]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.shards)


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: TokenSplit
    val: TokenSplit
    cache_path: Path
    hold: object = None  # the entry's shared lock (cache.hold), kept while the data is in use


def read_cache(path: Path, model: str) -> PreparedData:
    """The cache entry ``path``; one whose files do not match its meta.json raises :class:`cache.Damaged`."""
    meta = C.read_meta(path)
    try:
        hold = C.hold(path)
        tok = TextTokenizer.from_file(path / "tokenizer.json", model)
        splits = {}
        for split, info in meta["splits"].items():
            shards = []
            for s in info["shards"]:
                file = Path(s.get("path") or path / s["file"])
                tokens = np.memmap(file, dtype=info["dtype"], mode="r", offset=s.get("offset", 0),
                                   shape=(s["num_tokens"],))
                index = {}
                if "file" in s:
                    stem = path / s["file"].removesuffix(".bin")
                    index["document_offsets"] = np.load(f"{stem}.documents.npy")
                    if model == "bert":
                        index["segment_offsets"] = np.load(f"{stem}.segments.npy")
                shards.append(TokenShard(tokens, **index))
            splits[split] = TokenSplit(shards)
        return PreparedData(tok, splits["train"], splits["val"], path, hold)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise C.Damaged(path, str(exc)) from None


def _reuse(path: Path, model: str, log, repair: bool) -> PreparedData | None:
    """The entry ``path`` if it is complete; a damaged one is removed when ``repair`` (the lock is held)."""
    if not (path / "meta.json").exists() and not (path.is_dir() and repair):
        return None
    try:
        return read_cache(path, model)
    except C.Damaged as exc:
        if repair:
            log(f"data: the cache entry {path} is damaged ({exc.reason}): building it again")
            C.discard(path)
        return None


def _cached(path: Path, model: str, log, reused: str, build, alias=None) -> PreparedData:
    """The entry ``path``, read if complete, else made by ``build(partial)`` and renamed into place.

    ``build`` runs under the entry's lock, so a second process waits and then reads
    the entry instead of writing the same files; ``reused`` is logged on reading.
    ``alias(tokenizer)``, if given, is the key of the same corpus with the tokenizer the
    new entry saved: :func:`cache.link` makes it name the entry too."""
    prepared = _reuse(path, model, log, repair=False)
    if prepared is None:
        with C.building(path, log):
            prepared = _reuse(path, model, log, repair=True)  # built by the process this one waited for
            if prepared is None:
                partial = path.with_name(path.name + ".partial")
                build(partial)
                os.replace(partial, path)
                prepared = read_cache(path, model)
                if alias is not None:
                    C.link(alias(prepared.tokenizer), path)
                log(f"data: {C.summary(path.parent)}")
                return prepared
    log(f"data: reusing the {reused} in {path}")
    log(f"data: {C.summary(path.parent)}")
    return prepared


def _named(data) -> str:
    """What an entry was made from, for ``python -m minipt.cache --list``: --data made absolute (empty: the plays)."""
    paths = data if isinstance(data, list) else [data] if data else []
    return ", ".join(os.path.abspath(os.path.expanduser(p)) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def _digest(tok: TextTokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


# ----------------------------------------------------------------------------- documents, split
def _documents(sources, mode, val_fraction, text_field, strip_markup, start=(0, 0)) -> Iterator[tuple]:
    """``(position after, [(split, text), ...])`` per document, from ``start`` = (source, record).

    A document longer than a piece comes as ``(None, [(split, piece)])`` items, then
    ``(position after, [])``: the position marks where each document ends."""
    if mode == "stream":
        yield from _stream_split(sources, val_fraction, text_field, strip_markup, start)
        return
    for i in range(start[0], len(sources)):
        source, first = sources[i], start[1] if i == start[0] else 0
        if source.is_text_file and S.text_size(source.path, at_most=S.PIECE_BYTES) > S.PIECE_BYTES:
            if first == 0:
                yield from _file_in_pieces(source, mode, val_fraction, (i, 1))
            continue
        for record, name, text in S.read_documents(source, text_field, strip_markup, first):
            if not text.strip():
                continue
            if mode == "doc":
                parts = [p for p in zip(("train", "val"), S.split_tail(text, val_fraction)) if p[1].strip()]
            else:
                parts = [("val" if S.held_out(name, val_fraction) else "train", text)]
            yield from _bounded((i, record + 1), parts)


def _bounded(position, parts: list[tuple[str, str]]) -> Iterator[tuple]:
    """One document's ``parts``, in pieces when one is longer than a piece."""
    if all(len(text) <= S.PIECE_BYTES for _, text in parts):
        yield position, parts
        return
    for split, text in parts:
        for piece in S.pieces(text):
            yield None, [(split, piece)]
    yield position, []


def _file_in_pieces(source, mode, val_fraction, position) -> Iterator[tuple]:
    """A whole-file document (.txt, .md, their .gz) larger than a piece, read a piece at a time, never whole."""
    held = mode == "holdout" and S.held_out(source.name, val_fraction)
    tail = S.tail_start(source.path, val_fraction) if mode == "doc" else None
    for past, piece in S.read_text(source.path, tail):
        if piece.strip():  # whitespace alone, a megabyte of it, would only make a piece of blank tokens
            yield None, [("val" if past or held else "train", piece)]
    yield position, []


def _stream_split(sources, val_fraction, text_field, strip_markup, start):
    texts = [t for s in sources for _, _, t in S.read_documents(s, text_field, strip_markup) if t.strip()]
    cut = int(sum(map(len, texts)) * (1.0 - val_fraction))
    begin = 0
    for i, text in enumerate(texts):
        local = min(max(cut - begin, 0), len(text))
        begin += len(text)
        if i >= start[0]:
            yield from _bounded((i + 1, 0), [p for p in (("train", text[:local]), ("val", text[local:])) if p[1]])


def _tokenizer_sample(docs: Iterator[tuple], share: float, budget: float) -> tuple[list[str], int]:
    """Training texts (pieces) of an evenly spread ``share`` of the documents, up to ``budget`` characters,
    and how many documents they come from; the first document with training text is always taken, so a
    few huge documents still give a sample."""
    sample, size, n, taken = [], 0, 0, set()
    for position, pieces in docs:
        if int((n + 1) * share) != int(n * share) or not sample:  # one of the evenly spaced picks
            for split, text in pieces:
                if split == "train" and size < budget:
                    sample.append(text)
                    size += len(text)
                    taken.add(n)
        if size >= budget:
            break
        n += position is not None
    return sample, len(taken)


# ----------------------------------------------------------------------------- progress
class Progress:
    """MB/s and tokens/s: a tqdm bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total_bytes: float, log):
        self.log, self.total, self.bytes, self.tokens = log, total_bytes, 0, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=int(total_bytes), unit="B", unit_scale=True,
                            desc="tokenizing", leave=False)

    def update(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        elif now - self.last >= 10.0:
            self.last = now
            mbs = self.bytes / MB / max(now - self.start, 1e-9)
            self.log(f"data: tokenized {self.bytes / MB:,.1f} of ~{self.total / MB:,.0f} MB, {mbs:.1f} MB/s, "
                     f"{rate / 1e6:.2f}M tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- writing shards
class _ShardWriter:
    """One split's shard: tokens appended to a file beside its final name, the index kept in memory.

    A document may come in pieces: :meth:`add` appends each piece, :meth:`end` ends the document."""

    def __init__(self, folder: Path, split: str, part: int, dtype, model: str):
        self.stem, self.model, self.dtype = folder / f"{split}-{part:05d}", model, dtype
        self.file = open(f"{self.stem}.bin.tmp", "wb")
        self.num_tokens, self.open = 0, False
        self.segments, self.documents = array("q", [0]), array("q", [0])

    def add(self, seqs: list[list[int]]) -> None:
        """A piece of the open document: its token ids (GPT), or its segments' (BERT)."""
        self.open = True
        for ids in seqs:
            np.asarray(ids, dtype=self.dtype).tofile(self.file)
            self.num_tokens += len(ids)
            self.segments.append(self.num_tokens)

    def end(self, eot: list[int]) -> bool:
        """End the open document, GPT's with ``eot``; whether it held a token, and so counts as one."""
        if not self.open:
            return False
        self.open = False
        np.asarray(eot, dtype=self.dtype).tofile(self.file)
        self.num_tokens += len(eot)
        bound = self.num_tokens if self.model == "gpt" else len(self.segments) - 1
        if bound == self.documents[-1]:
            return False
        self.documents.append(bound)
        return True

    def close(self) -> None:
        self.file.close()
        os.replace(f"{self.stem}.bin.tmp", f"{self.stem}.bin")
        atomic_write(Path(f"{self.stem}.documents.npy"), lambda f: np.save(f, np.asarray(self.documents)))
        if self.model == "bert":
            atomic_write(Path(f"{self.stem}.segments.npy"), lambda f: np.save(f, np.asarray(self.segments)))


def _batches(docs: Iterator[tuple], model: str) -> Iterator[list[tuple]]:
    """Documents grouped to about BATCH_BYTES of text; BERT's texts already cut into segments."""
    batch, size = [], 0
    for position, pieces in docs:
        nbytes = sum(len(t.encode("utf-8")) for _, t in pieces)
        units = [(split, [t] if model == "gpt" else S.segments(t)) for split, t in pieces]
        batch.append((position, nbytes, units))
        size += nbytes
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _read_ahead(iterator: Iterator, depth: int = 2) -> Iterator:
    """``iterator`` run on a thread, ``depth`` items ahead: parsing overlaps encoding, which releases the GIL."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def _tokenize(folder: Path, tok: TextTokenizer, model: str, docs_from, shard_tokens: int, progress: Progress) -> dict:
    """Shards from the last finished part on; returns the per-split shard list, counting every part."""
    done = sorted(folder.glob("part-*.json"))
    parts = [json.loads(p.read_text()) for p in done]
    position = tuple(parts[-1]["next"]) if parts else (0, 0)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eot = [tok.eot_id] if model == "gpt" and tok.eot_id is not None else []

    def open_part(n):
        return {split: _ShardWriter(folder, split, n, dtype, model) for split in ("train", "val")}

    def close_part(writers, next_position, docs):
        for w in writers.values():
            w.close()
        record = {"next": list(next_position), "documents": docs,
                  **{split: w.num_tokens for split, w in writers.items()}}
        atomic_write(folder / f"part-{len(parts):05d}.json", lambda f: f.write(json.dumps(record).encode()))
        parts.append(record)

    def encode(batch):
        return batch, iter(tok.encode_batch([t for _, _, units in batch for _, seqs in units for t in seqs]))

    writers, docs = open_part(len(parts)), {"train": 0, "val": 0}
    # Three stages on three threads: parse, encode (in Rust, without the GIL), write.
    for batch, encoded in _read_ahead(map(encode, _read_ahead(_batches(docs_from(position), model)))):
        for end, nbytes, units in batch:
            before = sum(w.num_tokens for w in writers.values())
            for split, seqs in units:
                writers[split].add([e for e in (next(encoded) for _ in seqs) if e])
            if end is not None:  # the document is whole: no shard ever holds part of one
                position = end
                for split, w in writers.items():
                    docs[split] += w.end(eot)
            progress.update(nbytes, sum(w.num_tokens for w in writers.values()) - before)
            if end is not None and writers["train"].num_tokens >= shard_tokens:
                close_part(writers, position, docs)
                writers, docs = open_part(len(parts)), {"train": 0, "val": 0}
    if any(w.num_tokens for w in writers.values()) or not parts:
        close_part(writers, position, docs)
    else:
        for w in writers.values():
            w.file.close()
            os.remove(w.file.name)
    shards = {"train": [], "val": []}
    for n, p in enumerate(parts):
        for split in shards:
            if p[split]:
                shards[split].append({"file": f"{split}-{n:05d}.bin", "num_tokens": p[split]})
    counts = {split: sum(p["documents"][split] for p in parts) for split in shards}
    return {"dtype": np.dtype(dtype).name, "shards": shards, "documents": counts}


# ----------------------------------------------------------------------------- prepare_data
def prepare_data(
    *, model: str, data: str = "", strip_markup: bool = True, tokenizer: str = "auto", vocab_size: int | None = None,
    split: str = "auto", val_fraction: float = 0.1, cache_dir: str | Path = "", text_field: str = "text",
    tokenizer_sample_mb: float = 100.0, shard_tokens: int = SHARD_TOKENS, log=print,
) -> PreparedData:
    """Find the corpus, split it, train or load the tokenizer, tokenize into shards: or reuse the cache.

    ``vocab_size`` none: DEFAULT_VOCAB_SIZE for a trained tokenizer; for token files see :mod:`minipt.data.tokens`."""
    sources = S.find_sources(data)
    root = C.cache_root(cache_dir)
    if S.is_tokens(sources):
        return _prepare_token_files(sources, model, tokenizer, vocab_size, val_fraction, root, log)
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    total = sum(s.text_bytes for s in sources)
    small = total <= tokenizer_sample_mb * MB
    mode = split if split != "auto" else "doc" if small else "holdout"
    if mode == "stream" and not small:
        raise S.DataError(f"split=stream needs the whole text in memory; this corpus is about {total / MB:,.0f} MB, "
                          f"over tokenizer_sample_mb={tokenizer_sample_mb:g}: use split=holdout or doc")
    kind = {"gpt": "bpe", "bert": "wordpiece"}[model] if tokenizer == "auto" else tokenizer
    base = {"version": CACHE_VERSION, "model": model, "split": mode, "val_fraction": val_fraction,
            "text_field": text_field, "strip_markup": strip_markup}
    given = None
    if kind in KINDS:
        settings = {**base, "tokenizer": kind, "vocab_size": vocab_size if kind != "char" else None,
                    "sample_mb": None if small else tokenizer_sample_mb}
    else:
        given = TextTokenizer.from_file(kind, model)
        settings = {**base, "tokenizer": _digest(given)}
    path = root / C.cache_key(sources, settings, by_content=small)

    def docs_from(start=(0, 0)):
        return _documents(sources, mode, val_fraction, text_field, strip_markup, start)

    def build(partial: Path) -> None:
        partial.mkdir(exist_ok=True)
        tok = given
        try:
            if (partial / "tokenizer.json").is_file():  # an interrupted run's: its shards were made with it
                tok = TextTokenizer.from_file(partial / "tokenizer.json", model)
                log(f"data: resuming the tokenization in {partial}")
            elif tok is None:
                share = 1.0 if small else tokenizer_sample_mb * MB / total
                budget = tokenizer_sample_mb * MB if not small else float("inf")
                texts, documents = _tokenizer_sample(docs_from(), share, budget)
                if not texts:
                    raise S.DataError(f"the corpus {data or '(bundled plays)'!r} is empty: no training text to "
                                      "train a tokenizer on")
                size = "" if kind == "char" else f" with vocab_size {vocab_size}"
                what = f"the {documents} training documents" if small else (
                    f"a sample of {documents:,} training documents spread across the corpus")
                log(f"data: training a {kind} tokenizer{size} on {what}")
                tok = TextTokenizer.wrap(train_tokenizer(kind, texts, vocab_size, model), model)
                del texts
                if kind != "char" and tok.vocab_size < vocab_size:
                    log(f"data: note: the {kind} tokenizer has {tok.vocab_size:,} tokens, fewer than the vocab_size "
                        f"{vocab_size:,} asked for: its training text ran out of merges (every pair of tokens in it "
                        "is merged already); the model's vocabulary is the tokenizer's")
            if not (partial / "tokenizer.json").is_file():
                atomic_write(partial / "tokenizer.json", lambda f: f.write(tok.to_str().encode()))
            progress = Progress(total, log)
            try:
                meta = _tokenize(partial, tok, model, docs_from, shard_tokens, progress)
            finally:
                progress.close()
            counts = meta.pop("documents")
            if not meta["shards"]["train"] and not meta["shards"]["val"]:
                raise S.DataError(f"the corpus {data or '(bundled plays)'!r} is empty: no document holds any text")
            if not meta["shards"]["train"] or not meta["shards"]["val"]:
                raise S.DataError(
                    f"the corpus is too small to split: {counts['train']} training and {counts['val']} validation "
                    f"document(s) at val_fraction={val_fraction} with split={mode}"
                )
            splits = {name: {"dtype": meta["dtype"], "shards": shards} for name, shards in meta["shards"].items()}
            entry = [p for p in partial.iterdir() if not p.name.startswith("part-")]  # the resume points go
            C.write_meta(partial, {"settings": settings, "splits": splits, "data": _named(data)}, entry)
        except S.DataError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except OSError as exc:  # the sources' read errors are DataErrors: this is a write into the cache
            raise C.write_failed(partial, exc, resumable=True) from None
        for p in partial.glob("part-*.json"):
            p.unlink()
        n = {name: sum(s["num_tokens"] for s in shards) for name, shards in meta["shards"].items()}
        log(f"data: {n['train']:,} training and {n['val']:,} validation tokens ({mode} split), cached in {path}")

    def alias(tok: TextTokenizer) -> Path:
        return root / C.cache_key(sources, {**base, "tokenizer": _digest(tok)}, small)

    return _cached(path, model, log, "tokenized corpus cached", build, alias if kind in KINDS else None)


def _prepare_token_files(sources, model, tokenizer, vocab_size, val_fraction, root, log) -> PreparedData:
    if model == "bert":
        raise S.DataError(
            "BERT cannot train on token files: its inputs need [CLS], [SEP] and [MASK] ids and sentence bounds "
            "that only a tokenizer and text give; pass text (txt, md, jsonl, parquet) instead"
        )
    if tokenizer in KINDS:
        raise S.DataError(f"--tokenizer={tokenizer} trains on text, and token files have none: pass "
                          "--vocab_size, or --tokenizer=PATH/tokenizer.json of the tokenizer that made them")
    if tokenizer != "auto":
        tok = TextTokenizer.from_file(tokenizer, model)
        size = tok.vocab_size
    else:
        tok, size = _token_vocabulary(sources, vocab_size, model, log)
    # The entry records where the files are, so it is theirs alone: keyed on their resolved paths.
    base = {"version": CACHE_VERSION, "tokens": True, "vocab_size": size, "val_fraction": val_fraction,
            "paths": [str(s.path.resolve()) for s in sources]}
    settings = {**base, "tokenizer": _digest(tok) if tok else None}
    path = root / C.cache_key(sources, settings, by_content=False)

    def build(partial: Path) -> None:
        files = TF.token_files(sources, size)
        shards = TF.split_token_files(files, val_fraction)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            (tok or TextTokenizer.wrap(id_tokenizer(size), model)).save(partial / "tokenizer.json")
            C.write_meta(partial, {"settings": settings, "splits": {name: {"dtype": "uint16", "shards": s}
                                                                     for name, s in shards.items()},
                                   "data": _named([str(s.path) for s in sources])}, [partial / "tokenizer.json"])
        except OSError as exc:
            raise C.write_failed(partial, exc, resumable=False) from None
        n = {name: sum(x["num_tokens"] for x in s) for name, s in shards.items()}
        log(f"data: {n['train']:,} training and {n['val']:,} validation tokens read from {len(files)} token "
            "file(s)")

    def alias(stand_in: TextTokenizer) -> Path:
        return root / C.cache_key(sources, {**base, "tokenizer": _digest(stand_in)}, by_content=False)

    return _cached(path, model, log, "checked token files recorded", build, alias if tok is None else None)


def _token_vocabulary(sources, vocab_size, model, log) -> tuple[TextTokenizer | None, int]:
    """The vocabulary of token files that come without a tokenizer file: (its characters, if known; its size)."""
    path = TF.find_meta(sources)
    if path is None:
        if vocab_size is None:
            log(f"data: no {TF.META} beside the token files: their ids are taken to be GPT-2's BPE (vocab_size "
                f"{GPT2_VOCAB_SIZE}), as nanoGPT takes them; --vocab_size or --tokenizer says otherwise")
            return None, GPT2_VOCAB_SIZE
        return None, vocab_size
    meta = TF.read_meta(path)
    if vocab_size is not None and vocab_size != meta.vocab_size:
        raise S.DataError(f"--vocab_size={vocab_size} contradicts {path}, whose vocab_size is {meta.vocab_size}: "
                          "leave --vocab_size out")
    if meta.stoi is None:
        log(f"data: vocab_size {meta.vocab_size} from {path}, which has no characters: ids read as <id>")
        return None, meta.vocab_size
    log(f"data: the {meta.vocab_size} characters of {path}, with nanoGPT's ids")
    return TextTokenizer.wrap(char_tokenizer(meta.stoi), model), meta.vocab_size
