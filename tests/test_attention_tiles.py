"""Which tiles attention's kernels visit: the Triton kernels read exactly the (query block, key block)
tiles that ``attention_tiles`` counts, and those counts follow the documents of packed rows and the
width of sliding windows rather than T².

The Triton tests poison what each tile would read and count the outputs the poison reaches, so a
tile read past the mirror's bounds (or one the mirror counts and the kernel skips) fails them; they
run in the interpreter on CPU tensors, or on the GPU. The helpers are test_attention.py's.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import sampled_sweep
from minipt.ops import attention
from minipt.ops.attention import triton as attention_triton
from minipt.ops.attention._common import document_spans, window_bounds
from minipt.ops.attention._tiles import attention_tiles
from test_attention import DEVICE, make_document_ids, make_mask, make_qkv


SCHEDULE_CASES = [(False, None, "random"), (True, None, "random"), (True, "right", "random"),
                  (False, "left", "aligned"), (True, None, "singles"), (False, None, "one")]


def forward_tiles_read(is_causal, mask, pattern, window_size=None, T=100, B0=2):
    """(tiles the Triton forward reads, attention_tiles' counts). NaN in V reaches a query block's
    output exactly when the kernel reads that key block (p = 0 times NaN is NaN), so poisoning one
    key block per batch row counts the visits."""
    block_m, block_n = attention_triton._INTERPRETER_CONFIGS["fwd"][:2]
    num_n = -(-T // block_n)
    ids = make_document_ids(pattern, B0, T, seed=3).repeat_interleave(num_n, 0)  # row b·num_n + n poisons block n
    key_mask = make_mask(mask, B0, T)
    key_mask = None if key_mask is None else key_mask.repeat_interleave(num_n, 0)
    q, k, v = make_qkv(B0 * num_n, 1, T, 16, torch.float32)
    for row in range(B0 * num_n):
        n = row % num_n
        v[row, :, n * block_n:(n + 1) * block_n] = float("nan")
    out = attention(q, k, v, is_causal=is_causal, attention_mask=key_mask, document_ids=ids, window_size=window_size,
                    backend="triton")
    pad = -T % block_m
    blocks = F.pad(out.isnan().any(-1)[:, 0], (0, pad)).view(B0 * num_n, -1, block_m).any(-1)
    want = attention_tiles(T, block_m, block_n, is_causal=is_causal, attention_mask=make_mask(mask, B0, T),
                           document_ids=make_document_ids(pattern, B0, T, seed=3), window_size=window_size)
    return int(blocks.sum()), want


def dkdv_tiles_read(is_causal, mask, pattern, window_size=None, T=100, B0=2):
    """The mirror image: NaN in dO reaches a key block's dK and dV exactly when the pass reads that query block."""
    block_m, block_n = attention_triton._INTERPRETER_CONFIGS["dkdv"][:2]
    num_m = -(-T // block_m)
    ids = make_document_ids(pattern, B0, T, seed=4)
    key_mask = make_mask(mask, B0, T)
    window = window_bounds(window_size, is_causal, T)
    q, k, v = make_qkv(B0, 1, T, 16, torch.float32)
    spans = document_spans(ids)
    out, lse, key_range = attention_triton._attention_forward(q, k, v, key_mask, spans, is_causal, 0.25, *window)
    grad_out = torch.randn(B0 * num_m, 1, T, 16, device=DEVICE)
    for row in range(B0 * num_m):
        m = row % num_m
        grad_out[row, :, m * block_m:(m + 1) * block_m] = float("nan")
    tile = lambda x: x.repeat_interleave(num_m, 0)  # row b·num_m + m poisons query block m
    _, dk, dv = attention_triton._attention_backward(
        grad_out, tile(q), tile(k), tile(v), tile(out), tile(lse), None if key_mask is None else tile(key_mask),
        tile(key_range), document_spans(tile(ids)), is_causal, 0.25, *window)
    pad = -T % block_n
    poisoned = (dk.isnan() | dv.isnan()).any(-1)[:, 0]
    blocks = F.pad(poisoned, (0, pad)).view(B0 * num_m, -1, block_n).any(-1)
    want = attention_tiles(T, block_m, block_n, is_causal=is_causal, attention_mask=key_mask, document_ids=ids,
                           window_size=window_size)
    return int(blocks.sum()), want


@pytest.mark.parametrize("is_causal, mask, pattern", sampled_sweep(SCHEDULE_CASES))
def test_tile_counts_are_the_tiles_the_forward_reads(is_causal, mask, pattern):
    read, want = forward_tiles_read(is_causal, mask, pattern)
    assert read == want["forward"]
    assert want["forward"] < want["dense"] or pattern == "one" and not is_causal and mask is None


@pytest.mark.parametrize("is_causal, mask, pattern", sampled_sweep(SCHEDULE_CASES))
def test_tile_counts_are_the_tiles_the_dkdv_pass_reads(is_causal, mask, pattern):
    read, want = dkdv_tiles_read(is_causal, mask, pattern)
    assert read == want["dkdv"]


def test_tile_counts_follow_document_lengths():
    """Equal documents of length L in a row of T: the dense count over T/L, to the block."""
    T, L = 1024, 128
    ids = (torch.arange(T) // L)[None]
    tiles = attention_tiles(T, 64, 32, document_ids=ids)
    assert tiles == {"forward": (T // 64) * (L // 32), "dkdv": (T // 32) * (L // 64), "dense": (T // 64) * (T // 32)}
    causal = attention_tiles(T, 64, 32, is_causal=True, document_ids=ids)
    assert causal["forward"] == (T // L) * sum(min(2 * (m + 1), L // 32) for m in range(L // 64))


WINDOW_SCHEDULE_CASES = [(c, m, p, w) for (c, m, p), w in zip(
    SCHEDULE_CASES, [(7, 5), (20, 0), (40, 3), (0, 0), (3, 31), (-1, 18)])] + [(False, "holes", "random", (33, 17))]


@pytest.mark.parametrize("is_causal, mask, pattern, window_size", sampled_sweep(WINDOW_SCHEDULE_CASES))
def test_tile_counts_are_the_tiles_the_windowed_forward_reads(is_causal, mask, pattern, window_size):
    read, want = forward_tiles_read(is_causal, mask, pattern, window_size)
    assert read == want["forward"]
    block_m, block_n = attention_triton._INTERPRETER_CONFIGS["fwd"][:2]
    unwindowed = attention_tiles(100, block_m, block_n, is_causal=is_causal, attention_mask=make_mask(mask, 2, 100),
                                 document_ids=make_document_ids(pattern, 2, 100, seed=3))
    assert want["forward"] <= unwindowed["forward"]


@pytest.mark.parametrize("is_causal, mask, pattern, window_size", sampled_sweep(WINDOW_SCHEDULE_CASES))
def test_tile_counts_are_the_tiles_the_windowed_dkdv_pass_reads(is_causal, mask, pattern, window_size):
    read, want = dkdv_tiles_read(is_causal, mask, pattern, window_size)
    assert read == want["dkdv"]


def test_tile_counts_follow_the_window():
    """A T = 8192 causal row with a 1024-key window: T·window tiles, not T²/2. On 64 × 64 tiles query block m
    reads key blocks m - 16 to m, 17 of them (the first cut by the window's edge), so the window reads 24.7%
    of the causal tiles (1024 / 8192 · 2 = 25% less the triangle's diagonal blocks)."""
    T, W = 8192, 1024
    causal = attention_tiles(T, 64, 64, is_causal=True)
    window = attention_tiles(T, 64, 64, is_causal=True, window_size=(W - 1, 0))
    n = T // 64
    assert causal["forward"] == causal["dkdv"] == n * (n + 1) // 2
    assert window["forward"] == window["dkdv"] == sum(min(m + 1, 17) for m in range(n))
    assert window["forward"] <= 0.25 * causal["forward"]
    # The bidirectional window of the same width, (512, 511), against the dense square.
    sym = attention_tiles(T, 64, 64, window_size=(W // 2, W // 2 - 1))
    assert sym["forward"] <= 0.14 * sym["dense"]
