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
