"""``backend="native"``: the pybind11 extension ``minipt._C`` behind each op's contract.

The extension takes raw pointers, shapes and the CUDA stream; this module checks
tensors, makes them contiguous, allocates outputs and wraps forward and backward
in autograd.

Each kernel is a ``torch.library`` custom op (``minipt::native_<name>``) with a fake
implementation that only describes its outputs, and the differentiable ones carry
their backward, so ``torch.compile`` keeps each kernel as one opaque node of its
graph instead of breaking the graph at an unknown call.

What runs where:

=======================  ==========================  ==============================
op                       CPU tensors                 CUDA tensors
=======================  ==========================  ==============================
cross_entropy            C++ (OpenMP, SIMD)          CUDA, one block per row
linear_cross_entropy     torch GEMM + C++ CE         cuBLAS GEMM + CUDA CE
mlm_mask                 C++ (OpenMP), Philox        CUDA, Philox: same bits as CPU
attention                BackendUnavailableError     CUDA, flash-style tiles
=======================  ==========================  ==============================

Floating inputs must be float32, float16 or bfloat16 (maths is float32); float64
raises :class:`BackendUnavailableError`, as does an attention head dim other than
64 or 128.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from minipt._backend import BackendUnavailableError, native_module
from minipt.ops.cross_entropy import reduce_loss

# dtype codes of the extension (kernels/common.h, FloatType)
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ATTENTION_HEAD_DIMS = (64, 128)
# linear_cross_entropy materialises at most this many logits at once (64 MiB in float32)
LOGITS_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- checks
def _float_code(op: str, name: str, x: torch.Tensor) -> int:
    code = FLOAT_CODES.get(x.dtype)
    if code is None:
        raise BackendUnavailableError(
            f"{op}: backend='native' supports float32, float16 and bfloat16 {name}, got {x.dtype}"
        )
    return code


def _check_device(op: str, *named: tuple[str, torch.Tensor]) -> None:
    device = named[0][1].device
    for name, x in named:
        if x.device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(
                f"{op}: backend='native' runs on CPU and CUDA tensors; {name} is on {x.device}"
            )
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but {named[0][0]} is on {device}; expected one device")


def _check_contiguous(op: str, *named: tuple[str, torch.Tensor]) -> None:
    # The kernels index raw memory as dense row-major arrays. The public functions
    # below make inputs contiguous; this guards direct calls of the custom ops.
    for name, x in named:
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")


def _run(kernel: str, device: torch.device, **args) -> None:
    """Call ``_C.<kernel>_cpu`` with the torch thread count, or ``_C.<kernel>_cuda`` on the current stream."""
    _C = native_module()
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_C, f"{kernel}_cuda")(**args, stream=torch.cuda.current_stream().cuda_stream)
    else:
        getattr(_C, f"{kernel}_cpu")(**args, num_threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- cross-entropy
def _ce_args(logits, target, ignore_index, label_smoothing) -> dict:
    op = "cross_entropy"
    _check_device(op, ("logits", logits), ("target", target))
    _check_contiguous(op, ("logits", logits), ("target", target))
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
        dtype=_float_code(op, "logits", logits), target_size=target.element_size(), ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


@torch.library.custom_op("minipt::native_cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) and log-sum-exps (N,), both float32; ignored rows have loss 0."""
    args = _ce_args(logits, target, ignore_index, label_smoothing)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _run("cross_entropy_forward", logits.device, loss=loss.data_ptr(), lse=lse.data_ptr(), **args)
    return loss, lse


@cross_entropy_forward.register_fake
def _(logits, target, ignore_index, label_smoothing):
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("minipt::native_cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """Gradient wrt the logits of Σ_i grad_rows[i]·loss[i]; grad_rows and lse are float32 (N,)."""
    args = _ce_args(logits, target, ignore_index, label_smoothing)
    for name, x in (("lse", lse), ("grad_rows", grad_rows)):
        if x.dtype != torch.float32 or x.shape != target.shape:
            raise ValueError(
                f"cross_entropy: {name} must be float32 of shape {tuple(target.shape)}, got {x.dtype} {tuple(x.shape)}"
            )
    _check_device("cross_entropy", ("logits", logits), ("lse", lse), ("grad_rows", grad_rows))
    _check_contiguous("cross_entropy", ("lse", lse), ("grad_rows", grad_rows))
    grad = torch.empty_like(logits)
    _run("cross_entropy_backward", logits.device, lse=lse.data_ptr(), grad_rows=grad_rows.data_ptr(),
         grad_logits=grad.data_ptr(), **args)
    return grad


@cross_entropy_backward.register_fake
def _(logits, target, lse, grad_rows, ignore_index, label_smoothing):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, target, ctx.ignore_index, ctx.label_smoothing = inputs
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, grad_loss, grad_lse):
    # lse is an internal by-product for the backward; nothing differentiates through it.
    logits, target, lse = ctx.saved_tensors
    grad_rows = grad_loss.float().contiguous()
    grad = cross_entropy_backward(logits, target, lse, grad_rows, ctx.ignore_index, ctx.label_smoothing)
    return grad, None, None, None


cross_entropy_forward.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(logits, target, *, ignore_index, reduction, label_smoothing):
    _float_code("cross_entropy", "logits", logits)
    logits, target = logits.contiguous(), target.contiguous()
    loss, _ = cross_entropy_forward(logits, target, ignore_index, float(label_smoothing))
    return reduce_loss(loss, target != ignore_index, reduction).to(logits.dtype)


# ----------------------------------------------------------------------------- attention
def _attention_args(q, k, v, attention_mask, out, lse, is_causal, scale) -> dict:
    op = "attention"
    named = [("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)]
    if attention_mask is not None:
        named.append(("attention_mask", attention_mask))
    _check_device(op, *named)
    if q.device.type != "cuda":
        raise BackendUnavailableError(
            f"{op}: backend='native' has CUDA kernels only (there is no C++ CPU attention); got tensors on "
            f"{q.device}. Use backend='torch' on the CPU."
        )
    _check_contiguous(op, *named)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"{op}: q, k, v and out must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(out.shape)}")
    B, H, T, D = q.shape
    if D not in ATTENTION_HEAD_DIMS:
        raise BackendUnavailableError(f"{op}: backend='native' supports head dims {ATTENTION_HEAD_DIMS}, got {D}")
    if not (k.dtype == v.dtype == out.dtype == q.dtype):
        raise TypeError(f"{op}: q, k, v and out must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {out.dtype}")
    if lse.dtype != torch.float32 or lse.shape != (B, H, T):
        raise ValueError(f"{op}: lse must be float32 of shape {(B, H, T)}, got {lse.dtype} {tuple(lse.shape)}")
    if attention_mask is not None and (attention_mask.dtype != torch.uint8 or attention_mask.shape != (B, T)):
        raise ValueError(
            f"{op}: the key mask must be uint8 of shape {(B, T)}, got {attention_mask.dtype} "
            f"{tuple(attention_mask.shape)}"
        )
    return dict(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        key_mask=0 if attention_mask is None else attention_mask.data_ptr(), batch=B, heads=H, seq_len=T,
        head_dim=D, dtype=_float_code(op, "q, k and v", q), is_causal=is_causal, scale=scale,
    )


@torch.library.custom_op("minipt::native_attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor], is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, T, D) and the base-2 log-sum-exp of each row's scaled scores (B, H, T), float32.

    key_mask is (B, T) uint8 with 1 for a real token, or None.
    """
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    args = _attention_args(q, k, v, key_mask, out, lse, is_causal, scale)
    _run("attention_forward", q.device, **args)
    return out, lse


@attention_forward.register_fake
def _(q, k, v, key_mask, is_causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("minipt::native_attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: Optional[torch.Tensor], is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from dout, deterministically (no atomics)."""
    args = _attention_args(q, k, v, key_mask, out, lse, is_causal, scale)
    _check_device("attention", ("q", q), ("grad_out", grad_out))
    _check_contiguous("attention", ("grad_out", grad_out))
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype:
        raise ValueError(
            f"attention: grad_out must match q's shape and dtype, got {grad_out.dtype} {tuple(grad_out.shape)}"
        )
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    _run("attention_backward", q.device, grad_out=grad_out.data_ptr(), delta=delta.data_ptr(),
         grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr(), **args)
    return grad_q, grad_k, grad_v


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_mask, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_mask, ctx.is_causal, ctx.scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    grads = attention_backward(grad_out.contiguous(), q, k, v, out, lse, key_mask, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None)


attention_forward.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q, k, v, *, is_causal, attention_mask, scale):
    op = "attention"
    _float_code(op, "q, k and v", q)
    if q.device.type != "cuda":
        raise BackendUnavailableError(
            f"{op}: backend='native' has CUDA kernels only (there is no C++ CPU attention); got tensors on "
            f"{q.device}. Use backend='torch' on the CPU."
        )
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        raise BackendUnavailableError(
            f"{op}: backend='native' supports head dims {ATTENTION_HEAD_DIMS}, got {q.shape[-1]}"
        )
    key_mask = None if attention_mask is None else attention_mask.ne(0).to(torch.uint8).contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), key_mask, bool(is_causal), scale)
    return out


# ----------------------------------------------------------------------------- linear cross-entropy
class _LinearCrossEntropy(torch.autograd.Function):
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
        grads = _LinearCrossEntropy._new_grads(hidden, weight, bias, needs) if eager else None
        if eager:  # d(loss)/d(loss_i): 1 for sum, 1/count for mean; ignored rows are zeroed by the kernel
            row_scale = counted.float() / (counted.sum().clamp(min=1) if reduction == "mean" else 1)
        for rows in _row_chunks(N, V):
            logits = F.linear(hidden[rows], weight, bias)  # (chunk, V), the only logits alive
            losses[rows], lse[rows] = cross_entropy_forward(logits, target[rows], ignore_index, label_smoothing)
            if eager:
                grad_logits = cross_entropy_backward(
                    logits, target[rows], lse[rows], row_scale[rows].contiguous(), ignore_index, label_smoothing
                )
                _LinearCrossEntropy._accumulate(grads, rows, grad_logits, hidden, weight)
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
            grads = _LinearCrossEntropy._new_grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            grad_rows = grad_loss.float().contiguous()
            for rows in _row_chunks(hidden.shape[0], weight.shape[0]):
                logits = F.linear(hidden[rows], weight, bias)
                grad_logits = cross_entropy_backward(
                    logits, target[rows], lse[rows], grad_rows[rows], ignore_index, label_smoothing
                )
                _LinearCrossEntropy._accumulate(grads, rows, grad_logits, hidden, weight)
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


def linear_cross_entropy(hidden, weight, target, *, bias, ignore_index, reduction, label_smoothing):
    op = "linear_cross_entropy"
    _float_code(op, "hidden", hidden)
    named = [("hidden", hidden), ("weight", weight), ("target", target)]
    if bias is not None:
        named.append(("bias", bias))
    _check_device(op, *named)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, reduction, float(label_smoothing))


# ----------------------------------------------------------------------------- MLM masking
@torch.library.custom_op("minipt::native_mlm_mask", mutates_args=())
def mlm_mask_op(
    input_ids: torch.Tensor, special_tokens_mask: Optional[torch.Tensor], mask_token_id: int, vocab_size: int,
    mlm_probability: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels), both shaped and typed like input_ids; see minipt.ops.mlm_mask."""
    op = "mlm_mask"
    named = [("input_ids", input_ids)]
    if special_tokens_mask is not None:
        named.append(("special_tokens_mask", special_tokens_mask))
    _check_device(op, *named)
    _check_contiguous(op, *named)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: input_ids must be int32 or int64, got {input_ids.dtype}")
    if special_tokens_mask is not None:
        if special_tokens_mask.shape != input_ids.shape:
            raise ValueError(
                f"{op}: special_tokens_mask must have shape {tuple(input_ids.shape)}, "
                f"got {tuple(special_tokens_mask.shape)}"
            )
        if special_tokens_mask.dtype not in (torch.bool, torch.uint8, torch.int32, torch.int64):
            raise TypeError(
                f"{op}: special_tokens_mask must be bool, uint8, int32 or int64, got {special_tokens_mask.dtype}"
            )
    masked, labels = torch.empty_like(input_ids), torch.empty_like(input_ids)
    _run(
        "mlm_mask", input_ids.device, input_ids=input_ids.data_ptr(),
        special=0 if special_tokens_mask is None else special_tokens_mask.data_ptr(),
        special_size=0 if special_tokens_mask is None else special_tokens_mask.element_size(),
        masked=masked.data_ptr(), labels=labels.data_ptr(), numel=input_ids.numel(), id_size=input_ids.element_size(),
        mask_token_id=mask_token_id, vocab_size=vocab_size, mlm_probability=mlm_probability, seed=seed,
    )
    return masked, labels


@mlm_mask_op.register_fake
def _(input_ids, special_tokens_mask, mask_token_id, vocab_size, mlm_probability, seed):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


def mlm_mask(input_ids, *, mask_token_id, vocab_size, special_tokens_mask, mlm_probability, seed):
    if special_tokens_mask is not None:
        special_tokens_mask = special_tokens_mask.contiguous()
    return mlm_mask_op(
        input_ids.contiguous(), special_tokens_mask, mask_token_id, vocab_size, float(mlm_probability), seed
    )
