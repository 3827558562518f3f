"""The settings of every command, and command lines built from config dataclasses.

Every field of a command's config (:class:`TrainConfig`, :class:`FinetuneConfig`,
:class:`EvalConfig`, :class:`SampleConfig`) is a command-line option
(``--key=value`` or ``--key value``) and a key of a TOML or JSON ``--config``
file; later sources win: defaults, then the file, then the command line.
``python -m minipt.train --config`` also reads nanoGPT's Python config files,
without running them (:mod:`minipt.nanogpt_config`). The
comment after each field is its ``--help`` text, so the dataclass is the one
place a setting is described. What every command shares (device, precision,
backend, seed, run folder, compile) is declared once, in :class:`CommandConfig`.
Names follow nanoGPT's ``train.py`` where the two overlap. A config is a value:
it is checked when it is made and never gains or changes a field afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from minipt.errors import ConfigError, unknown_setting
from minipt.metrics import CLASSIFICATION, REGRESSION
from minipt.nanogpt_config import read_nanogpt_config
from minipt.ops._backend import BACKENDS


@dataclass
class CommandConfig:
    """What every command shares; each command's config adds its own fields before these."""

    # ---- system
    device: str = "auto"  # auto, cpu, cuda or cuda:N; auto: this process's GPU if there is one, else the CPU
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU, else float32), float32 or bfloat16
    backend: str = "auto"  # minipt.ops backend: auto (triton on CUDA, native on CPU), torch, triton or native
    compile: bool = False  # run the model through torch.compile
    tf32: bool = True  # CUDA: float32 matmuls in TF32, as nanoGPT (about 3e-4 relative error); false: full float32
    seed: int = 1337  # seeds everything random the command does
    out_dir: str = "out"  # the run folder

    def __post_init__(self):
        check_types(self)
        _choice("backend", self.backend, BACKENDS)
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


@dataclass
class TrainConfig(CommandConfig):
    # ---- what to train
    model: str = "gpt"  # gpt (causal LM) or bert (masked LM + next sentence prediction)
    preset: str = ""  # a named size (gpt2, gpt-mini, bert-base, bert-mini, ...); empty: the CPU-sized default
    init_from: str = ""  # a minipt run or Hugging Face GPT-2/BERT folder: its architecture, weights, tokenizer
    objective: str = "mlm+nsp"  # BERT: mlm+nsp, or mlm alone (the NSP head is then not trained)
    n_layer: int | None = None  # transformer blocks; none: the preset's, else 4
    n_head: int | None = None  # attention heads per block; none: the preset's, else 4
    n_embd: int | None = None  # width of the residual stream; none: the preset's, else 128
    block_size: int | None = None  # context length (BERT: of [CLS] A [SEP] B [SEP]); none: the preset's, else 128
    dropout: float | None = None  # dropout rate; none: the model's default (GPT 0.0, BERT 0.1)
    bias: bool | None = None  # GPT: biases in Linear and LayerNorm layers; none: the preset's (true)
    doc_mask: bool = False  # GPT: attention stops at each <|endoftext|>, which opens its document, inside a window
    reset_positions: bool = False  # GPT with doc_mask: positions restart at 0 at each document's <|endoftext|>
    attn_window: int | None = None  # GPT sees the attn_window tokens up to itself, BERT those attn_window // 2 around
    global_every: int | None = None  # with attn_window: every global_every-th layer from 0 sees the whole context
    logit_softcap: float | None = None  # caps the LM (GPT) or MLM (BERT) logits to s·tanh(logits/s) (Gemma 2: 30)
    # ---- data
    data: str = ""  # file, folder or glob: txt, md (.gz too), jsonl[.gz|.zst], parquet, token .bin; empty: the plays
    text_field: str = "text"  # jsonl and parquet: the field (column) that holds a document's text
    strip_markup: bool = True  # bundled plays as "SPEAKER:" text, no headings or stage directions; false keeps markdown
    tokenizer: str = "auto"  # bpe, wordpiece, char or PATH/tokenizer.json; auto: bpe for GPT, wordpiece for BERT
    vocab_size: int | None = None  # of a trained bpe/wordpiece (none: 8192) or token files (none: meta.pkl's, else GPT-2's)
    tokenizer_sample_mb: float = 100.0  # a corpus past this many MB is large: its tokenizer trains on a sample this big
    split: str = "auto"  # doc: tail of each document; holdout: whole documents; stream: nanoGPT; auto: holdout if large
    val_fraction: float = 0.1  # share of the text held out for validation; tokenizers never see it
    cache_dir: str = ""  # cache of tokenizers and tokenized corpora; empty: $MINIPT_CACHE, else ~/.cache/minipt
    mlm_probability: float = 0.15  # BERT: share of tokens selected for the MLM loss (80% [MASK], 10% random, 10% kept)
    short_seq_prob: float = 0.1  # BERT: share of pairs built to a random shorter length
    pack: bool = False  # BERT: several [CLS] A [SEP] B [SEP] pairs per row of block_size, each its own document
    # ---- optimization
    batch_size: int = 16  # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per step; the global batch is batch_size x this x processes
    max_iters: int = 800  # optimizer steps in the run
    learning_rate: float = 1e-3  # peak learning rate, reached after the warm-up
    min_lr: float | None = None  # learning rate at the end of the cosine decay; none: learning_rate / 10
    warmup_iters: int = 50  # steps of linear warm-up
    lr_decay_iters: int | None = None  # step at which the cosine decay reaches min_lr; none: max_iters
    decay_lr: bool = True  # warm up and decay the learning rate; false: constant learning_rate
    weight_decay: float = 0.1  # decoupled weight decay (lr x this a step), of matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    z_loss: float = 0.0  # adds z_loss x lse² per predicted token to the training loss (PaLM: 1e-4), logged apart
    optimizer: str = ""  # muon (the blocks' matrices; AdamW the rest) or adamw; empty: muon for GPT, adamw for BERT
    muon_learning_rate: float = 0.01  # muon: peak learning rate of the blocks' matrices, on learning_rate's schedule
    muon_momentum: float = 0.95  # muon: Muon's Nesterov momentum
    # ---- evaluation and logging
    eval_interval: int = 100  # steps between evaluations (and checkpoints)
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between progress updates and train-loss rows of metrics.jsonl
    always_save_checkpoint: bool = True  # save at every evaluation; false: only when the validation loss improves
    sample_tokens: int = 200  # GPT: tokens sampled at the end of the run; 0: no sample
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # metrics.jsonl's scalars also as TensorBoard events in out_dir/tb (minipt[tensorboard])
    # ---- system
    seed: int = 1337  # seeds the initialisation, the data order and the MLM masks
    out_dir: str = ""  # run folder: config, tokenizer, weights, metrics, loss plot; empty: out-gpt or out-bert
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    overwrite: bool = False  # start afresh in an out_dir that already holds a run, deleting that run's files

    def __post_init__(self):
        super().__post_init__()
        _choice("model", self.model, ("gpt", "bert"))
        if not self.out_dir:  # each kind its own folder, so a BERT run after a GPT one needs no --out_dir
            self.out_dir = default_run_folder(self.model)
        if not self.optimizer:
            self.optimizer = DEFAULT_OPTIMIZER[self.model]
        _choice("objective", self.objective, ("mlm+nsp", "mlm"))
        _choice("split", self.split, ("auto", "doc", "holdout", "stream"))
        # The model's own fields (n_layer, n_head, n_embd, block_size, dropout) are checked by its
        # config class, which minipt.pretraining.model_config builds; the errors name the field alike.
        for name in ("vocab_size", "batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                     "eval_iters", "log_interval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_iters", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            raise ConfigError(f"lr_decay_iters ({self.lr_decay_iters}) must be >= warmup_iters ({self.warmup_iters})")
        _interval("val_fraction", self.val_fraction, 0.0, 1.0, closed=False)
        if not self.tokenizer_sample_mb > 0:
            raise ConfigError(f"tokenizer_sample_mb must be > 0, got {self.tokenizer_sample_mb}")
        _interval("mlm_probability", self.mlm_probability, 0.0, 1.0, closed=False)
        _interval("short_seq_prob", self.short_seq_prob, 0.0, 1.0)
        _check_optimization(self)
        if not 0 <= self.z_loss < float("inf"):  # logit_softcap is the model config's to check
            raise ConfigError(f"z_loss must be a finite float >= 0, got {self.z_loss}")
        if self.decay_lr and self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        if self.model == "bert" and self.bias is not None:
            raise ConfigError("bias applies to --model gpt only; BERT always has biases")
        for name in ("doc_mask", "reset_positions"):
            if self.model == "bert" and getattr(self, name):
                raise ConfigError(f"{name} applies to --model gpt only; a BERT pair is one document: "
                                  "--pack puts several in a row, each seeing only itself")
        if self.reset_positions and not self.doc_mask:
            raise ConfigError("reset_positions needs doc_mask=true: positions restart where a document starts, "
                              "and without doc_mask attention still runs across documents")
        if self.model == "gpt" and self.pack:
            raise ConfigError("pack applies to --model bert only; GPT windows have no padding to fill: "
                              "--doc_mask keeps their documents apart")
        if self.init_from and self.preset:
            raise ConfigError("preset and init_from both set the architecture: init_from takes the checkpoint's")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: pick one")
        if self.init_from and not self.resume and Path(self.init_from).resolve() == Path(self.out_dir).resolve():
            # the new run would be written over (with overwrite, deleted before) the weights it starts from
            raise ConfigError(
                f"init_from and out_dir name the same folder ({self.out_dir}): write the new run to another out_dir"
            )


def default_run_folder(model: str) -> str:
    """Where a training run of ``model`` goes without --out_dir, and where sample, eval and export look."""
    return f"out-{model}"


SCRATCH = "scratch"  # FinetuneConfig.init_from: random weights, for comparison with a pretrained start


@dataclass
class FinetuneConfig(CommandConfig):
    # ---- model and data
    init_from: str = ""  # a BERT run, a fine-tune run or a Hugging Face BERT folder; "scratch": random weights
    arch_from: str = ""  # with --init_from=scratch: the run or folder whose architecture and tokenizer to take
    data: str = ""  # examples: .csv, .tsv (GLUE's) or .jsonl, in the fields below; empty: the genre task
    val_data: str = ""  # validation examples, same format; empty: the last val_fraction of --data
    test_data: str = ""  # test examples, scored once at the end with the weights validation picked; empty: none
    text_field: str = "text"  # the column (jsonl: field) of the text, e.g. sentence; with header=false its index
    text_pair_field: str | None = None  # the column of a pair's second text, e.g. sentence2; none: text_pair if present
    label_field: str = "label"  # the column of the label: a class, or a number for regression
    header: bool = True  # .csv and .tsv: the first row names the columns; false: none does, they go by index from 0
    num_labels: int | None = None  # 1: regression (MSE; labels are numbers); N: labels 0 to N-1; none: those of --data
    val_fraction: float = 0.1  # share of --data held out when no --val_data is given
    max_length: int | None = None  # tokens per example with [CLS] and [SEP]s (longer: cut); none: block_size
    # ---- optimization
    epochs: int = 3  # passes over the training examples
    batch_size: int = 16  # examples per step, all ranks together
    learning_rate: float = 2e-5  # peak learning rate (BERT's paper: 2e-5 to 5e-5)
    warmup_iters: int = 0  # steps of linear warm-up
    weight_decay: float = 0.01  # decoupled weight decay (lr x this a step), of matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    optimizer: str = "adamw"  # adamw, or muon: Muon for the encoder blocks' weight matrices, AdamW for the rest
    muon_learning_rate: float = 2e-5  # muon: peak learning rate of the blocks' matrices, on learning_rate's schedule
    muon_momentum: float = 0.95  # muon: Muon's Nesterov momentum
    dropout: float | None = None  # dropout in the encoder and before the classifier; none: the checkpoint's
    metric: str | None = None  # best epoch by accuracy, macro_f1, f1, matthews, pearson, spearman; none: macro_f1|pearson
    # ---- system
    seed: int = 1337  # seeds the classifier's initialisation, dropout and the order of the examples
    out_dir: str = "out-finetune"  # the run folder; the exported model goes to out_dir/hf
    log_interval: int = 10  # steps between progress updates and train-loss rows of metrics.jsonl
    progress: bool = True  # show a progress bar (plain lines when not on a terminal)
    tensorboard: bool = False  # metrics.jsonl's scalars also as TensorBoard events in out_dir/tb (minipt[tensorboard])
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    overwrite: bool = False  # start afresh in an out_dir that already holds a run, deleting that run's files

    def __post_init__(self):
        super().__post_init__()
        for name in ("epochs", "batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_optimization(self)
        if self.num_labels is not None and self.num_labels < 1:
            raise ConfigError(f"num_labels must be a positive integer (1: regression) or none, got {self.num_labels}")
        if self.metric is not None:
            _choice("metric", self.metric, CLASSIFICATION + REGRESSION)
            if self.regression != (self.metric in REGRESSION):
                raise ConfigError(
                    f"metric={self.metric} scores " + ("regression, which --num_labels=1 asks for" if self.metric in
                                                       REGRESSION else "classes; --num_labels=1 is regression") +
                    f": use {' or '.join(REGRESSION if self.regression else CLASSIFICATION)}")
            if self.metric == "f1" and (self.num_labels or 2) != 2:
                raise ConfigError(f"metric=f1 scores the positive class of two labels; num_labels={self.num_labels}: "
                                  "use macro_f1")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: pick one")
        if self.arch_from and self.init_from != SCRATCH:
            raise ConfigError(f"arch_from is read only with --init_from={SCRATCH} (the weights of --init_from "
                              "bring their own architecture)")
        if self.init_from == SCRATCH and not self.arch_from and not self.resume:
            raise ConfigError(f"--init_from={SCRATCH} needs --arch_from=PATH: the BERT run or Hugging Face folder "
                              "whose architecture and tokenizer the randomly initialised model takes")

    @property
    def regression(self) -> bool:
        """Whether the model predicts a number (one output, MSE) rather than a class, as transformers' num_labels=1."""
        return self.num_labels == 1

    @property
    def selection_metric(self) -> str:
        """The validation score that picks the epoch: --metric, else pearson (regression) or macro_f1."""
        return self.metric or ("pearson" if self.regression else "macro_f1")

    @property
    def start(self) -> tuple[str, str]:
        """(the folder the model is read from, the argument that names it): --arch_from for a scratch start."""
        return (self.arch_from, "arch_from") if self.init_from == SCRATCH else (self.init_from, "init_from")


EVAL_TASKS = ("text", "hellaswag")  # see minipt.evaluation and minipt.multiple_choice
TEXT_ONLY = ("text_field", "strip_markup", "mlm_probability", "short_seq_prob", "pack")  # EvalConfig: --task=text


@dataclass
class EvalConfig(CommandConfig):
    # ---- model and data
    out_dir: str = "out-gpt"  # a minipt run (train writes out-gpt, out-bert) or a Hugging Face GPT-2 or BERT folder
    task: str = "text"  # text: scores held-out text; hellaswag: GPT picks HellaSwag's endings (acc, acc_norm)
    data: str = ""  # text: file, folder or glob of txt, md (.gz too), jsonl[.gz|.zst], parquet; hellaswag: .jsonl or .bin
    text_field: str | None = None  # jsonl and parquet: the field (column) that holds a document's text; none: the run's
    strip_markup: bool | None = None  # bundled plays as "SPEAKER:" text, no headings or stage directions; none: the run's
    json: str = ""  # also write the results to this JSON file
    # ---- scoring
    block_size: int | None = None  # tokens per window (GPT), pair (BERT) or ending row; none: the model's block_size
    batch_size: int = 8  # windows, pairs or multiple-choice examples per forward pass
    mlm_probability: float | None = None  # BERT: share of tokens masked; none: the run's, else 0.15
    short_seq_prob: float | None = None  # BERT: share of pairs built shorter; none: the run's, else 0.1
    pack: bool | None = None  # BERT: several pairs per row of block_size; none: as the run trained, else false
    seed: int = 1337  # BERT: seeds the pairs and the masks

    def __post_init__(self):
        super().__post_init__()
        _choice("task", self.task, EVAL_TASKS)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")
        for name in TEXT_ONLY:
            if self.task != "text" and getattr(self, name) is not None:
                raise ConfigError(f"{name} applies to --task=text, which scores held-out text; not to "
                                  f"--task={self.task}")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2 or none, got {self.block_size}")
        if self.mlm_probability is not None:
            _interval("mlm_probability", self.mlm_probability, 0.0, 1.0, closed=False)
        if self.short_seq_prob is not None:
            _interval("short_seq_prob", self.short_seq_prob, 0.0, 1.0)


@dataclass
class SampleConfig(CommandConfig):
    # ---- run
    out_dir: str = "out-gpt"  # a minipt run (train writes out-gpt, out-bert) or a Hugging Face GPT-2 or BERT folder
    seed: int = 1337  # seeds the sampling
    # ---- GPT
    prompt: str = ""  # text to continue; empty: start a new document
    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = 0.8  # softmax temperature; 0: always the most likely token
    top_k: int | None = 200  # sample among the k most likely tokens; none: among all
    num_samples: int = 1  # samples to draw
    # ---- BERT
    text: str = ""  # text with [MASK] tokens to fill in; for a fine-tune run, the text to classify
    candidates: int = 5  # candidates shown for each [MASK]
    text_a: str = ""  # first segment for next sentence prediction
    text_b: str = ""  # second segment: the probability that it follows text_a, or the text_pair to classify

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_new_tokens", "num_samples", "candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or none, got {self.top_k}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.text_a and not self.text_b:
            raise ConfigError("next sentence prediction needs both --text_a and --text_b")
        if self.text_b and not (self.text_a or self.text):
            raise ConfigError("--text_b needs --text_a (next sentence prediction) or --text (a fine-tune run's pair)")


OPTIMIZERS = ("adamw", "muon")  # see minipt.loop.make_optimizer
# Pretraining's optimizer without --optimizer: the one whose whole default run reached the lower validation
# loss on the bundled plays (the README's quick start; bench/optimizers.py compares them seed by seed).
DEFAULT_OPTIMIZER = {"gpt": "muon", "bert": "adamw"}


def _check_optimization(cfg: TrainConfig | FinetuneConfig) -> None:
    """The optimizer settings that training and fine-tuning share."""
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    for name in ("learning_rate", "muon_learning_rate"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("beta1", "beta2", "muon_momentum"):
        _interval(name, getattr(cfg, name), 0.0, 1.0, upper_open=True)
    for name in ("weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _interval(name, value, lo, hi, *, closed=True, upper_open=False) -> None:
    ok = (lo < value < hi) if not closed else (lo <= value < hi if upper_open else lo <= value <= hi)
    if not ok:
        left, right = ("[" if closed else "("), ("]" if closed and not upper_open else ")")
        raise ConfigError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")


@dataclass
class ExportConfig:
    out_dir: str = "out-gpt"  # the run to export: a pretraining run (GPT or BERT) or a fine-tune run
    to: str = ""  # the folder to write (required), which from_pretrained loads: weights, config and tokenizer
    overwrite: bool = False  # write into a folder that already holds files

    def __post_init__(self):
        check_types(self)


@dataclass
class CacheConfig:
    cache_dir: str = ""  # the cache folder; empty: $MINIPT_CACHE, else ~/.cache/minipt (the commands' default)
    list: bool = False  # list minipt's entries there: each tokenized corpus, its size and what it was made from
    clear: bool = False  # delete minipt's entries that no running process holds; other files there stay

    def __post_init__(self):
        check_types(self)


# ----------------------------------------------------------------------------- field types and help
def _field_order(cls) -> list[dataclasses.Field]:
    """The fields of ``cls``: those a command declares itself first, then the shared ones it inherits."""
    fields = dataclasses.fields(cls)
    own = [f for f in fields if f.name in vars(cls).get("__annotations__", {})]
    return own + [f for f in fields if f not in own]


def field_types(cls) -> dict[str, tuple[type, bool]]:
    """``{name: (base type, accepts None)}`` for each field of a config dataclass, in ``--help`` order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in _field_order(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = (args[0], True) if args else (hint, False)
    return out


def check_types(config) -> None:
    """Raise ConfigError for a field whose value is not of its declared type."""
    for name, (kind, optional) in field_types(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, float(value))
            ok = True
        if not ok:
            expected = kind.__name__ + (" or none" if optional else "")
            raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def field_help(cls) -> tuple[dict[str, str], dict[str, str]]:
    """The comment after each field (its help) and the section comment above it."""
    helps, sections = {}, {}
    # The shared base first, so that a command's own comment on a field it redeclares wins.
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        section = ""
        for line in inspect.getsource(klass).splitlines():
            heading = re.match(r"\s+# -+ (.+)$", line)
            if heading:
                section = heading.group(1)
            m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
            if m:
                helps[m.group(1)], sections[m.group(1)] = m.group(2), section
    return helps, sections


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _parse_value(kind: type, optional: bool, text: str):
    if optional and text.lower() in ("none", "null"):
        return None
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an' if kind is int else 'a'} {kind.__name__}{' or none' if optional else ''}, got {text!r}"
        ) from None


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    helps, sections = field_help(cls)
    parser = _Parser(prog=prog, description=description.replace("``", ""), allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="FILE",
        help="a TOML or JSON file of settings, or a run's config.json to repeat it"
             + (", or a nanoGPT config .py" if cls is TrainConfig else "") + "; the command line overrides it"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = cls()
    for name, (kind, optional) in field_types(cls).items():
        section = sections.get(name, "")
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section or None))
        default = getattr(defaults, name)
        shown = "none" if default is None else json.dumps(default) if isinstance(default, (str, bool)) else default
        group.add_argument(
            f"--{name}", type=lambda s, k=kind, o=optional: _parse_value(k, o, s), default=argparse.SUPPRESS,
            nargs="?" if kind is bool else None, const=True if kind is bool else None,
            metavar=kind.__name__.upper(),
            help=f"{helps.get(name, '')} (default: {shown})".replace("%", "%%"),  # argparse %-formats help
        )
    return parser


def _unknown_key(cls, key: str, where: str) -> ConfigError:
    return unknown_setting(key, [f.name for f in dataclasses.fields(cls)], where)


def read_config_file(cls, path: str) -> dict:
    """Settings from a TOML or JSON file, checked against the fields of ``cls``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError("TOML config files need Python 3.11 or later; use a .json file") from None
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".json":
            values = json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".py" and cls is TrainConfig:
            values = read_nanogpt_config(p, {f.name for f in dataclasses.fields(cls)})
        elif p.suffix == ".py":
            raise ConfigError(f"{path}: nanoGPT config files (.py) set up training: python -m minipt.train reads "
                              "them; give this command a .toml or .json file")
        else:
            raise ConfigError(f"config file must end in .toml, .json or (nanoGPT's) .py, got {path!r}")
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    if isinstance(values.get("train"), dict) and "model_type" in values:
        # a run folder's own config.json: its settings repeat the run (a new run, not a resume of it)
        values = {k: v for k, v in values["train"].items() if k not in ("resume", "overwrite")}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(cls, key, f" in {path}")
    return values


def parse_overrides(cls, argv: list[str] | None, prog: str, description: str) -> dict:
    """The settings given explicitly, by ``--config`` file and command line, as a dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, prog, description)
    args, rest = parser.parse_known_args(argv)
    for token in rest:
        if token.startswith("-"):
            raise _unknown_key(cls, token.lstrip("-").split("=", 1)[0], "")
        raise ConfigError(f"unexpected argument {token!r}: settings are given as --key=value")
    given = vars(args)
    path = given.pop("config", None)
    values = read_config_file(cls, path) if path else {}
    values.update(given)
    return values


def make_config(cls, values: dict):
    try:
        return cls(**values)
    except TypeError as exc:  # only reachable from code, not the command line, which checks keys first
        raise ConfigError(str(exc)) from None
