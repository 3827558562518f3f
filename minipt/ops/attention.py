"""Masked softmax attention: bidirectional with key padding (BERT) or causal (GPT).

    out = softmax(scale · Q Kᵀ + mask) V,   Q, K, V: (B, H, T, D)

The mask combines key padding (``attention_mask[b, j] == 0`` hides key j from
every query of sequence b) and, when ``is_causal``, hides keys j > i from query i.
A query row with no visible key returns zeros, and its gradients are zero.

Memory traffic of a materialising attention (SDPA's math path, taken whenever a
mask is given): read 3·BHTD, write and re-read the (B, H, T, T) scores and
probabilities, write BHTD. The (T, T) matrices dominate once T > D, which is why
the Triton kernel never materialises them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minipt._backend import BackendUnavailableError, resolve_backend
from minipt.ops._checks import FLOAT_DTYPES, check_same, check_tensor

OP = "attention"


# ----------------------------------------------------------------------------- reference
def visible_keys(T: int, attention_mask: torch.Tensor | None, is_causal: bool, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T) mask of the keys each query may see, or None when all are visible."""
    visible = None
    if attention_mask is not None:
        visible = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if is_causal:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
        visible = causal if visible is None else visible & causal
    return visible


def attention_ref(q, k, v, *, is_causal=False, attention_mask=None, scale=None, upcast=True):
    """PyTorch reference on ``F.scaled_dot_product_attention``.

    With ``upcast`` it computes in at least float32 and casts back; without, it is
    what PyTorch itself does in the input dtype (the baseline of the low-precision
    tolerance rule, and ``backend="torch"``).
    """
    out_dtype = q.dtype
    if upcast:
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    T = q.shape[-2]
    if attention_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        return out.to(out_dtype)
    visible = visible_keys(T, attention_mask, is_causal, q.device)  # (B, 1, T, T)
    # A row with no visible key would be softmax(all -inf) = NaN, in the output and
    # in every gradient. Let such rows see every key, then zero their output: the
    # zeroed output sends no gradient back, so q, k and v get none from them.
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~any_visible, scale=scale)
    return (out * any_visible).to(out_dtype)  # (B, H, T, D)


# ----------------------------------------------------------------------------- backends
def _attention_triton(q, k, v, is_causal, attention_mask, scale):
    raise BackendUnavailableError(f"{OP}: backend='triton' is not implemented yet")


# ----------------------------------------------------------------------------- public op
def _check_inputs(q, k, v, attention_mask, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, x, ndim=4, dtypes=FLOAT_DTYPES)
    check_same(OP, ("q", q), ("k", k), ("v", v))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{OP}: q, k and v must share one shape (B, H, T, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, _, T, _ = q.shape
    if attention_mask is not None:
        check_tensor(OP, "attention_mask", attention_mask)
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                f"{OP}: attention_mask must be bool or integer 0/1 (1 = real token), got {attention_mask.dtype}; "
                "additive float masks are not accepted"
            )
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"{OP}: attention_mask must have shape (B, T) = ({B}, {T}), got {tuple(attention_mask.shape)}")
        check_same(OP, ("q", q), ("attention_mask", attention_mask), dtype=False)
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")


def attention(q, k, v, *, is_causal=False, attention_mask=None, scale=None, backend="auto"):
    """Scaled dot-product attention over (B, H, T, D) tensors; see the module docstring."""
    _check_inputs(q, k, v, attention_mask, scale)
    backend = resolve_backend(backend, q.device, OP)
    if backend == "torch":
        return attention_ref(q, k, v, is_causal=is_causal, attention_mask=attention_mask, scale=scale, upcast=False)
    if backend == "triton":
        return _attention_triton(q, k, v, is_causal, attention_mask, scale)
    from minipt.ops import native

    return native.attention(q, k, v, is_causal=is_causal, attention_mask=attention_mask, scale=scale)
