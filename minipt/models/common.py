"""What GPT and BERT share: the output record, the config and input checks, the
named sizes, the layers a sliding window applies to, the split and merge of
attention heads, and the FLOPs estimate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minipt.ops._checks import check_softcap


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None  # total loss: GPT's LM loss, or BERT's mlm_loss + nsp_loss
    logits: torch.Tensor | None = None  # (B, T, V) next-token (GPT) or MLM (BERT) logits
    nsp_logits: torch.Tensor | None = None  # (B, 2), or (B, S, 2) at cls_positions; 0 = B follows A, 1 = B is random
    mlm_loss: torch.Tensor | None = None  # BERT: mean CE over the masked positions (with the z term, if any)
    nsp_loss: torch.Tensor | None = None  # BERT: mean CE of the next-sentence classifier
    # BERT with labels: the MLM head's output at the K picked rows (K >= masked positions; the
    # padding rows' targets are IGNORE_INDEX), what the loss read; BERT.mlm_logits scores them.
    masked_hidden: torch.Tensor | None = None  # (K, C)
    masked_targets: torch.Tensor | None = None  # (K,)
    # With labels and z_loss > 0: the z term (z_loss · lse², mean over the predicted tokens) that the loss
    # includes, detached, for logging apart from the cross-entropy.
    z_loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------- configs
def check_config(model: str, config, config_cls: type) -> None:
    if not isinstance(config, config_cls):
        raise TypeError(f"{model}: config must be a {config_cls.__name__}, got {type(config).__name__}")


def check_positive_int(cls_name: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls_name}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{cls_name}: {name} must be a positive int, got {value}")


def check_token_id(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(cfg).__name__}: {name} must be an int, got {type(value).__name__}")
    if not 0 <= value < cfg.vocab_size:
        raise ValueError(f"{type(cfg).__name__}: {name} must be in [0, vocab_size={cfg.vocab_size}), got {value}")


def check_shared_fields(cfg) -> None:
    """Checks both configs share: sizes, heads dividing the width, dropout and eps.

    ``backend`` is left to the ops, which check it at every call against the one
    list of backends (``minipt.ops._backend.BACKENDS``).
    """
    name = type(cfg).__name__
    for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        check_positive_int(name, field, getattr(cfg, field))
    if cfg.n_embd % cfg.n_head != 0:
        raise ValueError(
            f"{name}: n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}), "
            "so that every head gets n_embd // n_head channels"
        )
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a float in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg.layer_norm_eps, bool) or not isinstance(cfg.layer_norm_eps, (int, float)) or not (
        0.0 < cfg.layer_norm_eps < 1.0
    ):
        raise ValueError(f"{name}: layer_norm_eps must be a float in (0, 1), got {cfg.layer_norm_eps!r}")
    check_softcap(name, cfg.logit_softcap, "logit_softcap")  # the losses' own check of their softcap


def check_window_fields(cfg) -> None:
    """``attn_window`` and ``global_every``, which both configs share: positive ints or None, the second
    only with the first."""
    name = type(cfg).__name__
    for field in ("attn_window", "global_every"):
        if getattr(cfg, field) is not None:
            check_positive_int(name, field, getattr(cfg, field))
    if cfg.global_every is not None and cfg.attn_window is None:
        raise ValueError(f"{name}: global_every needs attn_window: it picks the layers that attend beyond the window")


def windowed_layer(cfg, layer: int) -> bool:
    """Whether layer ``layer`` (from 0) attends through ``cfg.attn_window``: every layer, or with
    ``global_every`` = K all but layers 0, K, 2K, ..., which attend to the whole row (ModernBERT's pattern)."""
    return cfg.attn_window is not None and (cfg.global_every is None or layer % cfg.global_every != 0)


def from_preset(cls, presets: dict, name: str, overrides: dict):
    """``cls`` at the named size of ``presets``, with any field replaced by ``overrides``."""
    if name not in presets:
        raise ValueError(f"{cls.__name__}.preset: unknown preset {name!r}; expected one of {sorted(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.preset: unknown field(s) {unknown}; expected fields of {sorted(known)}")
    return cls(**{**presets[name], **overrides})


# ----------------------------------------------------------------------------- inputs
def check_ids(model: str, name: str, ids, block_size: int, like: torch.Tensor | None = None) -> None:
    """``ids`` is an integer (B, T) tensor with 1 <= T <= block_size, or of the shape of ``like``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{model}: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{model}: {name} must hold integer ids, got dtype {ids.dtype}")
    if like is None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{model}: {name} must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > block_size:
            raise ValueError(
                f"{model}: {name} has {ids.shape[1]} positions but the model's block_size is {block_size}"
            )
    elif ids.shape != like.shape:
        raise ValueError(
            f"{model}: {name} must have the shape of input_ids {tuple(like.shape)}, got {tuple(ids.shape)}")


# ----------------------------------------------------------------------------- heads
def split_heads(qkv: torch.Tensor, n_head: int):
    """(B, T, 3·C) packed projections -> q, k, v, each (B, nh, T, hs), as views (no copy)."""
    B, T, C3 = qkv.shape
    return tuple(t.view(B, T, n_head, C3 // (3 * n_head)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, nh·hs), heads side by side.

    The attention op returns a view of (B, T, nh, hs) memory, so this is a view
    too; reshape copies only for an output laid out otherwise (the torch backend's).
    """
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


# ----------------------------------------------------------------------------- cost
def training_flops_per_token(params: float, config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a model whose matmuls use ``params`` weights.

    6·N + 12·n_layer·n_embd·T, the estimate of PaLM (appendix B) that nanoGPT uses
    for MFU: 6·N for the matmuls against N parameters (2 forward, 4 backward),
    12·L·C·T for the attention scores and their weighted sum over T keys, counting
    the full T×T even though causal masking skips half.
    """
    return 6.0 * params + 12.0 * config.n_layer * config.n_embd * seq_len
