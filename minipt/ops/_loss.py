"""Loss plumbing shared by the cross-entropy ops and the models. It imports no op."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position that carries no loss (torch's and Hugging Face's convention)


def reduce_loss(loss: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses; ``counted`` marks rows that are not ignored.

    The mean over zero counted rows is 0.0, not NaN (minipt's one departure from torch).
    """
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum().clamp(min=1)


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap · tanh(logits / softcap)`` (Gemma 2's final-logit soft-capping); the logits as they are for None.

    Every logit lands in (-softcap, softcap), -inf at -softcap. The models apply it
    wherever they hand out logits, the losses inside their kernels.
    """
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def z_term(lse: torch.Tensor, counted: torch.Tensor, z_loss: float, reduction: str) -> torch.Tensor:
    """The z-loss part of a loss, ``z_loss · lse²`` on each counted row, reduced as the loss is.

    Detached: it is what a run logs beside the cross-entropy, while the loss itself
    already carries its gradient.
    """
    rows = torch.where(counted, z_loss * lse.detach().square(), 0.0)
    return reduce_loss(rows, counted, reduction)
