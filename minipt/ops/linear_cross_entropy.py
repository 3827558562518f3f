"""Cross-entropy of a linear layer's output, without the (N, V) logits.

    loss = cross_entropy(hidden @ weightᵀ + bias, target)

hidden (N, D), weight (V, D), bias (V,). For an LM head, V is 30k–130k and the
fp32 logits of a 16k-token batch take 2–8 GB, more than the model. The fused
kernel walks over the logits in chunks, keeps only per-row statistics, and
produces the gradients of hidden, weight and bias chunk by chunk.

Memory traffic of the reference: write NV logits, then everything the
cross-entropy reference reads and writes; peak memory holds the logits, their
float32 copy and their gradient at once.

The Triton path takes C rows at a time (the approach of Liger-Kernel's fused
linear cross-entropy):

    logits_c = hidden_c @ weightᵀ + bias                  (C, V), torch.matmul
    loss_c, ∂loss/∂logits_c -> written over logits_c      Triton, one row per program
    grad_hidden_c  = ∂logits_c @ weight                   (C, D)
    grad_weight   += ∂logits_cᵀ @ hidden_c                (V, D), float32 accumulator
    grad_bias     += Σ_rows ∂logits_c                     (V,),   float32 accumulator

The GEMMs stay on torch.matmul (cuBLAS on CUDA): chunking is what saves the
memory, and cuBLAS is the fastest GEMM at hand. C is chosen so one chunk of
logits takes about ``CHUNK_LOGITS_BYTES`` (256 MiB; rows rounded to a multiple of
64): at V = 50304 in bf16 that is 2624 rows, 7 chunks for 16k tokens, against
1.6 GB for the full logits. Fewer, larger chunks keep the GEMMs efficient and cut
the re-reads of the (V, D) gradient accumulator, which are the price of chunking
over rows.

Napkin math at N = 16384, D = 768, V = 50304 in bf16. Peak: a chunk (256 MiB), the
float32 grad_weight (147 MiB), one bf16 (V, D) product (74 MiB) and grad_hidden
(24 MiB), about 0.5 GiB; the unfused path holds the logits, their log-softmax and
two logits-sized gradients, 4-6 GiB. Extra traffic: 7 chunks × (write 74 MiB,
read it, read and write 147 MiB) ≈ 3 GB, about 1 ms at H100 bandwidth, against
≈ 3.8 TFLOP of GEMMs (6 ms) that both paths run.

For ``reduction="mean"`` or ``"sum"`` the gradients are computed in the forward,
for d(loss) = 1, and the backward only scales them by the incoming scalar: the
logits are computed once. For ``reduction="none"`` the upstream gradient is per
row and unknown in the forward, so the forward keeps nothing but the inputs and
the backward recomputes the chunks with that gradient.

Gradients are computed in the forward only when grad mode is on and an input
requires them, so evaluation does no extra work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minipt.ops._backend import resolve_backend
from minipt.ops._loss import reduce_loss
from minipt.ops._native import check_device, float_code
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_targets, check_tensor
from minipt.ops.cross_entropy import (
    _cross_entropy_forward,
    check_ce_args,
    cross_entropy_ref,
    native_cross_entropy_backward,
    native_cross_entropy_forward,
)

OP = "linear_cross_entropy"
CHUNK_LOGITS_BYTES = 256 * 2**20  # the budget for one chunk of logits
CHUNK_ROW_MULTIPLE = 64  # keeps the chunk GEMMs on whole tiles
# backend="native" materialises at most this many logits at once (64 MiB in float32)
LOGITS_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- reference
def linear_cross_entropy_ref(
    hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, upcast=True
):
    """PyTorch reference: materialises the logits (in at least float32 with ``upcast``)."""
    out_dtype = hidden.dtype
    if upcast:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    loss = cross_entropy_ref(
        logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, upcast=False
    )
    return loss.to(out_dtype)


# ----------------------------------------------------------------------------- chunked forward and backward
def _chunk_rows(N: int, V: int, dtype: torch.dtype) -> int:
    rows = CHUNK_LOGITS_BYTES // (V * torch.empty((), dtype=dtype).element_size())
    rows = max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    return max(1, min(N, rows))  # at least 1: an empty batch still needs a valid step


def _chunked(hidden, weight, bias, target, ignore_index, label_smoothing, grad_scale, need_grads):
    """Per-row losses and, with ``need_grads``, the gradients for ∂loss_i scaled by ``grad_scale``.

    ``grad_scale`` is a 0-dim or (N,) float tensor on the device (no host sync).
    Returns ``(loss_rows, grad_hidden, grad_weight, grad_bias)``; the gradients are
    None without ``need_grads`` (grad_bias also without ``bias``).
    """
    N, V = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(N, device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
    grad_hidden = grad_weight = grad_bias = None
    if need_grads:
        grad_hidden = torch.empty_like(hidden)
        # float32 accumulators, whatever the input dtype: a bf16 sum over many
        # chunks would lose the small contributions.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        grad_bias = torch.zeros(V, device=weight.device, dtype=acc) if bias is not None else None
    step = _chunk_rows(N, V, hidden.dtype)
    for start in range(0, N, step):
        end = min(start + step, N)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V)
        scale = grad_scale[start:end] if grad_scale.dim() == 1 else grad_scale
        loss_rows[start:end], _ = _cross_entropy_forward(
            logits, target[start:end], ignore_index, label_smoothing,
            grad=logits if need_grads else None, grad_scale=scale,
        )
        if need_grads:  # logits now holds ∂loss/∂logits for these rows
            torch.mm(logits, weight, out=grad_hidden[start:end])
            if grad_weight.dtype == logits.dtype:
                grad_weight.addmm_(logits.t(), h)
            else:
                grad_weight += logits.t() @ h
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=grad_bias.dtype)
    if need_grads:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if bias is not None else None
    return loss_rows, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- torch ops and autograd
# Custom ops, so torch.compile treats the chunk loop as one opaque call and the
# target range check (a host sync) stays inside it.
@torch.library.custom_op("minipt::triton_linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, need_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, and for mean/sum with ``need_grads`` the gradients for d(loss) = 1 (else empty tensors)."""
    check_targets(OP, target, weight.shape[0], ignore_index)
    counted = target != ignore_index
    if reduction == "mean":
        grad_scale = 1.0 / counted.sum().clamp(min=1).to(torch.float32)
    else:
        grad_scale = torch.ones((), device=hidden.device, dtype=torch.float32)
    need_grads = need_grads and reduction != "none"
    loss_rows, *grads = _chunked(hidden, weight, bias, target, ignore_index, label_smoothing, grad_scale, need_grads)
    grads = [g if g is not None else hidden.new_empty(0) for g in grads]
    if reduction == "none":
        return loss_rows.to(hidden.dtype), *grads
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / counted.sum().clamp(min=1)
    return loss.to(hidden.dtype), *grads


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, need_grads):
    loss = hidden.new_empty(hidden.shape[0]) if reduction == "none" else hidden.new_empty(())
    if not need_grads or reduction == "none":
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


@torch.library.custom_op("minipt::triton_linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
    grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    target: torch.Tensor, ignore_index: int, label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of Σ_i grad_rows[i] · loss_i, recomputing the chunks (reduction="none")."""
    _, grad_hidden, grad_weight, grad_bias = _chunked(
        hidden, weight, bias, target, ignore_index, label_smoothing, grad_rows, True
    )
    return grad_hidden, grad_weight, grad_bias if grad_bias is not None else hidden.new_empty(0)


@_linear_cross_entropy_bwd_op.register_fake
def _(grad_rows, hidden, weight, bias, target, ignore_index, label_smoothing):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, reduction, label_smoothing, _ = inputs
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_bwd_op(
            grad_loss, hidden, weight, bias, target, ctx.ignore_index, ctx.label_smoothing
        )
    else:  # the forward's gradients are for d(loss) = 1
        grad_hidden, grad_weight, grad_bias = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None, None


_linear_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _linear_cross_entropy_triton(hidden, weight, target, bias, ignore_index, reduction, label_smoothing):
    need_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, *_ = _linear_cross_entropy_fwd_op(
        hidden, weight, bias, target, ignore_index, reduction, label_smoothing, need_grads
    )
    return loss


# ----------------------------------------------------------------------------- native
class _NativeLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias) over row chunks: only one chunk's logits exist at a time.

    Each chunk runs a torch GEMM (cuBLAS / the CPU BLAS) for its logits, then the
    native cross-entropy kernels on them. For a scalar loss the gradients depend on
    grad_output only through one factor, so the forward produces them chunk by
    chunk right away (three GEMMs in all, as unfused) and the backward scales them.
    With ``reduction="none"`` every row has its own factor, which the forward
    cannot know: the backward recomputes each chunk's logits (a fourth GEMM).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing):
        N, V = hidden.shape[0], weight.shape[0]
        counted = target != ignore_index
        losses = hidden.new_empty(N, dtype=torch.float32)
        lse = torch.empty_like(losses)
        needs = ctx.needs_input_grad[:3]
        eager = any(needs) and reduction != "none"
        grads = _NativeLinearCrossEntropy._new_grads(hidden, weight, bias, needs) if eager else None
        if eager:  # d(loss)/d(loss_i): 1 for sum, 1/count for mean; ignored rows are zeroed by the kernel
            row_scale = counted.float() / (counted.sum().clamp(min=1) if reduction == "mean" else 1)
        for rows in _row_chunks(N, V):
            logits = F.linear(hidden[rows], weight, bias)  # (chunk, V), the only logits alive
            losses[rows], lse[rows] = native_cross_entropy_forward(logits, target[rows], ignore_index, label_smoothing)
            if eager:
                grad_logits = native_cross_entropy_backward(
                    logits, target[rows], lse[rows], row_scale[rows].contiguous(), ignore_index, label_smoothing
                )
                _NativeLinearCrossEntropy._accumulate(grads, rows, grad_logits, hidden, weight)
        ctx.eager = eager
        ctx.options = (ignore_index, label_smoothing)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if eager:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, lse)
        return reduce_loss(losses, counted, reduction).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, label_smoothing = ctx.options
        if ctx.eager:
            scale = grad_loss.float()
            grads = [None if g is None else (g * scale) for g in ctx.saved_tensors]
        else:
            hidden, weight, bias, target, lse = ctx.saved_tensors
            grads = _NativeLinearCrossEntropy._new_grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            grad_rows = grad_loss.float().contiguous()
            for rows in _row_chunks(hidden.shape[0], weight.shape[0]):
                logits = F.linear(hidden[rows], weight, bias)
                grad_logits = native_cross_entropy_backward(
                    logits, target[rows], lse[rows], grad_rows[rows], ignore_index, label_smoothing
                )
                _NativeLinearCrossEntropy._accumulate(grads, rows, grad_logits, hidden, weight)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None)

    @staticmethod
    def _new_grads(hidden, weight, bias, needs):
        """Gradient buffers: hidden's in its dtype (each row is written once), weight's and bias's in
        float32 because they sum over every chunk."""
        return [
            torch.empty_like(hidden) if needs[0] else None,
            torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
            torch.zeros_like(bias, dtype=torch.float32) if needs[2] and bias is not None else None,
        ]

    @staticmethod
    def _accumulate(grads, rows, grad_logits, hidden, weight):
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            else:  # the GEMM accumulates in float32 inside; the sum over chunks does so here
                grad_weight += torch.mm(grad_logits.t(), hidden[rows])
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)


def _row_chunks(N: int, V: int):
    rows = max(1, min(N, LOGITS_CHUNK_ELEMENTS // max(V, 1)))
    return [slice(start, min(start + rows, N)) for start in range(0, N, rows)]


def _linear_cross_entropy_native(hidden, weight, target, *, bias, ignore_index, reduction, label_smoothing):
    op = "linear_cross_entropy"
    float_code(op, "hidden", hidden)
    named = [("hidden", hidden), ("weight", weight), ("target", target)]
    if bias is not None:
        named.append(("bias", bias))
    check_device(op, *named)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _NativeLinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction, float(label_smoothing))


# ----------------------------------------------------------------------------- public op
def _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing) -> None:
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_ce_args(OP, hidden, target, ignore_index, reduction, label_smoothing, logits_name="hidden")
    check_same(OP, ("hidden", hidden), ("weight", weight))
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{OP}: weight must have shape (V, D) with D = {hidden.shape[1]} to match hidden, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_same(OP, ("hidden", hidden), ("bias", bias))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_cross_entropy(
    hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto"
):
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    Under autocast the linear layer runs in the autocast dtype, as ``F.linear``
    would, and the loss comes back in ``hidden``'s own dtype, as the reference's.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        out_dtype = hidden.dtype
        hidden, weight, bias = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (hidden, weight, bias)
        )
        with torch.autocast(device_type, enabled=False):
            loss = linear_cross_entropy(
                hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, backend=backend,
            )
        return loss.to(out_dtype)
    _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    backend = resolve_backend(backend, hidden.device, OP)
    if backend == "triton":
        return _linear_cross_entropy_triton(
            hidden, weight, target, bias, ignore_index, reduction, float(label_smoothing)
        )
    check_targets(OP, target, weight.shape[0], ignore_index)
    if backend == "torch":
        return linear_cross_entropy_ref(
            hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, upcast=False,
        )
    return _linear_cross_entropy_native(
        hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=float(label_smoothing),
    )
