"""Fine-tuning BERT for sequence classification or regression, from a pretrained start or from random weights.

``python -m minipt.finetune`` is the command around :func:`finetune` and
:func:`export`. The model is :class:`minipt.models.BertClassifier`
(``BertForSequenceClassification``: dropout and a linear layer on the pooled
[CLS] state), started from a BERT run, a fine-tune run or a Hugging Face BERT
folder, or with ``--init_from=scratch --arch_from=DIR`` from random weights in
the architecture of ``DIR``: the comparison that shows what pretraining brings.

The loop is the trainer's (:mod:`minipt.loop`): AdamW (or Muon for the encoder
blocks' matrices, ``--optimizer=muon``), linear warm-up and one cosine decay to
zero over the whole run, bf16 autocast on a GPU, DDP under
``torchrun`` (each rank takes its share of every batch). A checkpoint is saved
after every epoch; Ctrl-C or SIGTERM saves at the current step, and ``--resume``
continues exactly (the order of the examples is drawn per epoch from the seed,
so a step number says where the run stands).

A classifier learns by cross-entropy. With ``--num_labels=1`` the model is
a regressor, as in transformers: one output, learnt by mean squared error
against a number (GLUE's STS-B).

After each epoch it scores the validation set (:mod:`minipt.metrics`). A
classifier gets accuracy, macro-F1, the Matthews correlation and, with two
labels, the F1 of the second; a regressor gets Pearson's and Spearman's
correlations. The epoch with the best ``--metric`` score (by default macro-F1,
or Pearson's r for regression) gives the run's final weights. These then score
the test set, if there is one. Without ``--data`` the examples are the bundled
genre task (:mod:`minipt.data.genre`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from minipt import checkpoint as ckpt
from minipt import hf, runtime
from minipt.config import SCRATCH, ConfigError, FinetuneConfig, TrainConfig
from minipt.data import genre
from minipt.data.examples import Columns, collate, encode, epoch_order, split_examples
from minipt.errors import Interrupted
from minipt.load import is_hf_folder, load_run
from minipt.loop import (
    Schedule, flush_window, holding_run_folder, make_optimizer, save_on_main, saved_settings, stop_requested, wrap_ddp,
)
from minipt.metrics import (
    CLASSIFICATION, REGRESSION, classification_scores, confusion_matrix, rank_key, regression_scores,
)
from minipt.models import CLASSIFIER, BertClassifier, BertClassifierConfig, build_model
from minipt.ops import cross_entropy, resolve_backends
from minipt.runlog import MetricsLog, Progress, StopRequest, TrainWindow, plot_losses, require_tensorboard
from minipt.tokenizer import TextTokenizer

BEST = "best"  # subfolder: the best epoch's weights while the run goes on
CONFUSION = "confusion.json"


# ----------------------------------------------------------------------------- scores
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
    if is_hf_folder(init_from):
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
    """A fine-tune run: config, examples, model, optimizer, step and the best epoch so far."""

    def __init__(self, cfg: FinetuneConfig, rt: runtime.Runtime, log, backends: dict[str, str]):
        self.cfg, self.rt, self.log, self.out = cfg, rt, log, Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out, tensorboard=cfg.tensorboard and rt.is_main)
        rt.on_main(lambda: self._prepare_folder())
        if cfg.resume:
            saved = ckpt.read_config(self.out)
            if saved.get("model_type") != CLASSIFIER:
                raise ConfigError(f"--resume: {self.out} holds a {saved.get('model_type')} run, not a fine-tune run")
            self.tok = TextTokenizer.from_file(self.out / ckpt.TOKENIZER, "bert")
            block_size = saved["model"]["block_size"]
        else:
            start, argument = cfg.start
            bert, self.tok, saved = load_run(start, backend=cfg.backend, dropout=cfg.dropout)
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
            paths = rt.on_main(lambda: genre.build(self.out, val_fraction)) or genre.paths(self.out)
            # the run records the files it read, as if they had been given
            self.cfg = cfg = dataclasses.replace(cfg, **dict(zip(("data", "val_data", "test_data"), map(str, paths))))
            log(f"the genre task: passages from the held-out last {val_fraction:g} of every bundled play: "
                f"{cfg.data} (training plays), {cfg.val_data} (validation plays) and {cfg.test_data} (test plays)")
        self.max_length = cfg.max_length or block_size
        if self.max_length > block_size:
            raise ConfigError(f"max_length={self.max_length} exceeds the model's {block_size} positions")
        columns = Columns(cfg.text_field, cfg.text_pair_field, cfg.label_field, cfg.header)
        train, val, test, labels = split_examples(cfg.data, cfg.val_data, cfg.test_data, columns=columns,
                                                  num_labels=cfg.num_labels, val_fraction=cfg.val_fraction,
                                                  seed=cfg.seed)
        if cfg.selection_metric == "f1" and len(labels) != 2:
            raise ConfigError(f"--metric=f1 scores the positive class of two labels; {cfg.data} has {len(labels)} "
                              f"({', '.join(labels)}): use macro_f1")
        num_labels = 1 if labels is None else len(labels)
        if cfg.resume:
            if saved["labels"] != labels:
                number = ["a number: regression"]
                raise ConfigError(f"--resume: the labels of {cfg.data} ({', '.join(labels or number)}) are not the "
                                  f"run's ({', '.join(saved['labels'] or number)})")
            overrides = {"backend": cfg.backend, **({} if cfg.dropout is None else {"dropout": cfg.dropout})}
            self.model = build_model(CLASSIFIER, {**saved["model"], **overrides})
        else:
            torch.manual_seed(cfg.seed)
            if cfg.init_from == SCRATCH:
                arch = {**dataclasses.asdict(bert.config), "num_labels": num_labels}
                self.model = BertClassifier(BertClassifierConfig(**arch))
            else:
                self.model = BertClassifier.from_bert(bert, num_labels)
        self.model.to(rt.device).train()
        self.labels, self.regression = labels, labels is None
        self.train_rows, self.val_rows, self.test_rows = (
            encode(x, self.tok, self.max_length) for x in (train, val, test))
        self.steps_per_epoch = -(-len(self.train_rows) // cfg.batch_size)
        self.max_iters = cfg.epochs * self.steps_per_epoch
        # one cosine decay over the whole run, to zero
        self.schedule = Schedule(learning_rate=cfg.learning_rate, warmup_iters=cfg.warmup_iters,
                                 decay_iters=max(self.max_iters, cfg.warmup_iters), min_lr=0.0)
        self.optimizer = make_optimizer(
            self.model, learning_rate=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
            device=rt.device, optimizer=cfg.optimizer, muon_learning_rate=cfg.muon_learning_rate,
            muon_momentum=cfg.muon_momentum,
        )
        self.iter, self.best, self.tokens = 0, None, 0
        # the encoder's MLM and NSP heads get no gradient here
        self.train_model = wrap_ddp(torch.compile(self.model) if cfg.compile else self.model, rt,
                                    find_unused_parameters=True)
        if cfg.resume:
            self.load_state_dict(ckpt.load_checkpoint(self.out, self.model, rt.device))
        elif rt.is_main:
            ckpt.write_config(self.out, {
                "model_type": CLASSIFIER, "train": saved_settings(cfg), "model": dataclasses.asdict(self.model.config),
                "labels": labels, "tokenizer_vocab_size": self.tok.vocab_size, "backends": backends,
            })
            ckpt.atomic_write_text(self.out / ckpt.TOKENIZER, self.tok.to_str())

    def _prepare_folder(self) -> None:
        ckpt.prepare_run_folder(self.out, resume=self.cfg.resume, overwrite=self.cfg.overwrite)
        if not self.cfg.resume:  # a best epoch left by an interrupted earlier run is not this run's
            shutil.rmtree(self.out / BEST, ignore_errors=True)

    # ---- state
    def state_dict(self) -> dict:
        """The training state; ``rng`` holds every rank's generators, so each is gathered on rank 0 first."""
        rng = self.rt.gather_on_main(ckpt.rng_state(self.rt.device))
        return {"iter": self.iter, "best": self.best, "optimizer": self.optimizer.state_dict(), "rng": rng,
                "finished": False}

    def load_state_dict(self, state: dict) -> None:
        if state.get("finished"):
            raise ConfigError(f"--resume: the run in {self.out} has finished (its weights are its best epoch's); "
                              f"fine-tune further with --init_from={self.out} and a new --out_dir")
        self.iter, self.best = state["iter"], state["best"]
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng_state(state["rng"], self.rt.device, self.rt.rank)

    def save(self) -> None:
        save_on_main(self.rt, self.out, self.model, self.state_dict())  # state_dict on every rank: it gathers

    def flush(self, window: TrainWindow, progress: Progress) -> None:
        flush_window(window, self.rt, progress, step=self.iter, lr=self.schedule.lr(self.iter - 1),
                     metrics=self.metrics)

    # ---- steps
    def _logits(self, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
        with self.rt.autocast():
            return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed over the batch: squared error of the one output (regression), else cross-entropy."""
        if self.regression:
            return F.mse_loss(logits[:, 0], labels, reduction="sum")
        return cross_entropy(logits, labels, reduction="sum", backend=self.cfg.backend)

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
        self.optimizer.set_lr(self.schedule.lr(self.iter))
        loss_sum = self._loss_sum(self._logits(batch, self.train_model), batch["labels"])
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
        """Loss and scores on ``rows`` (a classifier's with its confusion matrix), the examples split across ranks.

        Each rank writes its share of the predictions into one vector of them all, zeros elsewhere: their sum
        over the ranks is every prediction in order, which the correlations need."""
        self.model.eval()
        n = len(rows)
        sums = torch.zeros(n + 1, dtype=torch.float64, device=self.rt.device)  # the predictions, then the loss sum
        mine = range(self.rt.rank, n, self.rt.world_size)
        for i in range(0, len(mine), self.cfg.batch_size):
            at = mine[i:i + self.cfg.batch_size]
            batch = collate([rows[j] for j in at], self.tok.pad_id, self.rt.device)
            logits = self._logits(batch, self.model)
            predicted = logits[:, 0] if self.regression else logits.argmax(-1)
            sums[torch.tensor(at, device=self.rt.device)] = predicted.double()
            sums[-1] += self._loss_sum(logits, batch["labels"]).double()
        self.model.train()
        sums = self.rt.all_reduce_sum(sums).cpu().numpy()
        predicted, truth, loss = sums[:n], [target for _, _, target in rows], float(sums[-1]) / n
        if self.regression:
            return {"loss": loss, **regression_scores(predicted, truth)}
        matrix = confusion_matrix(truth, predicted.astype(int), len(self.labels))
        return {"loss": loss, **classification_scores(matrix), "confusion": matrix.tolist()}

    def end_of_epoch(self, progress: Progress) -> None:
        """Evaluate, log, keep the weights if the epoch is the best so far, and save the checkpoint."""
        epoch = self.iter // self.steps_per_epoch
        result = self.evaluate(self.val_rows)
        result["val_loss"] = result.pop("loss")
        matrix = result.pop("confusion", None)
        if self.rt.is_main:
            self.metrics.append({"iter": self.iter, "epoch": epoch, **result})
        metric = self.cfg.selection_metric
        improved = self.best is None or rank_key(result[metric]) > rank_key(self.best[metric])
        progress.log(f"epoch {epoch}: val loss {result['val_loss']:.4f}, " + shown(result)
                     + ("  (best so far)" if improved else ""))
        if improved:
            self.best = {"iter": self.iter, "epoch": epoch, **result, "confusion": matrix}
            if self.rt.is_main:
                (self.out / BEST).mkdir(exist_ok=True)
                ckpt.save_checkpoint(self.out / BEST, self.model, {"iter": self.iter})
        self.save()

    def finish(self) -> None:
        """Make the best epoch's weights the run's, score the test examples with them, and mark the run finished.

        ``confusion.json`` gets the labels (null: regression), the chosen epoch
        and metric, and per split (``validation``, and ``test`` when there are
        test examples) the loss and scores; a classifier's also get the share of
        the commonest true label (``majority_rate``: what always guessing it
        scores) and the confusion matrix.
        """
        ckpt.load_weights(self.out / BEST, self.model, self.rt.device)
        self.rt.barrier()
        best = {k: v for k, v in self.best.items() if k not in ("iter", "epoch")}
        self.results = {"validation": {"loss": best.pop("val_loss"), **best}}
        if self.test_rows:
            self.results["test"] = self.evaluate(self.test_rows)
        for result in self.results.values():
            matrix = result.pop("confusion", None)
            if matrix is not None:
                result["majority_rate"] = max(map(sum, matrix)) / sum(map(sum, matrix))
                result["matrix"] = matrix
        state = {**self.state_dict(), "finished": True}  # on every rank: the generators are gathered
        if self.rt.is_main:
            if "test" in self.results:
                self.metrics.append({"iter": self.iter, "epoch": self.best["epoch"], **{
                    f"test_{k}": v for k, v in self.results["test"].items() if k != "matrix"}})
            ckpt.save_checkpoint(self.out, self.model, state)
            layout = {} if self.regression else {"rows": "true label", "columns": "predicted label"}
            ckpt.atomic_write_text(self.out / CONFUSION, json.dumps(
                {"labels": self.labels, "epoch": self.best["epoch"], "metric": self.cfg.selection_metric, **layout,
                 **self.results}, indent=2))
            shutil.rmtree(self.out / BEST)
            plot_losses(self.out)


def shown(result: dict) -> str:
    """The scores of ``result``, in the order of their definitions, for a log line."""
    return ", ".join(f"{name} {result[name]:.4f}" for name in CLASSIFICATION + REGRESSION if name in result)


def finetune(cfg: FinetuneConfig, rt: runtime.Runtime, log=print) -> Finetune:
    """Fine-tune to the last epoch (or a stop request); the result holds the best epoch's weights.

    The run folder is locked for the run's life (see :func:`minipt.loop.holding_run_folder`)."""
    if cfg.tensorboard:
        require_tensorboard()
    with holding_run_folder(cfg.out_dir, rt):
        return _finetune(cfg, rt, log)


def _finetune(cfg: FinetuneConfig, rt: runtime.Runtime, log) -> Finetune:
    if not cfg.resume and not cfg.init_from:
        raise ConfigError(f"--init_from (a BERT run or Hugging Face BERT folder, or {SCRATCH}) is required")
    for name in ("val_data", "test_data"):
        if not cfg.data and getattr(cfg, name):
            raise ConfigError(f"--{name} needs --data: without --data the genre task gives all three splits")
    start, argument = cfg.start
    if not cfg.resume and Path(start).resolve() == Path(cfg.out_dir).resolve():
        raise ConfigError(f"--{argument} and --out_dir name the same folder: the run would be written over its start")
    backends = resolve_backends(cfg.backend, rt.device)  # a backend that cannot serve is refused before any work
    log("backends: " + ", ".join(f"{op} {backend}" for op, backend in backends.items()))
    run = Finetune(cfg, rt, log, backends)
    if cfg.resume:
        if rt.is_main:
            run.metrics.keep_until(run.iter)
        log(f"resuming {run.out} at step {run.iter} of {run.max_iters}")
    else:
        if cfg.init_from == SCRATCH:
            start = f"a randomly initialised BERT shaped like {cfg.arch_from}"
        log(f"fine-tuning {start}: {run.model.num_params() / 1e6:.2f}M parameters, "
            f"{len(run.train_rows)} examples, " + ("regression" if run.regression else f"{len(run.labels)} labels")
            + f", {len(run.val_rows)} for validation, "
            f"{len(run.test_rows)} for test, "
            f"{rt.device} {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)")
    progress = Progress(run.max_iters, run.iter, cfg.progress and rt.is_main, log)
    window = TrainWindow(rt.device, run.iter)
    with contextlib.closing(run.metrics):  # the TensorBoard events of the finish too
        with StopRequest() as stop, contextlib.closing(progress):
            while run.iter < run.max_iters:
                window.add(run.step(), run.tokens)
                progress.step()
                at_epoch_end = run.iter % run.steps_per_epoch == 0
                if run.iter % cfg.log_interval == 0 or at_epoch_end:
                    run.flush(window, progress)
                if at_epoch_end:
                    run.end_of_epoch(progress)
                    window.restart_clock()
                if stop_requested(stop, rt, step=run.iter, log_interval=cfg.log_interval):
                    run.flush(window, progress)
                    run.save()
                    raise Interrupted(run.iter)
        run.finish()
    log(f"\nbest epoch {run.best['epoch']} of {cfg.epochs} by {cfg.selection_metric}; its weights are the run's.")
    for split, result in run.results.items():
        if run.regression:
            log(f"{split}: {shown(result)}, loss (mean squared error) {result['loss']:.4f}")
            continue
        log(f"{split}: {shown(result)}, loss {result['loss']:.4f}; the commonest label alone scores accuracy "
            f"{result['majority_rate']:.4f}; confusion matrix:")
        log(format_confusion(result["matrix"], run.labels))
    return run


def export(model: BertClassifier, tok: TextTokenizer, labels: list[str], folder: Path, log=print) -> bool:
    """The model as transformers' BertForSequenceClassification, with its tokenizer, in ``folder``.

    Without ``transformers`` installed, says how to get it and returns False: the run is saved either way."""
    try:
        hf.save_pretrained(model, tok, folder, labels=labels)
    except hf.MissingDependency as exc:
        log(f"note: no Hugging Face export: {exc}")
        return False
    return True
