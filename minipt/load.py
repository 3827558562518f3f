"""Starting points: a minipt run folder, a fine-tune run or a Hugging Face folder, read into model and tokenizer.

Every command that starts from a trained model reads it here: ``train
--init_from``, ``finetune``, ``eval``, ``sample`` and the benchmarks.

* A **minipt run** is told by its ``config.json``, which has a ``train`` entry;
  its model is rebuilt from the saved model config, never from a preset.
* A **fine-tune run** (model kind :data:`minipt.models.CLASSIFIER`) is read as
  its classifier, or with ``encoder=True`` as the BERT it fine-tuned.
* A **Hugging Face folder** saved by ``save_pretrained`` (GPT2LMHeadModel,
  BertForPreTraining, BertForMaskedLM) is read through :mod:`minipt.hf`, with
  its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minipt import checkpoint as ckpt
from minipt import hf
from minipt.models import CLASSIFIER, build_model
from minipt.tokenizer import TextTokenizer, TokenizerError, load_hf_tokenizer


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a Hugging Face model rather than a minipt run (whose config.json has a "train" entry)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ckpt.CheckpointError(f"{path} is not a folder: expected a minipt run or a Hugging Face model folder")
    if not (folder / ckpt.CONFIG).is_file():
        raise ckpt.CheckpointError(
            f"{path} is neither a minipt run nor a Hugging Face model: it holds no {ckpt.CONFIG}"
        )
    try:
        return "train" not in json.loads((folder / ckpt.CONFIG).read_text(encoding="utf-8"))
    except (ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{folder / ckpt.CONFIG} is corrupt: {exc}") from None


def read_model_config(path: str | Path, *, encoder: bool = False) -> tuple[str, dict]:
    """(kind, model config) of a minipt run or a Hugging Face model folder, from its config.json alone.

    With ``encoder``, a fine-tune run reads as the BERT it holds (kind ``bert``, no ``num_labels``).
    """
    if is_hf_folder(path):
        _, kind, config = hf.read_hf_config(path)
        return kind, dataclasses.asdict(config)
    config = ckpt.read_config(path)
    kind, model = config["model_type"], config["model"]
    if encoder and kind == CLASSIFIER:
        return "bert", {k: v for k, v in model.items() if k != "num_labels"}
    return kind, model


def check_vocabulary(tok: TextTokenizer, embedding_rows: int, source) -> None:
    """Refuse a tokenizer with ids past the model's embedding; fewer tokens than rows is normal (padded rows)."""
    if tok.vocab_size > embedding_rows:
        raise TokenizerError(
            f"the tokenizer of {source} has {tok.vocab_size} tokens but the model's embedding has {embedding_rows} "
            f"rows: ids {embedding_rows} to {tok.vocab_size - 1} would index past it"
        )


def load_run(
    path: str | Path, device: torch.device | str = "cpu", *, backend: str | None = None, dropout: float | None = None,
    encoder: bool = False,
) -> tuple[torch.nn.Module, TextTokenizer, dict]:
    """The model (in eval mode, on ``device``), tokenizer and config of a run or a Hugging Face model folder.

    The config is the run's config.json; for a Hugging Face folder, ``model_type``,
    ``model`` and ``notes`` (what did not come from the checkpoint, such as a fresh
    NSP head). Either way ``untrained_heads`` lists the heads whose outputs are
    not results (``nsp`` for a BertForMaskedLM, or a run trained on MLM alone). ``backend`` and ``dropout`` replace the saved ones. With ``encoder``,
    a fine-tune run gives the BERT it fine-tuned (with the MLM and NSP heads it kept
    from its start, which the fine-tune did not train), as a ``bert`` config with a note.
    """
    kind, model_config = read_model_config(path)
    overrides = {k: v for k, v in (("backend", backend), ("dropout", dropout)) if v is not None}
    if is_hf_folder(path):
        tok = load_hf_tokenizer(path, kind)
        model, notes = hf.load_hf_folder(path, **overrides)
        architecture = hf.read_hf_config(path)[0]
        config = {"model_type": kind, "model": dataclasses.asdict(model.config), "notes": notes,
                  "untrained_heads": ["nsp"] if architecture == "BertForMaskedLM" else []}
    else:
        config = ckpt.read_config(path)
        tok = TextTokenizer.from_file(Path(path) / ckpt.TOKENIZER, "gpt" if kind == "gpt" else "bert")
        model = build_model(kind, {**model_config, **overrides})
        ckpt.load_weights(path, model, device)
        if encoder and kind == CLASSIFIER:
            bert = build_model("bert", read_model_config(path, encoder=True)[1] | overrides)
            bert.load_state_dict(model.bert.state_dict())
            model = bert
            config = {**config, "model_type": "bert", "model": dataclasses.asdict(bert.config), "notes": [
                f"{path} is a fine-tune run: its BERT encoder is read, without the classification layer; its MLM "
                "and NSP heads are those its fine-tune started from, untrained by it"]}
    if "untrained_heads" not in config:  # a minipt run trained with the MLM objective alone never trained NSP
        config["untrained_heads"] = ["nsp"] if config.get("train", {}).get("objective") == "mlm" else []
    check_vocabulary(tok, model.config.vocab_size, path)
    return model.to(device).eval(), tok, config
