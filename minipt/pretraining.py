"""Pretraining: GPT (causal LM) or BERT (MLM + NSP), from a config to a saved run.

Read it top to bottom with :mod:`minipt.loop` beside it; ``python -m
minipt.train`` is the command around :func:`resolve_config` and :func:`train`.

The loop is nanoGPT's: AdamW (fused where torch has it) with weight decay on
2-D parameters only, linear warm-up then cosine decay to ``min_lr``, gradient
clipping and accumulation, bf16 autocast on a GPU; ``--optimizer=muon`` gives
the blocks' weight matrices to Muon, on the same schedule scaled to
``muon_learning_rate`` (:func:`minipt.loop.make_optimizer`). It avoids host
syncs: the loss stays on the device and is read only every ``log_interval``
steps, which is also when a non-finite loss is caught (before any checkpoint is
written, so the last checkpoint on disk is always a good one). Ctrl-C or
SIGTERM finishes the current step, saves and raises
:class:`minipt.errors.Interrupted`; ``--resume`` continues exactly where the
run stopped, data order and MLM masks included. Under ``torchrun`` each rank
reads its own slice of every global batch, and only rank 0 writes.

``--init_from=PATH`` continues pretraining from a minipt run (a fine-tune run
gives its BERT encoder) or a Hugging Face GPT-2/BERT folder (read by
:func:`minipt.load.load_run`): its architecture, weights and tokenizer, which
tokenizes the data; the optimizer starts fresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from minipt import checkpoint as ckpt
from minipt import runtime
from minipt.config import ConfigError, TrainConfig, make_config
from minipt.data import make_samplers, prepare_data, to_device
from minipt.data.packing import check_pair_room
from minipt.errors import Interrupted
from minipt.inference import show_trained
from minipt.load import load_run, read_model_config
from minipt.loop import (
    Schedule, flush_window, holding_run_folder, make_optimizer, resumed_accumulation, resumed_config, save_on_main,
    saved_settings, saved_world_size, stop_requested, world_size_note, wrap_ddp,
)
from minipt.models import MODEL_KINDS, BertConfig, GPTConfig, build_model
from minipt.ops import resolve_backends
from minipt.runlog import MetricsLog, Progress, StopRequest, TrainWindow, plot_losses, read_metrics, require_tensorboard
from minipt.scoring import Scorer, mask_seed

# The CPU-sized model when no --preset is given: trains in minutes on two cores.
DEFAULT_SIZES = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)


# ----------------------------------------------------------------------------- settings
def document_settings(cfg: TrainConfig, eot_id: int | None) -> dict:
    """GPTConfig's document fields for ``--doc_mask``/``--reset_positions``, given the tokenizer's <|endoftext|> id."""
    if cfg.doc_mask and eot_id is None:
        raise ConfigError("doc_mask needs <|endoftext|> in the tokenizer, the token that opens each document; "
                          "token files come without one: pass their --tokenizer")
    return {"doc_sep_id": eot_id if cfg.doc_mask else None, "reset_positions": cfg.reset_positions}


def model_config(cfg: TrainConfig, vocab_size: int, pad_id: int, eot_id: int | None = None) -> GPTConfig | BertConfig:
    """The model config of a new run: preset (or the CPU-sized default), then the fields given explicitly.

    ``vocab_size``, ``pad_id`` (BERT's) and ``eot_id`` (GPT's document separator) come from the tokenizer."""
    cls = MODEL_KINDS[cfg.model].config
    shape = {"n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "attn_window", "global_every",
             "logit_softcap"}
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


def schedule(cfg: TrainConfig) -> Schedule:
    return Schedule(
        learning_rate=cfg.learning_rate, warmup_iters=cfg.warmup_iters, decay=cfg.decay_lr,
        decay_iters=cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters,
        min_lr=cfg.learning_rate / 10 if cfg.min_lr is None else cfg.min_lr,
    )


def resolve_config(overrides: dict, world_size: int | None = None) -> TrainConfig:
    """The run's config from the settings given: checked before any data is read, so a typo costs no tokenization.

    With ``--resume``, over the settings the run saved, and on ``world_size`` processes (default: as launched)
    where the run trained on another number, with the gradient_accumulation_steps that keeps its tokens per
    step unless one is given; with ``--init_from``, of the checkpoint's model kind."""
    if overrides.get("init_from") and not overrides.get("resume"):
        # the checkpoint's kind is the model's before any check reads it (bias, pack, doc_mask)
        kind, _ = read_model_config(overrides["init_from"], encoder=True)
        cfg = make_config(TrainConfig, {"model": kind, **overrides})
        return init_from_config(cfg, overrides)
    cfg = make_config(TrainConfig, overrides)
    # The tokenizer's vocabulary size and ids replace these stand-ins later.
    model_config(cfg, vocab_size=64, pad_id=0, eot_id=0)
    if not cfg.resume:
        return cfg
    cfg = resumed_config(TrainConfig, overrides)
    ckpt.check_resumable(cfg.out_dir)  # before anything reads the checkpoint
    check_resumed_architecture(cfg, overrides)
    if "gradient_accumulation_steps" in overrides:
        return cfg
    world_size = runtime.launched_world_size() if world_size is None else world_size
    accumulation = resumed_accumulation(cfg.gradient_accumulation_steps, saved_world_size(cfg.out_dir), world_size)
    return dataclasses.replace(cfg, gradient_accumulation_steps=accumulation)


# The settings that shape a model's weights (or, for the cap, its outputs): a resumed run keeps its saved ones.
# (block_size is the windows' length, which may be shorter than the model's positions: only those bound it)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "bias", "attn_window", "global_every", "logit_softcap")


def check_resumed_architecture(cfg: TrainConfig, given: dict) -> None:
    """A setting given with --resume that contradicts the saved model is an error, never silently dropped."""
    saved = ckpt.read_config(cfg.out_dir)
    arch = {"attn_window": None, "global_every": None, "logit_softcap": None, **saved["model"]}  # older runs
    if given.get("model") not in (None, saved["model_type"]):
        raise ConfigError(f"--model={given['model']} cannot resume the run in {cfg.out_dir}, a {saved['model_type']} run")
    for name in ARCHITECTURE:
        value = given.get(name)
        if value is not None and name in arch and value != arch[name]:
            raise ConfigError(f"--{name}={value} cannot resume the run in {cfg.out_dir}, whose model has "
                              f"{name}={arch[name]}; start a new run from its weights with --init_from={cfg.out_dir}")
    if given.get("block_size") is not None and given["block_size"] > arch["block_size"]:
        raise ConfigError(f"--block_size={given['block_size']} exceeds the {arch['block_size']} positions of the "
                          f"model in {cfg.out_dir}")


def init_from_config(cfg: TrainConfig, given: dict) -> TrainConfig:
    """``cfg`` with the model kind of ``--init_from``; a setting that contradicts the checkpoint is an error."""
    kind, arch = read_model_config(cfg.init_from, encoder=True)
    where = f"--init_from={cfg.init_from}"
    if "model" in given and given["model"] != kind:
        raise ConfigError(f"--model={given['model']} contradicts {where}, which holds a {kind} model")
    # a config saved before windows and caps has none
    arch = {"attn_window": None, "global_every": None, "logit_softcap": None, **arch}
    for name in ("n_layer", "n_head", "n_embd", "bias", "attn_window", "global_every", "logit_softcap"):
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


# ----------------------------------------------------------------------------- one run
class Run:
    """Everything a training run holds: config, data, model, optimizer, scorer and progress."""

    def __init__(self, cfg: TrainConfig, rt: runtime.Runtime, log):
        self.cfg, self.rt, self.log = cfg, rt, log
        self.out = Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out, tensorboard=cfg.tensorboard and rt.is_main)
        self.schedule = schedule(cfg)
        pretrained = None
        if cfg.init_from and not cfg.resume:
            torch.manual_seed(cfg.seed)  # what the checkpoint lacks (BertForMaskedLM's NSP head) starts alike
            pretrained, tok, loaded = load_run(cfg.init_from, backend=cfg.backend, dropout=cfg.dropout, encoder=True)
            for note in [f"initialised from {cfg.init_from}; the optimizer starts fresh", *loaded.get("notes", [])]:
                log(note)
            # the data is tokenized with the checkpoint's tokenizer, read from the run folder as on resume
            rt.on_main(lambda: ckpt.atomic_write_text(self.out / ckpt.TOKENIZER, tok.to_str()))
        self.data = self._prepare_data()
        self.tok = self.data.tokenizer
        torch.manual_seed(cfg.seed + rt.rank)
        self.model_config = self._architecture(pretrained)
        fresh = pretrained is None
        self.model = (build_model(cfg.model, self.model_config) if fresh else pretrained.train()).to(rt.device)
        self.block_size = cfg.block_size or self.model_config.block_size
        self.optimizer = make_optimizer(
            self.model, learning_rate=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
            device=rt.device, optimizer=cfg.optimizer, muon_learning_rate=cfg.muon_learning_rate,
            muon_momentum=cfg.muon_momentum,
        )
        self.sampler, val_batches, padding = make_samplers(
            cfg.model, self.data, self.block_size, cfg.batch_size, cfg.eval_iters, cfg.short_seq_prob, cfg.seed,
            rt.rank, rt.world_size, cfg.pack,
        )
        self.iter, self.best_val = 0, float("inf")
        self.tokens = 0  # real (non-padding) tokens of this rank's last step
        # With the NSP loss off, the pooler and NSP head get no gradient.
        self.train_model = wrap_ddp(torch.compile(self.model) if cfg.compile else self.model, rt,
                                    find_unused_parameters=cfg.model == "bert" and cfg.objective == "mlm")
        self.scorer = Scorer(
            cfg.model, self.model, self.tok, rt, backend=cfg.backend, mlm_probability=cfg.mlm_probability,
            objective=cfg.objective, seed=cfg.seed, val_batches=val_batches, padding=padding,
            train_model=self.train_model,
        )

    def _architecture(self, pretrained) -> GPTConfig | BertConfig:
        """A resumed run's saved model config, a pretrained start's, or a new one from the settings."""
        cfg = self.cfg
        if cfg.resume:  # the architecture is the checkpoint's, as this run saved it, never a preset's
            saved = MODEL_KINDS[cfg.model].config(**ckpt.read_config(self.out)["model"])
            dropout = saved.dropout if cfg.dropout is None else cfg.dropout
            return dataclasses.replace(saved, backend=cfg.backend, dropout=dropout)
        if pretrained is not None:
            if cfg.model == "gpt":  # documents are this run's choice, not the checkpoint's
                pretrained.config = dataclasses.replace(pretrained.config, **document_settings(cfg, self.tok.eot_id))
            return pretrained.config
        return model_config(cfg, self.tok.vocab_size, self.tok.pad_id, self.tok.eot_id)

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
        """The training state; ``rng`` holds every rank's generators, so each is gathered on rank 0 first."""
        return {
            "iter": self.iter, "best_val": self.best_val, "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": self.rt.gather_on_main(ckpt.rng_state(self.rt.device)),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iter, self.best_val = state["iter"], state["best_val"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.restore_rng_state(state["rng"], self.rt.device, self.rt.rank)

    def save(self) -> None:
        save_on_main(self.rt, self.out, self.model, self.state_dict())  # state_dict on every rank: it gathers

    # ---- steps
    def step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over the accumulated micro-batches; returns the mean cross-entropy and, with
        ``z_loss``, the mean z term (the loss it trained on is their sum), on the device."""
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        self.optimizer.set_lr(self.schedule.lr(self.iter))
        total = torch.zeros((), device=self.rt.device)
        z_total = torch.zeros((), device=self.rt.device) if cfg.z_loss > 0 else None
        self.tokens = 0
        for micro, arrays in enumerate(self.sampler.next_step(accum)):
            self.tokens += self.real_tokens(arrays)
            # DDP all-reduces the gradients on the last micro-batch only.
            no_sync = self.rt.distributed and micro < accum - 1
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                seed = mask_seed(cfg.seed, self.iter, micro, self.rt.rank)
                out = self.scorer.forward(to_device(arrays, self.rt.device), seed, z_loss=cfg.z_loss)
                (out.loss / accum).backward()
            total += out.loss.detach()
            if z_total is not None:
                z_total += out.z_loss
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        if z_total is None:
            return total / accum, None
        return (total - z_total) / accum, z_total / accum

    def evaluate_and_save(self, progress: Progress, start_iter: int) -> None:
        """Evaluate, log the metrics, and save a checkpoint unless this is the step the run started at."""
        metrics = self.scorer.evaluate()
        if self.rt.is_main:
            self.metrics.append({"iter": self.iter, **metrics})
        progress.log(f"step {self.iter}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        improved = metrics["val_loss"] < self.best_val
        self.best_val = min(self.best_val, metrics["val_loss"])
        if self.iter > start_iter and (self.cfg.always_save_checkpoint or improved or self.iter == self.cfg.max_iters):
            self.save()

    def flush(self, window: TrainWindow, progress: Progress) -> None:
        flush_window(window, self.rt, progress, step=self.iter, lr=self.schedule.lr(self.iter - 1),
                     metrics=self.metrics)


def start(cfg: TrainConfig, rt: runtime.Runtime, log) -> Run:
    """The run folder made ready, and the run built in it: resumed from its checkpoint, or new and saved.

    Every op's backend is resolved first, so that one which cannot serve the run is refused before any work."""
    backends = resolve_backends(cfg.backend, rt.device)
    log("backends: " + ", ".join(f"{op} {backend}" for op, backend in backends.items()))
    rt.on_main(lambda: ckpt.prepare_run_folder(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite))
    run = Run(cfg, rt, log)
    if cfg.resume:
        saved, saved_world = ckpt.read_config(run.out), saved_world_size(run.out)
        run.load_state_dict(ckpt.load_checkpoint(run.out, run.model, rt.device))
        if rt.is_main:
            run.metrics.keep_until(run.iter)
            # the resumed settings (a longer max_iters, say) are the run's settings now
            ckpt.write_config(run.out, {**saved, "train": saved_settings(cfg), "backends": backends,
                                        "world_size": rt.world_size})
        log(f"resuming {run.out} at step {run.iter}")
        note = world_size_note(saved["train"], saved_world, cfg, rt.world_size, run.block_size)
        if note:
            log(note)
    elif rt.is_main:
        ckpt.write_config(run.out, {
            "model_type": cfg.model, "train": saved_settings(cfg),
            "model": dataclasses.asdict(run.model_config), "tokenizer_vocab_size": run.tok.vocab_size,
            "backends": backends, "world_size": rt.world_size,
        })
        ckpt.atomic_write_text(run.out / ckpt.TOKENIZER, run.tok.to_str())
    return run


def train(cfg: TrainConfig, rt: runtime.Runtime, log=print) -> Run:
    """Train to ``cfg.max_iters``; raises TrainingError on a non-finite loss, Interrupted on a stop request.

    The run folder is locked for the run's life, so that a second process cannot mix its files in; a run
    that ``--overwrite`` set out to replace comes back if this one fails before its first checkpoint."""
    if cfg.tensorboard:
        require_tensorboard()
    with holding_run_folder(cfg.out_dir, rt):
        return _train(cfg, rt, log)


def _train(cfg: TrainConfig, rt: runtime.Runtime, log) -> Run:
    run = start(cfg, rt, log)
    log(
        f"{cfg.model.upper()} {run.model.num_params() / 1e6:.2f}M parameters, vocab {run.tok.vocab_size}, "
        f"block {run.block_size}, {run.tokens_per_step:,} tokens per step, "
        f"{rt.device} {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)"
    )
    progress = Progress(cfg.max_iters, run.iter, cfg.progress and rt.is_main, log)
    start_iter = run.iter
    window = TrainWindow(rt.device, start_iter)
    with StopRequest() as stop, contextlib.closing(progress), contextlib.closing(run.metrics):
        while True:
            # A resumed run was evaluated at its first step before it stopped.
            at_eval = run.iter % cfg.eval_interval == 0 or run.iter == cfg.max_iters
            if at_eval and not (cfg.resume and run.iter == start_iter):
                run.flush(window, progress)
                run.evaluate_and_save(progress, start_iter)
                window.restart_clock()
            if run.iter >= cfg.max_iters:
                break
            loss, z_loss = run.step()
            window.add(loss, run.tokens, z_loss)
            progress.step()
            if run.iter % cfg.log_interval == 0:
                run.flush(window, progress)
            if stop_requested(stop, rt, step=run.iter, log_interval=cfg.log_interval):
                run.flush(window, progress)
                run.save()
                raise Interrupted(run.iter)
    if rt.is_main:
        plot_losses(run.out)
    return run


def final_report(run: Run, log) -> None:
    """What a finished run prints: the validation loss it went from and to, then a sample (GPT) or a fill-mask."""
    evals = [r for r in read_metrics(run.out) if "val_loss" in r]
    if evals:
        first, last = evals[0], evals[-1]
        log(f"\nvalidation loss {first['val_loss']:.3f} at step {first['iter']} -> "
            f"{last['val_loss']:.3f} at step {last['iter']}")
        if run.cfg.model == "bert":
            log(f"MLM accuracy {last['mlm_acc']:.3f} (chance {1 / run.tok.vocab_size:.5f}); NSP accuracy "
                f"{last['nsp_acc']:.3f} (always guessing the commoner label: {last['nsp_majority']:.3f})")
    # BERT fills a [MASK] in a sentence of the run's own validation text, whatever the corpus
    segments = () if run.cfg.model != "bert" else (
        s for shard in run.data.val.shards for document in shard.documents() for s in document)
    show_trained(run.model, run.tok, run.cfg.model, sample_tokens=run.cfg.sample_tokens, seed=run.cfg.seed,
                 dtype=run.rt.dtype, log=log, segments=segments)
