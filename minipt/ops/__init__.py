"""minipt's ops. Each takes ``backend="auto" | "torch" | "triton" | "native"``."""

from minipt.ops.attention import attention, attention_ref
from minipt.ops.cross_entropy import cross_entropy, cross_entropy_ref
from minipt.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from minipt.ops.mlm_mask import masked_positions, mlm_mask, mlm_mask_ref

__all__ = [
    "attention",
    "attention_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "masked_positions",
    "mlm_mask",
    "mlm_mask_ref",
]
