"""BERT rows that hold several ``[CLS] A [SEP] B [SEP]`` pairs, and the padding each layout leaves.

Unpacked, a batch holds one pair per row, padded to its longest pair (see
:func:`minipt.data.collate_pairs`); a short pair leaves most of its row to
padding, which every layer computes and throws away. Packed, each row of
``block_size`` positions holds as many pairs as fit, each its own document: its
positions restart at 0 at its [CLS], its token types are its own, attention
stays inside it (the attention op's ``document_ids``), and NSP is read at its
[CLS]. Rows have ``pair_slots(block_size)`` NSP slots, the most pairs a row can
hold (a pair is at least 5 tokens), so the NSP head's shapes never depend on the
data; slots no pair fills point at position 0 and carry IGNORE_INDEX labels. A
batch is as wide as its longest row rounded up to a multiple of 8, the rule of
unpacked batches; with many rows to a batch, usually block_size.

Strategy: first fit, in the sampler's order, with a bounded look-ahead. Each
pair goes into the first row with room for it; a new row opens when none has
room, until the step has its N rows. A pair that then fits nowhere waits for the
next step, and the step reads on, so later short pairs still fill its gaps, until
every row is full (less room than the shortest pair) or N pairs wait. The next
step places the waiting pairs first; at most N wait, so each fits then: no pair
is dropped or held back more than one step. The sampler's state is its position
in the stream plus the waiting pairs, so resuming is exact. Pairs are built for
``block_size`` as unpacked (most fill a row alone); what packing saves is the
padding of the shorter ones (``short_seq_prob``, document ends). Validation and
eval pairs, fixed once, are packed all at once, without the step's bound.
"""

from __future__ import annotations

import numpy as np

from minipt.config import ConfigError
from minipt.ops import IGNORE_INDEX
from minipt.tokenizer import TextTokenizer

MIN_PAIR_TOKENS = 5  # [CLS] a [SEP] b [SEP]: create_pair_instances keeps no pair with an empty side


def check_pair_room(block_size: int) -> None:
    """A BERT row must hold at least one pair: the ConfigError train and eval give for a shorter block_size."""
    if block_size < MIN_PAIR_TOKENS:
        raise ConfigError(f"block_size={block_size} holds no [CLS] A [SEP] B [SEP] pair, which needs at least "
                          f"{MIN_PAIR_TOKENS} positions")


def pair_length(instance) -> int:
    """Positions of ``[CLS] A [SEP] B [SEP]``."""
    return len(instance.tokens_a) + len(instance.tokens_b) + 3


def pair_slots(block_size: int) -> int:
    """NSP slots per packed row: the most pairs ``block_size`` positions can hold."""
    return block_size // MIN_PAIR_TOKENS


def padded_width(lengths: list[int], max_seq_length: int) -> int:
    """The width of an unpacked batch: its longest pair, rounded up to a multiple of 8, at most max_seq_length."""
    return min(-(-max(lengths) // 8) * 8, max_seq_length)


class RowPacker:
    """First fit of pairs into rows of ``block_size`` positions, at most ``max_rows`` rows (None: no limit)."""

    def __init__(self, block_size: int, max_rows: int | None = None):
        self.block_size, self.max_rows = block_size, max_rows
        self.rows: list[list] = []
        self.room = np.zeros(0, dtype=np.int64)  # free positions per row

    @property
    def full(self) -> bool:
        """Whether no pair can be added: every row allowed is open, none with room for the shortest pair."""
        return len(self.rows) == self.max_rows and int(self.room.max()) < MIN_PAIR_TOKENS

    def add(self, instance) -> bool:
        """Place ``instance``; False, leaving it out, when it fits no row and no row may open."""
        length = pair_length(instance)
        if length > self.block_size:
            raise ValueError(f"a pair of {length} tokens cannot fit a row of block_size={self.block_size}")
        fits = np.flatnonzero(self.room >= length)
        if fits.size:
            self.rows[fits[0]].append(instance)
            self.room[fits[0]] -= length
            return True
        if self.max_rows is not None and len(self.rows) == self.max_rows:
            return False
        self.rows.append([instance])
        self.room = np.append(self.room, self.block_size - length)
        return True


def empty_pair_arrays(shape: tuple[int, int], tok: TextTokenizer) -> dict[str, np.ndarray]:
    """All padding: input_ids, token_type_ids, attention_mask and special_tokens_mask of ``shape``."""
    ids = np.full(shape, tok.pad_id, dtype=np.int64)
    return {
        "input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.zeros(shape, dtype=bool),
        "special_tokens_mask": np.ones(shape, dtype=bool),  # [CLS], [SEP] and [PAD] are never masked
    }


def write_pair(arrays: dict[str, np.ndarray], row: int, start: int, instance, tok: TextTokenizer) -> int:
    """``[CLS] A [SEP] B [SEP]`` into ``row`` of input_ids, token_type_ids and special_tokens_mask from
    ``start``; returns where it ends. The arrays hold padding, type 0 and "special" there before."""
    la, lb = len(instance.tokens_a), len(instance.tokens_b)
    end = start + la + lb + 3
    ids, special = arrays["input_ids"][row], arrays["special_tokens_mask"][row]
    ids[start], ids[start + la + 1], ids[end - 1] = tok.cls_id, tok.sep_id, tok.sep_id
    ids[start + 1:start + la + 1] = instance.tokens_a
    ids[start + la + 2:end - 1] = instance.tokens_b
    arrays["token_type_ids"][row, start + la + 2:end] = 1
    special[start + 1:start + la + 1] = special[start + la + 2:end - 1] = False
    return end


def collate_packed(rows: list[list], tok: TextTokenizer, block_size: int) -> dict[str, np.ndarray]:
    """Packed rows as arrays: collate_pairs' five, and position_ids, document_ids and cls_positions.

    Each row has ``pair_slots(block_size)`` NSP slots. Padding is one more
    document after the last pair (ids never decrease along a row), hidden by attention_mask.
    """
    B, slots = len(rows), pair_slots(block_size)
    width = padded_width([sum(pair_length(x) for x in row) for row in rows], block_size)
    out = empty_pair_arrays((B, width), tok)
    positions, documents = np.zeros((B, width), dtype=np.int64), np.zeros((B, width), dtype=np.int64)
    cls_positions = np.zeros((B, slots), dtype=np.int64)
    labels = np.full((B, slots), IGNORE_INDEX, dtype=np.int64)
    for row, pairs in enumerate(rows):
        start = 0
        for slot, x in enumerate(pairs):
            end = write_pair(out, row, start, x, tok)
            positions[row, start:end] = np.arange(end - start)
            documents[row, start:end] = slot
            cls_positions[row, slot], labels[row, slot] = start, int(x.is_random_next)
            start = end
        out["attention_mask"][row, :start] = True
        documents[row, start:] = len(pairs)
    return {**out, "next_sentence_label": labels, "position_ids": positions, "document_ids": documents,
            "cls_positions": cls_positions}


def pad_share(tokens: int, positions: int) -> float:
    """The share of ``positions`` that are padding when ``tokens`` of them are real."""
    return 1.0 - tokens / positions
