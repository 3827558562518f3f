"""Atomic file writes: a file is whole under its name, or it is not there.

A file is written under a temporary name in its own folder, flushed and
fsync'd, then ``os.replace``'d over the old one, and the folder is fsync'd, so
that after a crash, a kill or a full disk a reader finds the old file or the new
one, never half of one. Run folders (:mod:`minipt.checkpoint`) and the token
cache (:mod:`minipt.data.cache`) write through here.

This module imports nothing from minipt, so every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporary(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` a temporary sibling of ``path`` and fsync it; return its name (removed if ``write`` fails)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each written temporary over its final name, then make the renames durable."""
    for tmp, path in pairs:
        os.replace(tmp, path)
    fsync_dir(pairs[0][1].parent)


def atomic_write(path: str | Path, write_file: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically; ``write_file`` gets the temporary file, open for binary writing."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write_file(f)

    commit([(write_temporary(path, write), path)])


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
