"""GPT: a causal language model with the GPT-2 architecture, on minipt's ops.

Read top to bottom: the config and its named sizes, then the model from its
attention up: attention, MLP, block, the documents of a packed row, and GPT
with its loss and ``generate``.

Attention goes through ``minipt.ops.attention`` and the loss through
``minipt.ops.linear_cross_entropy``, with ``backend=config.backend``;
``backend="torch"`` is therefore minipt on PyTorch's own ops (SDPA,
F.cross_entropy). The LM head is tied to the token embedding, and with labels
the loss is computed from the hidden states, so the (B, T, V) logits exist only
when the caller asks for them. The attention op has no dropout: ``dropout``
acts on the embeddings, the residual branches and the MLP, never on the
attention probabilities.

Packed rows. A row can hold several documents, each seeing only itself (the
attention op's ``document_ids``), found on the device: with ``doc_sep_id`` set,
every occurrence of that token (<|endoftext|>) opens a document, so a
position's document is the running count of separators up to it, and with
``reset_positions`` its position is its distance from the last separator.
Hugging Face's GPT-2 has no document mask: ``minipt.hf.to_hf`` exports a GPT
trained with one all the same, and the exported model attends across
separators, with positions counted from the input's start.

Capped logits. With ``logit_softcap`` = s the LM head's logits are
s·tanh(logits / s), as in Gemma 2: inside the loss (the op's ``softcap``) and
wherever the model hands logits out, ``generate`` included. GPT-2 has no cap:
``to_hf`` refuses such a model. ``forward(..., z_loss=z)`` adds z·lse² per
predicted token to the loss (PaLM's z-loss, a training setting, not part of the
model) and returns that term apart as ``z_loss``.

Sliding windows. With ``attn_window`` = N each position attends to itself and
the N - 1 positions before it (``window_size=(N - 1, 0)``, the ``sliding_window``
of Mistral and Gemma in Hugging Face), at a cost that follows T·N rather than
T²/2; with ``global_every`` = K, layers 0, K, 2K, ... attend to every earlier
position all the same. GPT-2 has no window: ``to_hf`` refuses such a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipt.models.common import (
    ModelOutput, check_config, check_ids, check_shared_fields, check_token_id, check_window_fields, from_preset,
    merge_heads, split_heads, training_flops_per_token, windowed_layer,
)
from minipt.ops import IGNORE_INDEX, attention, linear_cross_entropy, softcap_logits


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
    attn_window: int | None = None  # each position attends to itself and the attn_window - 1 before it; None: all
    global_every: int | None = None  # with attn_window: every global_every-th layer from 0 sees all earlier positions
    logit_softcap: float | None = None  # the LM head's logits become logit_softcap·tanh(logits / logit_softcap)

    def __post_init__(self):
        check_shared_fields(self)
        check_window_fields(self)
        for name in ("bias", "reset_positions"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.doc_sep_id is not None:
            check_token_id(self, "doc_sep_id")
        if self.reset_positions and self.doc_sep_id is None:
            raise ValueError("GPTConfig: reset_positions needs doc_sep_id: positions restart at a document's separator")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named size, with any field replaced by ``overrides``.

        "gpt2" is the 124M model with the vocabulary padded to 50304; pass
        ``vocab_size=50257`` (or use ``minipt.hf.from_hf``) to load OpenAI's weights.
        """
        return from_preset(cls, GPT_PRESETS, name, overrides)


GPT_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt-mini": dict(vocab_size=8192, block_size=64, n_layer=4, n_head=4, n_embd=128),  # nanoGPT's CPU size
    "gpt-tiny": dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32),  # unit tests
}


# ----------------------------------------------------------------------------- blocks
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.backend
        # A causal window of attn_window keys, the position itself included; None: every earlier position.
        self.window_size = (config.attn_window - 1, 0) if windowed_layer(config, layer) else None
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, document_ids=None):
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # (B, nh, T, hs) each
        y = attention(q, k, v, is_causal=True, document_ids=document_ids, window_size=self.window_size,
                      backend=self.backend)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(merge_heads(y)))  # (B, T, C)


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # (B, T, 4C) -> (B, T, C)


class GPTBlock(nn.Module):
    """Pre-LayerNorm: the residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = GPTMLP(config)

    def forward(self, x, document_ids=None):
        x = x + self.attn(self.ln_1(x), document_ids)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


# ----------------------------------------------------------------------------- packed rows
def documents_from_separators(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T) int64 document ids: the separators at or before each position, so a separator opens its document."""
    return torch.cumsum(input_ids == sep_id, dim=1)


def positions_in_documents(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """(B, T) int64: each position's distance from its document's separator (from the row's start before the first)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    start = torch.cummax(torch.where(input_ids == sep_id, pos, 0), dim=1).values  # (B, T)
    return pos - start


# ----------------------------------------------------------------------------- the model
class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        check_config("GPT", config, GPTConfig)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # also the LM head (tied)
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([GPTBlock(config, layer) for layer in range(config.n_layer)]),
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
        check_ids("GPT", "input_ids", input_ids, cfg.block_size)
        document_ids = None
        if cfg.doc_sep_id is not None:
            document_ids = documents_from_separators(input_ids, cfg.doc_sep_id)  # (B, T)
        if position_ids is not None:
            check_ids("GPT", "position_ids", position_ids, cfg.block_size, like=input_ids)
        elif cfg.reset_positions:
            position_ids = positions_in_documents(input_ids, cfg.doc_sep_id)  # (B, T)
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, document_ids)
        return self.transformer.ln_f(x)

    def lm_logits(self, x):
        """The tied LM head: hidden states (..., C) -> logits (..., V), capped by ``logit_softcap``."""
        return softcap_logits(F.linear(x, self.transformer.wte.weight), self.config.logit_softcap)

    def forward(self, input_ids, labels=None, *, position_ids=None, return_logits: bool | None = None,
                z_loss: float = 0.0) -> ModelOutput:
        """``labels`` (B, T) are the targets already shifted by the caller; IGNORE_INDEX (-100) is ignored.

        The loss reads the hidden states through ``linear_cross_entropy``, so the
        (B, T, V) logits are built only when asked for; ``return_logits=None``
        means: only when there are no labels. ``z_loss`` > 0 adds z_loss·lse² per
        predicted token to the loss, and the output's ``z_loss`` holds that term.
        ``position_ids``: see :meth:`hidden_states`.
        """
        x = self.hidden_states(input_ids, position_ids)  # (B, T, C)
        out = ModelOutput()
        if labels is not None:
            check_ids("GPT", "labels", labels, self.config.block_size, like=input_ids)
            loss = linear_cross_entropy(
                x.reshape(-1, x.shape[-1]), self.transformer.wte.weight, labels.reshape(-1), ignore_index=IGNORE_INDEX,
                softcap=self.config.logit_softcap, z_loss=z_loss, return_z_loss=z_loss > 0,
                backend=self.config.backend,
            )  # with return_z_loss: (loss, z term)
            out.loss, out.z_loss = loss if z_loss > 0 else (loss, None)
        if return_logits is None:
            return_logits = labels is None
        if return_logits:
            out.logits = self.lm_logits(x)  # (B, T, V)
        return out

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
            logits = self.lm_logits(last).float()  # (B, V)
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

        See :func:`minipt.models.common.training_flops_per_token`; N is the
        non-embedding parameter count.
        """
        return training_flops_per_token(self.num_params(), self.config, seq_len or self.config.block_size)
