"""Convert between minipt's models and Hugging Face ``transformers``.

    from_hf(GPT2LMHeadModel)    -> GPT        to_hf(GPT)  -> GPT2LMHeadModel
    from_hf(BertForPreTraining) -> BERT       to_hf(BERT) -> BertForPreTraining
    to_hf(BertClassifier, labels=...) -> BertForSequenceClassification (through classifier_to_hf)

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
GPT-2) is refused with a ValueError rather than converted approximately, and so
is a minipt model that GPT-2 or BERT cannot reproduce: one with sliding-window
attention (``attn_window``), or a GPT or BERT whose LM/MLM logits are soft-capped
(``logit_softcap``; a classifier from such a BERT exports, as its head has no cap).
Dropout on attention probabilities does not exist in minipt (its attention op
has none): ``from_hf`` drops it, and ``to_hf`` writes 0.0 there.

``transformers`` is an optional dependency (the ``test`` extra) and is imported
only when a conversion runs.

:func:`load_hf_folder` reads a folder written by ``save_pretrained`` without
``transformers``: ``config.json`` (a field it leaves out has transformers'
default, :data:`HF_CONFIG_DEFAULTS`) and the weights (``model.safetensors``, its
sharded form, or ``pytorch_model.bin`` read with ``weights_only=True``), through
the same key maps. Older checkpoints (the hub's ``gpt2``) store GPT-2 without its
``transformer.`` prefix and BERT's LayerNorms as gamma/beta; both are read.
``BertForMaskedLM`` has neither pooler nor NSP head: they start fresh, and the
loader says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, processors

from minipt.checkpoint import CheckpointError
from minipt.errors import MiniptError, MissingDependency
from minipt.models import BERT, GPT, BertClassifier, BertConfig, GPTConfig

GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # two implementations of the same tanh approximation
BERT_ERF_GELUS = ("gelu", "gelu_python")  # both the exact erf form


class ExportRefused(MiniptError, ValueError):
    """A minipt model that no ``transformers`` class computes: exporting it would give another model."""


def require_transformers():
    """The ``transformers`` module, or a MissingDependency that says how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependency(
            "minipt.hf needs the optional dependency `transformers` (>= 4.40); "
            "install it with `pip install transformers` or `pip install minipt[hf]`"
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
    if head not in sd:  # save_pretrained leaves a tied head out of the file
        return
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
    transformers = require_transformers()
    if isinstance(hf_model, transformers.GPT2LMHeadModel):
        return _gpt_from_hf(hf_model, backend)
    if isinstance(hf_model, transformers.BertForPreTraining):
        return _bert_from_hf(hf_model, backend)
    raise TypeError(
        "from_hf: hf_model must be a transformers.GPT2LMHeadModel or transformers.BertForPreTraining, "
        f"got {type(hf_model).__name__}"
    )


def to_hf(model, *, labels: list[str] | None = None):
    """The ``transformers`` model equal to minipt's ``model`` (GPT, BERT or BertClassifier), on its device and dtype.

    A BertClassifier becomes a BertForSequenceClassification whose ``id2label`` is
    ``labels`` (default: ``LABEL_0``, ``LABEL_1``, ..., as transformers names them)
    and whose ``problem_type`` is the classifier's (``regression`` for one output),
    so that transformers computes the same loss from labels.
    A GPT trained with a document mask (``doc_sep_id``, ``reset_positions``) exports
    as plain GPT-2, which attends across separators and counts positions from the
    window's start: equal to minipt's model on a window that holds one document.
    A model with sliding-window attention (``attn_window``) is refused: GPT-2 and
    BERT attend to every position, so the export would be another model. So is a
    GPT or BERT with ``logit_softcap``, whose heads GPT-2's and BERT's cannot cap;
    a classifier's own logits are not capped, so it exports all the same.
    """
    _refuse_window(model)
    if isinstance(model, BertClassifier):
        names = labels if labels is not None else [f"LABEL_{i}" for i in range(model.config.num_labels)]
        if len(names) != model.config.num_labels:
            raise ValueError(f"to_hf: labels has {len(names)} names for a classifier of {model.config.num_labels}")
        return classifier_to_hf(model.bert, model.classifier, names, model.config.problem_type)
    if labels is not None:
        raise TypeError("to_hf: labels apply to a minipt.models.BertClassifier only")
    if isinstance(model, (GPT, BERT)):
        _refuse_softcap(model)
        return _gpt_to_hf(model) if isinstance(model, GPT) else _bert_to_hf(model)
    raise TypeError(
        f"to_hf: model must be a minipt.models.GPT, BERT or BertClassifier, got {type(model).__name__}"
    )


def _refuse_window(model) -> None:
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "attn_window", None)
    if window is not None:
        raise ExportRefused(
            f"to_hf: this {type(model).__name__} attends through a sliding window (attn_window={window}, "
            f"global_every={cfg.global_every}), which Hugging Face's GPT-2 and BERT have no field for: they would "
            "attend to every position and compute another model; export a model trained with attn_window=None"
        )


def _refuse_softcap(model) -> None:
    cap = model.config.logit_softcap
    if cap is not None:
        head = "LM" if isinstance(model, GPT) else "MLM"
        raise ExportRefused(
            f"to_hf: this {type(model).__name__} caps its {head} logits (logit_softcap={cap}), which Hugging Face's "
            "GPT-2 and BERT have no field for: they would compute uncapped logits and another model; export a model "
            "trained with logit_softcap=None"
        )


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


def _gpt_weights(config: GPTConfig, sd) -> dict[str, torch.Tensor]:
    """minipt's GPT state dict from GPT2LMHeadModel's."""
    _require_tied(sd, "lm_head.weight", "transformer.wte.weight")
    ours = {}
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"):
        ours[key] = sd[key]
    for i in range(config.n_layer):
        for key in _GPT2_BLOCK_KEYS:
            full = f"transformer.h.{i}.{key}"
            ours[full] = sd[full].t() if key in _GPT2_CONV1D else sd[full]
    return ours


def _gpt_from_hf(hf_model, backend: str) -> GPT:
    config = _gpt_config_from_hf(hf_model.config, backend)
    model = _place_like(GPT(config), hf_model)
    model.load_state_dict(_gpt_weights(config, hf_model.state_dict()), strict=True)
    return model


def _gpt_to_hf(model: GPT):
    transformers = require_transformers()
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


# A BertForMaskedLM has no pooler and no NSP head, unless its weights come from pretraining
# (bert-base-uncased's config says BertForMaskedLM, its file holds both): what is absent starts fresh.
_BERT_NSP_PARTS = ("pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias")


def _bert_weights(config: BertConfig, sd, *, nsp_optional: bool = False) -> dict[str, torch.Tensor]:
    """minipt's BERT state dict from BertForPreTraining's (``nsp_optional``: BertForMaskedLM's)."""
    _require_tied(sd, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    _require_tied(sd, "cls.predictions.decoder.bias", "cls.predictions.bias")
    ours = {
        ours: sd[theirs] for theirs, ours in _bert_key_map(config.n_layer).items()
        if theirs in sd or not (nsp_optional and ours in _BERT_NSP_PARTS)
    }
    for i in range(config.n_layer):
        prefix = f"bert.encoder.layer.{i}.attention.self"
        for part in ("weight", "bias"):
            ours[f"layers.{i}.attn.qkv.{part}"] = torch.cat(
                [sd[f"{prefix}.{name}.{part}"] for name in ("query", "key", "value")], dim=0
            )
    return ours


def _bert_from_hf(hf_model, backend: str) -> BERT:
    config = _bert_config_from_hf(hf_model.config, backend)
    model = _place_like(BERT(config), hf_model)
    model.load_state_dict(_bert_weights(config, hf_model.state_dict()), strict=True)
    return model


def _hf_bert_config(transformers, cfg: BertConfig, **extra):
    """``transformers.BertConfig`` of minipt's BERT config, plus the head's own fields."""
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.inner_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0, max_position_embeddings=cfg.block_size,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        **extra,
    )


def _bert_to_hf(model: BERT):
    transformers = require_transformers()
    cfg = model.config
    hf_config = _hf_bert_config(transformers, cfg, tie_word_embeddings=True)
    hf_model = _place_like(transformers.BertForPreTraining(hf_config), model)
    ours = model.state_dict()
    mapping = _bert_key_map(cfg.n_layer)
    mapping["cls.predictions.decoder.weight"] = "embeddings.word_embeddings.weight"
    mapping["cls.predictions.decoder.bias"] = "mlm_head.decoder_bias"

    _load_into_hf(hf_model, lambda key: _bert_weight(ours, mapping, key, "BertForPreTraining"))
    return hf_model


def _bert_weight(ours: dict, mapping: dict, key: str, what: str) -> torch.Tensor:
    """The minipt tensor for Hugging Face BERT's ``key``: mapped one to one, or a third of the packed qkv."""
    if key in mapping:
        return ours[mapping[key]]
    prefix, _, rest = key.partition(".attention.self.")
    name, _, part = rest.partition(".")
    if name not in ("query", "key", "value"):
        raise KeyError(f"to_hf: no minipt parameter for {what}'s {key}")
    layer = int(prefix.rsplit(".", 1)[-1])
    return ours[f"layers.{layer}.attn.qkv.{part}"].chunk(3, dim=0)[("query", "key", "value").index(name)]


# ----------------------------------------------------------------------------- folders saved by save_pretrained
# The architectures a folder may hold (config.json's "architectures"), and minipt's kind for each.
HF_ARCHITECTURES = {"GPT2LMHeadModel": "gpt", "BertForPreTraining": "bert", "BertForMaskedLM": "bert"}
# transformers' GPT2Config and BertConfig defaults of the fields read here: save_pretrained
# writes only the fields that differ from the defaults of PretrainedConfig.
HF_CONFIG_DEFAULTS = {
    "gpt": dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
    ),
    "bert": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute", is_decoder=False,
        add_cross_attention=False,
    ),
}
# Buffers that older transformers versions saved beside the weights: the causal mask, the position ids.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".embeddings.position_ids")


def read_hf_config(folder: str | Path, *, backend: str = "auto") -> tuple[str, str, GPTConfig | BertConfig]:
    """(architecture, minipt kind, model config) of a Hugging Face model folder; reads config.json only."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a model config: expected a JSON object")
    architectures = raw.get("architectures") or []
    supported = ", ".join(HF_ARCHITECTURES)
    if not architectures or architectures[0] not in HF_ARCHITECTURES:
        found = architectures[0] if architectures else f"no architectures (model_type {raw.get('model_type')!r})"
        raise CheckpointError(f"{path} describes {found}; minipt reads {supported}")
    architecture = architectures[0]
    kind = HF_ARCHITECTURES[architecture]
    fields = SimpleNamespace(**{**HF_CONFIG_DEFAULTS[kind], **raw})
    try:
        config = (_gpt_config_from_hf if kind == "gpt" else _bert_config_from_hf)(fields, backend)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return architecture, kind, config


class _Tensors(dict):
    """A checkpoint's tensors by name; a missing one is named with its file, and every one read is noted."""

    def __init__(self, tensors: dict, source: str):
        super().__init__(tensors)
        self.source, self.read = source, set()

    def __getitem__(self, key):
        if key not in self:
            raise CheckpointError(f"{self.source} lacks the tensor {key!r} that its config.json implies")
        self.read.add(key)
        return super().__getitem__(key)


def _read_tensors(folder: Path) -> tuple[dict, str]:
    from safetensors.torch import load_file

    single, index, pickled = folder / "model.safetensors", folder / "model.safetensors.index.json", (
        folder / "pytorch_model.bin")
    try:
        if single.is_file():
            return load_file(str(single)), str(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}, str(index)
        if pickled.is_file():
            return torch.load(pickled, map_location="cpu", weights_only=True), str(pickled)
    except Exception as exc:  # safetensors and torch.load raise several types for a truncated or garbled file
        raise CheckpointError(f"cannot read the weights in {folder}: {type(exc).__name__}: {exc}") from None
    raise CheckpointError(f"{folder} holds no weights: expected model.safetensors or pytorch_model.bin")


def _hf_names(tensors: dict, kind: str) -> dict:
    """The names today's transformers gives: GPT-2 under ``transformer.``, LayerNorms with weight and bias."""
    out = {}
    for key, value in tensors.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if kind == "gpt" and not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = value
    return out


def load_hf_folder(folder: str | Path, *, backend: str = "auto", dropout: float | None = None):
    """(model, notes): a minipt GPT or BERT, float32 on the CPU, from a ``save_pretrained`` folder.

    ``dropout`` replaces the checkpoint's; ``notes`` say what did not come from the checkpoint.
    """
    folder = Path(folder)
    architecture, kind, config = read_hf_config(folder, backend=backend)
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    raw, source = _read_tensors(folder)
    tensors = _Tensors(_hf_names(raw, kind), source)
    try:
        if kind == "gpt":
            ours = _gpt_weights(config, tensors)
        else:
            ours = _bert_weights(config, tensors, nsp_optional=architecture == "BertForMaskedLM")
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    unread = sorted(k for k in tensors if k not in tensors.read and not k.endswith(_HF_BUFFERS)
                    and k not in ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"))
    if unread:
        raise CheckpointError(
            f"{source} holds tensors its config.json does not describe ({len(unread)}, e.g. {unread[:3]}): "
            f"the config says n_layer={config.n_layer}"
        )
    model = (GPT if kind == "gpt" else BERT)(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in ours.items() if list(v.shape) != shapes[k]]
    if wrong:
        raise CheckpointError(
            f"{source} does not fit its config.json: {len(wrong)} tensors have other shapes, e.g. minipt's {wrong[0]} "
            f"is {list(ours[wrong[0]].shape)} in the file but {shapes[wrong[0]]} by the config"
        )
    missing, _ = model.load_state_dict(ours, strict=False)
    notes = []
    if missing:
        notes.append(f"the {architecture} in {source} has no pooler or NSP head ({', '.join(missing)}): "
                     "they start freshly initialised")
    return model, notes


# ----------------------------------------------------------------------------- sequence classification
def classifier_to_hf(bert: BERT, classifier: torch.nn.Linear, labels: list[str], problem_type: str):
    """``transformers.BertForSequenceClassification`` from minipt's encoder and pooler plus a classifier on top.

    The MLM and NSP heads have no place in it and are left out. ``problem_type`` (see
    :class:`minipt.models.BertClassifierConfig`) tells transformers the loss to compute from labels.
    """
    _refuse_window(bert)
    transformers = require_transformers()
    cfg = bert.config
    hf_config = _hf_bert_config(
        transformers, cfg, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, architectures=["BertForSequenceClassification"],
        problem_type=problem_type,
    )
    hf_model = _place_like(transformers.BertForSequenceClassification(hf_config), bert)
    ours = bert.state_dict()
    mapping = {k: v for k, v in _bert_key_map(cfg.n_layer).items() if k.startswith("bert.")}

    def weights(key):
        if key.startswith("classifier."):
            return getattr(classifier, key.split(".", 1)[1])
        return _bert_weight(ours, mapping, key, "BertForSequenceClassification")

    _load_into_hf(hf_model, weights)
    return hf_model


def save_pretrained(model, tok, folder: str | Path, *, labels: list[str] | None = None) -> None:
    """``model`` (see :func:`to_hf`) and its tokenizer as a folder that ``from_pretrained`` loads, tokenizer included.

    The tokenizer is ``tokenizer.json`` with a ``tokenizer_config.json`` naming its
    special tokens, which ``AutoTokenizer`` reads as a fast tokenizer."""
    folder = Path(folder)
    logging = require_transformers().utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar for one shard written in an instant is carriage returns in a log
    try:
        to_hf(model, labels=labels).save_pretrained(folder)
    finally:
        if shown:
            logging.enable_progress_bar()
    tokenizer = Tokenizer.from_str(tok.to_str())
    if tok.cls_id is not None and tokenizer.post_processor is None:
        # transformers' tokenizer adds [CLS] and [SEP] through the post-processor; minipt adds them itself
        cls, sep = tok.id_to_token(tok.cls_id), tok.id_to_token(tok.sep_id)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)])
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {"cls_token": tok.cls_id, "sep_token": tok.sep_id, "pad_token": tok.pad_id, "mask_token": tok.mask_id}
    if tok.eot_id is not None:  # GPT-2's one special token opens, ends and pads a document
        ids.update(bos_token=tok.eot_id, eos_token=tok.eot_id, unk_token=tok.eot_id)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                **{name: tok.id_to_token(i) for name, i in ids.items() if i is not None}}
    if tok.cls_id is not None:  # BERT's inputs carry the segment of each token
        settings.update(unk_token="[UNK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
