"""BERT (MLM + NSP) with the original architecture, on minipt's ops, and the sequence classifier built on it.

Read top to bottom: the config and its named sizes, then the model from its
embeddings up: embeddings, attention, layer, MLM head, and BERT with its pooler
and NSP head; last the classifier (``BertForSequenceClassification``).

Attention goes through ``minipt.ops.attention`` and the losses through
``minipt.ops`` (``linear_cross_entropy`` for the MLM head, ``cross_entropy``
for NSP), with ``backend=config.backend``; ``backend="torch"`` is therefore
minipt on PyTorch's own ops (SDPA, F.cross_entropy). The MLM decoder is tied to
the word embedding, and with labels the loss is computed from the hidden
states, so the (B, T, V) logits exist only when the caller asks for them. The
attention op has no dropout: ``dropout`` acts on the embeddings and the
residual branches, never on the attention probabilities.

A training step never reads a tensor on the host: the MLM head runs on a fixed
number of rows (``masked_capacity``) picked by ``masked_positions``, so the
forward pass has static shapes and compiles into one graph.

Packed rows. A row can hold several pairs, each seeing only itself (the
attention op's ``document_ids``). The caller gives the layout
(``position_ids``, ``document_ids`` and each pair's [CLS] position, see
:mod:`minipt.data.packing`), and NSP is read at every [CLS].

Capped logits. With ``logit_softcap`` = s the MLM head's logits are
s·tanh(logits / s) (as Gemma 2 caps its LM head's), inside the MLM loss and in
``mlm_logits``; NSP's two logits are not capped. ``forward(..., z_loss=z)`` adds
z·lse² per masked position to the MLM loss and returns that term apart as
``z_loss``. Hugging Face's BERT has no cap: ``to_hf`` refuses such a model.

Sliding windows, as ModernBERT's ``local_attention``: with ``attn_window`` = W
each position attends to the positions at most W // 2 away on either side
(``window_size=(W // 2, W // 2)``); with ``global_every`` = K, layers 0, K,
2K, ... attend to the whole row all the same (ModernBERT: W = 128, K = 3).
Hugging Face's BERT has no window: ``to_hf`` refuses such a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipt.models.common import (
    ModelOutput, check_config, check_ids, check_positive_int, check_shared_fields, check_token_id, check_window_fields,
    from_preset, merge_heads, split_heads, training_flops_per_token, windowed_layer,
)
from minipt.ops import IGNORE_INDEX, attention, cross_entropy, linear_cross_entropy, softcap_logits
from minipt.ops.mlm_mask import masked_capacity, masked_positions


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
    attn_window: int | None = None  # each position attends to those at most attn_window // 2 away; None: all
    global_every: int | None = None  # with attn_window: every global_every-th layer from 0 sees the whole row
    logit_softcap: float | None = None  # the MLM head's logits become logit_softcap·tanh(logits / logit_softcap)

    def __post_init__(self):
        check_shared_fields(self)
        check_window_fields(self)
        check_positive_int("BertConfig", "type_vocab_size", self.type_vocab_size)
        if self.n_inner is not None:
            check_positive_int("BertConfig", "n_inner", self.n_inner)
        check_token_id(self, "pad_token_id")

    @property
    def inner_size(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """A named size, with any field replaced by ``overrides``.

        "bert-tiny" and "bert-mini" are the sizes Google released under those names
        (2 layers × 128 and 4 layers × 256).
        """
        return from_preset(cls, BERT_PRESETS, name, overrides)


BERT_PRESETS = {
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768),  # 110M
    "bert-large": dict(n_layer=24, n_head=16, n_embd=1024),  # 340M
    "bert-mini": dict(n_layer=4, n_head=4, n_embd=256),  # 11M
    "bert-tiny": dict(n_layer=2, n_head=2, n_embd=128),  # 4.4M
}

# ----------------------------------------------------------------------------- the model
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
    def __init__(self, config: BertConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.backend
        # ModernBERT's local window: the positions at most attn_window // 2 away; None: the whole row.
        self.window_size = (config.attn_window // 2,) * 2 if windowed_layer(config, layer) else None
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # one matmul for q, k and v
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, document_ids=None):
        q, k, v = split_heads(self.qkv(x), self.n_head)  # (B, nh, T, hs) each
        y = attention(q, k, v, attention_mask=mask, document_ids=document_ids, window_size=self.window_size,
                      backend=self.backend)  # (B, nh, T, hs)
        return self.proj(merge_heads(y))  # (B, T, C)


class BertLayer(nn.Module):
    """Post-LayerNorm: each sublayer's output is added to the stream, then the sum is normalised."""

    def __init__(self, config: BertConfig, layer: int):
        super().__init__()
        self.attn = BertSelfAttention(config, layer)
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
        check_config("BERT", config, BertConfig)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config, layer) for layer in range(config.n_layer)])
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
        check_ids("BERT", "input_ids", input_ids, self.config.block_size)
        for name, ids in (("token_type_ids", token_type_ids), ("labels", labels), ("position_ids", position_ids),
                          ("document_ids", document_ids)):
            if ids is not None:
                check_ids("BERT", name, ids, self.config.block_size, like=input_ids)
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
        """The tied decoder: MLM-head output (..., C) -> logits (..., V), capped by ``logit_softcap``."""
        logits = F.linear(hidden, self.embeddings.word_embeddings.weight, self.mlm_head.decoder_bias)
        return softcap_logits(logits, self.config.logit_softcap)

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
        return_logits: bool | None = None, z_loss: float = 0.0,
    ) -> ModelOutput:
        """MLM + NSP, as Hugging Face's ``BertForPreTraining``.

        ``labels`` (B, T) hold the original id at masked positions and IGNORE_INDEX
        elsewhere; the MLM head runs on those positions only, padded to a row
        count fixed by ``mlm_probability``, the masking rate that drew the labels
        (None: room for every position). The loss is mlm_loss + nsp_loss when
        ``next_sentence_label`` (B,) is given, else the MLM loss alone.
        ``return_logits=None`` means: (B, T, V) logits only when there are no labels.
        ``z_loss`` > 0 adds z_loss·lse² per masked position to the MLM loss, and the
        output's ``z_loss`` holds that term.

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
            mlm_loss = linear_cross_entropy(
                out.masked_hidden, self.embeddings.word_embeddings.weight, out.masked_targets,
                bias=self.mlm_head.decoder_bias, ignore_index=IGNORE_INDEX, softcap=self.config.logit_softcap,
                z_loss=z_loss, return_z_loss=z_loss > 0, backend=backend,
            )
            out.mlm_loss, out.z_loss = mlm_loss if z_loss > 0 else (mlm_loss, None)
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

        See :func:`minipt.models.common.training_flops_per_token`. The tied V×C
        decoder runs on the ``mlm_fraction`` of positions that carry an MLM label.
        The default, 1.0, counts it at every position, the convention of published
        MFU figures; at BERT-tiny's size the decoder is 90% of the parameters, so
        that convention can put MFU above 1.
        """
        cfg = self.config
        params = self.num_params() - cfg.vocab_size * cfg.n_embd * (1.0 - mlm_fraction)
        return training_flops_per_token(params, cfg, seq_len or cfg.block_size)


# ----------------------------------------------------------------------------- sequence classification
@dataclass
class BertClassifierConfig(BertConfig):
    num_labels: int = 2  # classes of the sequence classifier; 1: a regressor, one number

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("BertClassifierConfig", "num_labels", self.num_labels)

    @property
    def problem_type(self) -> str:
        """transformers' name for what the head predicts; num_labels=1 is regression, as there."""
        return "regression" if self.num_labels == 1 else "single_label_classification"


class BertClassifier(nn.Module):
    """BertForSequenceClassification: dropout and a linear layer on the pooled [CLS] state (pooler: dense + tanh).

    The encoder keeps its MLM and NSP heads, unused here, so that the weights of a
    pretraining run load into ``bert`` as they are.
    """

    def __init__(self, config: BertClassifierConfig):
        super().__init__()
        check_config("BertClassifier", config, BertClassifierConfig)
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
