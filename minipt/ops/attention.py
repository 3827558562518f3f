"""Masked softmax attention: bidirectional with key padding (BERT) or causal (GPT).

    out = softmax(scale · Q Kᵀ + mask) V,   Q, K, V: (B, H, T, D)

The mask combines key padding (``attention_mask[b, j] == 0`` hides key j from
every query of sequence b), when ``is_causal`` hides keys j > i from query i, and
with ``document_ids`` hides every key of another document.
A query row with no visible key returns zeros, and its gradients are zero.

Memory traffic of a materialising attention (SDPA's math path, taken whenever a
mask is given): read 3·BHTD, write and re-read the (B, H, T, T) scores and
probabilities, write BHTD. The (T, T) matrices dominate once T > D, which is why
the Triton kernel never materialises them.

The Triton kernels (FlashAttention-2, Dao 2023):

* Forward. One program owns BLOCK_M queries of one (b, h) and streams BLOCK_N keys
  at a time through an online softmax in base 2: scores are scaled by
  scale·log2(e) so ``exp2`` replaces ``exp``, and the running max m and sum l
  rescale the accumulator as the max grows. It writes the output and the row
  log-sum-exp lse = m + log2(l), the one statistic the backward needs.
  Traffic: read Q once, K and V once per query block (T/BLOCK_M times), write O.
* Backward. ``delta_i = rowsum(dO_i · O_i)`` first (read 2·BHTD). Then one pass
  per key block accumulates dK and dV over the query blocks, and one pass per
  query block accumulates dQ over the key blocks; both recompute
  P = exp2(s - lse) from Q, K and the saved lse. Each output block has one owner,
  so the backward needs no atomics and is deterministic. Traffic: the dK/dV pass
  reads Q and dO once per key block, the dQ pass K and V once per query block.
* Masks. Causal programs skip every block above the diagonal. With key padding a
  small pre-pass finds each sequence's first and last real key, and programs skip
  the key blocks outside that span, so the cost follows the real lengths of
  right- (or left-) padded batches; inside the span the per-key mask is read for
  each block, so masks with holes stay exact. Only the blocks that cross the
  diagonal or the end of the sequence pay for elementwise causal and bound masks.
* Packed documents. ``document_ids`` (B, T) never decrease along a row, so each
  position's document is one span [start, end), found by a binary search per
  position (``document_spans``), and a block of positions sees one contiguous
  span too: from its first position's document start to its last one's end. The
  forward and dQ programs skip the key blocks outside their query block's span,
  the dK/dV programs the query blocks outside their key block's span, so the cost
  follows Σ lenᵢ² (halved when causal) rather than T². Only tiles that reach past
  the span every row of the block shares compare positions with spans.
  ``attention_tiles`` counts the tiles visited, as the kernels' bounds do.
* A row that sees no key keeps m = -inf and l = 0: its output is 0 and its lse is
  +inf, which makes every recomputed probability of the row exp2(-inf) = 0, so
  its gradients vanish without a special case in the backward.
* Precision: fp16/bf16 tiles go through the tensor cores with fp32 accumulation,
  P and dS rounded to the input dtype before their matmuls (as FlashAttention
  does); fp32 inputs use exact fp32 dots.
* Launch configs (tile sizes, warps, pipeline stages) come from a table keyed on
  the GPU's compute capability, read at the first launch on each device.

Layout. Inputs may have any B, H and T strides (a (B, T, H, D) projection
transposed, or slices of a packed qkv); D must be the unit stride, or is made so
by one copy. The output of the Triton and native kernels is written as dense
(B, T, H, D) memory and returned as its (B, H, T, D) view, so a model's
``out.transpose(1, 2).reshape(B, T, H * D)`` merges the heads without copying
B·T·C elements per layer, and the gradient that comes back through that reshape
reaches the backward in the same layout, again without a copy (the Triton
kernels take any B, H and T strides of it). The torch
backend returns what SDPA returns and adds no copy for layout: SDPA's CUDA flash
and memory-efficient kernels also write (B, T, H, D) memory, its CPU kernels follow
q's layout, and where it returns dense (B, H, T, D) merging heads copies.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minipt.ops._attention_configs import (
    _AMPERE_DOCUMENT_CONFIGS, _CONFIGS, _INTERPRETER_CONFIGS, _SHORT_CONFIGS, _SHORT_T, _table_capability,
)
from minipt.ops._backend import BackendUnavailableError, resolve_backend, triton_interpreting
from minipt.ops._native import check_contiguous, check_device, float_code, run_kernel
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_tensor
from minipt.ops._triton import jit, tl, triton, triton_op

OP = "attention"
HEAD_DIMS = (16, 32, 64, 128)
NATIVE_HEAD_DIMS = (64, 128)  # the CUDA kernels of backend="native"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- reference
def visible_keys(T: int, attention_mask: torch.Tensor | None, is_causal: bool, device,
                 document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T) mask of the keys each query may see, or None when all are visible."""
    visible = None
    if attention_mask is not None:
        visible = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
        visible = same if visible is None else visible & same
    if is_causal:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
        visible = causal if visible is None else visible & causal
    return visible


def attention_ref(q, k, v, *, is_causal=False, attention_mask=None, document_ids=None, scale=None, upcast=True):
    """PyTorch reference on ``F.scaled_dot_product_attention``.

    With ``upcast`` it computes in at least float32 and casts back; without, it is
    what PyTorch itself does in the input dtype (the baseline of the low-precision
    tolerance rule, and ``backend="torch"``).
    """
    out_dtype = q.dtype
    if upcast:
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    T = q.shape[-2]
    # SDPA's is_causal path returns NaN for a scale <= 0 (torch 2.13, CPU: the scale
    # multiplies the -inf of masked scores); its explicit-mask path below does not.
    if attention_mask is None and document_ids is None and not (is_causal and scale is not None and scale <= 0):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        return out.to(out_dtype)
    visible = visible_keys(T, attention_mask, is_causal, q.device, document_ids)  # (B, 1, T, T)
    # A row with no visible key would be softmax(all -inf) = NaN, in the output and
    # in every gradient. Let such rows see every key, then zero their output: the
    # zeroed output sends no gradient back, so q, k and v get none from them.
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~any_visible, scale=scale)
    return (out * any_visible).to(out_dtype)  # (B, H, T, D)


# ----------------------------------------------------------------------------- schedule
def document_spans(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, T) int32: for each position, the first position of its document and the one past its last.

    Ids never decrease along a row, so a binary search finds both ends. The kernels
    read these spans instead of the ids: one compare per score, whatever the id dtype.
    """
    ids = document_ids.contiguous()
    start = torch.searchsorted(ids, ids, side="left", out_int32=True)
    end = torch.searchsorted(ids, ids, side="right", out_int32=True)
    return torch.stack((start, end), 1)


def attention_tiles(T, block_m, block_n, *, is_causal=False, attention_mask=None, document_ids=None) -> dict:
    """(query block, key block) tiles the Triton kernels visit per head, summed over the batch.

    "forward" counts the forward's tiles (the dQ pass visits the same), "dkdv" the
    dK/dV pass's (it walks query blocks of ``block_m`` rows per key block of
    ``block_n`` keys), "dense" the tiles of a (T, T) score matrix. The bounds
    mirror _key_block_range and _attention_bwd_dkdv_kernel line for line;
    tests/test_attention.py checks them against what the kernels read.
    """
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
    if attention_mask is not None:
        dead = (start_n + block_n <= first) | (start_n >= end)
        lo = torch.where(dead, T, lo)
        hi = torch.where(dead, T, hi)
    dkdv = cdiv(hi - lo, block_m).clamp(min=0).expand(B, -1).sum()
    dense = B * cdiv(T, block_m) * cdiv(T, block_n)
    return {"forward": int(forward), "dkdv": int(dkdv), "dense": int(dense)}


# ----------------------------------------------------------------------------- kernels
@jit
def _key_range_kernel(Mask_ptr, KeyRange_ptr, stride_mb, stride_mt, T, BLOCK: tl.constexpr):
    """KeyRange[b] = (first real key, last real key + 1); (T, 0) for a sequence with none."""
    b = tl.program_id(0)
    row = Mask_ptr + b.to(tl.int64) * stride_mb
    first = tl.full([BLOCK], T, tl.int32)
    end = tl.zeros([BLOCK], tl.int32)
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        real = tl.load(row + t * stride_mt, mask=t < T, other=0) != 0
        first = tl.minimum(first, tl.where(real, t, T))
        end = tl.maximum(end, tl.where(real, t + 1, 0))
    tl.store(KeyRange_ptr + 2 * b, tl.min(first, 0))
    tl.store(KeyRange_ptr + 2 * b + 1, tl.max(end, 0))


@jit
def _mma(a, b, UPCAST: tl.constexpr):
    # The interpreter's tl.dot multiplies the raw bit patterns of bf16 operands
    # (triton-lang/triton#11584). fp32 holds every bf16 value exactly, so upcasting
    # there gives the products a GPU's bf16 tensor cores give.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 dots default to tf32 on tensor cores (relative error ~3e-4); "ieee" keeps
    # fp32 inputs exact. 16-bit operands ignore the setting.
    return tl.dot(a, b, input_precision="ieee")


@jit
def _fwd_key_blocks(
    acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt,
    rows, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax over the key blocks in [lo, hi); EDGE blocks cross the diagonal or the end."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        # The block start goes to int64 before the stride multiply: T·stride can pass 2^31.
        k_ptrs = K_base + start_n.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_base + start_n.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
        if EDGE:
            k = tl.load(k_ptrs, mask=keys[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        # Scale before the max: a negative scale reverses which score is largest.
        s = _mma(q, tl.trans(k), UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if HAS_MASK:
            real = tl.load(mask_row + keys * stride_mt, mask=keys < T, other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        if HAS_DOCS:
            if _crosses_documents(start_n, BLOCK_N, shared_lo, shared_hi):
                key_start = _document_starts(DocSpan_ptr, b, keys, T)
                s = tl.where(key_start[None, :] == doc_start[:, None], s, float("-inf"))
        if EDGE:
            visible = keys[None, :] < T
            if IS_CAUSAL:
                visible = visible & (rows[:, None] >= keys[None, :])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet has m = -inf; shifting by 0 instead
        # keeps exp2(-inf - (-inf)) = NaN out and its p at 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EDGE:
            v = tl.load(v_ptrs, mask=keys[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _document_span(DocSpan_ptr, b, pos, T, HAS_DOCS: tl.constexpr):
    """[start, end) of the document of each position in ``pos``; (T, 0), an empty span, past T."""
    if HAS_DOCS:
        row = DocSpan_ptr + b.to(tl.int64) * 2 * T
        start = tl.load(row + pos, mask=pos < T, other=T)
        end = tl.load(row + T + pos, mask=pos < T, other=0)
    else:
        start = tl.where(pos < T, 0, T)
        end = tl.where(pos < T, T, 0)
    return start, end


@jit
def _document_starts(DocSpan_ptr, b, pos, T):
    """The start of each position's document, -1 past T; equal starts mean the same document."""
    return tl.load(DocSpan_ptr + b.to(tl.int64) * 2 * T + pos, mask=pos < T, other=-1)


@jit
def _crosses_documents(start, BLOCK: tl.constexpr, shared_lo, shared_hi):
    # A tile inside [shared_lo, shared_hi), the span every row's document covers, needs no id compare.
    return (start < shared_lo) | (start + BLOCK > shared_hi)


@jit
def _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key span [lo, hi) that a query block starting at start_m visits, and where its bulk ends.

    Key blocks in [lo, bulk_hi) lie wholly inside [0, T) and wholly left of the
    diagonal, so they need neither bound nor causal masks. A bulk block may pass
    the last real key or the end of the last document; the per-key mask and the
    document compare hide what lies beyond. attention_tiles mirrors these bounds.
    """
    lo = 0
    hi = T
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
    if HAS_MASK:
        lo = tl.load(KeyRange_ptr + 2 * b) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.load(KeyRange_ptr + 2 * b + 1))
    if HAS_DOCS:
        # Ids never decrease, so the block's keys run from its first row's document
        # start to its last row's document end.
        lo = tl.maximum(lo, tl.min(doc_start, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, tl.max(doc_end, 0))
    bulk_hi = T // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        bulk_hi = tl.minimum(bulk_hi, start_m // BLOCK_N * BLOCK_N)
    bulk_hi = tl.maximum(tl.minimum(bulk_hi, hi), lo)
    return lo, bulk_hi, hi



@jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, LSE_ptr, Mask_ptr, KeyRange_ptr, DocSpan_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    stride_mb, stride_mt, H, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    num_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    block_m = pid % num_m
    if IS_CAUSAL:
        block_m = num_m - 1 - block_m  # the longest rows start first, so the tail of the grid is short
    b = bh // H
    h = bh % H
    start_m = block_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m

    Q_base = Q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_base = K_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V_base = V_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    mask_row = Mask_ptr + b.to(tl.int64) * stride_mb
    q_ptrs = Q_base + start_m.to(tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows[:, None] < T, other=0.0)

    doc_start, doc_end = _document_span(DocSpan_ptr, b, rows, T, HAS_DOCS)
    shared_lo = tl.max(doc_start, 0)
    shared_hi = tl.min(doc_end, 0)
    lo, bulk_hi, hi = _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, BLOCK_M, BLOCK_N,
                                       IS_CAUSAL, HAS_MASK, HAS_DOCS)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, lo, bulk_hi, T, qk_scale, HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_MASK, HAS_DOCS, UPCAST,
    )
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_MASK, HAS_DOCS, UPCAST,
    )

    empty = l_i == 0.0  # no visible key: output 0, lse +inf (see the header)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    O_base = Out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = O_base + start_m.to(tl.int64) * stride_ot + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out_ptr.dtype.element_ty), mask=rows[:, None] < T)
    tl.store(LSE_ptr + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


@jit
def _attention_bwd_delta_kernel(
    Out_ptr, dOut_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = Σ_d dO_id · O_id, the row term of dS = P ∘ (dP - delta)."""
    num_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    o_ptrs = (Out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_ot
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    do_ptrs = (dOut_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + start_m.to(tl.int64) * stride_gt
               + offs_m[:, None] * stride_gt + offs_d[None, :])
    o = tl.load(o_ptrs, mask=rows[:, None] < T, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=rows[:, None] < T, other=0.0).to(tl.float32)
    tl.store(Delta_ptr + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@jit
def _dkdv_query_blocks(
    dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt,
    keys, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    """dV += Pᵀ dO and dK += dSᵀ Q over the query blocks in [lo, hi), in the transposed
    (key, query) orientation so that P never needs a transpose."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q_ptrs = Q_base + start_m.to(tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = dO_base + start_m.to(tl.int64) * stride_gt + offs_m[:, None] * stride_gt + offs_d[None, :]
        if EDGE:
            q = tl.load(q_ptrs, mask=rows[:, None] < T, other=0.0)
            # lse = +inf past the end makes those rows' probabilities 0.
            lse = tl.load(lse_row + rows, mask=rows < T, other=float("inf"))
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_row + rows)
        p_t = tl.exp2(_mma(k, tl.trans(q), UPCAST) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if EDGE and IS_CAUSAL:
            p_t = tl.where(rows[None, :] >= keys[:, None], p_t, 0.0)
        if HAS_DOCS:
            if _crosses_documents(start_m, BLOCK_M, shared_lo, shared_hi):
                query_start = _document_starts(DocSpan_ptr, b, rows, T)
                p_t = tl.where(query_start[None, :] == doc_start[:, None], p_t, 0.0)
        if EDGE:
            do = tl.load(do_ptrs, mask=rows[:, None] < T, other=0.0)
            delta = tl.load(delta_row + rows, mask=rows < T, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_row + rows)
        dv += _mma(p_t.to(do.dtype), do, UPCAST)
        dp_t = _mma(v, tl.trans(do), UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, UPCAST)
    return dk, dv


@jit
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, dK_ptr, dV_ptr, LSE_ptr, Delta_ptr, Mask_ptr, KeyRange_ptr, DocSpan_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    stride_mb, stride_mt, H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    num_n = tl.cdiv(T, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n
    start_n = (pid % num_n) * BLOCK_N  # causal: the first key blocks see the most queries, and start first
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = start_n + offs_n

    K_base = K_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V_base = V_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k_ptrs = K_base + start_n.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V_base + start_n.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=keys[:, None] < T, other=0.0)
    v = tl.load(v_ptrs, mask=keys[:, None] < T, other=0.0)
    Q_base = Q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    dO_base = dO_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    lse_row = LSE_ptr + bh.to(tl.int64) * T
    delta_row = Delta_ptr + bh.to(tl.int64) * T

    # Query blocks [lo, bulk_lo) cross the diagonal, [bulk_lo, bulk_hi) see every key
    # of this block, [bulk_hi, hi) is the partial last block. attention_tiles mirrors these bounds.
    lo = 0
    bulk_lo = 0
    bulk_hi = T // BLOCK_M * BLOCK_M
    hi = T
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        bulk_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, bulk_hi)
    doc_start, doc_end = _document_span(DocSpan_ptr, b, keys, T, HAS_DOCS)
    shared_lo = tl.max(doc_start, 0)
    shared_hi = tl.min(doc_end, 0)
    if HAS_DOCS:
        # Same-document is symmetric: the queries that see these keys are the keys'
        # own documents. A bound equal to hi may be unaligned; the loop past it is empty.
        hi = tl.max(doc_end, 0)
        lo = tl.maximum(lo, tl.min(doc_start, 0) // BLOCK_M * BLOCK_M)
        bulk_lo = tl.minimum(tl.maximum(bulk_lo, lo), hi)
        bulk_hi = tl.maximum(tl.minimum(bulk_hi, hi), bulk_lo)
    if HAS_MASK:
        # A block with no real key owes zero gradients and reads no query at all.
        dead = (start_n + BLOCK_N <= tl.load(KeyRange_ptr + 2 * b)) | (start_n >= tl.load(KeyRange_ptr + 2 * b + 1))
        lo = tl.where(dead, T, lo)
        bulk_lo = tl.where(dead, T, bulk_lo)
        bulk_hi = tl.where(dead, T, bulk_hi)
        hi = tl.where(dead, T, hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt, keys, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, lo, bulk_lo, T, qk_scale, HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_DOCS, UPCAST,
    )
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt, keys, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_lo, bulk_hi, T, qk_scale, HEAD_DIM, BLOCK_M, False, IS_CAUSAL, HAS_DOCS, UPCAST,
    )
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt, keys, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_DOCS, UPCAST,
    )
    dk *= scale
    if HAS_MASK:
        # A padded key's row of P was never masked inside the loops (it costs nothing
        # to leave it there); its gradients are zero by definition, whatever was summed.
        real = tl.load(Mask_ptr + b.to(tl.int64) * stride_mb + keys * stride_mt, mask=keys < T, other=0) != 0
        dk = tl.where(real[:, None], dk, 0.0)
        dv = tl.where(real[:, None], dv, 0.0)
    dk_ptrs = (dK_ptr + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + start_n.to(tl.int64) * stride_dkt
               + offs_n[:, None] * stride_dkt + offs_d[None, :])
    dv_ptrs = (dV_ptr + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + start_n.to(tl.int64) * stride_dvt
               + offs_n[:, None] * stride_dvt + offs_d[None, :])
    tl.store(dk_ptrs, dk.to(dK_ptr.dtype.element_ty), mask=keys[:, None] < T)
    tl.store(dv_ptrs, dv.to(dV_ptr.dtype.element_ty), mask=keys[:, None] < T)


@jit
def _dq_key_blocks(
    dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt,
    rows, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ += dS K over the key blocks in [lo, hi), with dS = P ∘ (dO Vᵀ - delta)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        k_ptrs = K_base + start_n.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_base + start_n.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
        if EDGE:
            k = tl.load(k_ptrs, mask=keys[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=keys[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.exp2(_mma(q, tl.trans(k), UPCAST) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            real = tl.load(mask_row + keys * stride_mt, mask=keys < T, other=0) != 0
            p = tl.where(real[None, :], p, 0.0)
        if HAS_DOCS:
            if _crosses_documents(start_n, BLOCK_N, shared_lo, shared_hi):
                key_start = _document_starts(DocSpan_ptr, b, keys, T)
                p = tl.where(key_start[None, :] == doc_start[:, None], p, 0.0)
        if EDGE:
            visible = keys[None, :] < T
            if IS_CAUSAL:
                visible = visible & (rows[:, None] >= keys[None, :])
            p = tl.where(visible, p, 0.0)
        dp = _mma(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, UPCAST)
    return dq


@jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, dQ_ptr, LSE_ptr, Delta_ptr, Mask_ptr, KeyRange_ptr, DocSpan_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dqb, stride_dqh, stride_dqt, stride_mb, stride_mt, H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr,
):
    num_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    block_m = pid % num_m
    if IS_CAUSAL:
        block_m = num_m - 1 - block_m
    b = bh // H
    h = bh % H
    start_m = block_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m

    q_ptrs = (Q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qt
              + offs_m[:, None] * stride_qt + offs_d[None, :])
    do_ptrs = (dO_ptr + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + start_m.to(tl.int64) * stride_gt
               + offs_m[:, None] * stride_gt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=rows[:, None] < T, other=0.0)
    do = tl.load(do_ptrs, mask=rows[:, None] < T, other=0.0)
    lse = tl.load(LSE_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(Delta_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    K_base = K_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V_base = V_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    mask_row = Mask_ptr + b.to(tl.int64) * stride_mb

    # The same key-block schedule as the forward.
    doc_start, doc_end = _document_span(DocSpan_ptr, b, rows, T, HAS_DOCS)
    shared_lo = tl.max(doc_start, 0)
    shared_hi = tl.min(doc_end, 0)
    lo, bulk_hi, hi = _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, BLOCK_M, BLOCK_N,
                                       IS_CAUSAL, HAS_MASK, HAS_DOCS)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_key_blocks(
        dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows,
        DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, bulk_hi, T, qk_scale, HEAD_DIM, BLOCK_N, False,
        IS_CAUSAL, HAS_MASK, HAS_DOCS, UPCAST,
    )
    dq = _dq_key_blocks(
        dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows,
        DocSpan_ptr, b, doc_start, shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_N, True,
        IS_CAUSAL, HAS_MASK, HAS_DOCS, UPCAST,
    )
    dq_ptrs = (dQ_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqt
               + offs_m[:, None] * stride_dqt + offs_d[None, :])
    tl.store(dq_ptrs, (dq * scale).to(dQ_ptr.dtype.element_ty), mask=rows[:, None] < T)


# ----------------------------------------------------------------------------- launch configs
# The table, and why each entry is what it is, live in _attention_configs.py.
@functools.cache
def _device_capability(device_index: int | None) -> tuple[int, int]:
    # Read at the first launch on each device, never at import: importing minipt must not touch a GPU.
    return torch.cuda.get_device_capability(device_index)


def _launch_config(kind: str, q: torch.Tensor, documents: bool = False) -> dict:
    """The config of kernel ``kind`` ("fwd", "dkdv" or "dq") for q's shape, dtype, GPU and packing."""
    _, _, T, head_dim = q.shape
    if triton_interpreting():
        config = _INTERPRETER_CONFIGS[kind]
    else:
        arch = _table_capability(_device_capability(q.device.index))
        if T <= _SHORT_T and q.dtype.itemsize == 2 and kind in _SHORT_CONFIGS:
            config = _SHORT_CONFIGS[kind]
        else:
            key = (kind, 64 if head_dim <= 64 else 128, q.dtype.itemsize)
            config = _CONFIGS[arch][key]
            if documents and arch < (9, 0):
                config = _AMPERE_DOCUMENT_CONFIGS.get(key, config)
    block_m, block_n, num_warps, num_stages = config
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def _upcast(q: torch.Tensor) -> bool:
    return triton_interpreting() and q.dtype == torch.bfloat16


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


# ----------------------------------------------------------------------------- launchers
# torch.library.triton_op makes each launcher an operator that torch.compile keeps
# whole (no graph break) and sees into; wrap_triton makes the launches traceable.
def _last_dim_unit(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any B, H and T strides but read D with stride 1; anything
    # else (an expanded gradient, a transposed D) is copied once here.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_view(attention_mask: torch.Tensor) -> torch.Tensor:
    # A bool tensor is one byte per element; read it as uint8 rather than copy it.
    return attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask


@triton_op("minipt::triton_attention_fwd", mutates_args=())
def _attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], doc_span: Optional[Tensor], is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns the output, the base-2 row log-sum-exp (B, H, T) and the (B, 2) real-key spans."""
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    B, H, T, D = q.shape
    # (B, T, H, D) memory returned as a (B, H, T, D) view: merging heads is then free.
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    has_mask = attention_mask is not None
    if has_mask:
        mask = _mask_view(attention_mask)
        key_range = torch.empty((B, 2), dtype=torch.int32, device=q.device)
        torch.library.wrap_triton(_key_range_kernel)[(B,)](mask, key_range, mask.stride(0), mask.stride(1), T, 1024)
        mask_strides = mask.stride()
    else:
        # Never read: the kernels compile the mask code out when HAS_MASK is False.
        mask, key_range, mask_strides = q, torch.empty((0,), dtype=torch.int32, device=q.device), (0, 0)
    config = _launch_config("fwd", q)
    torch.library.wrap_triton(_attention_fwd_kernel)[(triton.cdiv(T, config["BLOCK_M"]) * B * H,)](
        q, k, v, out, lse, mask, key_range, key_range if doc_span is None else doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *mask_strides,
        H, T, scale * math.log2(math.e),
        HEAD_DIM=D, IS_CAUSAL=is_causal, HAS_MASK=has_mask, HAS_DOCS=doc_span is not None, UPCAST=_upcast(q), **config,
    )
    return out, lse, key_range


@triton_op("minipt::triton_attention_bwd", mutates_args=())
def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attention_mask: Optional[Tensor], key_range: Tensor, doc_span: Optional[Tensor], is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _last_dim_unit(out)
    grad_out = _last_dim_unit(grad_out)
    B, H, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # 4096 elements of each tensor per program: 64 rows of fp32 at D = 128 spilled on sm_90.
    block = 32 if triton_interpreting() else 4096 // D
    torch.library.wrap_triton(_attention_bwd_delta_kernel)[(triton.cdiv(T, block) * B * H,)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), H, T, D, block,
    )
    has_mask = attention_mask is not None
    mask = _mask_view(attention_mask) if has_mask else q
    mask_strides = mask.stride() if has_mask else (0, 0)
    flags = {"HEAD_DIM": D, "IS_CAUSAL": is_causal, "HAS_MASK": has_mask, "HAS_DOCS": doc_span is not None,
             "UPCAST": _upcast(q)}
    doc_span = key_range if doc_span is None else doc_span
    qk_scale = scale * math.log2(math.e)
    config = _launch_config("dkdv", q)
    torch.library.wrap_triton(_attention_bwd_dkdv_kernel)[(triton.cdiv(T, config["BLOCK_N"]) * B * H,)](
        q, k, v, grad_out, dk, dv, lse, delta, mask, key_range, doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), *mask_strides,
        H, T, qk_scale, scale, **flags, **config,
    )
    config = _launch_config("dq", q, documents=flags["HAS_DOCS"])
    torch.library.wrap_triton(_attention_bwd_dq_kernel)[(triton.cdiv(T, config["BLOCK_M"]) * B * H,)](
        q, k, v, grad_out, dq, lse, delta, mask, key_range, doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), *mask_strides,
        H, T, qk_scale, scale, **flags, **config,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, doc_span, is_causal, scale = inputs
    out, lse, key_range = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, key_range, doc_span)
    ctx.is_causal = is_causal
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse, _grad_key_range):
    q, k, v, out, lse, attention_mask, key_range, doc_span = ctx.saved_tensors
    dq, dk, dv = _attention_backward(
        grad_out, q, k, v, out, lse, attention_mask, key_range, doc_span, ctx.is_causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, is_causal, attention_mask, document_ids, scale):
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{OP}: backend='triton' supports float16, bfloat16 and float32 inputs, got {str(q.dtype).replace('torch.', '')}"
        )
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"{OP}: backend='triton' supports head dims {HEAD_DIMS}, got head dim D = {D}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    doc_span = None if document_ids is None else document_spans(document_ids)
    out, _, _ = _attention_forward(q, k, v, attention_mask, doc_span, bool(is_causal), float(scale))
    return out


# ----------------------------------------------------------------------------- native
# backend="native": the CUDA kernels of kernels/attention.cu (SIMT, head dims 64 and
# 128; there is no CPU kernel). They read q, k and v as dense (B, H, T, D) and write
# the output as dense (B, T, H, D), returned as the same (B, H, T, D) view as the
# Triton output's; the backward reads the incoming gradient in that layout too.
def _bthd_dense(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view of dense (B, T, H, D) memory: ``x`` itself when it is one, else a copy."""
    return x if x.transpose(1, 2).is_contiguous() else x.transpose(1, 2).contiguous().transpose(1, 2)


def _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale) -> dict:
    """The kernels' arguments, after every check: the custom ops below may be called directly."""
    named = [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)]
    named += [(name, x) for name, x in (("key_mask", key_mask), ("doc_span", doc_span)) if x is not None]
    check_device(OP, *named)
    if q.device.type != "cuda":
        raise BackendUnavailableError(
            f"{OP}: backend='native' has CUDA kernels only (there is no C++ CPU attention); got tensors on "
            f"{q.device}. Use backend='torch' on the CPU."
        )
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"{OP}: q, k, v and out must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(out.shape)}")
    B, H, T, D = q.shape
    if D not in NATIVE_HEAD_DIMS:
        raise BackendUnavailableError(f"{OP}: backend='native' supports head dims {NATIVE_HEAD_DIMS}, got {D}")
    check_contiguous(OP, *[(name, x) for name, x in named if name != "out"])
    check_contiguous(OP, ("out.transpose(1, 2)", out.transpose(1, 2)))
    if not (k.dtype == v.dtype == out.dtype == q.dtype):
        raise TypeError(f"{OP}: q, k, v and out must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {out.dtype}")
    if lse.dtype != torch.float32 or lse.shape != (B, H, T):
        raise ValueError(f"{OP}: lse must be float32 of shape {(B, H, T)}, got {lse.dtype} {tuple(lse.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.uint8 or key_mask.shape != (B, T)):
        raise ValueError(f"{OP}: key_mask must be uint8 of shape {(B, T)}, got {key_mask.dtype} {tuple(key_mask.shape)}")
    if doc_span is not None and (doc_span.dtype != torch.int32 or doc_span.shape != (B, 2, T)):
        raise ValueError(f"{OP}: doc_span must be int32 of shape {(B, 2, T)} (document_spans of the ids), "
                         f"got {doc_span.dtype} {tuple(doc_span.shape)}")
    return dict(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        key_mask=0 if key_mask is None else key_mask.data_ptr(),
        doc_span=0 if doc_span is None else doc_span.data_ptr(), batch=B, heads=H, seq_len=T,
        head_dim=D, dtype=float_code(OP, "q, k and v", q), is_causal=is_causal, scale=scale,
    )


def _native_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("minipt::native_attention_fwd", mutates_args=())
def native_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
    doc_span: Optional[torch.Tensor], is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out, a (B, H, T, D) view of (B, T, H, D) memory, and the base-2 log-sum-exp of each
    row's scaled scores (B, H, T), float32. key_mask is (B, T) uint8 with 1 for a real token, or None;
    doc_span the (B, 2, T) int32 ``document_spans`` of packed rows, or None."""
    out, lse = _native_outputs(q)
    args = _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale)
    run_kernel("attention_forward", q.device, **args)
    return out, lse


@native_attention_forward.register_fake
def _(q, k, v, key_mask, doc_span, is_causal, scale):
    return _native_outputs(q)


@torch.library.custom_op("minipt::native_attention_bwd", mutates_args=())
def native_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: Optional[torch.Tensor], doc_span: Optional[torch.Tensor], is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from grad_out, laid out as out is, deterministically (no atomics)."""
    args = _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale)
    check_device(OP, ("q", q), ("grad_out", grad_out))
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype:
        raise ValueError(f"{OP}: grad_out must match q's shape and dtype, got {grad_out.dtype} {tuple(grad_out.shape)}")
    check_contiguous(OP, ("grad_out.transpose(1, 2)", grad_out.transpose(1, 2)))
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    run_kernel("attention_backward", q.device, grad_out=grad_out.data_ptr(), delta=delta.data_ptr(),
               grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr(), **args)
    return grad_q, grad_k, grad_v


@native_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, doc_span, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _native_setup_context(ctx, inputs, output):
    q, k, v, key_mask, doc_span, ctx.is_causal, ctx.scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, doc_span, out, lse)


def _native_backward(ctx, grad_out, _grad_lse):
    q, k, v, key_mask, doc_span, out, lse = ctx.saved_tensors
    grads = native_attention_backward(
        _bthd_dense(grad_out), q, k, v, out, lse, key_mask, doc_span, ctx.is_causal, ctx.scale
    )
    return (*grads, None, None, None, None)


native_attention_forward.register_autograd(_native_backward, setup_context=_native_setup_context)


def _attention_native(q, k, v, is_causal, attention_mask, document_ids, scale):
    # Device, head dim and dtype are checked once, by the custom op.
    key_mask = None if attention_mask is None else attention_mask.ne(0).to(torch.uint8).contiguous()
    doc_span = None if document_ids is None else document_spans(document_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = native_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), key_mask, doc_span, bool(is_causal), scale
    )
    return out


# ----------------------------------------------------------------------------- public op
def _check_document_ids(q, document_ids) -> None:
    B, _, T, _ = q.shape
    check_tensor(OP, "document_ids", document_ids)
    if document_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: document_ids must be int32 or int64, got {document_ids.dtype}")
    if tuple(document_ids.shape) != (B, T):
        raise ValueError(f"{OP}: document_ids must have shape (B, T) = ({B}, {T}), got {tuple(document_ids.shape)}")
    check_same(OP, ("q", q), ("document_ids", document_ids), dtype=False)
    message = f"{OP}: document_ids must be non-decreasing along each row (one document after another)"
    ordered = (document_ids[:, 1:] >= document_ids[:, :-1]).all()
    if document_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if not ordered:
            raise ValueError(message)
    else:
        # Checked on the device, in stream order: no host sync on the training step's path, and
        # no branch on a tensor to break a compiled graph (on a CPU it raises a RuntimeError).
        torch._assert_async(ordered, message)


def _check_inputs(q, k, v, attention_mask, document_ids, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, x, ndim=4, dtypes=FLOAT_DTYPES)
    check_same(OP, ("q", q), ("k", k), ("v", v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{OP}: q, k and v must share one shape (B, H, T, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, _, T, _ = q.shape
    if attention_mask is not None:
        check_tensor(OP, "attention_mask", attention_mask)
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                f"{OP}: attention_mask must be bool or integer 0/1 (1 = real token), got {attention_mask.dtype}; "
                "additive float masks are not accepted"
            )
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"{OP}: attention_mask must have shape (B, T) = ({B}, {T}), got {tuple(attention_mask.shape)}")
        check_same(OP, ("q", q), ("attention_mask", attention_mask), dtype=False)
    if document_ids is not None:
        _check_document_ids(q, document_ids)
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")


def attention(q, k, v, *, is_causal=False, attention_mask=None, document_ids=None, scale=None, backend="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; see the module docstring.

    ``document_ids`` (B, T), int32 or int64 and non-decreasing along each row, packs
    several documents into one row: a position sees only its own document's keys.
    Returns a (B, H, T, D) tensor; with backend="triton" or "native" it is a view of
    (B, T, H, D) memory, so ``out.transpose(1, 2)`` is contiguous.
    """
    _check_inputs(q, k, v, attention_mask, document_ids, scale)
    backend = resolve_backend(backend, q.device, OP)
    if backend == "torch":
        return attention_ref(q, k, v, is_causal=is_causal, attention_mask=attention_mask, document_ids=document_ids,
                             scale=scale, upcast=False)
    if backend == "triton":
        return _attention_triton(q, k, v, is_causal, attention_mask, document_ids, scale)
    return _attention_native(q, k, v, is_causal, attention_mask, document_ids, scale)
