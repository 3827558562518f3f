"""Argument checks shared by the ops. Each error names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("none", "mean", "sum")


def check_tensor(op: str, name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_same(op: str, reference: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor], dtype: bool = True) -> None:
    """All tensors on the device of the first; with ``dtype``, also of its dtype."""
    ref_name, ref = reference
    for name, x in others:
        if x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; expected one device")
        if dtype and x.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; expected one dtype")


def check_reduction(op: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(op: str, label_smoothing) -> None:
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")


# The kernels take both options as float32 scalars.
_FLOAT32 = torch.finfo(torch.float32)


def check_softcap(op: str, softcap, name: str = "softcap") -> None:
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float))
        or not _FLOAT32.tiny <= softcap <= _FLOAT32.max
    ):
        raise ValueError(f"{op}: {name} must be a positive finite float (float32's normal range) or None, "
                         f"got {softcap!r}")


def check_z_loss(op: str, z_loss) -> None:
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not 0 <= z_loss <= _FLOAT32.max:
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss!r}")


def check_flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def check_targets(op: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target is in [0, num_classes) or equals ignore_index, asserted on the device.

    ``torch._assert_async`` costs no host sync, where reading the answer back
    would cost one per training step: on CUDA a bad id stops the run with a
    device-side assert, on the CPU it raises a RuntimeError at once. The message
    cannot quote the bad value, which only the device knows.

    Call it inside an opaque custom op, where it runs eagerly even in a compiled
    graph: traced, inductor fuses the assert into a CPU kernel whose throw from
    inside an OpenMP region aborts the process.
    """
    valid = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
    torch._assert_async(
        valid.all(), f"{op}: target values must be in [0, {num_classes}) or equal ignore_index={ignore_index}"
    )
