"""Backend selection for every op in :mod:`minipt.ops`.

An op accepts ``backend="auto" | "torch" | "triton" | "native"``:

* ``auto`` is Triton for CUDA tensors, and for CPU tensors the native C++
  kernels (every op has one), or torch where the extension was not built; the
  environment variable ``MINIPT_BACKEND`` replaces ``auto`` with a named backend.
* ``torch`` is the PyTorch reference that lives beside each kernel.
* ``triton`` needs a CUDA tensor, or ``TRITON_INTERPRET=1`` for CPU tensors.
* ``native`` is the pybind11 extension ``minipt._C``.

A backend that cannot serve a call raises :class:`BackendUnavailableError`; no op
ever swaps in another kernel behind the caller's back.
"""

from __future__ import annotations

import os

import torch

from minipt.errors import MiniptError
from minipt.ops._triton import IMPORT_ERROR

BACKENDS = ("auto", "torch", "triton", "native")


class BackendUnavailableError(MiniptError, RuntimeError):
    """The requested backend cannot run this call (names the backend and why)."""


class BackendSettingError(MiniptError, ValueError):
    """``MINIPT_BACKEND`` names no backend."""


def triton_interpreting() -> bool:
    # Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so what
    # counts is the value at import time; the conftest sets it before any import.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None when it can (minipt.ops._triton tries, once)."""
    return IMPORT_ERROR


def native_import_error() -> str | None:
    """Why the extension cannot be imported, or None when it can."""
    try:
        from minipt import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def native_module():
    """The compiled extension, or a BackendUnavailableError saying why it is missing."""
    try:
        from minipt import _C
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend='native' needs the compiled extension minipt._C, which failed to import "
            f"({exc}); reinstall with `pip install -e .`"
        ) from exc
    return _C


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` into the concrete backend that will run ``op`` on ``device``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get("MINIPT_BACKEND", "").strip()
        if override:
            if override not in BACKENDS:
                raise BackendSettingError(
                    f"{op}: environment variable MINIPT_BACKEND must be one of {BACKENDS}, got {override!r}"
                )
            backend = override
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else ("native" if native_import_error() is None else "torch")

    if backend == "triton":
        error = triton_import_error()
        if error is not None:
            raise BackendUnavailableError(f"{op}: backend='triton' but triton cannot be imported ({error})")
        if device.type != "cuda" and not triton_interpreting():
            raise BackendUnavailableError(
                f"{op}: backend='triton' runs on CUDA tensors; got a tensor on {device}. "
                "Set TRITON_INTERPRET=1 before importing minipt to run the kernels on the CPU."
            )
    elif backend == "native":
        _C = native_module()
        if device.type == "cuda" and not _C.has_cuda:
            raise BackendUnavailableError(
                f"{op}: backend='native' got a CUDA tensor, but minipt._C was built without CUDA "
                "(no nvcc at build time, or MINIPT_CUDA=OFF)"
            )
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"{op}: backend='native' supports CPU and CUDA tensors, got {device}")
    elif backend == "torch":
        pass
    return backend
