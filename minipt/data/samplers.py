"""Samplers: GPT windows drawn across all shards, BERT pairs built a shard at a time (packed or not).

GPT batches are random windows of ``block_size + 1`` tokens of a shard's stream,
in which ``<|endoftext|>`` follows every document; a window never spans two
shards. BERT examples are built as in Google's ``create_pretraining_data.py``
(see :func:`create_pair_instances`) from one shard's documents at a time, so only
that shard's documents are ever held, as views of its memory map; with ``pack``
several go into each row (see :mod:`minipt.data.packing`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from minipt.data.packing import (
    RowPacker, collate_packed, empty_pair_arrays, pad_share, padded_width, pair_length, write_pair,
)
from minipt.data.prepare import PreparedData, TokenSplit
from minipt.data.sources import DataError
from minipt.tokenizer import TextTokenizer


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

    A window starts at any offset of any shard from which it fits in that shard;
    the offsets of all shards are numbered one after another, so one shard reads
    exactly as one stream. Each step draws the offsets of the whole global batch
    (accumulation steps × ranks × batch_size) from one generator seeded alike on
    every rank, and a rank keeps its own slice: ranks read different data, and N
    ranks see exactly the windows that one process with an N-times larger batch
    would see.
    """

    def __init__(
        self, split: TokenSplit, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        name: str = "training",
    ):
        self.shards = [s.tokens for s in split.shards if len(s.tokens) > block_size]
        if not self.shards:
            raise DataError(
                f"the {name} split holds {split.num_tokens} tokens, no shard of it the block_size + 1 = "
                f"{block_size + 1} needed for one window; use a larger corpus or a smaller --block_size"
            )
        self.starts = np.cumsum([0] + [len(t) - block_size for t in self.shards])  # window offsets per shard
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)

    def windows(self, offsets: np.ndarray) -> dict[str, np.ndarray]:
        shard = np.searchsorted(self.starts, offsets, side="right") - 1
        local = offsets - self.starts[shard]
        w = np.stack([self.shards[s][o:o + self.block_size + 1] for s, o in zip(shard, local)]).astype(np.int64)
        return {"x": w[:, :-1], "y": w[:, 1:]}  # (B, T) each

    def next_step(self, accumulation: int) -> list[dict[str, np.ndarray]]:
        offsets = self.rng.integers(0, self.starts[-1], size=(accumulation, self.world_size, self.batch_size))
        return [self.windows(offsets[m, self.rank]) for m in range(accumulation)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def fixed_windows(
    split: TokenSplit, block_size: int, batch_size: int, num_batches: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """The validation batches: drawn once, so every evaluation scores the same text."""
    try:
        sampler = WindowSampler(split, block_size, batch_size, seed, name="validation")
    except DataError as exc:
        raise DataError(f"{exc}; or raise --val_fraction") from None
    return [sampler.next_step(1)[0] for _ in range(num_batches)]


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
                    # int32: a shard's instances are held for as long as it is read
                    instances.append(PairInstance(np.asarray(tokens_a, np.int32), np.asarray(tokens_b, np.int32),
                                                  is_random))
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
            i += 1
    rng.shuffle(instances)
    return instances


def collate_pairs(instances: list[PairInstance], tok: TextTokenizer, max_seq_length: int) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` padded to the longest pair, rounded up to a multiple of 8."""
    width = padded_width([pair_length(x) for x in instances], max_seq_length)
    out = empty_pair_arrays((len(instances), width), tok)
    for row, x in enumerate(instances):
        out["attention_mask"][row, :write_pair(out, row, 0, x, tok)] = True
    labels = np.asarray([int(x.is_random_next) for x in instances], dtype=np.int64)
    return {**out, "next_sentence_label": labels}


class PairSampler:
    """BERT batches: the pair instances of one shard at a time, built afresh per epoch.

    An epoch visits the shards in an order drawn from (seed, epoch), and builds
    each shard's instances from (seed, epoch, shard), shuffled within the shard;
    with one shard that is the whole corpus shuffled. So the sampler's state is
    just (epoch, shard, position). The global batch of a step is the next
    accumulation × ranks × batch_size instances of that stream, or with ``pack``
    as many rows, filled first-fit from its next instances (and the ones the last
    step left waiting, see :mod:`minipt.data.packing`); each rank keeps its own
    slice, as :class:`WindowSampler` does.
    """

    def __init__(
        self, split: TokenSplit, tok: TextTokenizer, block_size: int, batch_size: int, short_seq_prob: float,
        seed: int, rank: int = 0, world_size: int = 1, pack: bool = False,
    ):
        self.shards, self.pack = split.shards, pack
        self.tok, self.block_size, self.batch_size = tok, block_size, batch_size
        self.short_seq_prob, self.seed, self.rank, self.world_size = short_seq_prob, seed, rank, world_size
        self.epoch, self.shard, self.position = 0, 0, 0
        self.waiting: list[PairInstance] = []  # packing: pairs the last step could not place
        self._load()
        for _ in range(len(self.shards)):
            if self._instances:
                break
            self._advance()
        else:
            raise DataError("the training split yields no segment pair; use a larger corpus")
        if (self.epoch, self.shard) != (0, 0):  # back to the start: empty shards are skipped as they come
            self.epoch, self.shard, self.position = 0, 0, 0
            self._load()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if len(order) > 1:
            random.Random(f"{self.seed}:{epoch}:order").shuffle(order)
        return order

    def _load(self) -> None:
        # Shard 0's generator is the one a single-shard corpus has always used.
        index = self._order(self.epoch)[self.shard]
        rng = random.Random(self.seed * 1_000_003 + self.epoch + (index << 40))
        self._instances = create_pair_instances(
            self.shards[index].documents(), self.block_size, self.short_seq_prob, rng
        )

    def _advance(self) -> None:
        """On to the next shard, or to the next epoch after the last."""
        self.shard, self.position = self.shard + 1, 0
        if self.shard == len(self.shards):
            self.epoch, self.shard = self.epoch + 1, 0
        self._load()

    def _take(self, n: int) -> list[PairInstance]:
        out = []
        while len(out) < n:
            if self.position == len(self._instances):
                self._advance()
                continue
            k = min(n - len(out), len(self._instances) - self.position)
            out += self._instances[self.position:self.position + k]
            self.position += k
        return out

    def _take_rows(self, n: int) -> list[list[PairInstance]]:
        """``n`` rows: the waiting pairs, then the next instances, first fit; what fits nowhere waits."""
        packer = RowPacker(self.block_size, max_rows=n)
        for x in self.waiting:  # at most n, each a row at worst: all are placed
            packer.add(x)
        self.waiting = []
        while not packer.full and len(self.waiting) < n:
            if self.position == len(self._instances):
                self._advance()
                continue
            x = self._instances[self.position]
            self.position += 1
            if not packer.add(x):
                self.waiting.append(x)
        return packer.rows

    def next_step(self, accumulation: int) -> list[dict[str, np.ndarray]]:
        b, w = self.batch_size, self.world_size
        step = (self._take_rows if self.pack else self._take)(accumulation * w * b)
        collate = collate_packed if self.pack else collate_pairs
        return [
            collate(step[(m * w + self.rank) * b:(m * w + self.rank + 1) * b], self.tok, self.block_size)
            for m in range(accumulation)
        ]

    def state_dict(self) -> dict:
        waiting = [[x.tokens_a.tolist(), x.tokens_b.tolist(), x.is_random_next] for x in self.waiting]
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "waiting": waiting}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard, self.position = state["epoch"], state.get("shard", 0), state["position"]
        self.waiting = [PairInstance(np.asarray(a, np.int32), np.asarray(b, np.int32), r)
                        for a, b, r in state.get("waiting", [])]
        self._load()


def pair_batches(instances: list[PairInstance], tok: TextTokenizer, block_size: int, batch_size: int, pack: bool
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """Fixed batches of ``instances`` (validation, eval) and the share of padding in them.

    Unpacked: ``batch_size`` pairs per batch, in order. Packed: all the pairs
    first-fit into rows, ``batch_size`` rows per batch. The figures are
    ``pad_share``, of the layout in use, and when packing ``unpacked_pad_share``:
    what the same pairs leave unpacked, the ``pad_share`` a run without packing reports.
    """
    groups = [instances[i:i + batch_size] for i in range(0, len(instances), batch_size)]
    lengths = [[pair_length(x) for x in g] for g in groups]
    unpacked = pad_share(sum(map(sum, lengths)), sum(len(n) * padded_width(n, block_size) for n in lengths))
    if not pack:
        return [collate_pairs(g, tok, block_size) for g in groups], {"pad_share": unpacked}
    packer = RowPacker(block_size)
    for x in instances:
        packer.add(x)
    rows = packer.rows
    batches = [collate_packed(rows[i:i + batch_size], tok, block_size) for i in range(0, len(rows), batch_size)]
    masks = [b["attention_mask"] for b in batches]
    packed = pad_share(sum(int(m.sum()) for m in masks), sum(m.size for m in masks))
    return batches, {"pad_share": packed, "unpacked_pad_share": unpacked}


def fixed_pairs(
    split: TokenSplit, tok: TextTokenizer, block_size: int, batch_size: int, num_batches: int,
    short_seq_prob: float, seed: int, pack: bool = False,
) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """The validation batches, with their padding figures (see :func:`pair_batches`).

    Built once, from as many shards as they need, so every evaluation scores the
    same pairs, packed or not.
    """
    rng, instances = random.Random(seed), []
    for shard in split.shards:
        instances += create_pair_instances(shard.documents(), block_size, short_seq_prob, rng)
        if len(instances) >= batch_size * num_batches:
            break
    if not instances:
        raise DataError("the validation split yields no segment pair; raise --val_fraction or use a larger corpus")
    return pair_batches(instances[:batch_size * num_batches], tok, block_size, batch_size, pack)


# ----------------------------------------------------------------------------- both kinds
def make_samplers(
    kind: str, data: PreparedData, block_size: int, batch_size: int, eval_iters: int, short_seq_prob: float,
    seed: int, rank: int = 0, world_size: int = 1, pack: bool = False,
) -> tuple[WindowSampler | PairSampler, list[dict[str, np.ndarray]], dict[str, float]]:
    """The training sampler of model ``kind``, its ``eval_iters`` fixed validation batches and their padding figures.

    The validation batches are drawn from the validation split with ``seed + 1``,
    apart from the training stream, and every rank holds all of them. GPT windows
    have no padding, and no figures.
    """
    if kind == "gpt":
        sampler = WindowSampler(data.train, block_size, batch_size, seed, rank, world_size)
        return sampler, fixed_windows(data.val, block_size, batch_size, eval_iters, seed + 1), {}
    tok = data.tokenizer
    sampler = PairSampler(data.train, tok, block_size, batch_size, short_seq_prob, seed, rank, world_size, pack)
    return sampler, *fixed_pairs(data.val, tok, block_size, batch_size, eval_iters, short_seq_prob, seed + 1, pack)
