"""Masked softmax attention: bidirectional with key padding (BERT) or causal (GPT).

    out = softmax(scale · Q Kᵀ + mask) V,   Q, K, V: (B, H, T, D)

The mask combines key padding (``attention_mask[b, j] == 0`` hides key j from
every query of sequence b), when ``is_causal`` hides keys j > i from query i,
with ``document_ids`` hides every key of another document, and with
``window_size=(left, right)`` (FlashAttention's convention) hides every key
outside i - left <= j <= i + right, -1 leaving a side unbounded.
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
  ``_tiles.attention_tiles`` counts the tiles visited, as the kernels' bounds do.
* Sliding windows. Query i sees keys [i - left, i + right], so a query block
  sees keys from its first row's left edge to its last row's right edge, and a
  key block is seen from the queries [j - right, j + left] of its first and last
  keys: the forward and dQ programs start and stop their key loop there, the
  dK/dV programs their query loop, so a row's cost follows T·window rather than
  T² (or T²/2). The blocks that cross a window edge pay for an elementwise
  compare, as those that cross the diagonal do; the others pay nothing. The
  public function first drops what a window cannot hide (``window_bounds``): a
  side of T - 1 or more, and the right side under ``is_causal``.
* A row that sees no key keeps m = -inf and l = 0: its output is 0 and its lse is
  +inf, which makes every recomputed probability of the row exp2(-inf) = 0, so
  its gradients vanish without a special case in the backward.
* Precision: fp16/bf16 tiles go through the tensor cores with fp32 accumulation,
  P and dS rounded to the input dtype before their matmuls (as FlashAttention
  does); fp32 inputs use exact fp32 dots.
* Launch configs (tile sizes, warps, pipeline stages) come from a table keyed on
  the GPU's compute capability, read at the first launch on each device.

The native kernels take the same arguments on both devices (the scale and the
window resolved, the document ids as spans), so ``backend="native"`` dispatches on the device alone:

* CUDA tensors: SIMT kernels for head dims 64 and 128 (kernels/attention.cu).
* CPU tensors: C++ kernels for any head dim (kernels/attention.cpp), the same
  plan on 64 × 64 tiles with float32 maths for every input dtype. The forward
  runs over OpenMP threads by (batch, head, query block); in the backward one
  thread owns a head's dQ, dK and dV, so each tile costs five GEMMs instead of a
  separate dQ pass's seven, and the gradients are the same bits for any thread
  count, at the price of parallelism of B·H. Tiles start where a document, the
  causal bound or the window starts, and tiles of padding are skipped, as above.
* Both save the base-2 lse for the backward; float64 raises BackendUnavailableError.

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

The folder. This file holds the reference, the argument checks and the public
function, which dispatches to a backend; ``triton_kernels.py`` the Triton
kernels, ``triton.py`` their launch table, launchers and autograd; ``native.py``
the wrapper of the native kernels, C++ and CUDA; ``_common.py`` what those share
(the op's name, ``document_spans``, ``window_bounds``); ``_tiles.py`` a Python
mirror of the kernels' tile bounds for tests and benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minipt.ops._backend import resolve_backend
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_tensor
from minipt.ops.attention._common import OP, document_spans, window_bounds
from minipt.ops.attention.native import attention_native
from minipt.ops.attention.triton import attention_triton


# ----------------------------------------------------------------------------- reference
def visible_keys(T: int, attention_mask: torch.Tensor | None, is_causal: bool, device,
                 document_ids: torch.Tensor | None = None, window_size=None) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T) mask of the keys each query may see, or None when all are visible."""
    visible = None
    if window_size is not None and tuple(window_size) != (-1, -1):
        left, right = window_size
        pos = torch.arange(T, device=device)
        offset = pos[None, :] - pos[:, None]  # j - i, (T, T)
        near = torch.ones(T, T, dtype=torch.bool, device=device)
        if left != -1:
            near &= offset >= -left
        if right != -1:
            near &= offset <= right
        visible = near[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        visible = real if visible is None else visible & real
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
        visible = same if visible is None else visible & same
    if is_causal:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
        visible = causal if visible is None else visible & causal
    return visible


def attention_ref(q, k, v, *, is_causal=False, attention_mask=None, document_ids=None, window_size=None, scale=None,
                  upcast=True):
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
    windowed = window_size is not None and tuple(window_size) != (-1, -1)
    if attention_mask is None and document_ids is None and not windowed and not (
            is_causal and scale is not None and scale <= 0):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        return out.to(out_dtype)
    visible = visible_keys(T, attention_mask, is_causal, q.device, document_ids, window_size)  # (B, 1, T, T)
    # A row with no visible key would be softmax(all -inf) = NaN, in the output and
    # in every gradient. Let such rows see every key, then zero their output: the
    # zeroed output sends no gradient back, so q, k and v get none from them.
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~any_visible, scale=scale)
    return (out * any_visible).to(out_dtype)  # (B, H, T, D)


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


def _check_window(window_size) -> None:
    if window_size is None:
        return
    pair = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    if not pair or any(isinstance(x, bool) or not isinstance(x, int) or x < -1 for x in window_size):
        raise ValueError(
            f"{OP}: window_size must be None or a pair (left, right) of ints, each >= 0 or -1 for an unbounded "
            f"side, got {window_size!r}"
        )


def _check_inputs(q, k, v, attention_mask, document_ids, window_size, scale) -> None:
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
    _check_window(window_size)
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")


def attention(q, k, v, *, is_causal=False, attention_mask=None, document_ids=None, window_size=None, scale=None,
              backend="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; see the module docstring.

    ``document_ids`` (B, T), int32 or int64 and non-decreasing along each row, packs
    several documents into one row: a position sees only its own document's keys.
    ``window_size=(left, right)``: query i sees keys i - left <= j <= i + right, -1
    leaving a side unbounded (a causal window of N keys is ``(N - 1, 0)``).
    Returns a (B, H, T, D) tensor; with backend="triton" or "native" it is a view of
    (B, T, H, D) memory, so ``out.transpose(1, 2)`` is contiguous.
    """
    _check_inputs(q, k, v, attention_mask, document_ids, window_size, scale)
    backend = resolve_backend(backend, q.device, OP)
    window = window_bounds(window_size, bool(is_causal), q.shape[-2])
    if backend == "torch":
        return attention_ref(q, k, v, is_causal=is_causal, attention_mask=attention_mask, document_ids=document_ids,
                             window_size=window, scale=scale, upcast=False)
    # Both kernel backends take the scale resolved, the document ids as spans and the window resolved.
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    doc_span = None if document_ids is None else document_spans(document_ids)
    run = attention_triton if backend == "triton" else attention_native
    return run(q, k, v, attention_mask, doc_span, bool(is_causal), scale, *window)
