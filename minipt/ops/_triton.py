"""Triton where it is installed, stand-ins where it is not.

Triton ships wheels for Linux only. On macOS or Windows ``minipt`` must still
import, so that the torch and native backends run there; the kernels below are
then defined as plain functions and never launched, because
:func:`minipt.ops._backend.resolve_backend` refuses ``backend="triton"`` without
Triton. Kernel modules import ``triton``, ``tl``, ``jit`` and ``triton_op`` from here
instead of from Triton and torch.library.
"""

from __future__ import annotations

import torch

IMPORT_ERROR: str | None = None  # why Triton is missing, for backend="triton"'s refusal
try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install on an odd platform
    triton = tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def jit(fn=None, **kwargs):
    """``triton.jit``, used bare or with keyword arguments; the identity without Triton."""
    if triton is not None:
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)
    return fn if fn is not None else (lambda f: f)


def triton_op(name: str, *, mutates_args):
    """``torch.library.triton_op``; without Triton a plain ``custom_op`` of the same name,
    so the op still exists (and torch logs no warning about kernels it cannot find)."""
    if triton is not None:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)
