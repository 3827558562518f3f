"""The parts of a training loop that pretraining and fine-tuning share.

* :class:`Schedule`: linear warm-up, then cosine decay to a floor (nanoGPT's).
* :func:`make_optimizer`: AdamW, weight decay on matrices and embeddings only;
  or Muon for the blocks' matrices and AdamW for the rest, as one :class:`Optimizers`.
* :func:`wrap_ddp`: the model as DistributedDataParallel under ``torchrun``.
* :func:`flush_window`: the train-loss row logged every ``log_interval`` steps,
  the one place the host reads the loss, and where a non-finite one stops the run.
* :func:`save_on_main`: rank 0 writes a checkpoint while the others wait.
* :func:`stop_requested`: Ctrl-C or SIGTERM, agreed on by every rank.
* :func:`resumed_config`: a ``--resume`` command line over the settings a run saved;
  :func:`saved_settings`: those settings as a run saves them, every path absolute.
* :func:`resumed_accumulation` and :func:`world_size_note`: a run resumed on another number
  of processes keeps its tokens per step, and says so.
* :func:`holding_run_folder`: the run folder locked for the run's life, and a
  run that ``--overwrite`` set aside put back if the new one fails before its
  first checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt import checkpoint as ckpt
from minipt.config import SCRATCH, ConfigError, TrainConfig, make_config
from minipt.errors import TrainingError
from minipt.models.bert import BertLayer
from minipt.models.gpt import GPTBlock
from minipt.runlog import MetricsLog, Progress, StopRequest, TrainWindow
from minipt.runtime import Runtime
from minipt.tokenizer import KINDS


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to ``learning_rate``, cosine decay to ``min_lr`` at ``decay_iters``, then flat (nanoGPT)."""

    learning_rate: float
    warmup_iters: int
    decay_iters: int
    min_lr: float
    decay: bool = True  # false: learning_rate throughout

    def lr(self, it: int) -> float:
        if not self.decay:
            return self.learning_rate
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(self.decay_iters - self.warmup_iters, 1)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)


class Optimizers:
    """Torch optimizers over disjoint parameters, scheduled, stepped and saved as one.

    Each is named (its key in the state) and has a learning-rate scale: its learning rate is the
    schedule's times the scale. AdamW's is 1, so its learning rate is the schedule's own, bit for bit;
    Muon's is muon_learning_rate / learning_rate, so both follow one warm-up and decay to their own peaks.
    """

    def __init__(self, parts: dict[str, tuple[torch.optim.Optimizer, float]]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer, _ in self.parts.values() for group in optimizer.param_groups]

    def set_lr(self, lr: float) -> None:
        for optimizer, scale in self.parts.values():
            for group in optimizer.param_groups:
                group["lr"] = lr * scale

    def step(self) -> None:
        for optimizer, _ in self.parts.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer, _ in self.parts.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, (optimizer, _) in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" in state:  # saved before there was a choice of optimizer: AdamW's own state
            state = {"adamw": state}
        if set(state) != set(self.parts):
            raise ckpt.CheckpointError(f"the saved optimizer state is of {' + '.join(state)}, "
                                       f"but this run trains with {' + '.join(self.parts)}")
        for name, (optimizer, _) in self.parts.items():
            optimizer.load_state_dict(state[name])


# Muon's step is an orthogonalised matrix, whose entries have an RMS of 1/sqrt(max(rows, columns)); torch
# scales it by one of two rules. "original" (Keller Jordan's, modded-nanogpt's at lr 0.05) multiplies by
# sqrt(max(1, rows / columns)): an RMS of lr / sqrt(fan_in), here (n_embd=128) lr / 11 for the q/k/v,
# output and up-projection matrices and lr / 23 for the down-projection. "match_rms_adamw" (Moonshot's)
# multiplies by 0.2 sqrt(max(rows, columns)): an RMS of 0.2 lr, a typical AdamW step's, for every shape
# and width. We take the second: its learning rate reads on AdamW's scale (a fine-tune can start from
# AdamW's own), and torch's decoupled decay (lr x weight_decay a step) then stands to the step as AdamW's
# does, so one weight_decay serves both. Validation loss of the default GPT after 100 steps (one seed):
# match_rms_adamw at 0.005 / 0.01 / 0.02 / 0.04: 5.67 / 5.67 / 5.70 / 5.75; "original" at 0.025 / 0.05
# (match_rms_adamw's 0.011 / 0.022 on three matrices of four, half that on the down-projection): 5.69 /
# 5.73; AdamW alone at 1e-3 (the default) / 2e-3 / 4e-3 / 8e-3: 5.86 / 5.80 / 5.76 / 5.80. Hence 0.01:
# modded-nanogpt's rate, halved at this width.
MUON_ADJUST_LR = "match_rms_adamw"


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights of the transformer blocks (attention and MLP), which Muon takes under ``--optimizer=muon``.

    Embeddings, the tied LM head, the pooler and the classification and NSP heads are matrices too, but
    not hidden layers: Muon's orthogonalised step suits a map between hidden states, not a lookup table
    or a readout, so they stay with AdamW, as norms and biases do."""
    blocks = [m for m in model.modules() if isinstance(m, (GPTBlock, BertLayer))]
    return [p for block in blocks for p in block.parameters() if p.dim() == 2 and p.requires_grad]


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device, optimizer: str = "adamw",
                   muon_learning_rate: float = TrainConfig.muon_learning_rate,
                   muon_momentum: float = TrainConfig.muon_momentum) -> Optimizers:
    """AdamW with weight decay on matrices and embeddings, none on biases and LayerNorm (nanoGPT).

    ``optimizer="muon"``: Muon (Nesterov momentum ``muon_momentum``, the same decoupled weight decay) for
    :func:`muon_parameters`, at ``muon_learning_rate``; AdamW as above for every other parameter."""
    muon = muon_parameters(model) if optimizer == "muon" else []
    taken = {id(p) for p in muon}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused AdamW runs on CPU and CUDA tensors since torch 2.4, one kernel for all parameters.
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type in ("cpu", "cuda"))
    parts = {"adamw": (adamw, 1.0)}
    if optimizer == "muon":
        parts["muon"] = (torch.optim.Muon(muon, lr=muon_learning_rate, weight_decay=weight_decay,
                                          momentum=muon_momentum, adjust_lr_fn=MUON_ADJUST_LR),
                         muon_learning_rate / learning_rate)
    return Optimizers(parts)


def wrap_ddp(model: torch.nn.Module, rt: Runtime, *, find_unused_parameters: bool) -> torch.nn.Module:
    """``model`` as DistributedDataParallel when the run has several ranks, else as it is."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def flush_window(window: TrainWindow, rt: Runtime, progress: Progress, *, step: int, lr: float,
                 metrics: MetricsLog) -> None:
    """Log the mean train loss (and z term) of the steps since the last log; stop on a non-finite one."""
    if window.steps == 0:
        return
    sums = torch.stack([window.loss] + ([] if window.z_loss is None else [window.z_loss]))  # a copy: reduced in place
    means = [value / (window.steps * rt.world_size) for value in rt.all_reduce_sum(sums).tolist()]  # one sync
    if not all(math.isfinite(value) for value in means):
        out = metrics.out
        kept = f"The last checkpoint in {out} is kept" if ckpt.has_run(out) else "No checkpoint was saved"
        raise TrainingError(
            f"the training loss became {sum(means)} between steps {window.first_step} and {step}; stopping. "
            f"{kept}; try a lower --learning_rate or --grad_clip"
        )
    row = {"iter": step, "train_loss": means[0], **({"train_z_loss": means[1]} if len(means) > 1 else {}),
           "lr": lr, "tokens_per_s": window.tokens * rt.world_size / window.seconds()}
    if rt.is_main:
        metrics.append(row)
    progress.train_row(row)
    window.reset(step)


def save_on_main(rt: Runtime, out: Path, model: torch.nn.Module, state: dict) -> None:
    """Rank 0 writes the checkpoint (``state`` was gathered on every rank); every rank waits for it."""
    if rt.is_main:
        ckpt.save_checkpoint(out, model, state)
    rt.barrier()


def stop_requested(stop: StopRequest, rt: Runtime, *, step: int, log_interval: int) -> bool:
    if not rt.distributed:
        return stop.requested
    # Ranks agree on stopping at log steps only, where they meet anyway.
    if step % log_interval != 0:
        return False
    return bool(rt.all_reduce_sum(torch.tensor(float(stop.requested), device=rt.device)).item() > 0)


# The settings that name files or folders: a run saves them absolute, so that --resume finds them from any folder.
PATH_SETTINGS = ("out_dir", "data", "val_data", "test_data", "init_from", "arch_from", "tokenizer", "cache_dir")
INPUTS = ("data", "val_data", "test_data")  # read again by a resumed run, so each must be found


def _is_path(name: str, value) -> bool:
    return bool(value) and not (name == "tokenizer" and value in ("auto", *KINDS)) and not (
        name == "init_from" and value == SCRATCH)


def saved_settings(cfg) -> dict:
    """``cfg`` as a run saves it in its config.json: every path setting absolute (a glob stays a glob)."""
    settings = dataclasses.asdict(cfg)
    for name in PATH_SETTINGS:
        if _is_path(name, settings.get(name)):
            settings[name] = os.path.abspath(os.path.expanduser(settings[name]))
    return settings


def _found(path: Path) -> bool:
    return bool(glob.glob(str(path), recursive=True)) if glob.has_magic(str(path)) else path.exists()


def absolute_saved_paths(settings: dict, saved_out_dir: str, out_dir: str) -> dict:
    """``settings`` of the run in ``out_dir`` with their relative paths made absolute (a run saved before
    paths were saved absolute): relative to the folder the run started in, which its saved ``out_dir``
    tells where that was relative (``run`` saved, ``/home/me/run`` resumed: ``/home/me``), else to the
    current folder. An input found in neither is a ConfigError naming it."""
    rel, here = Path(saved_out_dir or ""), Path(os.path.abspath(out_dir))
    n, started = len(rel.parts), []
    if n and not rel.is_absolute() and ".." not in rel.parts and here.parts[-n:] == rel.parts:
        started = [Path(*here.parts[:-n])]
    bases = list(dict.fromkeys([*started, Path.cwd()]))
    settings = dict(settings)
    for name in PATH_SETTINGS:
        value = settings.get(name)
        if not _is_path(name, value) or Path(value).expanduser().is_absolute():
            continue
        found = [base / value for base in bases if _found(base / value)]
        if not found and name in INPUTS:
            where = " nor ".join(f"{base}" + (" (where the run started, going by its out_dir)" if base in started
                                              else " (the current folder)") for base in bases)
            raise ConfigError(f"--resume: the run in {out_dir} saved {name}={value!r}, a path relative to the folder "
                              f"it was started from, found neither in {where}; resume from that folder, or give "
                              f"--{name}=ABSOLUTE_PATH")
        settings[name] = str(found[0] if found else bases[0] / value)
    return settings


def resumed_config(cls, overrides: dict):
    """The config of ``--resume``: the settings the run in ``out_dir`` saved, under those given now."""
    out_dir = make_config(cls, overrides).out_dir  # as given, or the default (train's: by --model)
    # a run saved before there was a choice of optimizer trained with AdamW, whatever the default is now
    saved = {"optimizer": "adamw", **ckpt.read_config(out_dir)["train"]}
    if overrides.get("optimizer", saved["optimizer"]) != saved["optimizer"]:
        raise ConfigError(f"--optimizer={overrides['optimizer']} cannot resume the run in {out_dir}, which trains "
                          f"with {saved['optimizer']}: its saved optimizer state would not fit. Start a new run "
                          f"from its weights with --init_from={out_dir}")
    known = {f.name for f in dataclasses.fields(cls)} - {"resume", "overwrite"} - set(overrides)
    kept = absolute_saved_paths({k: v for k, v in saved.items() if k in known}, saved.get("out_dir"), out_dir)
    # the folder the run was read from is the one it goes on in, whatever out_dir it saved
    return make_config(cls, {**kept, **overrides, "out_dir": out_dir})


def saved_world_size(out_dir: str | Path) -> int:
    """The number of processes the run in ``out_dir`` last trained on: in its config.json, or for a run saved
    before that was recorded, the number of per-rank generator states its checkpoint holds."""
    config = ckpt.read_config(out_dir)
    if "world_size" in config:
        return config["world_size"]
    rng = ckpt.load_state(out_dir)["rng"]
    return len(rng) if isinstance(rng, list) else 1


def resumed_accumulation(accumulation: int, saved_world_size: int, world_size: int) -> int:
    """The gradient_accumulation_steps that keeps a resumed run's micro-batches per step, ``accumulation`` on
    ``saved_world_size`` processes, on ``world_size`` instead; ``accumulation`` where no whole number does.

    The samplers draw each step's whole global batch and deal it to the ranks, so the same micro-batches
    per step read the same data: the run goes on as it would have on its old number of processes."""
    micro_batches = accumulation * saved_world_size
    return micro_batches // world_size if micro_batches % world_size == 0 else accumulation


def world_size_note(saved: dict, saved_world_size: int, cfg: TrainConfig, world_size: int, block_size: int
                    ) -> str | None:
    """The line a run resumed on another number of processes prints: both counts and the tokens per step;
    ``saved`` is the run's saved training settings, ``cfg`` those it resumes with."""
    if saved_world_size == world_size:
        return None
    before = saved["batch_size"] * saved["gradient_accumulation_steps"] * saved_world_size * block_size
    after = cfg.batch_size * cfg.gradient_accumulation_steps * world_size * block_size
    was, now = saved["gradient_accumulation_steps"], cfg.gradient_accumulation_steps
    change = f"gradient_accumulation_steps {was} -> {now}" if now != was else f"gradient_accumulation_steps {now}"
    head = f"resuming on {world_size} process(es) instead of {saved_world_size}: {change}"
    if after == before:
        return f"{head} keeps {before:,} tokens per step"
    why = ""
    if now == was and (was * saved_world_size) % world_size:
        why = (f" ({was} x {saved_world_size} micro-batches per step do not divide among {world_size} processes; "
               "set --gradient_accumulation_steps or --batch_size to choose)")
    return f"{head} makes {after:,} tokens per step instead of {before:,}{why}"


@contextlib.contextmanager
def holding_run_folder(out_dir: str | Path, rt: Runtime):
    """Hold ``out_dir`` (rank 0 locks it) while the block runs; undo an unfinished ``--overwrite`` if it fails."""
    out = Path(out_dir)
    created = not out.exists()
    lock = rt.on_main(lambda: ckpt.lock_run_folder(out))
    try:
        yield
    except BaseException:
        if rt.is_main and ckpt.undo_replacement(out):
            print(f"note: the run already in {out} is kept: the new one failed before its first checkpoint",
                  file=sys.stderr)
        if rt.is_main and created and [p.name for p in out.iterdir()] == [ckpt.LOCK]:
            shutil.rmtree(out)  # a run that failed before writing anything leaves no folder behind
        raise
    finally:
        if lock is not None:
            lock.close()
