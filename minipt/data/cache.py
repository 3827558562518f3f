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
of writing the same files at once. A process that reads an entry holds a shared
lock on its ``meta.json`` for as long as it uses it (:func:`hold`).

Clearing (``python -m minipt.cache``). :func:`entries` lists what minipt keeps
in the cache folder, told by name (``<key>``, ``<key>.partial``, ...), so that
no other file there is touched; :func:`clear` deletes each entry under both of
its locks, taken without waiting: an entry that a process is building or
training on is kept, and named.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------- in use, listed, cleared
ENTRY_NAME = re.compile(r"^([0-9a-f]{20})(\.partial|\.lock|\.damaged-\d+|\.tmp-\d+)?$")  # all that minipt writes here


def hold(path: Path):
    """A shared lock on the entry ``path`` for as long as the returned file stays open: a run holds the entry
    it trains on, and :func:`clear` leaves a held entry alone."""
    f = open(path / "meta.json", "rb")
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


@dataclass
class Entry:
    """What minipt keeps in its cache folder: a tokenized corpus, one being built or stopped (``partial``),
    an alias (a link naming a corpus by the key of its saved tokenizer) or a leftover (a lock, a folder set aside)."""

    path: Path
    kind: str  # "corpus", "partial", "alias" or "leftover"
    size: int  # bytes, links not followed
    about: str = ""  # a corpus: its model, tokenizer, split and data; an alias: its target


def _size(path: Path) -> int:
    if path.is_symlink():
        return 0
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _about(path: Path) -> str:
    """A corpus entry in a few words, from its meta.json."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        settings = meta["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged: its meta.json is unreadable"
    if settings.get("tokens"):
        return f"token files, vocab {settings['vocab_size']}: {', '.join(settings['paths'][:2])}" + (
            ", ..." if len(settings["paths"]) > 2 else "")
    tokenizer = settings["tokenizer"] if settings["tokenizer"] in ("bpe", "wordpiece", "char") else "own tokenizer"
    size = f" {settings['vocab_size']}" if settings.get("vocab_size") else ""
    data = meta.get("data", "?") or "the bundled plays"
    return f"{settings['model']}, {tokenizer}{size}, {settings['split']} split: {data}"


def entries(root: Path) -> list[Entry]:
    """minipt's entries in the cache folder ``root``, by name; its other files are none of minipt's."""
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        m = ENTRY_NAME.match(path.name)
        if not m:
            continue
        if m.group(2) is None and path.is_symlink():
            found.append(Entry(path, "alias", 0, f"the same corpus as {os.readlink(path)}"))
        elif m.group(2) is None and path.is_dir():
            found.append(Entry(path, "corpus", _size(path), _about(path)))
        elif m.group(2) == ".partial":
            found.append(Entry(path, "partial", _size(path), "a tokenization under way, or stopped"))
        else:
            found.append(Entry(path, "leftover", _size(path)))
    return found


def human(size: int) -> str:
    """Bytes as B, KB, MB or GB (powers of 1024), to one decimal."""
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def summary(root: Path) -> str:
    """The cache folder in one line: where, how many corpora, how big, and how to list or clear it."""
    found = entries(root)
    corpora = sum(e.kind == "corpus" for e in found)
    return (f"the cache {os.path.abspath(root)} holds {corpora} tokenized {'corpus' if corpora == 1 else 'corpora'}, "
            f"{human(sum(e.size for e in found))} (python -m minipt.cache --list shows them, --clear deletes them)")


BUILDING, READING = "a process is tokenizing into it", "a running process reads it"


def _key(entry: Entry) -> str:
    return entry.path.name.removesuffix(".partial")


@contextlib.contextmanager
def _locked(path: Path):
    """``path`` locked exclusively without waiting: yields False (and holds nothing) where another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY if path.exists() else os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # gone meanwhile: nothing holds it
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def in_use(entry: Entry) -> str:
    """Why ``entry`` cannot be deleted now (a process builds or reads it), or "" when nothing holds it."""
    if entry.kind not in ("corpus", "partial"):
        return ""
    lock = entry.path.with_name(_key(entry) + ".lock")
    if lock.exists():
        with _locked(lock) as free:
            if not free:
                return BUILDING
    if entry.kind == "corpus" and (entry.path / "meta.json").exists():
        with _locked(entry.path / "meta.json") as free:
            if not free:
                return READING
    return ""


def clear(root: Path) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Delete minipt's entries in ``root`` that no process holds: (the deleted, the kept with why).

    Each corpus or partial entry goes under its build lock and (a corpus) an exclusive lock on its
    meta.json, both taken without waiting, so that a process building or reading it keeps it; an alias
    goes with the corpus it names, a leftover lock when nothing holds it."""
    deleted, kept = [], []
    found = entries(root)
    for entry in (e for e in found if e.kind in ("corpus", "partial")):
        lock, meta = entry.path.with_name(_key(entry) + ".lock"), entry.path / "meta.json"
        with _locked(lock) as unbuilt:
            if not unbuilt:
                kept.append((entry, BUILDING))
                continue
            with _locked(meta) if entry.kind == "corpus" and meta.exists() else contextlib.nullcontext(True) as unread:
                if unread:
                    discard(entry.path)
                    deleted.append(entry)
                else:
                    kept.append((entry, READING))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # while held, as building() removes it: a process waiting on it looks again
    alive = {_key(e) for e, _ in kept}
    for entry in (e for e in found if e.kind in ("alias", "leftover")):
        if entry.kind == "alias" and os.readlink(entry.path) in alive:
            kept.append((entry, f"it names {os.readlink(entry.path)}, which is kept"))
            continue
        pid = entry.path.name.rpartition("-")[2]
        if pid.isdigit() and _running(int(pid)):
            kept.append((entry, f"process {pid} is writing it"))  # a link being made, or a folder being deleted
            continue
        if entry.path.name.endswith(".lock"):
            if not entry.path.exists() or entry.path.name.removesuffix(".lock") in alive:
                continue  # removed with its entry above, or its entry's, which is kept
            with _locked(entry.path) as free:
                if not free:
                    kept.append((entry, "a process holds this lock"))
                    continue
                entry.path.unlink()
        elif entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
        deleted.append(entry)
    return deleted, kept
