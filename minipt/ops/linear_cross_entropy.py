"""Cross-entropy of a linear layer's output, without the (N, V) logits.

    loss = cross_entropy(hidden @ weightᵀ + bias, target)

hidden (N, D), weight (V, D), bias (V,). For an LM head, V is 30k–130k and the
fp32 logits of a 16k-token batch take 2–8 GB, more than the model. The fused
kernel walks over the logits in chunks, keeps only per-row statistics, and
produces the gradients of hidden, weight and bias chunk by chunk.

Memory traffic of the reference: write NV logits, then everything the
cross-entropy reference reads and writes; peak memory holds the logits, their
float32 copy and their gradient at once.

Dtypes, as ``F.cross_entropy(F.linear(hidden, weight, bias), target)`` under
autocast: the logits are computed in the inputs' dtype (the autocast dtype
under autocast), the cross-entropy in float32, and the loss of fp16/bf16
inputs is returned in float32. Per-row losses are kept in float32 across the
chunks, never rounded to 16 bits before they are summed. The gradients of
hidden, weight and bias keep their own dtype; the backward takes the float32
grad_output that autograd hands it.

Both kernel backends run one chunk loop, which takes C rows at a time (the
approach of Liger-Kernel's fused linear cross-entropy):

    logits_c = hidden_c @ weightᵀ + bias                  (C, V), torch GEMM
    loss_c, ∂loss/∂logits_c                               the backend's cross-entropy kernel
    grad_hidden_c  = ∂logits_c @ weight                   (C, D)
    grad_weight   += ∂logits_cᵀ @ hidden_c                (V, D), float32 accumulator
    grad_bias     += Σ_rows ∂logits_c                     (V,),   float32 accumulator

Only the cross-entropy step differs: Triton writes the gradient over the chunk's
logits in the same pass as the loss; native runs its forward and then its
backward kernel, which on the CPU writes over the chunk's logits too (the C++
kernel reads each logit before it writes its gradient, at the same index) and
on CUDA into a second chunk-sized buffer. Every chunk reuses one logits buffer.

The GEMMs stay on torch (cuBLAS on CUDA, the CPU BLAS): chunking is what saves
the memory, and those are the fastest GEMMs at hand. C is chosen so one chunk
of logits takes about ``CHUNK_LOGITS_BYTES`` of its device (rows rounded to a
multiple of 64). On CUDA 256 MiB: at V = 50304 in bf16 that is 2624 rows, 7
chunks for 16k tokens, against 1.6 GB for the full logits. Fewer, larger chunks
keep the GEMMs efficient and cut the re-reads of the (V, D) gradient
accumulator, which are the price of chunking over rows. On the CPU 64 MiB: at
N = 8192, D = 512, V = 32768 in float32 (512 rows, 16 chunks) the step took
about as long as with 256 MiB (1.1x, within the noise of a loaded 2-core
machine) and 15% less time than with 32 MiB, and its peak fell from 346 to 154
MiB (bench.linear_cross_entropy; 32 and 16 MiB gave 122 and 105 MiB).

Each chunk's weight-gradient product reaches the float32 accumulator unrounded:
for fp16/bf16 on CUDA through ``torch.mm(..., out_dtype=torch.float32)`` (torch
>= 2.8), elsewhere as a float32 product of upcast operands. Rounding each
product to bf16 first would add one rounding error per chunk, so the error
would grow with the number of chunks.

Napkin math at N = 16384, D = 768, V = 50304 in bf16. Peak: a chunk (256 MiB), the
float32 grad_weight (147 MiB), one float32 (V, D) product (147 MiB) and
grad_hidden (24 MiB), about 0.6 GiB; the unfused path holds the logits, their
log-softmax and two logits-sized gradients, 4-6 GiB. Extra traffic: 7 chunks ×
(write 147 MiB, read it, read and write 147 MiB) ≈ 4 GB, about 1.3 ms at H100
bandwidth, against ≈ 3.8 TFLOP of GEMMs (6 ms) that both paths run.

For ``reduction="mean"`` or ``"sum"`` the gradients are computed in the forward,
for d(loss) = 1, and the backward only scales them, in place, by the incoming
scalar: the logits are computed once (three GEMMs in all, as unfused), and the
gradients are held once, not twice (a second backward through one call is
refused, as by PyTorch's own chunked ``F.linear_cross_entropy``). For
``reduction="none"`` the upstream gradient is per row and unknown in the
forward, so the forward keeps nothing but the inputs and the backward
recomputes the chunks with that gradient (a fourth GEMM).

``softcap`` and ``z_loss`` (see ``minipt.ops.cross_entropy``) reach the chunk's
cross-entropy kernel, which caps each logit as it reads it and adds the z term
from the row's lse, so they cost no extra pass over a chunk. The z term alone
(``return_z_loss``) is summed from the chunks' lse, which is kept only then.

Gradients are computed in the forward only for the inputs that require them,
and only in grad mode, so evaluation does no extra work. Targets are checked on
the device, without a host sync (see ``minipt.ops.cross_entropy``).
"""

from __future__ import annotations

import torch

from minipt.ops._backend import resolve_backend
from minipt.ops._loss import IGNORE_INDEX, reduce_loss, z_term
from minipt.ops._native import check_device, float_code, run_kernel
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_targets, check_tensor
from minipt.ops.cross_entropy import (
    _cross_entropy_forward,
    _native_ce_args,
    check_ce_args,
    cross_entropy_ref,
    native_cross_entropy_backward,
    native_forward_of_checked_targets,
)

OP = "linear_cross_entropy"
# The budget for one chunk of logits, by device type (see the header for each figure).
CHUNK_LOGITS_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}
CHUNK_ROW_MULTIPLE = 64  # keeps the chunk GEMMs on whole tiles


# ----------------------------------------------------------------------------- reference
def linear_cross_entropy_ref(
    hidden, weight, target, *, bias=None, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0,
    softcap=None, z_loss=0.0, return_z_loss=False, upcast=True,
):
    """PyTorch reference: materialises the (N, V) logits in the inputs' dtype, as ``F.linear`` does.

    With ``upcast`` (``backend="torch"``) their cross-entropy runs in at least
    float32, so the loss of 16-bit inputs is float32, as ``F.cross_entropy``
    gives under autocast; without, everything stays in the input dtype
    (``cross_entropy_ref``'s low-precision baseline). A float32 reference for
    16-bit inputs is this on inputs the caller has upcast.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return cross_entropy_ref(
        logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap, z_loss=z_loss, return_z_loss=return_z_loss, upcast=upcast,
    )


# ----------------------------------------------------------------------------- per-chunk cross-entropy
def _chunk_cross_entropy_triton(logits, target, options, grad_scale):
    """One chunk's per-row losses and lse and, with ``grad_scale``, ∂loss/∂logits · grad_scale, written over
    the chunk's own logits buffer (nothing else can see it). ``options``: ignore_index, label_smoothing,
    softcap (0 for none) and z_loss."""
    grad = logits if grad_scale is not None else None
    loss, lse = _cross_entropy_forward(logits, target, *options, grad=grad, grad_scale=grad_scale)
    return loss, lse, grad


def _chunk_cross_entropy_native(logits, target, options, grad_scale):
    """The same through the native kernels: the forward, then the backward from its lse. On the CPU the
    backward writes over the chunk's logits; on CUDA into a second chunk-sized buffer."""
    target = target.contiguous()
    loss, lse = native_forward_of_checked_targets(logits, target, *options)
    if grad_scale is None:
        return loss, lse, None
    grad_rows = grad_scale.float().expand(logits.shape[0]).contiguous()
    if logits.device.type != "cpu":
        return loss, lse, native_cross_entropy_backward(logits, target, lse, grad_rows, *options)
    # The C++ backward reads each logit before it writes its gradient, at the same index, one row at a
    # time (float32 in place; 16-bit rows widened into a per-thread buffer first), so it may alias.
    args = _native_ce_args(logits, target, *options)
    run_kernel("cross_entropy_backward", logits.device, lse=lse.data_ptr(), grad_rows=grad_rows.data_ptr(),
               grad_logits=logits.data_ptr(), **args)
    return loss, lse, logits


# Looked up when a chunk runs, not bound at import, so a test can count the chunks of either backend.
CHUNK_CROSS_ENTROPY = {"triton": _chunk_cross_entropy_triton, "native": _chunk_cross_entropy_native}


# ----------------------------------------------------------------------------- chunked forward and backward
def _chunk_rows(N: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = CHUNK_LOGITS_BYTES["cpu" if device.type == "cpu" else "cuda"]
    rows = budget // (V * dtype.itemsize)
    rows = max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    return max(1, min(N, rows))  # at least 1: an empty batch still needs a valid step


# torch.mm(..., out_dtype=torch.float32) for fp16/bf16 operands exists from torch 2.8, on CUDA only.
_MM_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product kept in acc's float32 (or float64), never rounded to a's dtype first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _MM_HAS_OUT_DTYPE:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked(backend, hidden, weight, bias, target, options, grad_scale, needs, keep_lse=False):
    """Per-row losses and the gradients of Σ_i grad_scale_i · loss_i for the inputs ``needs`` marks.

    ``options`` is (ignore_index, label_smoothing, softcap, z_loss), softcap 0 for
    none; ``grad_scale`` a 0-dim or (N,) float tensor on the device (no host sync);
    ``needs`` is (hidden, weight, bias). Returns ``(loss_rows, lse_rows, grad_hidden,
    grad_weight, grad_bias)`` with None for each gradient not needed, and for
    lse_rows unless ``keep_lse``.
    """
    chunk_cross_entropy = CHUNK_CROSS_ENTROPY[backend]
    N, V = hidden.shape[0], weight.shape[0]
    need_hidden, need_weight, need_bias = needs[0], needs[1], needs[2] and bias is not None
    want_grads = need_hidden or need_weight or need_bias
    loss_rows = torch.empty(N, device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
    lse_rows = torch.empty_like(loss_rows) if keep_lse else None
    # float32 accumulators, whatever the input dtype: a bf16 sum over many chunks
    # would lose the small contributions.
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_weight else None
    grad_bias = torch.zeros(V, device=weight.device, dtype=acc) if need_bias else None
    step = _chunk_rows(N, V, hidden.dtype, hidden.device)
    # One buffer for every chunk's logits (and, but for native on CUDA, their gradient): a fresh one per
    # chunk would hold two chunks at once while the next GEMM writes, and on the CPU fault in its pages anew.
    chunk = torch.empty(min(step, N), V, device=hidden.device, dtype=hidden.dtype)
    for start in range(0, N, step):
        end = min(start + step, N)
        h = hidden[start:end]
        logits = chunk[: end - start]  # (C, V)
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        scale = None
        if want_grads:
            scale = grad_scale[start:end] if grad_scale.dim() == 1 else grad_scale
        loss_rows[start:end], lse, grad_logits = chunk_cross_entropy(logits, target[start:end], options, scale)
        if keep_lse:
            lse_rows[start:end] = lse
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if need_weight:
            _add_product(grad_weight, grad_logits.t(), h)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=acc)
    grad_weight = grad_weight.to(weight.dtype) if need_weight else None
    grad_bias = grad_bias.to(bias.dtype) if need_bias else None
    return loss_rows, lse_rows, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- torch ops and autograd
# custom_op rather than triton_op, for both backends: the compiler then sees the
# chunk loop as one opaque call and cannot schedule two chunks' logits at once.
def _define_ops(backend: str):
    """The forward and backward ops of one backend, ``minipt::<backend>_linear_cross_entropy_fwd``/``_bwd``."""

    @torch.library.custom_op(f"minipt::{backend}_linear_cross_entropy_fwd", mutates_args=())
    def forward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
        ignore_index: int, reduction: str, label_smoothing: float, softcap: float, z_loss: float,
        return_z_loss: bool, needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, for mean/sum the gradients ``needs`` marks for d(loss) = 1 (else empty tensors), and the
        z term with ``return_z_loss`` (else an empty tensor)."""
        check_targets(OP, target, weight.shape[0], ignore_index)
        counted = target != ignore_index
        if reduction == "mean":
            grad_scale = 1.0 / counted.sum().clamp(min=1).to(torch.float32)
        else:
            grad_scale = torch.ones((), device=hidden.device, dtype=torch.float32)
        needs = needs if reduction != "none" else [False, False, False]
        options = (ignore_index, label_smoothing, softcap, z_loss)
        loss_rows, lse_rows, *grads = _chunked(
            backend, hidden, weight, bias, target, options, grad_scale, needs, keep_lse=return_z_loss
        )
        grads = [g if g is not None else hidden.new_empty(0) for g in grads]
        z = z_term(lse_rows, counted, z_loss, reduction) if return_z_loss else hidden.new_empty(0)
        return reduce_loss(loss_rows, counted, reduction), *grads, z  # float32 loss for 16-bit inputs

    @forward.register_fake
    def _(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss,
          needs):
        shape = hidden.shape[:1] if reduction == "none" else ()
        loss = hidden.new_empty(shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
        if reduction == "none":
            needs = [False, False, False]
        z = torch.empty_like(loss) if return_z_loss else hidden.new_empty(0)
        return loss, *_empty_grads(hidden, weight, bias, needs), z

    @torch.library.custom_op(f"minipt::{backend}_linear_cross_entropy_bwd", mutates_args=())
    def backward(
        grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        target: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradients of Σ_i grad_rows[i] · loss_i, recomputing the chunks (reduction="none")."""
        options = (ignore_index, label_smoothing, softcap, z_loss)
        _, _, *grads = _chunked(backend, hidden, weight, bias, target, options, grad_rows, needs)
        return tuple(g if g is not None else hidden.new_empty(0) for g in grads)

    @backward.register_fake
    def _(grad_rows, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss, needs):
        return _empty_grads(hidden, weight, bias, needs)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, z_loss, _, _ = inputs
        ctx.reduction, ctx.options = reduction, (ignore_index, label_smoothing, softcap, z_loss)
        # Nothing differentiates through the gradient outputs or the z term; materialised, their zero
        # "gradients" would hold as much memory again as the gradients themselves during the backward.
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
        else:
            ctx.save_for_backward(*output[1:4])

    def grad_fn(ctx, grad_loss, *_):
        needs = list(ctx.needs_input_grad[:3])
        if grad_loss is None:  # not materialised: no gradient reached the loss
            return (None,) * 11
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            grads = backward(grad_loss, hidden, weight, bias, target, *ctx.options, needs)
        else:
            grads = _scale_forward_grads(ctx, grad_loss)
        grads = [g if need else None for g, need in zip(grads, needs)]
        return *grads, *(None,) * 8

    forward.register_autograd(grad_fn, setup_context=setup_context)
    return forward


def _scale_forward_grads(ctx, grad_loss):
    """The gradients the forward computed for d(loss) = 1, scaled by ``grad_loss`` in place, so that the
    backward holds them once rather than twice (a float32 grad_loss leaves them in their dtype). A second
    backward through the same call would find them scaled already, so it is refused, as PyTorch's own chunked
    ``F.linear_cross_entropy`` refuses it; traced by torch.compile, the product is out of place instead."""
    if torch.compiler.is_compiling():
        return [g * grad_loss for g in ctx.saved_tensors]
    if getattr(ctx, "scaled", False):
        raise RuntimeError(
            f"{OP}: backward ran twice through one call (retain_graph=True); the chunked backends compute the "
            "gradients in the forward and the first backward scales them in place: call the op again instead"
        )
    ctx.scaled = True
    return [g.mul_(grad_loss) for g in ctx.saved_tensors]


def _empty_grads(hidden, weight, bias, needs):
    """Tensors shaped like the gradients ``needs`` marks, and empty ones for the rest."""
    shaped = (hidden, weight, bias if bias is not None else hidden.new_empty(0))
    return tuple(x.new_empty(x.shape) if need else hidden.new_empty(0) for x, need in zip(shaped, needs))


_LINEAR_CROSS_ENTROPY_OPS = {backend: _define_ops(backend) for backend in CHUNK_CROSS_ENTROPY}


def _linear_cross_entropy_chunked(backend, hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                                  softcap, z_loss, return_z_loss):
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, *_, z = _LINEAR_CROSS_ENTROPY_OPS[backend](
        hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss, needs
    )
    return (loss, z) if return_z_loss else loss


# ----------------------------------------------------------------------------- native
def _check_native(hidden, weight, target, bias) -> None:
    float_code(OP, "hidden", hidden)
    named = [("hidden", hidden), ("weight", weight), ("target", target)]
    if bias is not None:
        named.append(("bias", bias))
    check_device(OP, *named)


# ----------------------------------------------------------------------------- public op
def _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, z_loss,
                  return_z_loss) -> None:
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_ce_args(OP, hidden, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss,
                  logits_name="hidden")
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
    hidden, weight, target, *, bias=None, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0,
    softcap=None, z_loss=0.0, return_z_loss=False, backend="auto",
):
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    ``softcap``, ``z_loss`` and ``return_z_loss`` are ``cross_entropy``'s: the
    logits are capped to ``softcap · tanh(logits / softcap)``, ``z_loss · lse²``
    is added per counted row, and ``return_z_loss=True`` returns ``(loss, z_term)``
    with the z term alone, reduced as the loss and detached.

    Under autocast the linear layer runs in the autocast dtype, as ``F.linear``
    would. The loss of fp16/bf16 inputs (or of any under 16-bit autocast) is
    float32, as ``F.cross_entropy`` gives under autocast; the gradients keep the
    dtype of hidden, weight and bias.
    """
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                   z_loss=z_loss, return_z_loss=return_z_loss)
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (hidden, weight, bias)
        )
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden, weight, target, bias=bias, backend=backend, **options)
    _check_inputs(hidden, weight, target, bias, *options.values())
    backend = resolve_backend(backend, hidden.device, OP)
    if backend == "torch":
        if not torch.compiler.is_compiling():  # compiled, torch's own op checks (see check_targets)
            check_targets(OP, target, weight.shape[0], ignore_index)
        return linear_cross_entropy_ref(hidden, weight, target, bias=bias, **options)
    if backend == "native":
        _check_native(hidden, weight, target, bias)
    # The kernels take softcap 0 for none.
    return _linear_cross_entropy_chunked(
        backend, hidden, weight, target, bias, ignore_index, reduction, float(label_smoothing), float(softcap or 0.0),
        float(z_loss), return_z_loss,
    )
