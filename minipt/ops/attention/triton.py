"""attention's Triton backend: the launch table of its kernels (``triton_kernels.py``),
their launchers and the autograd. The algorithm, its memory traffic and its precision
are described in the package's header (``__init__.py``)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from minipt.ops._backend import triton_interpreting
from minipt.ops._triton import triton, triton_op
from minipt.ops.attention._common import OP
from minipt.ops.attention.triton_kernels import (
    _attention_bwd_delta_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_fwd_kernel,
    _key_range_kernel,
)

HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- launch configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per compute capability, kernel, head
# dim class (up to 64, or 128) and bytes per element. The tiles follow the Triton
# tutorial's and FlashAttention-2's: 128-row query blocks on tensor cores for the
# forward and the dQ pass; the dK/dV pass holds a wide key block and walks thin
# query blocks (the mirror image). Where the tutorial's 4 warps run out of
# registers, 8 warps share the same tile. fp32 inputs run exact fp32 dots
# (input_precision="ieee"), which live in registers, hence the small tiles.
#
# Checked by tests/test_compile_gate.py, which compiles the kernels without a GPU
# (fp16/bf16 exhaustively: head dims 16-128, causal or not, key mask or not; fp32
# and short sequences sampled, fp32 compiled exhaustively once for sm_80 and
# sm_90 when the table was chosen) and passes with Triton 3.6 and 3.9: no spilled
# register on sm_80 and sm_90, shared memory within 163 KB (sm_80) and 227 KB
# (sm_90) per block, tensor-core instructions for fp16/bf16; the 16-bit variants
# of the 8.6 and 8.9 entries (head dims 64 and 128) also compile spill-free within
# their 99 KB. A capability between entries takes the nearest lower one. A fixed
# table rather than an autotuner: each config is one compile, where tuning would
# compile and time every candidate for every shape class.
_FP32_CONFIGS = {
    ("fwd", 64, 4): (32, 32, 8, 2),
    ("fwd", 128, 4): (32, 16, 8, 2),
    ("dkdv", 64, 4): (32, 32, 8, 2),
    ("dkdv", 128, 4): (16, 32, 8, 2),
    ("dq", 64, 4): (32, 32, 8, 2),
    ("dq", 128, 4): (32, 16, 8, 2),
}
_AMPERE_CONFIGS = {
    ("fwd", 64, 2): (128, 32, 8, 3),
    ("fwd", 128, 2): (128, 32, 8, 3),
    ("dkdv", 64, 2): (16, 128, 8, 3),
    ("dkdv", 128, 2): (32, 64, 8, 3),
    ("dq", 64, 2): (128, 32, 8, 3),
    ("dq", 128, 2): (128, 32, 8, 3),
    **_FP32_CONFIGS,
    # With 8 warps ptxas holds some fp32 kernels to 80 registers and spills on
    # sm_8x; 4 warps do not spill there (but spill 256-448 B on sm_90).
    ("fwd", 64, 4): (32, 32, 4, 2),
    ("dkdv", 64, 4): (16, 32, 4, 2),
    ("dkdv", 128, 4): (16, 32, 4, 2),
}
# 8.6 and 8.9 have about 100 KB per SM: two stages bring the D = 128 forward from
# 64 to 48 KB, two blocks per SM. Elsewhere two stages gained no second block, and
# once made ptxas spill (the D = 64 forward, Triton 3.9).
_SMALL_SHARED_CONFIGS = {**_AMPERE_CONFIGS, ("fwd", 128, 2): (128, 32, 8, 2)}
_CONFIGS = {
    (8, 0): _AMPERE_CONFIGS,
    (8, 6): _SMALL_SHARED_CONFIGS,
    (8, 9): _SMALL_SHARED_CONFIGS,
    (9, 0): {
        ("fwd", 64, 2): (128, 64, 8, 3),
        ("fwd", 128, 2): (128, 64, 8, 3),
        ("dkdv", 64, 2): (64, 128, 8, 3),
        ("dkdv", 128, 2): (32, 128, 8, 3),
        ("dq", 64, 2): (128, 32, 4, 4),
        ("dq", 128, 2): (128, 32, 8, 3),
        **_FP32_CONFIGS,
        ("dq", 64, 4): (32, 32, 4, 2),  # 8 warps: 80 registers and a spill (Triton 3.6)
    },
}
# Packed documents keep each query row's document start live through the dQ loop:
# on sm_80 the D = 128 dQ kernel then needed more than 255 registers and spilled
# 16-48 B (Triton 3.9); 64-row query blocks on 4 warps use 230-248 and spill none.
# Capabilities below 9.0 take these entries when document_ids are given.
_AMPERE_DOCUMENT_CONFIGS = {("dq", 128, 2): (64, 32, 4, 3)}
# Sliding windows add a loop over the key blocks that cut the window's left edge to the
# forward and dQ kernels, and with it live values. Each windowed variant was compiled once
# (Triton 3.9) with every mask, 16-bit and fp32 for sm_80 and sm_90, 16-bit for 8.6 and 8.9;
# where the table's entry spilled, windowed launches take these: on sm_90 two pipeline stages
# for the 16-bit D = 128 forward (it needed more than 255 registers and spilled 8-16 B) and
# 16-key blocks for the fp32 D = 64 forward (24 B with documents); on sm_8x 4 warps or smaller
# blocks for fp32 (8 warps held them to 80-128 registers, 8-16 B), and on 8.6 and 8.9 64-row
# blocks on 4 warps for the 16-bit D = 128 forward (40 B on two stages of 128 rows) and 16-key
# blocks for its dQ (8 B with documents).
_AMPERE_WINDOW_CONFIGS = {
    ("fwd", 64, 4): (32, 16, 4, 2), ("fwd", 128, 4): (32, 16, 4, 2), ("dkdv", 128, 4): (16, 16, 4, 2),
    ("dq", 64, 4): (16, 32, 4, 2), ("dq", 128, 4): (32, 16, 4, 2),
}
_SMALL_SHARED_WINDOW_CONFIGS = {
    **_AMPERE_WINDOW_CONFIGS, ("fwd", 128, 2): (64, 32, 4, 2), ("dq", 128, 2): (64, 16, 4, 3),
}
_WINDOW_CONFIGS = {
    (8, 0): _AMPERE_WINDOW_CONFIGS,
    (8, 6): _SMALL_SHARED_WINDOW_CONFIGS,
    (8, 9): _SMALL_SHARED_WINDOW_CONFIGS,
    (9, 0): {("fwd", 128, 2): (128, 64, 8, 2), ("fwd", 64, 4): (32, 16, 8, 2)},
}
# Sequences of at most 64 tokens fill a 128-row query block only half: 64 rows.
_SHORT_T = 64
_SHORT_CONFIGS = {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3)}
# The interpreter runs small unequal blocks, so that test sizes cross diagonal and tail blocks.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}


def _table_capability(capability: tuple[int, int]) -> tuple[int, int]:
    """The table's entry for ``capability``: itself, else the nearest lower one (the lowest below 8.0)."""
    lower = [c for c in _CONFIGS if c <= capability]
    return max(lower) if lower else min(_CONFIGS)


@functools.cache
def _device_capability(device_index: int | None) -> tuple[int, int]:
    # Read at the first launch on each device, never at import: importing minipt must not touch a GPU.
    return torch.cuda.get_device_capability(device_index)


def _launch_config(kind: str, q: torch.Tensor, documents: bool = False, window: bool = False) -> dict:
    """The config of kernel ``kind`` ("fwd", "dkdv" or "dq") for q's shape, dtype, GPU, packing and window."""
    _, _, T, head_dim = q.shape
    if triton_interpreting():
        config = _INTERPRETER_CONFIGS[kind]
    else:
        arch = _table_capability(_device_capability(q.device.index))
        if T <= _SHORT_T and q.dtype.itemsize == 2 and kind in _SHORT_CONFIGS:
            config = _SHORT_CONFIGS[kind]
        else:
            key = (kind, 64 if head_dim <= 64 else 128, q.dtype.itemsize)
            config = _CONFIGS[arch][key]
            if documents and arch < (9, 0):
                config = _AMPERE_DOCUMENT_CONFIGS.get(key, config)
            if window:
                config = _WINDOW_CONFIGS[arch].get(key, config)
    block_m, block_n, num_warps, num_stages = config
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def _upcast(q: torch.Tensor) -> bool:
    return triton_interpreting() and q.dtype == torch.bfloat16


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


# ----------------------------------------------------------------------------- launchers
# torch.library.triton_op makes each launcher an operator that torch.compile keeps
# whole (no graph break) and sees into; wrap_triton makes the launches traceable.
def _last_dim_unit(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any B, H and T strides but read D with stride 1; anything
    # else (an expanded gradient, a transposed D) is copied once here.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_view(attention_mask: torch.Tensor) -> torch.Tensor:
    # A bool tensor is one byte per element; read it as uint8 rather than copy it.
    return attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask


def _window_args(T: int, window_left: int, window_right: int) -> tuple[int, int]:
    # An unbounded side (-1) becomes T, a bound every (query, key) pair meets, so that
    # the kernels compare without a special case.
    return (T if window_left == -1 else window_left), (T if window_right == -1 else window_right)


@triton_op("minipt::triton_attention_fwd", mutates_args=())
def _attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], doc_span: Optional[Tensor], is_causal: bool,
    scale: float, window_left: int, window_right: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns the output, the base-2 row log-sum-exp (B, H, T) and the (B, 2) real-key spans.

    ``window_left`` and ``window_right`` are ``window_bounds``' resolved window, -1 for an unbounded side."""
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    B, H, T, D = q.shape
    # (B, T, H, D) memory returned as a (B, H, T, D) view: merging heads is then free.
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    has_mask = attention_mask is not None
    if has_mask:
        mask = _mask_view(attention_mask)
        key_range = torch.empty((B, 2), dtype=torch.int32, device=q.device)
        torch.library.wrap_triton(_key_range_kernel)[(B,)](mask, key_range, mask.stride(0), mask.stride(1), T, 1024)
        mask_strides = mask.stride()
    else:
        # Never read: the kernels compile the mask code out when HAS_MASK is False.
        mask, key_range, mask_strides = q, torch.empty((0,), dtype=torch.int32, device=q.device), (0, 0)
    has_window = (window_left, window_right) != (-1, -1)
    config = _launch_config("fwd", q, window=has_window)
    torch.library.wrap_triton(_attention_fwd_kernel)[(triton.cdiv(T, config["BLOCK_M"]) * B * H,)](
        q, k, v, out, lse, mask, key_range, key_range if doc_span is None else doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *mask_strides,
        H, T, scale * math.log2(math.e), *_window_args(T, window_left, window_right),
        HEAD_DIM=D, IS_CAUSAL=is_causal, HAS_MASK=has_mask, HAS_DOCS=doc_span is not None,
        HAS_WINDOW=has_window, UPCAST=_upcast(q), **config,
    )
    return out, lse, key_range


@triton_op("minipt::triton_attention_bwd", mutates_args=())
def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attention_mask: Optional[Tensor], key_range: Tensor, doc_span: Optional[Tensor], is_causal: bool, scale: float,
    window_left: int, window_right: int,
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _last_dim_unit(out)
    grad_out = _last_dim_unit(grad_out)
    B, H, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # 4096 elements of each tensor per program: 64 rows of fp32 at D = 128 spilled on sm_90.
    block = 32 if triton_interpreting() else 4096 // D
    torch.library.wrap_triton(_attention_bwd_delta_kernel)[(triton.cdiv(T, block) * B * H,)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), H, T, D, block,
    )
    has_mask = attention_mask is not None
    mask = _mask_view(attention_mask) if has_mask else q
    mask_strides = mask.stride() if has_mask else (0, 0)
    flags = {"HEAD_DIM": D, "IS_CAUSAL": is_causal, "HAS_MASK": has_mask, "HAS_DOCS": doc_span is not None,
             "HAS_WINDOW": (window_left, window_right) != (-1, -1), "UPCAST": _upcast(q)}
    window = _window_args(T, window_left, window_right)
    doc_span = key_range if doc_span is None else doc_span
    qk_scale = scale * math.log2(math.e)
    config = _launch_config("dkdv", q, window=flags["HAS_WINDOW"])
    torch.library.wrap_triton(_attention_bwd_dkdv_kernel)[(triton.cdiv(T, config["BLOCK_N"]) * B * H,)](
        q, k, v, grad_out, dk, dv, lse, delta, mask, key_range, doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), *mask_strides,
        H, T, qk_scale, scale, *window, **flags, **config,
    )
    config = _launch_config("dq", q, documents=flags["HAS_DOCS"], window=flags["HAS_WINDOW"])
    torch.library.wrap_triton(_attention_bwd_dq_kernel)[(triton.cdiv(T, config["BLOCK_M"]) * B * H,)](
        q, k, v, grad_out, dq, lse, delta, mask, key_range, doc_span,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), *mask_strides,
        H, T, qk_scale, scale, *window, **flags, **config,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, doc_span, ctx.is_causal, ctx.scale, ctx.window_left, ctx.window_right = inputs
    out, lse, key_range = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, key_range, doc_span)


def _backward(ctx, grad_out, _grad_lse, _grad_key_range):
    q, k, v, out, lse, attention_mask, key_range, doc_span = ctx.saved_tensors
    dq, dk, dv = _attention_backward(
        grad_out, q, k, v, out, lse, attention_mask, key_range, doc_span, ctx.is_causal, ctx.scale, ctx.window_left,
        ctx.window_right,
    )
    return dq, dk, dv, None, None, None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(q, k, v, attention_mask, doc_span, is_causal: bool, scale: float, window_left: int,
                     window_right: int):
    """backend="triton" on checked inputs; doc_span is ``document_spans`` of the ids, or None, and the
    window is ``window_bounds``' (-1 for an unbounded side)."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{OP}: backend='triton' supports float16, bfloat16 and float32 inputs, got {str(q.dtype).replace('torch.', '')}"
        )
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"{OP}: backend='triton' supports head dims {HEAD_DIMS}, got head dim D = {D}")
    out, _, _ = _attention_forward(q, k, v, attention_mask, doc_span, is_causal, scale, window_left, window_right)
    return out
