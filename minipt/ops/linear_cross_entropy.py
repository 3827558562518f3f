"""Cross-entropy of a linear layer's output, without the (N, V) logits.

    loss = cross_entropy(hidden @ weightᵀ + bias, target)

hidden (N, D), weight (V, D), bias (V,). For an LM head, V is 30k–130k and the
fp32 logits of a 16k-token batch take 2–8 GB, more than the model. The fused
kernel walks over the logits in chunks, keeps only per-row statistics, and
produces the gradients of hidden, weight and bias chunk by chunk.

Memory traffic of the reference: write NV logits, then everything the
cross-entropy reference reads and writes; peak memory holds the logits, their
float32 copy and their gradient at once.
"""

from __future__ import annotations

import torch

from minipt._backend import BackendUnavailableError, resolve_backend
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_targets, check_tensor
from minipt.ops.cross_entropy import check_ce_args, cross_entropy_ref

OP = "linear_cross_entropy"


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


# ----------------------------------------------------------------------------- backends
def _linear_cross_entropy_triton(hidden, weight, target, bias, ignore_index, reduction, label_smoothing):
    raise BackendUnavailableError(f"{OP}: backend='triton' is not implemented yet")


# ----------------------------------------------------------------------------- public op
def _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing) -> None:
    check_tensor(OP, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_ce_args(OP, hidden, target, ignore_index, reduction, label_smoothing, logits_name="hidden")
    check_same(OP, ("hidden", hidden), ("weight", weight))
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
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits."""
    _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    check_targets(OP, target, weight.shape[0], ignore_index)
    backend = resolve_backend(backend, hidden.device, OP)
    if backend == "torch":
        return linear_cross_entropy_ref(
            hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, upcast=False,
        )
    if backend == "triton":
        return _linear_cross_entropy_triton(
            hidden, weight, target, bias, ignore_index, reduction, float(label_smoothing)
        )
    from minipt.ops import native

    return native.linear_cross_entropy(
        hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=float(label_smoothing),
    )
