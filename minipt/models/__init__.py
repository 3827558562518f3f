"""minipt's models: GPT (causal LM), BERT (MLM + NSP) and a BERT sequence classifier.

* :mod:`minipt.models.gpt`: GPT alone, read top to bottom as nanoGPT's model.py;
* :mod:`minipt.models.bert`: BERT, its heads, and the sequence classifier;
* :mod:`minipt.models.common`: what both share (output record, checks, heads, FLOPs).

This module is the registry: each kind's name, spelled here once, maps to its
model and config classes, and :func:`build_model` turns a saved config into a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn

from minipt.models.bert import BERT, BERT_PRESETS, BertClassifier, BertClassifierConfig, BertConfig
from minipt.models.common import ModelOutput
from minipt.models.gpt import GPT, GPT_PRESETS, GPTConfig

__all__ = [
    "BERT", "BERT_PRESETS", "CLASSIFIER", "GPT", "GPT_PRESETS", "MODEL_KINDS", "BertClassifier",
    "BertClassifierConfig", "BertConfig", "GPTConfig", "ModelKind", "ModelOutput", "build_model",
]

CLASSIFIER = "bert_classifier"  # the model kind of a fine-tune run


class ModelKind(NamedTuple):
    model: type[nn.Module]
    config: type


MODEL_KINDS = {
    "gpt": ModelKind(GPT, GPTConfig), "bert": ModelKind(BERT, BertConfig),
    CLASSIFIER: ModelKind(BertClassifier, BertClassifierConfig),
}


def build_model(kind: str, config: dict | GPTConfig | BertConfig) -> GPT | BERT | BertClassifier:
    """A model from its kind and its config (a dict, as saved in a run's ``config.json``)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"build_model: kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    model_cls, config_cls = MODEL_KINDS[kind]
    return model_cls(config_cls(**config) if isinstance(config, dict) else config)
