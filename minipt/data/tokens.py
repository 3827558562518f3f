"""Pre-tokenized corpora, memory-mapped as they are: nanoGPT ``.bin`` files and llm.c shards.

* nanoGPT (``train.bin``, ``val.bin``): raw uint16 token ids, nothing else.
* llm.c (``fineweb_train_000001.bin``, ``..._val_...``): a header of 256 int32
  (magic 20240520, version 1, token count), then that many uint16 ids.

Files named ``*_train_*``/``*_val_*`` must carry the llm.c header; ``train.bin``
and ``val.bin`` are raw; any other ``.bin`` is llm.c when it starts with the
magic, raw otherwise. ``val.bin`` and ``*_val_*`` files are the validation split;
when there is none, the last ``val_fraction`` of the tokens is. A token file has
no tokenizer: the vocabulary is ``--vocab_size``, or the size of a
``--tokenizer`` file, and every id is checked against it once, when the corpus
is first seen (then the cache remembers). BERT cannot train on token files: its
inputs need [CLS]/[SEP]/[MASK] ids and sentence bounds that only a tokenizer
and text give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
