"""Convert between minipt's models and Hugging Face ``transformers``.

    from_hf(GPT2LMHeadModel)    -> GPT        to_hf(GPT)  -> GPT2LMHeadModel
    from_hf(BertForPreTraining) -> BERT       to_hf(BERT) -> BertForPreTraining

The conversion goes through state dicts, so it depends only on parameter names,
which have stayed the same from transformers 4.40 to 5.x. Two layouts differ:

* GPT-2 stores its projections as ``Conv1D`` with weights of shape (in, out),
  the transpose of ``nn.Linear``'s (out, in). Its ``c_attn`` packs q, k and v
  along the output, in the order minipt's ``c_attn`` uses, so one transpose is
  the whole conversion.
* BERT keeps separate query, key and value Linears; minipt concatenates them
  into one ``qkv`` Linear (rows: q, then k, then v).

A configuration minipt cannot reproduce exactly (another activation, untied
heads, scaled or cross attention, a feed-forward width other than 4·n_embd for
GPT-2) is refused with a ValueError rather than converted approximately.
Dropout on attention probabilities does not exist in minipt (its attention op
has none): ``from_hf`` drops it, and ``to_hf`` writes 0.0 there.

``transformers`` is an optional dependency (the ``test`` extra) and is imported
only when a conversion runs.
"""

from __future__ import annotations

import torch

from minipt.model import BERT, GPT, BertConfig, GPTConfig

GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # two implementations of the same tanh approximation
BERT_ERF_GELUS = ("gelu", "gelu_python")  # both the exact erf form


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "minipt.hf needs the optional dependency `transformers` (>= 4.40); "
            "install it with `pip install transformers` or `pip install minipt[test]`"
        ) from exc
    return transformers


def _place_like(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Move ``model`` to the device and dtype of ``source``'s parameters (before loading, so nothing is rounded)."""
    p = next(source.parameters())
    return model.to(device=p.device, dtype=p.dtype)


def _load_into_hf(hf_model, weights) -> None:
    """Fill every parameter of ``hf_model``; ``weights(key)`` gives the tensor for a state-dict key.

    Buffers (causal masks, position ids) are the model's own; older transformers
    versions keep some of them in the state dict, so they are skipped by name.
    """
    buffers = {name for name, _ in hf_model.named_buffers()}
    sd = {key: weights(key) for key in hf_model.state_dict() if key not in buffers}
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    if unexpected or not set(missing) <= buffers:
        raise RuntimeError(f"to_hf: state dict mismatch, missing {missing}, unexpected {unexpected}")


def _require(ok: bool, what: str, why: str) -> None:
    if not ok:
        raise ValueError(f"from_hf: cannot represent this Hugging Face model: {what} ({why})")


def _require_tied(sd: dict, head: str, embedding: str) -> None:
    _require(
        torch.equal(sd[head], sd[embedding]),
        f"{head} differs from {embedding}",
        "minipt ties the output layer to the input embedding",
    )


def from_hf(hf_model, *, backend: str = "auto"):
    """A minipt GPT or BERT with the weights and configuration of ``hf_model``.

    ``hf_model`` is a ``transformers.GPT2LMHeadModel`` or ``BertForPreTraining``;
    the result is on its device, in its dtype, and in training mode.
    """
    transformers = _transformers()
    if isinstance(hf_model, transformers.GPT2LMHeadModel):
        return _gpt_from_hf(hf_model, backend)
    if isinstance(hf_model, transformers.BertForPreTraining):
        return _bert_from_hf(hf_model, backend)
    raise TypeError(
        "from_hf: hf_model must be a transformers.GPT2LMHeadModel or transformers.BertForPreTraining, "
        f"got {type(hf_model).__name__}"
    )


def to_hf(model):
    """The ``transformers`` model equal to minipt's ``model`` (GPT or BERT), on its device and dtype."""
    if isinstance(model, GPT):
        return _gpt_to_hf(model)
    if isinstance(model, BERT):
        return _bert_to_hf(model)
    raise TypeError(f"to_hf: model must be a minipt.model.GPT or minipt.model.BERT, got {type(model).__name__}")


# ----------------------------------------------------------------------------- GPT-2
# Conv1D weights, stored (in, out): transposed on the way in and on the way out.
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_BLOCK_KEYS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def _gpt_config_from_hf(c, backend: str) -> GPTConfig:
    _require(c.activation_function in GPT2_TANH_GELUS, f"activation_function={c.activation_function!r}",
             f"minipt's GPT uses the tanh GELU, one of {GPT2_TANH_GELUS}")
    _require(c.n_inner is None or c.n_inner == 4 * c.n_embd, f"n_inner={c.n_inner}",
             f"minipt's GPT MLP is 4·n_embd = {4 * c.n_embd} wide")
    _require(c.scale_attn_weights, "scale_attn_weights=False", "minipt's attention always scales by 1/sqrt(head dim)")
    _require(not c.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=True",
             "minipt's attention has no per-layer scale")
    _require(not getattr(c, "add_cross_attention", False), "add_cross_attention=True",
             "minipt's GPT is a decoder without cross-attention")
    return GPTConfig(
        vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        dropout=float(c.resid_pdrop), bias=True, layer_norm_eps=float(c.layer_norm_epsilon), backend=backend,
    )


def _gpt_from_hf(hf_model, backend: str) -> GPT:
    config = _gpt_config_from_hf(hf_model.config, backend)
    sd = hf_model.state_dict()
    _require_tied(sd, "lm_head.weight", "transformer.wte.weight")
    ours = {}
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"):
        ours[key] = sd[key]
    for i in range(config.n_layer):
        for key in _GPT2_BLOCK_KEYS:
            full = f"transformer.h.{i}.{key}"
            ours[full] = sd[full].t() if key in _GPT2_CONV1D else sd[full]
    model = _place_like(GPT(config), hf_model)
    model.load_state_dict(ours, strict=True)
    return model


def _gpt_to_hf(model: GPT):
    transformers = _transformers()
    cfg = model.config
    default_special = transformers.GPT2Config().bos_token_id
    special = default_special if default_special < cfg.vocab_size else None
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps,
        bos_token_id=special, eos_token_id=special, tie_word_embeddings=True,
    )
    hf_model = _place_like(transformers.GPT2LMHeadModel(hf_config), model)
    ours, theirs = model.state_dict(), hf_model.state_dict()

    def weights(key):
        if key == "lm_head.weight":
            return ours["transformer.wte.weight"]
        if key in ours:
            return ours[key].t() if key.split(".", 3)[-1] in _GPT2_CONV1D else ours[key]
        if key.endswith(".bias") and not cfg.bias:
            return torch.zeros_like(theirs[key])  # a model without biases is GPT-2 with zero biases
        raise KeyError(f"to_hf: no minipt parameter for GPT2LMHeadModel's {key}")

    _load_into_hf(hf_model, weights)
    return hf_model


# ----------------------------------------------------------------------------- BERT
_BERT_EMBEDDINGS = {
    "bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "embeddings.ln.weight",
    "bert.embeddings.LayerNorm.bias": "embeddings.ln.bias",
}
_BERT_HEADS = {
    "bert.pooler.dense.weight": "pooler.weight",
    "bert.pooler.dense.bias": "pooler.bias",
    "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_head.ln.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_head.ln.bias",
    "cls.predictions.bias": "mlm_head.decoder_bias",
    "cls.seq_relationship.weight": "nsp_head.weight",
    "cls.seq_relationship.bias": "nsp_head.bias",
}
_BERT_LAYER = {  # per layer, apart from the packed q, k, v
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "attention.output.LayerNorm.weight": "ln_1.weight",
    "attention.output.LayerNorm.bias": "ln_1.bias",
    "intermediate.dense.weight": "fc.weight",
    "intermediate.dense.bias": "fc.bias",
    "output.dense.weight": "proj.weight",
    "output.dense.bias": "proj.bias",
    "output.LayerNorm.weight": "ln_2.weight",
    "output.LayerNorm.bias": "ln_2.bias",
}


def _bert_key_map(n_layer: int) -> dict[str, str]:
    """Hugging Face name -> minipt name, for every parameter that maps one to one."""
    mapping = {**_BERT_EMBEDDINGS, **_BERT_HEADS}
    for i in range(n_layer):
        for theirs, ours in _BERT_LAYER.items():
            mapping[f"bert.encoder.layer.{i}.{theirs}"] = f"layers.{i}.{ours}"
    return mapping


def _bert_config_from_hf(c, backend: str) -> BertConfig:
    _require(c.hidden_act in BERT_ERF_GELUS, f"hidden_act={c.hidden_act!r}",
             f"minipt's BERT uses the erf GELU, one of {BERT_ERF_GELUS}")
    # transformers 5 dropped the field: absolute positions are all its BERT has
    positions = getattr(c, "position_embedding_type", "absolute")
    _require(positions == "absolute", f"position_embedding_type={positions!r}", "minipt's BERT has absolute positions")
    _require(not c.is_decoder and not c.add_cross_attention, "is_decoder or add_cross_attention",
             "minipt's BERT is a bidirectional encoder")
    return BertConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
        n_inner=c.intermediate_size, dropout=float(c.hidden_dropout_prob), layer_norm_eps=float(c.layer_norm_eps),
        # pad_token_id only decides which embedding row lookups leave untrained; without one, row 0 is used
        pad_token_id=0 if c.pad_token_id is None else c.pad_token_id, backend=backend,
    )


def _bert_from_hf(hf_model, backend: str) -> BERT:
    config = _bert_config_from_hf(hf_model.config, backend)
    sd = hf_model.state_dict()
    _require_tied(sd, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    if "cls.predictions.decoder.bias" in sd:
        _require_tied(sd, "cls.predictions.decoder.bias", "cls.predictions.bias")
    ours = {ours: sd[theirs] for theirs, ours in _bert_key_map(config.n_layer).items()}
    for i in range(config.n_layer):
        prefix = f"bert.encoder.layer.{i}.attention.self"
        for part in ("weight", "bias"):
            ours[f"layers.{i}.attn.qkv.{part}"] = torch.cat(
                [sd[f"{prefix}.{name}.{part}"] for name in ("query", "key", "value")], dim=0
            )
    model = _place_like(BERT(config), hf_model)
    model.load_state_dict(ours, strict=True)
    return model


def _bert_to_hf(model: BERT):
    transformers = _transformers()
    cfg = model.config
    hf_config = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.inner_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0, max_position_embeddings=cfg.block_size,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=True,
    )
    hf_model = _place_like(transformers.BertForPreTraining(hf_config), model)
    ours = model.state_dict()
    mapping = _bert_key_map(cfg.n_layer)
    mapping["cls.predictions.decoder.weight"] = "embeddings.word_embeddings.weight"
    mapping["cls.predictions.decoder.bias"] = "mlm_head.decoder_bias"

    def weights(key):
        if key in mapping:
            return ours[mapping[key]]
        prefix, _, rest = key.partition(".attention.self.")
        name, _, part = rest.partition(".")
        if name not in ("query", "key", "value"):
            raise KeyError(f"to_hf: no minipt parameter for BertForPreTraining's {key}")
        layer = int(prefix.rsplit(".", 1)[-1])
        return ours[f"layers.{layer}.attn.qkv.{part}"].chunk(3, dim=0)[("query", "key", "value").index(name)]

    _load_into_hf(hf_model, weights)
    return hf_model
