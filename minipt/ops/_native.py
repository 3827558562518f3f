"""Plumbing of ``backend="native"`` shared by every op: dtype codes, device and layout
checks, and the call into ``minipt._C``. It imports no op.

The extension takes raw pointers, shapes and the CUDA stream, not torch tensors, so
the build needs no libtorch. Each op's file wraps its kernels in ``torch.library``
custom ops (``minipt::native_<op>_<fwd|bwd>``) with fake implementations, so
``torch.compile`` keeps each kernel as one opaque node instead of breaking the graph.

What runs where:

=======================  ==========================  ==============================
op                       CPU tensors                 CUDA tensors
=======================  ==========================  ==============================
cross_entropy            C++ (OpenMP, SIMD)          CUDA, one block per row
linear_cross_entropy     torch GEMM + C++ CE         cuBLAS GEMM + CUDA CE
mlm_mask                 C++ (OpenMP), Philox        CUDA, Philox
attention                C++, flash-style tiles      CUDA, flash-style tiles
=======================  ==========================  ==============================

The MLM mask's bits are the same on every backend and device (see mlm_mask.py).
Floating inputs must be float32, float16 or bfloat16 (maths is float32); float64
raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import torch

from minipt.ops._backend import BackendUnavailableError, native_module

# dtype codes of the extension (kernels/common.h, FloatType)
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def float_code(op: str, name: str, x: torch.Tensor) -> int:
    code = FLOAT_CODES.get(x.dtype)
    if code is None:
        raise BackendUnavailableError(
            f"{op}: backend='native' supports float32, float16 and bfloat16 {name}, got {x.dtype}"
        )
    return code


def check_device(op: str, *named: tuple[str, torch.Tensor]) -> None:
    device = named[0][1].device
    for name, x in named:
        if x.device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(
                f"{op}: backend='native' runs on CPU and CUDA tensors; {name} is on {x.device}"
            )
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but {named[0][0]} is on {device}; expected one device")


def check_contiguous(op: str, *named: tuple[str, torch.Tensor]) -> None:
    # The kernels index raw memory as dense row-major arrays. Each op's native
    # wrapper makes inputs contiguous; this guards direct calls of the custom ops.
    for name, x in named:
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")


def run_kernel(kernel: str, device: torch.device, **args) -> None:
    """Call ``_C.<kernel>_cpu`` with the torch thread count, or ``_C.<kernel>_cuda`` on the current stream."""
    _C = native_module()
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_C, f"{kernel}_cuda")(**args, stream=torch.cuda.current_stream().cuda_stream)
    else:
        getattr(_C, f"{kernel}_cpu")(**args, num_threads=torch.get_num_threads())
