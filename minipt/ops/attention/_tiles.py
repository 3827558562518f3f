"""A Python mirror of the Triton kernels' tile bounds, for tests and benchmarks: how many
(query block, key block) tiles a launch visits, on any machine, a CPU included."""

from __future__ import annotations

import torch

from minipt.ops.attention._common import document_spans, window_bounds


def attention_tiles(T, block_m, block_n, *, is_causal=False, attention_mask=None, document_ids=None,
                    window_size=None) -> dict:
    """(query block, key block) tiles the Triton kernels visit per head, summed over the batch.

    "forward" counts the forward's tiles (the dQ pass visits the same), "dkdv" the
    dK/dV pass's (it walks query blocks of ``block_m`` rows per key block of
    ``block_n`` keys), "dense" the tiles of a (T, T) score matrix. The bounds
    mirror _key_block_range and _attention_bwd_dkdv_kernel (triton_kernels.py) line
    for line, the window resolved as the public function resolves it; each loop
    splits its span at multiples of the block size (or at its end), so the tiles of
    a span [lo, hi) are cdiv(hi - lo, block). tests/test_attention.py and
    tests/test_attention_window.py check them against what the kernels read.
    """
    left, right = window_bounds(window_size, is_causal, T)
    left, right = (T if left == -1 else left), (T if right == -1 else right)  # as the launchers pass them
    given = attention_mask if attention_mask is not None else document_ids
    B, device = (1, "cpu") if given is None else (given.shape[0], given.device)
    span = None if document_ids is None else document_spans(document_ids).long()
    if attention_mask is not None:
        real = attention_mask.bool()
        pos = torch.arange(T, device=device)
        first = torch.where(real, pos, T).amin(1, keepdim=True)  # _key_range_kernel's (first, end)
        end = torch.where(real, pos + 1, 0).amax(1, keepdim=True)

    def cdiv(a, b):
        return -(-a // b)

    start_m = torch.arange(0, T, block_m, device=device)[None, :]  # forward: one row per query block
    lo = torch.zeros_like(start_m)
    hi = torch.full_like(start_m, T)
    if is_causal:
        hi = torch.clamp(start_m + block_m, max=T)
    if attention_mask is not None:
        lo = first // block_n * block_n
        hi = torch.minimum(hi, end)
    if span is not None:
        last = torch.clamp(start_m + block_m, max=T) - 1
        lo = torch.maximum(lo, span[:, 0, start_m[0]] // block_n * block_n)
        hi = torch.minimum(hi, span[:, 1, last[0]])
    lo = torch.maximum(lo, (start_m - left).clamp(min=0) // block_n * block_n)
    hi = torch.minimum(hi, start_m + block_m + right)
    forward = cdiv(hi - lo, block_n).clamp(min=0).expand(B, -1).sum()

    start_n = torch.arange(0, T, block_n, device=device)[None, :]  # dK/dV: one row per key block
    lo = torch.zeros_like(start_n)
    hi = torch.full_like(start_n, T)
    if is_causal:
        lo = start_n // block_m * block_m
    if span is not None:
        last = torch.clamp(start_n + block_n, max=T) - 1
        hi = span[:, 1, last[0]]
        lo = torch.maximum(lo, span[:, 0, start_n[0]] // block_m * block_m)
    lo = torch.maximum(lo, (start_n - right).clamp(min=0) // block_m * block_m)
    hi = torch.minimum(hi, start_n + block_n + left)
    if attention_mask is not None:
        dead = (start_n + block_n <= first) | (start_n >= end)
        lo = torch.where(dead, T, lo)
        hi = torch.where(dead, T, hi)
    dkdv = cdiv(hi - lo, block_m).clamp(min=0).expand(B, -1).sum()
    dense = B * cdiv(T, block_m) * cdiv(T, block_n)
    return {"forward": int(forward), "dkdv": int(dkdv), "dense": int(dense)}
