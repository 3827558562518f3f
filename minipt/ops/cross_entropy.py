"""Cross-entropy over (N, V) logits, with the semantics of ``F.cross_entropy``.

    loss_i = -(1 - ε) · log p_i[t_i] - (ε / V) · Σ_j log p_i[j],   log p_i = x_i - lse(x_i)

Rows whose target is ``ignore_index`` contribute 0 and do not count towards the
mean. Unlike torch, a mean over zero counted rows is 0.0, not NaN.

Memory traffic of the reference: read NV (logits), write NV (log-probs), read NV
again for the gather and the smoothing sum; the backward reads and writes NV once
more. A fused kernel needs one read for the forward and one read + one write for
the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minipt._backend import BackendUnavailableError, resolve_backend
from minipt.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_label_smoothing,
    check_reduction,
    check_same,
    check_targets,
    check_tensor,
)

OP = "cross_entropy"


# ----------------------------------------------------------------------------- reference
def reduce_loss(loss: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses; ``counted`` marks rows that are not ignored."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum().clamp(min=1)


def cross_entropy_ref(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, upcast=True):
    """PyTorch reference on ``F.cross_entropy``, with minipt's mean over zero rows = 0.

    With ``upcast`` it computes in at least float32 and casts back; without, it is
    what PyTorch itself does in the input dtype (``backend="torch"``).
    """
    out_dtype = logits.dtype
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) if upcast else logits
    loss = F.cross_entropy(
        x, target.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )  # (N,), 0 on ignored rows
    return reduce_loss(loss, target != ignore_index, reduction).to(out_dtype)


# ----------------------------------------------------------------------------- backends
def _cross_entropy_triton(logits, target, ignore_index, reduction, label_smoothing):
    raise BackendUnavailableError(f"{OP}: backend='triton' is not implemented yet")


# ----------------------------------------------------------------------------- public op
def check_ce_args(op, logits, target, ignore_index, reduction, label_smoothing, logits_name="logits") -> None:
    check_tensor(op, logits_name, logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "target", target, ndim=1, dtypes=INDEX_DTYPES)
    check_same(op, (logits_name, logits), ("target", target), dtype=False)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{op}: target must have shape (N,) = ({logits.shape[0]},) to match {logits_name}, got {tuple(target.shape)}"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    check_reduction(op, reduction)
    check_label_smoothing(op, label_smoothing)


def cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto"):
    """Cross-entropy of (N, V) ``logits`` against (N,) class ids ``target``."""
    check_ce_args(OP, logits, target, ignore_index, reduction, label_smoothing)
    check_targets(OP, target, logits.shape[1], ignore_index)
    backend = resolve_backend(backend, logits.device, OP)
    if backend == "torch":
        return cross_entropy_ref(
            logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            upcast=False,
        )
    if backend == "triton":
        return _cross_entropy_triton(logits, target, ignore_index, reduction, float(label_smoothing))
    from minipt.ops import native

    return native.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing)
    )
