"""The cache of tokenized corpora on disk: where it is, the key of an entry, its integrity and its lock.

Keys. An entry's key hashes the settings and, per file of the corpus, its name
and either its whole content (small corpora) or its size, modification time and
a hash of its first and last ``HEAD_TAIL`` bytes (large ones, token files): a
file rewritten in place with its size and time kept is still told apart where
it changed at either end, without reading a corpus of gigabytes on every run.

Entries. ``<key>/`` appears only once complete: it is built as ``<key>.partial/``
and renamed. Its ``meta.json`` records the size of every other file of the
entry, so a damaged entry (a shard cut short, a meta.json that is not JSON) is
told from a complete one on reading: it is set aside, with a note, and built again.

Locks. The process that builds an entry holds ``<key>.lock`` beside it
(``flock``) until the entry is complete, then removes it; a second process that
wants the same entry waits, with a note, then reads the finished entry instead
of writing the same files at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from minipt.atomic import atomic_write
from minipt.data.sources import DataError, Source, open_source

HEAD_TAIL = 1 << 16  # bytes hashed at each end of a file keyed by its size and time
HASH_CHUNK = 1 << 20  # bytes per read while hashing a whole file, so memory stays flat


class Damaged(DataError):
    """A cache entry whose files do not match its meta.json: built again by prepare_data."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"the cache entry {path} is damaged ({reason}); delete it and run again")
        self.path, self.reason = path, reason


def default_cache_dir() -> Path:
    if os.environ.get("MINIPT_CACHE"):
        return Path(os.environ["MINIPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minipt"


def cache_root(cache_dir: str | Path) -> Path:
    """The cache folder ``cache_dir`` names (the default when empty), created; a file there is an error."""
    root = Path(cache_dir or default_cache_dir())
    if root.exists() and not root.is_dir():
        raise DataError(f"the cache folder {root} (--cache_dir) is a file; name a folder, or leave --cache_dir "
                        f"empty for {default_cache_dir()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {root} (--cache_dir): {exc.strerror or exc}") from None
    return root


def _hash_file(h, source: Source, whole: bool) -> None:
    st = source.path.stat()
    with open_source(source.path) as f:
        if whole:
            h.update(st.st_size.to_bytes(8, "little"))  # length-prefixed, so file boundaries count
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
            return
        h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
        h.update(f.read(HEAD_TAIL))
        f.seek(max(st.st_size - HEAD_TAIL, 0))
        h.update(f.read(HEAD_TAIL))


def cache_key(sources: list[Source], settings: dict, by_content: bool) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s in sources:
        h.update(s.name.encode() + b"\0")
        _hash_file(h, s, whole=by_content)
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- entries
def write_meta(folder: Path, meta: dict, files: list[Path]) -> None:
    """``meta.json`` of an entry, with the size of each of its ``files`` for :func:`read_meta` to check."""
    sizes = {p.name: p.stat().st_size for p in sorted(files)}
    atomic_write(folder / "meta.json", lambda f: f.write(json.dumps({**meta, "sizes": sizes}, indent=2).encode()))


def read_meta(path: Path) -> dict:
    """The meta.json of the entry ``path``, its files checked against the sizes it records."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        sizes = meta["sizes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Damaged(path, f"meta.json is unreadable: {exc}") from None
    for name, size in sizes.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            raise Damaged(path, f"{name} is missing") from None
        if actual != size:
            raise Damaged(path, f"{name} holds {actual:,} bytes, meta.json records {size:,}")
    return meta


def discard(path: Path) -> None:
    """Remove the entry ``path`` (the folder an alias names too): renamed first, so no reader sees it half gone."""
    target = path.resolve()
    aside = target.with_name(f"{target.name}.damaged-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)
    if path.is_symlink():
        path.unlink()


def link(alias: Path, target: Path) -> None:
    """``alias`` names the entry ``target`` too: a resumed run, which passes the tokenizer it saved,
    finds the entry that trained it instead of tokenizing the corpus again."""
    if alias == target or os.path.lexists(alias):
        return
    tmp = alias.with_name(f"{alias.name}.tmp-{os.getpid()}")
    os.symlink(target.name, tmp)
    os.replace(tmp, alias)


@contextlib.contextmanager
def building(path: Path, log):
    """Hold the lock of the entry ``path`` while it is built; wait, with a note, while another process does."""
    lock, waited = path.with_name(path.name + ".lock"), False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataError(f"cannot create the lock {lock} in the cache folder: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log(f"data: waiting for another process that is tokenizing this corpus into {path}")
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder removes the lock file as it finishes: a lock on a file no longer there guards nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def write_failed(partial: Path, exc: OSError, resumable: bool) -> DataError:
    """The error for a write into ``partial`` that failed (a full disk, a file size limit), saying what is kept:
    the finished shards when ``resumable``, else nothing."""
    if not resumable:
        shutil.rmtree(partial, ignore_errors=True)
        return DataError(f"cannot write the cache in {partial} ({exc.strerror or exc}): is the disk full? Nothing "
                         "was kept: free some space and run again")
    for tmp in partial.glob("*.tmp"):  # unfinished files, written again from scratch on resuming
        tmp.unlink()
    done = len(list(partial.glob("part-*.json")))
    return DataError(f"cannot write the cache in {partial} ({exc.strerror or exc}): is the disk full? Its "
                     f"{done} finished shard(s) are kept: free some space and run again to resume from them, "
                     "or delete that folder")
