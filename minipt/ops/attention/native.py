"""The native backend of attention: the wrapper of the C++ kernels in kernels/attention.cpp
(CPU tensors) and the CUDA kernels in kernels/attention.cu (CUDA tensors).

Both take the same arguments, so this wrapper dispatches on the device alone. The
CUDA kernels are SIMT code for head dims 64 and 128; the C++ kernels take any head
dim, with OpenMP over (batch, head, query block) in the forward and over (batch,
head) in the backward. Both compute in float32 for float32, float16 and bfloat16
inputs; float64 raises BackendUnavailableError. They write the output as dense
(B, T, H, D), returned as the same (B, H, T, D) view as the Triton output's; the
backward reads the incoming gradient in that layout too. The C++ kernels read q,
k and v with any strides along B, H and T (one set for the three), so the heads a
model splits from one (B, T, 3·H·D) projection are read in place, and write dq,
dk and dv as (B, T, H, D) too, so that their heads merge back without a
transpose; the CUDA kernels read and write dense (B, H, T, D). Each kernel is a
``torch.library`` custom op with a fake implementation, so ``torch.compile``
keeps it whole.
"""

from __future__ import annotations

from typing import Optional

import torch

from minipt.ops._backend import BackendUnavailableError
from minipt.ops._native import check_contiguous, check_device, float_code, run_kernel
from minipt.ops.attention._common import OP

CUDA_HEAD_DIMS = (64, 128)


def _bthd_dense(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view of dense (B, T, H, D) memory: ``x`` itself when it is one, else a copy."""
    return x if x.transpose(1, 2).is_contiguous() else x.transpose(1, 2).contiguous().transpose(1, 2)


def _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale, window_left,
                           window_right) -> dict:
    """The kernels' arguments, after every check: the custom ops below may be called directly."""
    named = [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)]
    named += [(name, x) for name, x in (("key_mask", key_mask), ("doc_span", doc_span)) if x is not None]
    check_device(OP, *named)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"{OP}: q, k, v and out must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(out.shape)}")
    B, H, T, D = q.shape
    if q.device.type == "cuda" and D not in CUDA_HEAD_DIMS:
        raise BackendUnavailableError(
            f"{OP}: backend='native' supports head dims {CUDA_HEAD_DIMS} on CUDA (any on the CPU), got {D}"
        )
    if q.device.type == "cuda":
        check_contiguous(OP, ("q", q), ("k", k), ("v", v))
    elif not _shared_row_strides(q, k, v):
        raise ValueError(f"{OP}: q, k and v must share strides with a contiguous last dimension, got "
                         f"{q.stride()}, {k.stride()}, {v.stride()}")
    check_contiguous(OP, *[(name, x) for name, x in named if name not in ("q", "k", "v", "out")])
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
        window_left=window_left, window_right=window_right, stride_b=q.stride(0), stride_h=q.stride(1),
        stride_t=q.stride(2),
    )


def _shared_row_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the C++ kernels can read q, k and v in place: one set of strides, D contiguous.
    A size-1 dimension's stride is never used, so it need not agree."""
    if q.shape[-1] > 1 and any(x.stride(-1) != 1 for x in (q, k, v)):
        return False
    return all(q.shape[i] == 1 or k.stride(i) == v.stride(i) == q.stride(i) for i in range(3))


def _bthd_empty(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view of new dense (B, T, H, D) memory."""
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


def _native_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    return _bthd_empty(q), q.new_empty((B, H, T), dtype=torch.float32)


def _native_grads(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk and dv in the layout the device's kernels write: (B, T, H, D) memory on the CPU."""
    if q.device.type == "cuda":
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    return tuple(_bthd_empty(q) for _ in range(3))


@torch.library.custom_op("minipt::native_attention_fwd", mutates_args=())
def native_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
    doc_span: Optional[torch.Tensor], is_causal: bool, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out, a (B, H, T, D) view of (B, T, H, D) memory, and the base-2 log-sum-exp of each
    row's scaled scores (B, H, T), float32. key_mask is (B, T) uint8 with 1 for a real token, or None;
    doc_span the (B, 2, T) int32 ``document_spans`` of packed rows, or None; query i sees keys
    i - window_left <= j <= i + window_right, -1 leaving a side unbounded."""
    out, lse = _native_outputs(q)
    args = _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale, window_left, window_right)
    run_kernel("attention_forward", q.device, **args)
    return out, lse


@native_attention_forward.register_fake
def _(q, k, v, key_mask, doc_span, is_causal, scale, window_left, window_right):
    return _native_outputs(q)


@torch.library.custom_op("minipt::native_attention_bwd", mutates_args=())
def native_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: Optional[torch.Tensor], doc_span: Optional[torch.Tensor], is_causal: bool, scale: float,
    window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from grad_out, laid out as out is, deterministically (no atomics)."""
    args = _native_attention_args(q, k, v, key_mask, doc_span, out, lse, is_causal, scale, window_left, window_right)
    check_device(OP, ("q", q), ("grad_out", grad_out))
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype:
        raise ValueError(f"{OP}: grad_out must match q's shape and dtype, got {grad_out.dtype} {tuple(grad_out.shape)}")
    check_contiguous(OP, ("grad_out.transpose(1, 2)", grad_out.transpose(1, 2)))
    grad_q, grad_k, grad_v = _native_grads(q)
    delta = torch.empty_like(lse)
    run_kernel("attention_backward", q.device, grad_out=grad_out.data_ptr(), delta=delta.data_ptr(),
               grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr(), **args)
    return grad_q, grad_k, grad_v


@native_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, doc_span, is_causal, scale, window_left, window_right):
    return _native_grads(q)


def _native_setup_context(ctx, inputs, output):
    q, k, v, key_mask, doc_span, ctx.is_causal, ctx.scale, ctx.window_left, ctx.window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, doc_span, out, lse)


def _native_backward(ctx, grad_out, _grad_lse):
    q, k, v, key_mask, doc_span, out, lse = ctx.saved_tensors
    grads = native_attention_backward(
        _bthd_dense(grad_out), q, k, v, out, lse, key_mask, doc_span, ctx.is_causal, ctx.scale, ctx.window_left,
        ctx.window_right,
    )
    return (*grads, None, None, None, None, None, None)


native_attention_forward.register_autograd(_native_backward, setup_context=_native_setup_context)


def attention_native(q, k, v, attention_mask, doc_span, is_causal: bool, scale: float, window_left: int,
                     window_right: int):
    """backend="native" on checked inputs; doc_span is ``document_spans`` of the ids, or None, and the
    window is ``window_bounds``' (-1 for an unbounded side)."""
    # Device, head dim and dtype are checked once, by the custom op; the window by the bindings.
    key_mask = None if attention_mask is None else attention_mask.ne(0).to(torch.uint8).contiguous()
    if q.device.type == "cuda" or not _shared_row_strides(q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, _ = native_attention_forward(q, k, v, key_mask, doc_span, is_causal, scale, window_left, window_right)
    return out
