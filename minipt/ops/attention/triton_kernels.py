"""attention's Triton kernels: the forward, the backward's delta, dK/dV and dQ passes,
and the helpers they inline. The algorithm, its memory traffic and its precision are
described in the package's header (``__init__.py``); ``triton.py`` holds their launch
table, launchers and autograd."""

from __future__ import annotations

from minipt.ops._triton import jit, tl


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
    rows, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax over the key blocks in [lo, hi); EDGE blocks cross the diagonal, a window edge or the end."""
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
        s = _hide_unseen_keys(
            s, float("-inf"), rows, keys, start_n, mask_row, stride_mt, DocSpan_ptr, b, doc_start, shared_lo,
            shared_hi, T, window_left, window_right, BLOCK_N, EDGE, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW,
        )
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
def _in_window(query, key, window_left, window_right):
    # i - left <= j <= i + right; the launchers pass T for an unbounded side, which every pair meets.
    return (query - key <= window_left) & (key - query <= window_right)


@jit
def _hide_unseen_keys(
    x, fill, rows, keys, start_n, mask_row, stride_mt, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, T,
    window_left, window_right, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """``x`` (BLOCK_M, BLOCK_N), scores or probabilities of ``rows`` against ``keys``, with ``fill`` where a
    row cannot see a key: padding, another document, and in EDGE blocks the end, the diagonal and the window."""
    if HAS_MASK:
        real = tl.load(mask_row + keys * stride_mt, mask=keys < T, other=0) != 0
        x = tl.where(real[None, :], x, fill)
    if HAS_DOCS:
        if _crosses_documents(start_n, BLOCK_N, shared_lo, shared_hi):
            key_start = _document_starts(DocSpan_ptr, b, keys, T)
            x = tl.where(key_start[None, :] == doc_start[:, None], x, fill)
    if EDGE:
        visible = keys[None, :] < T
        if IS_CAUSAL:
            visible = visible & (rows[:, None] >= keys[None, :])
        if HAS_WINDOW:
            visible = visible & _in_window(rows[:, None], keys[None, :], window_left, window_right)
        x = tl.where(visible, x, fill)
    return x


@jit
def _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, window_left, window_right,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key span [lo, hi) that a query block starting at start_m visits, and where its bulk starts and ends.

    Key blocks in [bulk_lo, bulk_hi) lie wholly inside [0, T), wholly left of the
    diagonal and wholly inside every row's window, so they need neither bound,
    causal nor window masks; [lo, bulk_lo) holds the blocks that cut the window's
    left edge (none without a window). A bulk block may pass the last real key or
    the end of the last document; the per-key mask and the document compare hide
    what lies beyond. Each bound is a multiple of BLOCK_N or equal to hi, so the
    three loops visit disjoint blocks. attention_tiles mirrors these bounds.
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
    if HAS_WINDOW:
        # The first row's window starts the span, the last row's ends it. Clamped at 0
        # before the division, which rounds toward zero.
        lo = tl.maximum(lo, tl.maximum(start_m - window_left, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(hi, start_m + BLOCK_M + window_right)
    bulk_hi = T // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        bulk_hi = tl.minimum(bulk_hi, start_m // BLOCK_N * BLOCK_N)
    if HAS_WINDOW:
        bulk_hi = tl.minimum(bulk_hi, (start_m + window_right + 1) // BLOCK_N * BLOCK_N)
    bulk_hi = tl.maximum(tl.minimum(bulk_hi, hi), lo)
    bulk_lo = lo
    if HAS_WINDOW:
        # Every key of a bulk block is at or after the last row's left edge.
        first_whole = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 - window_left, 0), BLOCK_N) * BLOCK_N
        bulk_lo = tl.minimum(tl.maximum(first_whole, lo), bulk_hi)
    return lo, bulk_lo, bulk_hi, hi

@jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, LSE_ptr, Mask_ptr, KeyRange_ptr, DocSpan_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    stride_mb, stride_mt, H, T, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
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
    lo, bulk_lo, bulk_hi, hi = _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, window_left,
                                                window_right, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_MASK, HAS_DOCS,
                                                HAS_WINDOW)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows, DocSpan_ptr, b,
            doc_start, shared_lo, shared_hi, lo, bulk_lo, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_N,
            True, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
        )
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_lo, bulk_hi, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_N, False,
        IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
    )
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_N, True,
        IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
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
    keys, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
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
        if EDGE and HAS_WINDOW:
            p_t = tl.where(_in_window(rows[None, :], keys[:, None], window_left, window_right), p_t, 0.0)
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
    stride_mb, stride_mt, H, T, qk_scale, scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
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

    # Query blocks [lo, bulk_lo) cross the diagonal or the window's right edge, [bulk_lo,
    # bulk_hi) see every key of this block, [bulk_hi, hi) cross the window's left edge or
    # the end. Each bound is a multiple of BLOCK_M or equal to hi. attention_tiles mirrors these bounds.
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
    if HAS_WINDOW:
        # Key j is seen from the queries [j - right, j + left]: the first key's start the
        # span, the last key's end it. Clamped at 0 before dividing, which rounds toward zero.
        lo = tl.maximum(lo, tl.maximum(start_n - window_right, 0) // BLOCK_M * BLOCK_M)
        hi = tl.minimum(hi, start_n + BLOCK_N + window_left)
        first_whole = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - window_right, 0), BLOCK_M) * BLOCK_M
        bulk_lo = tl.minimum(tl.maximum(tl.maximum(bulk_lo, first_whole), lo), hi)
        bulk_hi = tl.minimum(bulk_hi, (start_n + window_left + 1) // BLOCK_M * BLOCK_M)
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
        shared_lo, shared_hi, lo, bulk_lo, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_M, True,
        IS_CAUSAL, HAS_DOCS, HAS_WINDOW, UPCAST,
    )
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt, keys, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_lo, bulk_hi, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_M, False,
        IS_CAUSAL, HAS_DOCS, HAS_WINDOW, UPCAST,
    )
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, Q_base, dO_base, lse_row, delta_row, stride_qt, stride_gt, keys, DocSpan_ptr, b, doc_start,
        shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, window_left, window_right, HEAD_DIM, BLOCK_M, True,
        IS_CAUSAL, HAS_DOCS, HAS_WINDOW, UPCAST,
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
    rows, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, hi, T, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
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
        p = _hide_unseen_keys(
            p, 0.0, rows, keys, start_n, mask_row, stride_mt, DocSpan_ptr, b, doc_start, shared_lo, shared_hi, T,
            window_left, window_right, BLOCK_N, EDGE, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW,
        )
        dp = _mma(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, UPCAST)
    return dq


@jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, dQ_ptr, LSE_ptr, Delta_ptr, Mask_ptr, KeyRange_ptr, DocSpan_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dqb, stride_dqh, stride_dqt, stride_mb, stride_mt, H, T, qk_scale, scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
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
    lo, bulk_lo, bulk_hi, hi = _key_block_range(KeyRange_ptr, b, start_m, T, doc_start, doc_end, window_left,
                                                window_right, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_MASK, HAS_DOCS,
                                                HAS_WINDOW)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_WINDOW:
        dq = _dq_key_blocks(
            dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows,
            DocSpan_ptr, b, doc_start, shared_lo, shared_hi, lo, bulk_lo, T, qk_scale, window_left, window_right,
            HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
        )
    dq = _dq_key_blocks(
        dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows,
        DocSpan_ptr, b, doc_start, shared_lo, shared_hi, bulk_lo, bulk_hi, T, qk_scale, window_left, window_right,
        HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
    )
    dq = _dq_key_blocks(
        dq, q, do, lse, delta, K_base, V_base, mask_row, stride_kt, stride_vt, stride_mt, rows,
        DocSpan_ptr, b, doc_start, shared_lo, shared_hi, bulk_hi, hi, T, qk_scale, window_left, window_right,
        HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_MASK, HAS_DOCS, HAS_WINDOW, UPCAST,
    )
    dq_ptrs = (dQ_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqt
               + offs_m[:, None] * stride_dqt + offs_d[None, :])
    tl.store(dq_ptrs, (dq * scale).to(dQ_ptr.dtype.element_ty), mask=rows[:, None] < T)
