"""GPT (causal LM), BERT (MLM + NSP) and a BERT sequence classifier, built on minipt's ops.

Read top to bottom: the configs, the output record, then GPT from its attention
up to the model, then BERT the same way, and last the registry of the two kinds
with the one factory, :func:`build_model`, that turns a saved config into a model.

Every attention goes through ``minipt.ops.attention`` and every loss through
``minipt.ops`` (``linear_cross_entropy`` for the LM/MLM head, ``cross_entropy``
for NSP), with ``backend=config.backend``; ``backend="torch"`` is therefore
minipt on PyTorch's own ops (SDPA, F.cross_entropy). The LM head of both models
is tied to the word embedding, and with labels the loss is computed from the
hidden states, so the (B, T, V) logits exist only when the caller asks for them.

The attention op has no dropout: ``dropout`` acts on the embeddings, the
residual branches and (GPT) the MLP, never on the attention probabilities.

A training step never reads a tensor on the host: BERT's MLM head runs on a
fixed number of rows (``masked_capacity``) picked by ``masked_positions``, so the
forward pass has static shapes and compiles into one graph.

Packed rows. Both models can hold several documents in one row, each seeing only
itself (the attention op's ``document_ids``). GPT finds its documents on the
device: with ``doc_sep_id`` set, every occurrence of that token (<|endoftext|>)
opens a document, so a position's document is the running count of separators
up to it, and with ``reset_positions`` its position is its distance from the
last separator. BERT is given its layout by the caller (``position_ids``,
``document_ids`` and each pair's [CLS] position, see :mod:`minipt.data.packing`),
and reads NSP at every [CLS]. Hugging Face's GPT-2 has no document mask:
``minipt.hf.to_hf`` exports a GPT trained with one all the same, and the exported
model attends across separators, with positions counted from the input's start.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipt.ops import attention, cross_entropy, linear_cross_entropy
from minipt.ops._loss import IGNORE_INDEX
from minipt.ops.mlm_mask import masked_capacity, masked_positions


# ----------------------------------------------------------------------------- configs
def _check_positive_int(cls_name: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls_name}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{cls_name}: {name} must be a positive int, got {value}")


def _check_token_id(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(cfg).__name__}: {name} must be an int, got {type(value).__name__}")
    if not 0 <= value < cfg.vocab_size:
        raise ValueError(f"{type(cfg).__name__}: {name} must be in [0, vocab_size={cfg.vocab_size}), got {value}")


def _check_common(cfg) -> None:
    """Checks both configs share: sizes, heads dividing the width, dropout and eps.

    ``backend`` is left to the ops, which check it at every call against the one
    list of backends (``minipt.ops._backend.BACKENDS``).
    """
    name = type(cfg).__name__
    for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        _check_positive_int(name, field, getattr(cfg, field))
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


def _preset(cls, presets: dict, name: str, overrides: dict):
    if name not in presets:
        raise ValueError(f"{cls.__name__}.preset: unknown preset {name!r}; expected one of {sorted(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.preset: unknown field(s) {unknown}; expected fields of {sorted(known)}")
    return cls(**{**presets[name], **overrides})


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64, for tensor-core-friendly shapes
    block_size: int = 1024  # longest sequence: the number of learned positions
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; must divide n_embd
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on embeddings, residual branches and MLP output; the attention op has no dropout
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    backend: str = "auto"  # passed to every minipt.ops call: "auto" | "torch" | "triton" | "native"
    doc_sep_id: int | None = None  # the token that opens each document (<|endoftext|>): attention stops there
    reset_positions: bool = False  # with doc_sep_id: positions restart at 0 at each document's separator

    def __post_init__(self):
        _check_common(self)
        for name in ("bias", "reset_positions"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.doc_sep_id is not None:
            _check_token_id(self, "doc_sep_id")
        if self.reset_positions and self.doc_sep_id is None:
            raise ValueError("GPTConfig: reset_positions needs doc_sep_id: positions restart at a document's separator")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named size, with any field replaced by ``overrides``.

        "gpt2" is the 124M model with the vocabulary padded to 50304; pass
        ``vocab_size=50257`` (or use ``minipt.hf.from_hf``) to load OpenAI's weights.
        """
        return _preset(cls, GPT_PRESETS, name, overrides)


GPT_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt-mini": dict(vocab_size=8192, block_size=64, n_layer=4, n_head=4, n_embd=128),  # nanoGPT's CPU size
    "gpt-tiny": dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32),  # unit tests
}


@dataclass
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary of bert-base-uncased
    block_size: int = 512  # max positions: the number of learned position embeddings
    type_vocab_size: int = 2  # token types (segment A / segment B)
    n_layer: int = 12  # transformer layers
    n_head: int = 12  # attention heads per layer; must divide n_embd
    n_embd: int = 768  # hidden size
    n_inner: int | None = None  # width of the feed-forward layer; None means 4 * n_embd
    dropout: float = 0.1  # on embeddings and residual branches; the attention op has no dropout
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    pad_token_id: int = 0  # id of [PAD]: its word-embedding row starts at zero and gets no gradient from lookups
    backend: str = "auto"  # passed to every minipt.ops call: "auto" | "torch" | "triton" | "native"

    def __post_init__(self):
        _check_common(self)
        _check_positive_int("BertConfig", "type_vocab_size", self.type_vocab_size)
        if self.n_inner is not None:
            _check_positive_int("BertConfig", "n_inner", self.n_inner)
        _check_token_id(self, "pad_token_id")

    @property
    def inner_size(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """A named size, with any field replaced by ``overrides``.

        "bert-tiny" and "bert-mini" are the sizes Google released under those names
        (2 layers × 128 and 4 layers × 256).
        """
        return _preset(cls, BERT_PRESETS, name, overrides)


BERT_PRESETS = {
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768),  # 110M
    "bert-large": dict(n_layer=24, n_head=16, n_embd=1024),  # 340M
    "bert-mini": dict(n_layer=4, n_head=4, n_embd=256),  # 11M
    "bert-tiny": dict(n_layer=2, n_head=2, n_embd=128),  # 4.4M
}


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None  # total loss: GPT's LM loss, or BERT's mlm_loss + nsp_loss
    logits: torch.Tensor | None = None  # (B, T, V) next-token (GPT) or MLM (BERT) logits
    nsp_logits: torch.Tensor | None = None  # (B, 2), or (B, S, 2) at cls_positions; 0 = B follows A, 1 = B is random
    mlm_loss: torch.Tensor | None = None  # BERT: mean CE over the masked positions
    nsp_loss: torch.Tensor | None = None  # BERT: mean CE of the next-sentence classifier
    # BERT with labels: the MLM head's output at the K picked rows (K >= masked positions; the
    # padding rows' targets are IGNORE_INDEX), what the loss read; BERT.mlm_logits scores them.
    masked_hidden: torch.Tensor | None = None  # (K, C)
    masked_targets: torch.Tensor | None = None  # (K,)


def _check_ids(model: str, name: str, ids, block_size: int, like: torch.Tensor | None = None) -> None:
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


def documents_from_separators(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T) int64 document ids: the separators at or before each position, so a separator opens its document."""
    return torch.cumsum(input_ids == sep_id, dim=1)


def positions_in_documents(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T) int64: each position's distance from its document's separator (from the row's start before the first)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    start = torch.cummax(torch.where(input_ids == sep_id, pos, 0), dim=1).values  # (B, T)
    return pos - start


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


def training_flops_per_token(params: float, config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a model whose matmuls use ``params`` weights.

    6·N + 12·n_layer·n_embd·T, the estimate of PaLM (appendix B) that nanoGPT uses
    for MFU: 6·N for the matmuls against N parameters (2 forward, 4 backward),
    12·L·C·T for the attention scores and their weighted sum over T keys, counting
    the full T×T even though causal masking skips half.
    """
    return 6.0 * params + 12.0 * config.n_layer * config.n_embd * seq_len


# ----------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.backend
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, document_ids=None):
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # (B, nh, T, hs) each
        y = attention(q, k, v, is_causal=True, document_ids=document_ids, backend=self.backend)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(merge_heads(y)))  # (B, T, C)


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPTBlock(nn.Module):
    """Pre-LayerNorm: the residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = GPTMLP(config)

    def forward(self, x, document_ids=None):
        x = x + self.attn(self.ln_1(x), document_ids)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # also the LM head (tied)
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([GPTBlock(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.apply(self._init_weights)
        # GPT-2 scales the init of each projection into the residual stream by
        # 1/sqrt(2·n_layer): two such projections per block add up along the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids, position_ids=None):
        """The final LayerNorm's output, (B, T, C): what the tied LM head reads.

        ``position_ids`` (B, T), each in [0, block_size), replace the positions the
        config gives (0..T-1, or with ``reset_positions`` each document's own).
        """
        cfg = self.config
        _check_ids("GPT", "input_ids", input_ids, cfg.block_size)
        document_ids = None
        if cfg.doc_sep_id is not None:
            document_ids = documents_from_separators(input_ids, cfg.doc_sep_id)  # (B, T)
        if position_ids is not None:
            _check_ids("GPT", "position_ids", position_ids, cfg.block_size, like=input_ids)
        elif cfg.reset_positions:
            position_ids = positions_in_documents(input_ids, cfg.doc_sep_id)  # (B, T)
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, document_ids)
        return self.transformer.ln_f(x)

    def forward(self, input_ids, labels=None, *, position_ids=None, return_logits: bool | None = None) -> ModelOutput:
        """``labels`` (B, T) are the targets already shifted by the caller; IGNORE_INDEX (-100) is ignored.

        The loss reads the hidden states through ``linear_cross_entropy``, so the
        (B, T, V) logits are built only when asked for; ``return_logits=None``
        means: only when there are no labels. ``position_ids``: see :meth:`hidden_states`.
        """
        x = self.hidden_states(input_ids, position_ids)  # (B, T, C)
        wte = self.transformer.wte.weight  # (V, C)
        loss = None
        if labels is not None:
            _check_ids("GPT", "labels", labels, self.config.block_size, like=input_ids)
            loss = linear_cross_entropy(
                x.reshape(-1, x.shape[-1]), wte, labels.reshape(-1), ignore_index=IGNORE_INDEX,
                backend=self.config.backend,
            )
        if return_logits is None:
            return_logits = labels is None
        logits = F.linear(x, wte) if return_logits else None  # (B, T, V)
        return ModelOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append ``max_new_tokens`` sampled tokens to ``input_ids`` (B, T), as nanoGPT does.

        The context is cropped to the last ``block_size`` tokens. ``temperature=0``
        picks the most likely token; ``top_k`` samples among the k most likely;
        ``generator`` (on the model's device) makes the draw reproducible. Call
        ``model.eval()`` first to sample without dropout.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"GPT.generate: temperature must be a finite float >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"GPT.generate: top_k must be a positive int or None, got {top_k!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("GPT.generate: input_ids must be a (B, T) tensor of ids with T >= 1")
        idx = input_ids
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <= block_size)
            last = self.hidden_states(context)[:, -1, :]  # (B, C)
            logits = F.linear(last, self.transformer.wte.weight).float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id.to(idx.dtype)), dim=1)
        return idx

    def num_params(self, non_embedding=True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embeddings.

        The token embedding stays in, as in nanoGPT: it is also the LM head's
        weight, so its FLOPs are spent at every position.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at sequence length ``seq_len`` (default block_size).

        See :func:`training_flops_per_token`; N is the non-embedding parameter count.
        """
        return training_flops_per_token(self.num_params(), self.config, seq_len or self.config.block_size)


# ----------------------------------------------------------------------------- BERT
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.block_size, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids, token_type_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.ln(x))  # (B, T, C)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.backend
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # one matmul for q, k and v
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, document_ids=None):
        q, k, v = split_heads(self.qkv(x), self.n_head)  # (B, nh, T, hs) each
        y = attention(q, k, v, attention_mask=mask, document_ids=document_ids, backend=self.backend)  # (B, nh, T, hs)
        return self.proj(merge_heads(y))  # (B, T, C)


class BertLayer(nn.Module):
    """Post-LayerNorm: each sublayer's output is added to the stream, then the sum is normalised."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = BertSelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.n_embd, config.inner_size)
        self.proj = nn.Linear(config.inner_size, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, document_ids=None):
        x = self.ln_1(x + self.dropout(self.attn(x, mask, document_ids)))
        return self.ln_2(x + self.dropout(self.proj(F.gelu(self.fc(x)))))  # erf GELU, as the original BERT


class BertMLMHead(nn.Module):
    """The transform before the tied decoder: dense, GELU, LayerNorm; plus the decoder's own bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return self.ln(F.gelu(self.dense(x)))


class BERT(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"BERT: config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.n_layer)])
        self.pooler = nn.Linear(config.n_embd, config.n_embd)  # dense + tanh on [CLS]
        self.mlm_head = BertMLMHead(config)
        self.nsp_head = nn.Linear(config.n_embd, 2)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[config.pad_token_id].zero_()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_inputs(self, input_ids, token_type_ids, attention_mask, labels, next_sentence_label,
                      position_ids=None, document_ids=None, cls_positions=None) -> None:
        _check_ids("BERT", "input_ids", input_ids, self.config.block_size)
        for name, ids in (("token_type_ids", token_type_ids), ("labels", labels), ("position_ids", position_ids),
                          ("document_ids", document_ids)):
            if ids is not None:
                _check_ids("BERT", name, ids, self.config.block_size, like=input_ids)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point:
                raise TypeError("BERT: attention_mask must be a bool or integer 0/1 tensor (1 = real token)")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"BERT: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
        B, shape, of = input_ids.shape[0], input_ids.shape[:1], "shape (B,) ="
        if cls_positions is not None:
            if not isinstance(cls_positions, torch.Tensor) or cls_positions.dtype not in (torch.int32, torch.int64):
                raise TypeError("BERT: cls_positions must be an int32 or int64 tensor of [CLS] positions")
            shape, of = cls_positions.shape, "the shape (B, S) of cls_positions,"
            if cls_positions.dim() != 2 or shape[0] != B or shape[1] == 0:
                raise ValueError(f"BERT: cls_positions must have shape (B, S) = ({B}, S >= 1), got {tuple(shape)}")
        if next_sentence_label is not None and (
                not isinstance(next_sentence_label, torch.Tensor) or next_sentence_label.shape != shape):
            raise ValueError(f"BERT: next_sentence_label must be a tensor of {of} {tuple(shape)}")

    def encode(self, input_ids, token_type_ids=None, attention_mask=None, *, position_ids=None, document_ids=None):
        """The last layer's hidden states, (B, T, C).

        ``position_ids`` (B, T) replace 0..T-1; ``document_ids`` (B, T), non-decreasing
        along a row, keep each position to its own document of a packed row.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()  # (B, T), True = real token
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, mask, document_ids)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied decoder: MLM-head output (..., C) -> logits (..., V)."""
        return F.linear(hidden, self.embeddings.word_embeddings.weight, self.mlm_head.decoder_bias)

    def _masked_rows(self, x, labels, mlm_probability):
        """The MLM head's input and targets at a fixed number K of rows, K >= the labelled positions.

        K is ``masked_capacity`` at ``mlm_probability`` (every position without it),
        so the shapes do not depend on the data. The labelled positions come first,
        in order; the padding rows after them get IGNORE_INDEX targets, which add
        nothing to the loss or its mean.
        """
        flat_labels = labels.reshape(-1)  # (B·T,)
        n = flat_labels.numel()
        capacity = n if mlm_probability is None else masked_capacity(n, mlm_probability)
        index = masked_positions(flat_labels, capacity)  # (K,)
        labelled = (flat_labels != IGNORE_INDEX).sum()
        is_padding = torch.arange(capacity, device=labels.device) >= labelled  # (K,)
        targets = flat_labels[index].masked_fill(is_padding, IGNORE_INDEX)  # (K,)
        return x.reshape(-1, x.shape[-1])[index], targets  # (K, C), (K,)

    def forward(
        self, input_ids, token_type_ids=None, attention_mask=None, labels=None, next_sentence_label=None,
        *, position_ids=None, document_ids=None, cls_positions=None, mlm_probability: float | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """MLM + NSP, as Hugging Face's ``BertForPreTraining``.

        ``labels`` (B, T) hold the original id at masked positions and IGNORE_INDEX
        elsewhere; the MLM head runs on those positions only, padded to a row
        count fixed by ``mlm_probability``, the masking rate that drew the labels
        (None: room for every position). The loss is mlm_loss + nsp_loss when
        ``next_sentence_label`` (B,) is given, else the MLM loss alone.
        ``return_logits=None`` means: (B, T, V) logits only when there are no labels.

        Packed rows (:mod:`minipt.data.packing`) add ``position_ids`` and
        ``document_ids`` (see :meth:`encode`) and ``cls_positions`` (B, S), the
        [CLS] of each of S pair slots per row, each in [0, T): NSP is then read at
        every slot, ``nsp_logits`` is (B, S, 2), and ``next_sentence_label`` (B, S)
        holds IGNORE_INDEX at the slots no pair fills.
        """
        self._check_inputs(input_ids, token_type_ids, attention_mask, labels, next_sentence_label, position_ids,
                           document_ids, cls_positions)
        if mlm_probability is not None and not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"BERT: mlm_probability must be in (0, 1] or None, got {mlm_probability!r}")
        x = self.encode(input_ids, token_type_ids, attention_mask, position_ids=position_ids,
                        document_ids=document_ids)  # (B, T, C)
        backend = self.config.backend

        if cls_positions is None:
            cls = x[:, 0]  # (B, C)
        else:
            cls = x.gather(1, cls_positions.long()[..., None].expand(-1, -1, x.shape[-1]))  # (B, S, C)
        nsp_logits = self.nsp_head(torch.tanh(self.pooler(cls)))  # (B, 2) or (B, S, 2)
        out = ModelOutput(nsp_logits=nsp_logits)
        if labels is not None:
            rows, out.masked_targets = self._masked_rows(x, labels, mlm_probability)
            out.masked_hidden = self.mlm_head(rows)  # (K, C)
            out.mlm_loss = linear_cross_entropy(
                out.masked_hidden, self.embeddings.word_embeddings.weight, out.masked_targets,
                bias=self.mlm_head.decoder_bias, ignore_index=IGNORE_INDEX, backend=backend,
            )
            out.loss = out.mlm_loss
        if next_sentence_label is not None:
            out.nsp_loss = cross_entropy(
                nsp_logits.reshape(-1, 2), next_sentence_label.reshape(-1), ignore_index=IGNORE_INDEX, backend=backend
            )
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        if return_logits is None:
            return_logits = labels is None
        if return_logits:
            out.logits = self.mlm_logits(self.mlm_head(x))  # (B, T, V)
        return out

    def num_params(self, non_embedding=True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position and token-type embeddings.

        The word embedding stays in: it is also the MLM decoder's weight.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embeddings.position_embeddings.weight.numel()
            n -= self.embeddings.token_type_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, mlm_fraction: float = 1.0) -> float:
        """Training FLOPs per token at sequence length ``seq_len`` (default block_size).

        See :func:`training_flops_per_token`. The tied V×C decoder runs on the
        ``mlm_fraction`` of positions that carry an MLM label. The default, 1.0,
        counts it at every position, the convention of published MFU figures; at
        BERT-tiny's size the decoder is 90% of the parameters, so that convention
        can put MFU above 1.
        """
        cfg = self.config
        params = self.num_params() - cfg.vocab_size * cfg.n_embd * (1.0 - mlm_fraction)
        return training_flops_per_token(params, cfg, seq_len or cfg.block_size)


# ----------------------------------------------------------------------------- sequence classification
@dataclass
class BertClassifierConfig(BertConfig):
    num_labels: int = 2  # classes of the sequence classifier

    def __post_init__(self):
        super().__post_init__()
        _check_positive_int("BertClassifierConfig", "num_labels", self.num_labels)


class BertClassifier(nn.Module):
    """BertForSequenceClassification: dropout and a linear layer on the pooled [CLS] state (pooler: dense + tanh).

    The encoder keeps its MLM and NSP heads, unused here, so that the weights of a
    pretraining run load into ``bert`` as they are.
    """

    def __init__(self, config: BertClassifierConfig):
        super().__init__()
        if not isinstance(config, BertClassifierConfig):
            raise TypeError(f"BertClassifier: config must be a BertClassifierConfig, got {type(config).__name__}")
        self.config = config
        self.bert = BERT(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_bert(cls, bert: BERT, num_labels: int) -> "BertClassifier":
        """A classifier on ``bert``'s weights (copied), with a fresh classification layer."""
        config = BertClassifierConfig(**{**dataclasses.asdict(bert.config), "num_labels": num_labels})
        model = cls(config).to(next(bert.parameters()).device)
        model.bert.load_state_dict(bert.state_dict())
        return model

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, num_labels) logits."""
        x = self.bert.encode(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        pooled = torch.tanh(self.bert.pooler(x[:, 0]))  # (B, C)
        return self.classifier(self.dropout(pooled))

    def num_params(self, non_embedding=True) -> int:
        return self.bert.num_params(non_embedding) + sum(p.numel() for p in self.classifier.parameters())


# ----------------------------------------------------------------------------- the kinds
class ModelKind(NamedTuple):
    model: type[nn.Module]
    config: type


MODEL_KINDS = {
    "gpt": ModelKind(GPT, GPTConfig), "bert": ModelKind(BERT, BertConfig),
    "bert_classifier": ModelKind(BertClassifier, BertClassifierConfig),
}


def build_model(kind: str, config: dict | GPTConfig | BertConfig) -> GPT | BERT | BertClassifier:
    """A model from its kind and its config (a dict, as saved in a run's ``config.json``)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"build_model: kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    model_cls, config_cls = MODEL_KINDS[kind]
    return model_cls(config_cls(**config) if isinstance(config, dict) else config)
