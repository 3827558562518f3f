"""Pre-tokenized corpora, memory-mapped as they are: nanoGPT ``.bin`` files and llm.c shards.

* nanoGPT (``train.bin``, ``val.bin``): raw uint16 token ids, nothing else.
* llm.c (``fineweb_train_000001.bin``, ``..._val_...``): a header of 256 int32
  (magic 20240520, version 1, token count), then that many uint16 ids.

Files named ``*_train_*``/``*_val_*`` must carry the llm.c header; ``train.bin``
and ``val.bin`` are raw; any other ``.bin`` is llm.c when it starts with the
magic, raw otherwise. ``val.bin`` and ``*_val_*`` files are the validation split;
when there is none, the last ``val_fraction`` of the tokens is. A token file has
no tokenizer: the vocabulary is that of a ``--tokenizer`` file, else nanoGPT's
``meta.pkl`` beside the files, else ``--vocab_size``, else GPT-2's (nanoGPT's
assumption too), and every id is checked against it once, when the corpus is
first seen (then the cache remembers). BERT cannot train on token files: its
inputs need [CLS]/[SEP]/[MASK] ids and sentence bounds that only a tokenizer
and text give.

``meta.pkl`` is what nanoGPT's character-level ``prepare.py`` pickles:
``{'vocab_size': int, 'itos': {int: str}, 'stoi': {str: int}}``. A pickle can
run any code while it loads, so it is read by an unpickler that builds plain
values only and refuses every class or function a file names.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minipt.data.sources import DataError, Source, open_source

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4
_LLMC_NAME = re.compile(r"_(train|val)_\d*\.bin$")
CHECK_CHUNK = 1 << 24  # ids per look at a file while checking them against the vocabulary


@dataclass
class TokenFile:
    path: str  # resolved: the cache records where the ids are, to read them from any working folder
    offset: int  # bytes before the first token
    num_tokens: int
    split: str  # "train" or "val"


def inspect_token_file(source: Source) -> TokenFile:
    """Where a token file's ids start and how many there are; a malformed header is an error."""
    path, size = source.path, source.path.stat().st_size
    name = path.name.lower()
    with open_source(path) as f:
        header = np.fromfile(f, dtype="<i4", count=256) if size >= LLMC_HEADER_BYTES else np.zeros(0, "<i4")
    llmc = bool(_LLMC_NAME.search(name)) or (name not in ("train.bin", "val.bin") and header.size
                                              and header[0] == LLMC_MAGIC)
    split = "val" if name == "val.bin" or "_val_" in name else "train"
    if not llmc:
        if size % 2:
            raise DataError(f"{path}: a raw uint16 token file must have an even size, got {size} bytes")
        return TokenFile(str(path.resolve()), 0, size // 2, split)
    if header.size < 256 or header[0] != LLMC_MAGIC:
        found = f"magic {header[0]}" if header.size else f"only {size} bytes"
        raise DataError(f"{path}: not an llm.c token shard (expected magic {LLMC_MAGIC} at offset 0, {found})")
    if header[1] != LLMC_VERSION:
        raise DataError(f"{path}: llm.c shard version {header[1]} at offset 4, expected {LLMC_VERSION} (uint16 ids)")
    count = int(header[2])
    if size != LLMC_HEADER_BYTES + 2 * count:
        raise DataError(
            f"{path}: the header's token count {count} (offset 8) needs {LLMC_HEADER_BYTES + 2 * count} bytes, "
            f"the file has {size}"
        )
    return TokenFile(str(path.resolve()), LLMC_HEADER_BYTES, count, split)


def check_ids(f: TokenFile, vocab_size: int) -> None:
    """Every id of ``f`` below ``vocab_size``, read a chunk at a time so memory stays bounded."""
    tokens = np.memmap(f.path, dtype=np.uint16, mode="r", offset=f.offset, shape=(f.num_tokens,))
    for start in range(0, f.num_tokens, CHECK_CHUNK):
        chunk = tokens[start:start + CHECK_CHUNK]
        if int(chunk.max()) >= vocab_size:
            i = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{f.path}: token id {int(tokens[i])} at token {i} (byte offset {f.offset + 2 * i}) is not below "
                f"the vocabulary size {vocab_size}; set --vocab_size or --tokenizer to the corpus's tokenizer"
            )


def token_files(sources: list[Source], vocab_size: int) -> list[TokenFile]:
    files = [inspect_token_file(s) for s in sources]
    files = [f for f in files if f.num_tokens]
    if not files:
        raise DataError(f"the token files {', '.join(s.name for s in sources)} hold no token")
    for f in files:
        check_ids(f, vocab_size)
    return files


def split_token_files(files: list[TokenFile], val_fraction: float) -> dict[str, list[dict]]:
    """Each split's shards as (path, offset, num_tokens); without a val file, the stream's tail is validation."""
    shards = {"train": [], "val": []}
    has_val = any(f.split == "val" for f in files)
    for f in files:
        shards[f.split].append({"path": f.path, "offset": f.offset, "num_tokens": f.num_tokens})
    if not has_val:
        keep = int(sum(f.num_tokens for f in files) * (1.0 - val_fraction))
        train, shards["train"] = shards["train"], []
        for s in train:
            head = min(max(keep, 0), s["num_tokens"])
            keep -= s["num_tokens"]
            if head:
                shards["train"].append({**s, "num_tokens": head})
            if head < s["num_tokens"]:
                shards["val"].append({**s, "offset": s["offset"] + 2 * head, "num_tokens": s["num_tokens"] - head})
    if not shards["train"] or not shards["val"]:
        raise DataError(f"the token files are too small to split at val_fraction={val_fraction}")
    return shards


# ----------------------------------------------------------------------------- nanoGPT's meta.pkl
META = "meta.pkl"


@dataclass
class Meta:
    path: Path
    vocab_size: int
    stoi: dict[str, int] | None  # a character vocabulary, with nanoGPT's ids; none: the ids come without one


class _PlainValues(pickle.Unpickler):
    """Builds dicts, lists, numbers and strings, which need no class: a pickle that names one is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain values are read")


def find_meta(sources: list[Source]) -> Path | None:
    """The ``meta.pkl`` in the folder of the token files, where nanoGPT's train.py looks for it."""
    found = sorted({s.path.parent / META for s in sources if (s.path.parent / META).is_file()})
    if len(found) > 1:
        raise DataError(f"the token files lie in folders with a {META} each ({found[0]}, {found[1]}): "
                        "name the files of one folder")
    return found[0] if found else None


def read_meta(path: Path) -> Meta:
    """A nanoGPT ``meta.pkl``, loaded without running code and checked to be the vocabulary nanoGPT reads."""
    with open_source(path) as f:
        try:
            meta = _PlainValues(f).load()
        except Exception as exc:  # a damaged pickle raises any of a dozen types, none of them ours
            raise DataError(f"{path}: not a nanoGPT {META} ({type(exc).__name__}: {exc})") from None

    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}; nanoGPT's {META} is {{'vocab_size': int, 'itos': {{int: str}}, "
                         "'stoi': {str: int}}")

    if not isinstance(meta, dict) or not _is_int(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        raise bad("no positive integer 'vocab_size'" if isinstance(meta, dict) else f"a {type(meta).__name__}")
    size, stoi, itos = meta["vocab_size"], meta.get("stoi"), meta.get("itos")
    if stoi is None and itos is None:
        return Meta(path, size, None)
    if not (isinstance(stoi, dict) and all(isinstance(k, str) and k and _is_int(v) for k, v in stoi.items())):
        raise bad("'stoi' is not a dict of strings to integer ids")
    if not (isinstance(itos, dict) and all(_is_int(k) and isinstance(v, str) for k, v in itos.items())):
        raise bad("'itos' is not a dict of integer ids to strings")
    if sorted(stoi.values()) != list(range(len(stoi))) or len(stoi) != size:
        raise bad(f"'stoi' does not give the ids 0 to vocab_size - 1 = {size - 1} one string each")
    inverse = {i: s for s, i in stoi.items()}
    if itos != inverse:
        wrong = next(i for i in sorted(set(itos) | set(inverse)) if itos.get(i) != inverse.get(i))
        raise bad(f"'itos' is not the inverse of 'stoi': id {wrong} is {itos.get(wrong)!r} in one, "
                  f"{inverse.get(wrong)!r} in the other")
    return Meta(path, size, stoi)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
