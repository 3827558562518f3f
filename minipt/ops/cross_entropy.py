"""Cross-entropy over (N, V) logits, with the semantics of ``F.cross_entropy``.

    loss_i = -(1 - ε) · log p_i[t_i] - (ε / V) · Σ_j log p_i[j],   log p_i = x_i - lse(x_i)
           = lse_i - (1 - ε) · x_i[t_i] - (ε / V) · Σ_j x_i[j]
    ∂loss_i / ∂x_i[j] = softmax(x_i)[j] - (1 - ε) · [j = t_i] - ε / V

Rows whose target is ``ignore_index`` contribute 0 and do not count towards the
mean. Unlike torch, a mean over zero counted rows is 0.0, not NaN.

Two options change the row's loss, each off by default:

    softcap s:  x is replaced by c = s · tanh(x / s) (Gemma 2's logit soft-capping),
                so ∂loss/∂x = ∂loss/∂c · (1 - tanh²(x / s))
    z_loss z:   loss_i += z · lse(c_i)²   (PaLM's z-loss: keeps lse near 0),
                so ∂loss/∂c gains 2z · lse · softmax(c): softmax is scaled by 1 + 2z · lse

Both are computed in the same passes as the plain loss: the cap is applied to each
logit as it is read, and the z term needs only the row's lse. ``return_z_loss``
also returns the z term alone, reduced as the loss is and detached, for logging
beside the cross-entropy; the loss returned with it includes it. A kernel
launches its plain form unless an option is set (Triton constexprs, C++/CUDA
template flags), so the default path does what it did before, at its speed.

Memory traffic of the reference: read NV (logits), write NV (log-probs), read NV
again for the gather and the smoothing sum; the backward reads and writes NV once
more (16-bit logits add a float32 copy: write NV). A fused kernel needs one read
for the forward and one read + one write for the backward.

Dtypes: the loss of fp16/bf16 logits is float32 on every backend, as
``F.cross_entropy`` gives under autocast, and it is never rounded to 16 bits on
the way: a bf16 loss moves in steps of 0.03 between 4 and 8, which would round
the train and validation losses, perplexity and bits per byte. float64 logits
give a float64 loss (torch and Triton). The gradient keeps the logits' dtype,
computed in float32 and rounded once; the backward takes the float32
grad_output that autograd hands it.

The Triton forward gives each row one program that walks V in blocks with an
online log-sum-exp (running max and rescaled sum, in float32 for half inputs and
float64 for float64), picking up x[t] and Σx on the way: one read of the logits,
and it keeps only the per-row lse. The backward recomputes softmax from the saved
lse: one read and one write of NV and never a float32 copy of the logits, so the
extra peak memory is the gradient itself. Row offsets are int64 because N·V
passes 2**31 at LM sizes (16k tokens × 128k vocabulary).

The same forward kernel can instead write the scaled gradient straight after the
loss, in place over the logits (``_cross_entropy_forward(..., grad=logits)``):
a second read and a write in the forward, nothing in the backward. Only
``linear_cross_entropy`` uses it, on a chunk buffer nothing else can see; the
public op never overwrites a caller's logits.

Masked vocabulary columns arrive as -inf logits. Two steps would turn them into
NaN: the online rescale exp(m - m_new) while every logit so far is -inf (shift
by 0 instead), and the smoothing term ε/V · Σx without smoothing, 0 · (-inf)
(the sum is zeroed before the product). The gradient at a -inf logit is
exp(-inf - lse) = 0. Column offsets are int64 as well: a transposed (N, V) view
has stride N along V, and V·N passes 2**31 at the same sizes.

Target range: every backend asserts on the device that each target is in
[0, V) or ``ignore_index`` (``check_targets``, ``torch._assert_async``). It
costs no host sync: a CUDA run stops with a device-side assert, a CPU run raises
a RuntimeError at once. The assert runs inside the kernels' custom ops, so it
stays eager in a ``torch.compile`` graph; the torch backend asserts in eager
mode and leaves compiled graphs to torch's own checks. The kernels still never
read outside a row (a bad id gets a NaN loss from Triton and native CUDA, a
ValueError from native C++), so nothing depends on when the assert fires.

Both backends' kernels run behind ``torch.library.custom_op`` operators with
fake implementations, so ``torch.compile`` keeps each as one opaque call
(``fullgraph=True`` works). The Triton ones are not ``triton_op`` operators,
which the compiler would trace into with fake tensors: the interpreter's
kernels cannot take those, and CI compiles them there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minipt.ops._backend import resolve_backend
from minipt.ops._loss import IGNORE_INDEX, reduce_loss, softcap_logits, z_term
from minipt.ops._native import check_contiguous, check_device, float_code, run_kernel
from minipt.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_flag,
    check_label_smoothing,
    check_reduction,
    check_same,
    check_softcap,
    check_targets,
    check_tensor,
    check_z_loss,
)
from minipt.ops._triton import jit, tl, triton

OP = "cross_entropy"


# ----------------------------------------------------------------------------- reference
def cross_entropy_ref(
    logits, target, *, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
    return_z_loss=False, upcast=True,
):
    """PyTorch reference on ``F.cross_entropy``, with minipt's mean over zero rows = 0.

    With ``upcast`` (``backend="torch"``) it computes in at least float32 and
    returns that: the loss of 16-bit logits is float32, as under autocast, and
    their gradient comes back in their own dtype. Without, it is what PyTorch
    itself does in the input dtype, loss included: the low-precision baseline of
    the tests' three-way rule.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) if upcast else logits
    x = softcap_logits(x, softcap)  # read NV, write NV
    loss = F.cross_entropy(
        x, target.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )  # (N,), 0 on ignored rows
    counted = target != ignore_index
    if z_loss or return_z_loss:
        lse = torch.logsumexp(x, dim=-1)  # (N,); read NV
        loss = loss + torch.where(counted, z_loss * lse.square(), 0.0)
    out = reduce_loss(loss, counted, reduction)
    return (out, z_term(lse, counted, z_loss, reduction)) if return_z_loss else out


# ----------------------------------------------------------------------------- kernels
@jit
def _tanh(y):
    """tanh from one exp, e = exp(-2|y|): |tanh y| = (1 - e) / (1 + e), and in float32 below |y| = 1/4,
    where 1 - e cancels to a few ulp of 1, its Taylor series to y⁹ (relative error under 1e-8 there).
    libdevice's tanh has no interpreter form; ±inf give ±1, NaN stays NaN."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    if y.dtype == tl.float32:  # float64's 1 - e keeps 1e-16 of 1, closer than the tests' 1e-12
        a2 = a * a
        series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
        t = tl.where(a < 0.25, series, t)
    return tl.where(y < 0.0, -t, t)


@jit
def _grad_block(
    X_ptr, stride_xv, G_ptr, cols, V, target, lse, scale, label_smoothing, softcap, z_loss,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, ACC: tl.constexpr,
):
    """Store scale · ∂loss/∂x for the columns ``cols`` of one row, with c the (capped) logits:
    (softmax(c) · (1 + 2z·lse) - (1 - ε)·onehot(target) - ε/V) · (1 - tanh²(x / s))."""
    in_row = cols < V
    x = tl.load(X_ptr + cols.to(tl.int64) * stride_xv, mask=in_row, other=0.0).to(ACC)
    if SOFTCAP:
        t = _tanh(x * (1.0 / softcap))
        x = softcap * t
    p = tl.exp(x - lse)
    if Z_LOSS:
        p = p * (1.0 + 2.0 * z_loss * lse)
    grad = p - label_smoothing / V
    grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
    if SOFTCAP:
        grad = grad * (1.0 - t * t)
    tl.store(G_ptr + cols, (grad * scale).to(G_ptr.dtype.element_ty), mask=in_row)


@jit
def _cross_entropy_fwd_kernel(
    X_ptr, stride_xn, stride_xv, T_ptr, stride_t, Loss_ptr, Lse_ptr,
    G_ptr, stride_gn, Scale_ptr, stride_scale,
    V, ignore_index, label_smoothing, softcap, z_loss,
    WRITE_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X_ptr += row * stride_xn
    target = tl.load(T_ptr + row * stride_t).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)

    # Online log-sum-exp: m is the running max, s the sum of exp(x - m).
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sum_x = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x = tl.load(X_ptr + cols.to(tl.int64) * stride_xv, mask=in_row, other=float("-inf")).to(ACC)
        if SOFTCAP:  # capped, the padding's -inf would be -softcap: it stays -inf
            x = tl.where(in_row, softcap * _tanh(x * (1.0 / softcap)), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf, shift by 0: exp(-inf - (-inf)) is NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        sum_x += tl.sum(tl.where(in_row, x, 0.0), axis=0)
    lse = m + tl.log(s)

    x_target = tl.load(X_ptr + tl.where(in_range, target, 0) * stride_xv).to(ACC)
    if SOFTCAP:
        x_target = softcap * _tanh(x_target * (1.0 / softcap))
    # Σx is -inf with a masked column; zeroed without smoothing, as 0 · (-inf) is NaN.
    smooth = label_smoothing / V * tl.where(label_smoothing > 0.0, sum_x, 0.0)
    loss = lse - (1.0 - label_smoothing) * x_target - smooth
    if Z_LOSS:
        loss += z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(Loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(Lse_ptr + row, lse)

    if WRITE_GRAD:
        scale = tl.load(Scale_ptr + row * stride_scale).to(ACC)
        scale = tl.where(ignored, 0.0, scale)
        # When G aliases X, each block is read before it is overwritten, by this
        # program alone, so the in-place write is safe.
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            _grad_block(
                X_ptr, stride_xv, G_ptr + row * stride_gn, cols, V, target, lse, scale, label_smoothing, softcap,
                z_loss, SOFTCAP, Z_LOSS, ACC,
            )


@jit
def _cross_entropy_bwd_kernel(
    X_ptr, stride_xn, stride_xv, T_ptr, stride_t, Lse_ptr, G_ptr, stride_gn, Scale_ptr, stride_scale,
    V, ignore_index, label_smoothing, softcap, z_loss,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    # Grid (rows, column blocks): rows go on axis 0, whose limit is 2**31 - 1,
    # because N can pass the 65535 of the other axes.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    target = tl.load(T_ptr + row * stride_t).to(tl.int64)
    scale = tl.load(Scale_ptr + row * stride_scale).to(ACC)
    scale = tl.where(target == ignore_index, 0.0, scale)
    lse = tl.load(Lse_ptr + row)
    _grad_block(
        X_ptr + row * stride_xn, stride_xv, G_ptr + row * stride_gn, cols, V, target, lse, scale, label_smoothing,
        softcap, z_loss, SOFTCAP, Z_LOSS, ACC,
    )


# ----------------------------------------------------------------------------- launchers
MAX_BLOCK_V = 4096  # 16 values per thread at 8 warps


def _block_v(V: int) -> tuple[int, int]:
    """Columns per block and warps."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return block, 8 if block >= 2048 else 4


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _cross_entropy_forward(logits, target, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0, grad=None,
                           grad_scale=None):
    """Per-row losses and lse of (N, V) ``logits``, both float32 (float64 for float64 logits).

    ``softcap`` 0 means none. With ``grad`` (an (N, V) buffer, which may be ``logits``
    itself) the kernel also writes ∂loss_i/∂x_i · grad_scale[i] there; ``grad_scale``
    is a 0-dim or (N,) tensor.
    """
    N, V = logits.shape
    acc_torch, acc_tl = _acc_dtype(logits.dtype)
    loss = torch.empty(N, device=logits.device, dtype=acc_torch)
    lse = torch.empty(N, device=logits.device, dtype=acc_torch)
    if N == 0:
        return loss, lse
    write_grad = grad is not None
    if write_grad:
        assert grad.stride(1) == 1 and grad_scale is not None
    scale_stride = grad_scale.stride(0) if write_grad and grad_scale.dim() == 1 else 0
    block, warps = _block_v(V)
    _cross_entropy_fwd_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1), target, target.stride(0), loss, lse,
        grad if write_grad else logits, grad.stride(0) if write_grad else 0,
        grad_scale if write_grad else lse, scale_stride,
        V, ignore_index, label_smoothing, softcap, z_loss,
        WRITE_GRAD=write_grad, SOFTCAP=softcap > 0, Z_LOSS=z_loss > 0, BLOCK_V=block, ACC=acc_tl, num_warps=warps,
    )
    return loss, lse


# custom_op, not the project's usual triton_op + wrap_triton: torch.compile traces
# a triton_op's launcher with fake tensors, which the interpreter's kernels cannot
# take, so CI (no GPU) could not compile these ops at all.
@torch.library.custom_op("minipt::triton_cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_targets(OP, target, logits.shape[1], ignore_index)
    return _cross_entropy_forward(logits, target, ignore_index, label_smoothing, softcap, z_loss)


@_cross_entropy_fwd_op.register_fake
def _(logits, target, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0):
    acc = _acc_dtype(logits.dtype)[0]
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


@torch.library.custom_op("minipt::triton_cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, label_smoothing: float, softcap: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    N, V = logits.shape
    grad = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    if N == 0:
        return grad
    block, warps = _block_v(V)
    _cross_entropy_bwd_kernel[(N, triton.cdiv(V, block))](
        logits, logits.stride(0), logits.stride(1), target, target.stride(0), lse, grad, grad.stride(0),
        grad_rows, grad_rows.stride(0),
        V, ignore_index, label_smoothing, softcap, z_loss,
        SOFTCAP=softcap > 0, Z_LOSS=z_loss > 0, BLOCK_V=block, ACC=_acc_dtype(logits.dtype)[1], num_warps=warps,
    )
    return grad


@_cross_entropy_bwd_op.register_fake
def _(grad_rows, logits, target, lse, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0):
    return logits.new_empty(logits.shape)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    logits, target, *ctx.options = inputs  # ignore_index, label_smoothing, softcap, z_loss
    ctx.save_for_backward(logits, target, output[1])


def _backward(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = _cross_entropy_bwd_op(grad_loss, logits, target, lse, *ctx.options)
    return grad, None, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _cross_entropy_triton(logits, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss):
    loss, lse = _cross_entropy_fwd_op(logits, target, ignore_index, label_smoothing, softcap, z_loss)  # (N,) each
    return _reduce(loss, lse, target != ignore_index, reduction, z_loss, return_z_loss)


def _reduce(loss, lse, counted, reduction, z_loss, return_z_loss):
    """The reduced loss, and with ``return_z_loss`` the z term apart (float32, float64 for float64 logits)."""
    out = reduce_loss(loss, counted, reduction)
    return (out, z_term(lse, counted, z_loss, reduction)) if return_z_loss else out


# ----------------------------------------------------------------------------- native
def _native_ce_args(logits, target, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0) -> dict:
    op = "cross_entropy"
    check_device(op, ("logits", logits), ("target", target))
    check_contiguous(op, ("logits", logits), ("target", target))
    if logits.dim() != 2 or target.shape != (logits.shape[0],):
        raise ValueError(
            f"{op}: expected logits (N, V) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: target must be int32 or int64, got {target.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: backend='native' needs at least one class, got logits of shape {tuple(logits.shape)}")
    return dict(
        logits=logits.data_ptr(), target=target.data_ptr(), n_rows=logits.shape[0], n_classes=logits.shape[1],
        dtype=float_code(op, "logits", logits), target_size=target.element_size(), ignore_index=ignore_index,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
    )


def native_forward_of_checked_targets(logits, target, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0):
    """The native forward kernel, for a caller that has already checked ``target`` (linear_cross_entropy
    checks its targets once, not once per chunk)."""
    args = _native_ce_args(logits, target, ignore_index, label_smoothing, softcap, z_loss)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    run_kernel("cross_entropy_forward", logits.device, loss=loss.data_ptr(), lse=lse.data_ptr(), **args)
    return loss, lse


@torch.library.custom_op("minipt::native_cross_entropy_fwd", mutates_args=())
def native_cross_entropy_forward(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) and log-sum-exps (N,) of the (capped) logits, both float32; ignored rows have loss 0
    and lse 0. ``softcap`` 0 means none."""
    check_targets(OP, target, logits.shape[1], ignore_index)
    return native_forward_of_checked_targets(logits, target, ignore_index, label_smoothing, softcap, z_loss)


@native_cross_entropy_forward.register_fake
def _(logits, target, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0):
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("minipt::native_cross_entropy_bwd", mutates_args=())
def native_cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
    label_smoothing: float, softcap: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """Gradient wrt the logits of Σ_i grad_rows[i]·loss[i]; grad_rows and lse are float32 (N,)."""
    args = _native_ce_args(logits, target, ignore_index, label_smoothing, softcap, z_loss)
    for name, x in (("lse", lse), ("grad_rows", grad_rows)):
        if x.dtype != torch.float32 or x.shape != target.shape:
            raise ValueError(
                f"cross_entropy: {name} must be float32 of shape {tuple(target.shape)}, got {x.dtype} {tuple(x.shape)}"
            )
    check_device("cross_entropy", ("logits", logits), ("lse", lse), ("grad_rows", grad_rows))
    check_contiguous("cross_entropy", ("lse", lse), ("grad_rows", grad_rows))
    grad = torch.empty_like(logits)
    run_kernel("cross_entropy_backward", logits.device, lse=lse.data_ptr(), grad_rows=grad_rows.data_ptr(),
         grad_logits=grad.data_ptr(), **args)
    return grad


@native_cross_entropy_backward.register_fake
def _(logits, target, lse, grad_rows, ignore_index, label_smoothing, softcap=0.0, z_loss=0.0):
    return torch.empty_like(logits)


def _native_ce_setup_context(ctx, inputs, output):
    logits, target, *ctx.options = inputs  # ignore_index, label_smoothing, softcap, z_loss
    ctx.save_for_backward(logits, target, output[1])


def _native_ce_backward(ctx, grad_loss, grad_lse):
    # lse is an internal by-product for the backward; nothing differentiates through it.
    logits, target, lse = ctx.saved_tensors
    grad_rows = grad_loss.float().contiguous()
    grad = native_cross_entropy_backward(logits, target, lse, grad_rows, *ctx.options)
    return grad, None, None, None, None, None


native_cross_entropy_forward.register_autograd(_native_ce_backward, setup_context=_native_ce_setup_context)


def _cross_entropy_native(logits, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss):
    float_code("cross_entropy", "logits", logits)
    logits, target = logits.contiguous(), target.contiguous()
    loss, lse = native_cross_entropy_forward(logits, target, ignore_index, label_smoothing, softcap, z_loss)
    return _reduce(loss, lse, target != ignore_index, reduction, z_loss, return_z_loss)  # float32


# ----------------------------------------------------------------------------- public op
def check_ce_args(op, logits, target, ignore_index, reduction, label_smoothing, softcap=None, z_loss=0.0,
                  return_z_loss=False, logits_name="logits") -> None:
    check_tensor(op, logits_name, logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "target", target, ndim=1, dtypes=INDEX_DTYPES)
    check_same(op, (logits_name, logits), ("target", target), dtype=False)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{op}: target must have shape (N,) = ({logits.shape[0]},) to match {logits_name}, got {tuple(target.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    check_reduction(op, reduction)
    check_label_smoothing(op, label_smoothing)
    check_softcap(op, softcap)
    check_z_loss(op, z_loss)
    check_flag(op, "return_z_loss", return_z_loss)


def cross_entropy(
    logits, target, *, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
    return_z_loss=False, backend="auto",
):
    """Cross-entropy of (N, V) ``logits`` against (N,) class ids ``target``.

    ``softcap`` (a positive float, or None) replaces the logits by
    ``softcap · tanh(logits / softcap)`` first; ``z_loss`` adds ``z_loss · lse²``
    per counted row, lse being the log-sum-exp of the (capped) logits, to the loss
    and to its mean as the cross-entropy counts it. ``return_z_loss=True`` returns
    ``(loss, z_term)``: the loss with the z term in it, and the z term alone,
    reduced alike and detached (for logging).

    The loss of fp16/bf16 logits is float32, as ``F.cross_entropy`` gives under
    autocast (float64 logits give float64); the gradient keeps the logits' dtype.
    """
    check_ce_args(OP, logits, target, ignore_index, reduction, label_smoothing, softcap, z_loss, return_z_loss)
    if logits.shape[1] == 0:
        raise ValueError(f"{OP}: logits must have at least one class, got shape {tuple(logits.shape)}")
    backend = resolve_backend(backend, logits.device, OP)
    if backend == "torch":
        if not torch.compiler.is_compiling():  # compiled, torch's own op checks (see check_targets)
            check_targets(OP, target, logits.shape[1], ignore_index)
        return cross_entropy_ref(
            logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            softcap=softcap, z_loss=z_loss, return_z_loss=return_z_loss,
        )
    kernel = _cross_entropy_triton if backend == "triton" else _cross_entropy_native
    # The kernels take softcap 0 for none.
    return kernel(logits, target, ignore_index, reduction, float(label_smoothing), float(softcap or 0.0),
                  float(z_loss), return_z_loss)
