"""attention's Triton backend, in reading order: the kernels, their launch table, the
launchers and the autograd. The algorithm, its memory traffic and its precision are
described in the package's header (``__init__.py``)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from minipt.ops._backend import triton_interpreting
from minipt.ops._triton import jit, tl, triton, triton_op
from minipt.ops.attention._common import OP

HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per compute capability, kernel, head
# dim class (up to 64, or 128) and bytes per element. The tiles follow the Triton
# tutorial's and FlashAttention-2's: 128-row query blocks on tensor cores for the
# forward and the dQ pass; the dK/dV pass holds a wide key block and walks thin
# query blocks (the mirror image). Where the tutorial's 4 warps run out of
# registers, 8 warps share the same tile. fp32 inputs run exact fp32 dots
# (input_precision="ieee"), which live in registers, hence the small tiles.
#
# Checked by tests/test_compile_gate.py, which compiles the kernels without a GPU
# (fp16/bf16 exhaustively: head dims 16-128, causal or not, key mask or not; fp32
# and short sequences sampled, fp32 compiled exhaustively once for sm_80 and
# sm_90 when the table was chosen) and passes with Triton 3.6 and 3.9: no spilled
# register on sm_80 and sm_90, shared memory within 163 KB (sm_80) and 227 KB
# (sm_90) per block, tensor-core instructions for fp16/bf16; the 16-bit variants
# of the 8.6 and 8.9 entries (head dims 64 and 128) also compile spill-free within
# their 99 KB. A capability between entries takes the nearest lower one. A fixed
# table rather than an autotuner: each config is one compile, where tuning would
# compile and time every candidate for every shape class.
_FP32_CONFIGS = {
    ("fwd", 64, 4): (32, 32, 8, 2),
    ("fwd", 128, 4): (32, 16, 8, 2),
    ("dkdv", 64, 4): (32, 32, 8, 2),
    ("dkdv", 128, 4): (16, 32, 8, 2),
    ("dq", 64, 4): (32, 32, 8, 2),
    ("dq", 128, 4): (32, 16, 8, 2),
}
_AMPERE_CONFIGS = {
    ("fwd", 64, 2): (128, 32, 8, 3),
    ("fwd", 128, 2): (128, 32, 8, 3),
    ("dkdv", 64, 2): (16, 128, 8, 3),
    ("dkdv", 128, 2): (32, 64, 8, 3),
    ("dq", 64, 2): (128, 32, 8, 3),
    ("dq", 128, 2): (128, 32, 8, 3),
    **_FP32_CONFIGS,
    # With 8 warps ptxas holds some fp32 kernels to 80 registers and spills on
    # sm_8x; 4 warps do not spill there (but spill 256-448 B on sm_90).
    ("fwd", 64, 4): (32, 32, 4, 2),
    ("dkdv", 64, 4): (16, 32, 4, 2),
    ("dkdv", 128, 4): (16, 32, 4, 2),
}
# 8.6 and 8.9 have about 100 KB per SM: two stages bring the D = 128 forward from
# 64 to 48 KB, two blocks per SM. Elsewhere two stages gained no second block, and
# once made ptxas spill (the D = 64 forward, Triton 3.9).
_SMALL_SHARED_CONFIGS = {**_AMPERE_CONFIGS, ("fwd", 128, 2): (128, 32, 8, 2)}
_CONFIGS = {
    (8, 0): _AMPERE_CONFIGS,
    (8, 6): _SMALL_SHARED_CONFIGS,
    (8, 9): _SMALL_SHARED_CONFIGS,
    (9, 0): {
        ("fwd", 64, 2): (128, 64, 8, 3),
        ("fwd", 128, 2): (128, 64, 8, 3),
        ("dkdv", 64, 2): (64, 128, 8, 3),
        ("dkdv", 128, 2): (32, 128, 8, 3),
        ("dq", 64, 2): (128, 32, 4, 4),
        ("dq", 128, 2): (128, 32, 8, 3),
        **_FP32_CONFIGS,
        ("dq", 64, 4): (32, 32, 4, 2),  # 8 warps: 80 registers and a spill (Triton 3.6)
    },
}
# Packed documents keep each query row's document start live through the dQ loop:
# on sm_80 the D = 128 dQ kernel then needed more than 255 registers and spilled
# 16-48 B (Triton 3.9); 64-row query blocks on 4 warps use 230-248 and spill none.
# Capabilities below 9.0 take these entries when document_ids are given.
_AMPERE_DOCUMENT_CONFIGS = {("dq", 128, 2): (64, 32, 4, 3)}
# Sequences of at most 64 tokens fill a 128-row query block only half: 64 rows.
_SHORT_T = 64
_SHORT_CONFIGS = {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3)}
# The interpreter runs small unequal blocks, so that test sizes cross diagonal and tail blocks.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}


def _table_capability(capability: tuple[int, int]) -> tuple[int, int]:
    """The table's entry for ``capability``: itself, else the nearest lower one (the lowest below 8.0)."""
    lower = [c for c in _CONFIGS if c <= capability]
    return max(lower) if lower else min(_CONFIGS)


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


def attention_triton(q, k, v, attention_mask, doc_span, is_causal: bool, scale: float):
    """backend="triton" on checked inputs; doc_span is ``document_spans`` of the ids, or None."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{OP}: backend='triton' supports float16, bfloat16 and float32 inputs, got {str(q.dtype).replace('torch.', '')}"
        )
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"{OP}: backend='triton' supports head dims {HEAD_DIMS}, got head dim D = {D}")
    out, _, _ = _attention_forward(q, k, v, attention_mask, doc_span, is_causal, scale)
    return out
