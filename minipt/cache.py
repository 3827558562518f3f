"""python -m minipt.cache: list or clear minipt's cache of tokenized corpora.

Training tokenizes its corpus once into the cache folder (--cache_dir,
default $MINIPT_CACHE, else ~/.cache/minipt) and reads it from there on every
later run. --list (the default) shows each entry: its size and what it was
made from. --clear deletes minipt's entries and nothing else in the folder,
without asking; an entry that a running process is tokenizing or training on
is kept, and named. A cleared corpus is tokenized again by the next run that
needs it. How entries are kept and locked: minipt/data/cache.py.

Examples:

    python -m minipt.cache
    python -m minipt.cache --clear
    python -m minipt.cache --list --cache_dir /scratch/minipt-cache
"""

from __future__ import annotations

import sys
from pathlib import Path

from minipt.config import CacheConfig, make_config, parse_overrides
from minipt.data import cache
from minipt.errors import MiniptError, report

PROG = "python -m minipt.cache"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(CacheConfig, parse_overrides(CacheConfig, argv, PROG, __doc__))
        root = Path(cfg.cache_dir or cache.default_cache_dir()).expanduser()
        if root.exists() and not root.is_dir():
            raise cache.DataError(f"the cache folder {root} (--cache_dir) is a file, not a folder")
        if cfg.clear:
            deleted, kept = cache.clear(root)
            corpora = sum(e.kind == "corpus" for e in deleted)
            print(f"deleted {len(deleted)} entries ({corpora} tokenized corpora, the rest aliases, partial entries "
                  f"and leftovers), {cache.human(sum(e.size for e in deleted))}")
            for entry, why in kept:
                print(f"kept {entry.path.name}: {why}")
        if cfg.list or not cfg.clear:
            for entry in cache.entries(root):
                busy = cache.in_use(entry)
                print(f"{entry.path.name:<32} {cache.human(entry.size):>12}  {entry.kind}"
                      f"{': ' + entry.about if entry.about else ''}{f' (in use: {busy})' if busy else ''}")
        print(cache.summary(root) if root.is_dir() else f"the cache {root} does not exist yet")
        return 0
    except MiniptError as exc:
        return report("minipt.cache", exc)


if __name__ == "__main__":
    sys.exit(main())
