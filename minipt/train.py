"""``python -m minipt.train``: pretrain GPT (causal LM) or BERT (MLM + NSP).

With no arguments it trains a small GPT on the CPU on the bundled Shakespeare
plays (plain text, see :mod:`minipt.data`), evaluates as it goes, saves the run
to ``out/`` and ends with a sample; ``--model bert`` does the same for MLM + NSP.
Every field of :class:`minipt.config.TrainConfig` is an option; ``--help`` lists
them. Under ``torchrun --nproc_per_node=N -m minipt.train ...`` it runs DDP:
each rank reads its own slice of every global batch, and only rank 0 writes.

The loop is nanoGPT's: AdamW (fused where torch has it) with weight decay on
2-D parameters only, linear warm-up then cosine decay to ``min_lr``, gradient
clipping and accumulation, bf16 autocast on a GPU. It avoids host syncs: the
loss stays on the device and is read only every ``log_interval`` steps, which is
also when a non-finite loss is caught (before any checkpoint is written, so the
last checkpoint on disk is always a good one). Ctrl-C or SIGTERM finishes the
current step, saves and exits with status 130; ``--resume`` continues exactly
where the run stopped, data order and MLM masks included.

``--init_from=PATH`` continues pretraining from a minipt run (a fine-tune run
gives its BERT encoder) or a Hugging Face GPT-2/BERT folder (read by
:func:`minipt.sample.load_run`): its architecture, weights and tokenizer, which
tokenizes the data; the optimizer starts fresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

from minipt import checkpoint as ckpt
from minipt import runtime, sample
from minipt.config import ConfigError, TrainConfig, make_config, parse_overrides
from minipt.data import DataError, make_samplers, prepare_data, to_device
from minipt.data.packing import check_pair_room
from minipt.model import MODEL_KINDS, BertConfig, GPTConfig, ModelOutput, build_model
from minipt.ops import mlm_mask
from minipt.ops._loss import IGNORE_INDEX
from minipt.runlog import (
    Progress, StopRequest, TrainWindow, append_metrics, keep_metrics_until, plot_losses, read_metrics,
)
from minipt.tokenizer import TokenizerError

PROG = "python -m minipt.train"
# The CPU-sized model when no --preset is given: trains in minutes on two cores.
DEFAULT_SIZES = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the last checkpoint is kept."""


class Interrupted(Exception):
    """A stop request was honoured: the run saved its state at step ``args[0]``."""


# ----------------------------------------------------------------------------- model and optimizer
def document_settings(cfg: TrainConfig, eot_id: int | None) -> dict:
    """GPTConfig's document fields for ``--doc_mask``/``--reset_positions``, given the tokenizer's <|endoftext|> id."""
    if cfg.doc_mask and eot_id is None:
        raise ConfigError("doc_mask needs <|endoftext|> in the tokenizer, the token that opens each document; "
                          "token files come without one: pass their --tokenizer")
    return {"doc_sep_id": eot_id if cfg.doc_mask else None, "reset_positions": cfg.reset_positions}


def model_config(cfg: TrainConfig, vocab_size: int, pad_id: int, eot_id: int | None = None) -> GPTConfig | BertConfig:
    """The model config: preset (or the CPU-sized default), then the fields given explicitly.

    ``vocab_size``, ``pad_id`` (BERT's) and ``eot_id`` (GPT's document separator) come from the tokenizer."""
    cls = MODEL_KINDS[cfg.model].config
    shape = {"n_layer", "n_head", "n_embd", "block_size", "dropout", "bias"}
    fields = shape & {f.name for f in dataclasses.fields(cls)}
    overrides = {k: getattr(cfg, k) for k in fields if getattr(cfg, k) is not None}
    # Round the vocabulary up to a multiple of 64, as nanoGPT does with 50257 -> 50304: the
    # extra rows are never targets, and the LM-head matmul gets friendlier shapes.
    overrides.update(vocab_size=-(-vocab_size // 64) * 64, backend=cfg.backend)
    if cfg.model == "bert":
        overrides["pad_token_id"] = pad_id
    else:
        overrides.update(document_settings(cfg, eot_id))
    try:
        config = cls.preset(cfg.preset, **overrides) if cfg.preset else cls(**{**DEFAULT_SIZES, **overrides})
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if cfg.model == "bert":
        check_pair_room(config.block_size)
    return config


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on biases and LayerNorm (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused AdamW runs on CPU and CUDA tensors since torch 2.4, one kernel for all parameters.
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cpu", "cuda")
    )


def learning_rate(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat (nanoGPT)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters, min_lr = cfg.final_lr_decay_iters, cfg.final_min_lr
    if it >= decay_iters:
        return min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)


def mask_seed(*parts: int) -> int:
    """A 63-bit seed for ``mlm_mask`` from (seed, step, micro-step, rank): reproducible on resume."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- one run
# What an evaluation sums over its batches, then over the ranks in one all-reduce.
EVAL_SUMS = ("loss", "batches", "mlm_loss", "nsp_loss", "mlm_hits", "masked", "nsp_hits", "pairs", "random_b")


class Scorer:
    """A model's loss and validation metrics on batches already made: what training evaluates with, and eval.

    ``cfg`` gives the model kind and, for BERT, the masking rate, the objective and
    the seed of the validation masks. ``padding`` holds the batches' padding figures
    (see :func:`minipt.data.pair_batches`), reported with every evaluation.
    """

    def __init__(self, cfg: TrainConfig, rt: runtime.Runtime, tok, model, val_batches: list[dict[str, np.ndarray]],
                 padding: dict[str, float] | None = None):
        self.cfg, self.rt, self.tok, self.val_batches = cfg, rt, tok, val_batches
        self.padding = padding or {}
        self.model = self.train_model = model

    def forward(self, batch: dict[str, torch.Tensor], seed: int, model=None) -> ModelOutput:
        """The model's output, loss included, on one batch already on the device.

        BERT's MLM masks are drawn here, on the device, from ``seed``; its NSP labels
        enter the loss under the mlm+nsp objective only; a packed batch brings its layout.
        """
        model = model or self.train_model
        if self.cfg.model == "gpt":
            with self.rt.autocast():
                return model(batch["x"], labels=batch["y"])
        masked, labels = mlm_mask(
            batch["input_ids"], mask_token_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
            special_tokens_mask=batch["special_tokens_mask"], mlm_probability=self.cfg.mlm_probability, seed=seed,
            backend=self.cfg.backend,
        )
        nsp = batch["next_sentence_label"] if self.cfg.objective == "mlm+nsp" else None
        layout = {k: batch[k] for k in ("position_ids", "document_ids", "cls_positions") if k in batch}
        with self.rt.autocast():
            return model(
                masked, token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
                labels=labels, next_sentence_label=nsp, mlm_probability=self.cfg.mlm_probability, **layout,
            )

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation metrics over the fixed validation batches, split across ranks."""
        self.model.eval()
        sums = dict.fromkeys(EVAL_SUMS, torch.zeros((), dtype=torch.float64, device=self.rt.device))
        for i in range(self.rt.rank, len(self.val_batches), self.rt.world_size):
            batch = to_device(self.val_batches[i], self.rt.device)
            # Validation masks come from their own seeds (2**32 is past any step): the same every evaluation.
            out = self.forward(batch, mask_seed(self.cfg.seed, 2**32, i), model=self.model)
            for name, value in self._eval_terms(out, batch).items():
                sums[name] = sums[name] + value
        self.model.train()
        totals = self.rt.all_reduce_sum(torch.stack([sums[name] for name in EVAL_SUMS])).tolist()
        return self._eval_metrics(dict(zip(EVAL_SUMS, totals)))

    def _eval_terms(self, out: ModelOutput, batch: dict[str, torch.Tensor]) -> dict:
        """One batch's share of each of EVAL_SUMS (those of GPT: loss and batches)."""
        terms = {"loss": out.loss.double(), "batches": 1}
        if self.cfg.model == "bert":
            nsp_labels = batch["next_sentence_label"]  # (B,), or (B, S) with IGNORE_INDEX at empty slots
            # Scored on the rows the MLM loss read; a padding row's IGNORE_INDEX target matches no prediction.
            predicted = self.model.mlm_logits(out.masked_hidden).argmax(-1)
            terms.update(
                mlm_loss=out.mlm_loss.double(), nsp_loss=out.nsp_loss.double() if out.nsp_loss is not None else 0.0,
                mlm_hits=(predicted == out.masked_targets).sum(), masked=(out.masked_targets != IGNORE_INDEX).sum(),
                nsp_hits=(out.nsp_logits.argmax(-1) == nsp_labels).sum(), pairs=(nsp_labels != IGNORE_INDEX).sum(),
                random_b=(nsp_labels == 1).sum(),
            )
        return terms

    def _eval_metrics(self, s: dict[str, float]) -> dict:
        metrics = {"val_loss": s["loss"] / s["batches"]}
        if self.cfg.model == "gpt":
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
            return metrics
        random_share = s["random_b"] / max(s["pairs"], 1)
        metrics.update(
            mlm_loss=s["mlm_loss"] / s["batches"], mlm_acc=s["mlm_hits"] / max(s["masked"], 1),
            nsp_acc=s["nsp_hits"] / max(s["pairs"], 1),
            # what always guessing the commoner NSP label scores: the bar nsp_acc must clear
            nsp_majority=max(random_share, 1.0 - random_share),
        )
        if self.cfg.objective == "mlm+nsp":
            metrics["nsp_loss"] = s["nsp_loss"] / s["batches"]
        return {**metrics, **self.padding}


class Run(Scorer):
    """Everything a training run holds: config, data, model, optimizer and progress."""

    def __init__(self, cfg: TrainConfig, rt: runtime.Runtime, log):
        self.cfg, self.rt, self.log = cfg, rt, log
        self.out = Path(cfg.out_dir)
        self.pretrained = None
        if cfg.init_from and not cfg.resume:
            torch.manual_seed(cfg.seed)  # what the checkpoint lacks (BertForMaskedLM's NSP head) starts alike
            self.pretrained, tok, loaded = sample.load_run(
                cfg.init_from, backend=cfg.backend, dropout=cfg.dropout, encoder=True)
            for note in [f"initialised from {cfg.init_from}; the optimizer starts fresh", *loaded.get("notes", [])]:
                log(note)
            # the data is tokenized with the checkpoint's tokenizer, read from the run folder as on resume
            rt.on_main(lambda: ckpt.atomic_write_text(self.out / ckpt.TOKENIZER, tok.to_str()))
        self.data = self._prepare_data()
        self.tok = self.data.tokenizer
        torch.manual_seed(cfg.seed + rt.rank)
        self.model_config = self._model_config()
        fresh = self.pretrained is None
        self.model = (build_model(cfg.model, self.model_config) if fresh else self.pretrained.train()).to(rt.device)
        self.block_size = cfg.block_size or self.model_config.block_size
        self.optimizer = make_optimizer(self.model, cfg, rt.device)
        self.sampler, self.val_batches, self.padding = make_samplers(
            cfg.model, self.data, self.block_size, cfg.batch_size, cfg.eval_iters, cfg.short_seq_prob, cfg.seed,
            rt.rank, rt.world_size, cfg.pack,
        )
        self.iter, self.best_val = 0, float("inf")
        self.tokens = 0  # real (non-padding) tokens of this rank's last step
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # With the NSP loss off, the pooler and NSP head get no gradient.
            self.train_model = DDP(
                self.train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                find_unused_parameters=cfg.model == "bert" and cfg.objective == "mlm",
            )

    def _model_config(self) -> GPTConfig | BertConfig:
        cfg = self.cfg
        if not cfg.init_from:
            return model_config(cfg, self.tok.vocab_size, self.tok.pad_id, self.tok.eot_id)
        if self.pretrained is not None:
            if cfg.model == "gpt":  # documents are this run's choice, not the checkpoint's
                settings = document_settings(cfg, self.tok.eot_id)
                self.pretrained.config = dataclasses.replace(self.pretrained.config, **settings)
            return self.pretrained.config
        # resumed: the architecture is the checkpoint's, as this run saved it
        saved = MODEL_KINDS[cfg.model].config(**ckpt.read_config(self.out)["model"])
        dropout = saved.dropout if cfg.dropout is None else cfg.dropout
        return dataclasses.replace(saved, backend=cfg.backend, dropout=dropout)

    def _prepare_data(self):
        cfg = self.cfg
        # A resumed or initialised run reads its own tokenizer, never a retrained one.
        tokenizer = str(self.out / ckpt.TOKENIZER) if cfg.resume or cfg.init_from else cfg.tokenizer
        kwargs = dict(
            model=cfg.model, data=cfg.data, strip_markup=cfg.strip_markup, tokenizer=tokenizer,
            vocab_size=cfg.vocab_size, split=cfg.split, val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
            text_field=cfg.text_field, tokenizer_sample_mb=cfg.tokenizer_sample_mb,
        )
        data = self.rt.on_main(lambda: prepare_data(**kwargs, log=self.log))  # rank 0 fills the cache,
        return data or prepare_data(**kwargs, log=lambda msg: None)  # the others then read it

    @property
    def tokens_per_step(self) -> int:
        """Positions per optimizer step, all ranks together (BERT: at most; padding is not counted)."""
        return self.cfg.batch_size * self.block_size * self.cfg.gradient_accumulation_steps * self.rt.world_size

    def real_tokens(self, arrays: dict[str, np.ndarray]) -> int:
        """The tokens of a host batch that are not padding (a GPT window has none)."""
        return arrays["x"].size if self.cfg.model == "gpt" else int(arrays["attention_mask"].sum())

    # ---- state
    def state_dict(self) -> dict:
        rng = ckpt.rng_state(self.rt.device)
        return {
            "iter": self.iter, "best_val": self.best_val, "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.iter, self.best_val = state["iter"], state["best_val"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.restore_rng_state(state["rng"], self.rt.device)

    def save(self) -> None:
        if self.rt.is_main:
            ckpt.save_checkpoint(self.out, self.model, self.state_dict())
        self.rt.barrier()

    # ---- steps
    def step(self) -> torch.Tensor:
        """One optimizer step over the accumulated micro-batches; returns the mean loss, on the device."""
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.iter, cfg)
        total = torch.zeros((), device=self.rt.device)
        self.tokens = 0
        for micro, arrays in enumerate(self.sampler.next_step(accum)):
            self.tokens += self.real_tokens(arrays)
            # DDP all-reduces the gradients on the last micro-batch only.
            no_sync = self.rt.distributed and micro < accum - 1
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                seed = mask_seed(cfg.seed, self.iter, micro, self.rt.rank)
                out = self.forward(to_device(arrays, self.rt.device), seed)
                (out.loss / accum).backward()
            total += out.loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        return total / accum

# ----------------------------------------------------------------------------- the command
def resolve_config(argv) -> TrainConfig:
    overrides = parse_overrides(TrainConfig, argv, PROG, __doc__.split("\n\n")[0])
    if overrides.get("init_from") and not overrides.get("resume"):
        # the checkpoint's kind is the model's before any check reads it (bias, pack, doc_mask)
        kind, _ = sample.read_model_config(overrides["init_from"], encoder=True)
        cfg = make_config(TrainConfig, {"model": kind, **overrides})
        return init_from_config(cfg, overrides)
    cfg = make_config(TrainConfig, overrides)
    # The model's fields are checked before any data is read, so a typo costs no
    # tokenization; the tokenizer's vocabulary size and ids replace these stand-ins later.
    model_config(cfg, vocab_size=64, pad_id=0, eot_id=0)
    if not cfg.resume:
        return cfg
    saved = ckpt.read_config(cfg.out_dir)["train"]
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "overwrite"}
    return make_config(TrainConfig, {**{k: v for k, v in saved.items() if k in known}, **overrides})


def init_from_config(cfg: TrainConfig, given: dict) -> TrainConfig:
    """``cfg`` with the model kind of ``--init_from``; a setting that contradicts the checkpoint is an error."""
    kind, arch = sample.read_model_config(cfg.init_from, encoder=True)
    where = f"--init_from={cfg.init_from}"
    if "model" in given and given["model"] != kind:
        raise ConfigError(f"--model={given['model']} contradicts {where}, which holds a {kind} model")
    for name in ("n_layer", "n_head", "n_embd", "bias"):
        value = getattr(cfg, name)
        if value is not None and value != arch.get(name, value):
            raise ConfigError(f"--{name}={value} contradicts {where}, whose model has {name}={arch[name]}")
    if cfg.block_size is not None and cfg.block_size > arch["block_size"]:
        raise ConfigError(f"--block_size={cfg.block_size} exceeds the {arch['block_size']} positions of {where}; "
                          "a smaller one trains on shorter windows")
    for name in ("tokenizer", "vocab_size"):
        if name in given:
            raise ConfigError(f"--{name} does not apply with {where}: the data is tokenized with its tokenizer")
    return dataclasses.replace(cfg, model=kind)


def _start(cfg: TrainConfig, rt: runtime.Runtime, log) -> Run:
    rt.on_main(lambda: ckpt.prepare_run_folder(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite))
    run = Run(cfg, rt, log)
    if cfg.resume:
        run.load_state_dict(ckpt.load_checkpoint(run.out, run.model, rt.device))
        if rt.is_main:
            keep_metrics_until(run.out, run.iter)
            # the resumed settings (a longer max_iters, say) are the run's settings now
            ckpt.write_config(run.out, {**ckpt.read_config(run.out), "train": dataclasses.asdict(cfg)})
        log(f"resuming {run.out} at step {run.iter}")
    elif rt.is_main:
        ckpt.write_config(run.out, {
            "model_type": cfg.model, "train": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(run.model_config), "tokenizer_vocab_size": run.tok.vocab_size,
        })
        ckpt.atomic_write_text(run.out / ckpt.TOKENIZER, run.tok.to_str())
    return run


def _final_sample(run: Run, log) -> None:
    evals = [r for r in read_metrics(run.out) if "val_loss" in r]
    if evals:
        first, last = evals[0], evals[-1]
        log(f"\nvalidation loss {first['val_loss']:.3f} at step {first['iter']} -> "
            f"{last['val_loss']:.3f} at step {last['iter']}")
        if run.cfg.model == "bert":
            log(f"MLM accuracy {last['mlm_acc']:.3f} (chance {1 / run.tok.vocab_size:.5f}); NSP accuracy "
                f"{last['nsp_acc']:.3f} (always guessing the commoner label: {last['nsp_majority']:.3f})")
    sample.show_trained(run.model, run.tok, run.cfg.model, sample_tokens=run.cfg.sample_tokens, seed=run.cfg.seed,
                        dtype=run.rt.dtype, log=log)


# ----------------------------------------------------------------------------- the loop
def flush_window(run: Run, window: TrainWindow, progress: Progress) -> None:
    """Log the mean train loss of the steps since the last log; stop on a non-finite one."""
    if window.steps == 0:
        return
    rt = run.rt
    loss = float(rt.all_reduce_sum(window.loss.clone()).item()) / (window.steps * rt.world_size)
    if not math.isfinite(loss):
        raise TrainingError(
            f"the training loss became {loss} between steps {window.first_step} and {run.iter}; stopping. "
            f"The last checkpoint in {run.out} is kept; try a lower --learning_rate or --grad_clip"
        )
    row = {"iter": run.iter, "train_loss": loss, "lr": learning_rate(run.iter - 1, run.cfg),
           "tokens_per_s": window.tokens * rt.world_size / window.seconds()}
    if rt.is_main:
        append_metrics(run.out, row)
    progress.train_row(row)
    window.reset(run.iter)


def evaluate_and_save(run: Run, progress: Progress, start_iter: int) -> None:
    """Evaluate, log the metrics, and save a checkpoint unless this is the step the run started at."""
    cfg = run.cfg
    metrics = run.evaluate()
    if run.rt.is_main:
        append_metrics(run.out, {"iter": run.iter, **metrics})
    progress.log(f"step {run.iter}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    improved = metrics["val_loss"] < run.best_val
    run.best_val = min(run.best_val, metrics["val_loss"])
    if run.iter > start_iter and (cfg.always_save_checkpoint or improved or run.iter == cfg.max_iters):
        run.save()


def stop_requested(run: Run, stop: StopRequest) -> bool:
    rt = run.rt
    if not rt.distributed:
        return stop.requested
    # Ranks agree on stopping at log steps only, where they meet anyway.
    if run.iter % run.cfg.log_interval != 0:
        return False
    return bool(rt.all_reduce_sum(torch.tensor(float(stop.requested), device=rt.device)).item() > 0)


def train(cfg: TrainConfig, rt: runtime.Runtime) -> Run:
    """Train to ``cfg.max_iters`` (or a stop request); raises TrainingError on a non-finite loss."""
    log = print if rt.is_main else (lambda *a, **k: None)
    run = _start(cfg, rt, log)
    log(
        f"{cfg.model.upper()} {run.model.num_params() / 1e6:.2f}M parameters, vocab {run.tok.vocab_size}, "
        f"block {run.block_size}, {run.tokens_per_step:,} tokens per step, "
        f"{rt.device} {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)"
    )
    progress = Progress(cfg.max_iters, run.iter, cfg.progress and rt.is_main, log)
    start_iter = run.iter
    window = TrainWindow(rt.device, start_iter)
    with StopRequest() as stop, contextlib.closing(progress):
        while True:
            # A resumed run was evaluated at its first step before it stopped.
            at_eval = run.iter % cfg.eval_interval == 0 or run.iter == cfg.max_iters
            if at_eval and not (cfg.resume and run.iter == start_iter):
                flush_window(run, window, progress)
                evaluate_and_save(run, progress, start_iter)
                window.restart_clock()
            if run.iter >= cfg.max_iters:
                break
            window.add(run.step(), run.tokens)
            progress.step()
            if run.iter % cfg.log_interval == 0:
                flush_window(run, window, progress)
            if stop_requested(run, stop):
                flush_window(run, window, progress)
                run.save()
                raise Interrupted(run.iter)
    if rt.is_main:
        plot_losses(run.out)
    return run


def fail(message: str, code: int) -> int:
    print(f"minipt.train: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = resolve_config(argv)
        rt = runtime.setup(cfg.device, cfg.dtype)
    except (ConfigError, ckpt.CheckpointError) as exc:
        return fail(f"{exc}\n(see {PROG} --help)" if isinstance(exc, ConfigError) else str(exc), EXIT_USAGE)
    except ValueError as exc:  # a device or dtype this machine cannot give
        return fail(str(exc), EXIT_USAGE)
    try:
        run = train(cfg, rt)
        if rt.is_main:
            _final_sample(run, print)
            print(f"done: run saved in {run.out} (metrics.jsonl, loss.png); sample with: "
                  f"python -m minipt.sample --out_dir {run.out}")
        return 0
    except (ConfigError, DataError, TokenizerError, ckpt.CheckpointError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except TrainingError as exc:
        return fail(str(exc), EXIT_FAILED)
    except Interrupted as exc:
        if rt.is_main:
            print(f"\ninterrupted: saved step {exc.args[0]} in {cfg.out_dir}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if rt.is_main:
            print(f"\ninterrupted: nothing saved since the last checkpoint in {cfg.out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        runtime.shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
