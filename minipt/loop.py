"""The parts of a training loop that pretraining and fine-tuning share.

* :class:`Schedule`: linear warm-up, then cosine decay to a floor (nanoGPT's).
* :func:`make_optimizer`: AdamW, weight decay on matrices and embeddings only,
  as an :class:`Optimizers`.
* :func:`wrap_ddp`: the model as DistributedDataParallel under ``torchrun``.
* :func:`flush_window`: the train-loss row logged every ``log_interval`` steps,
  the one place the host reads the loss, and where a non-finite one stops the run.
* :func:`stop_requested`: Ctrl-C or SIGTERM, agreed on by every rank.
* :func:`resumed_config`: a ``--resume`` command line over the settings a run saved.
* :func:`holding_run_folder`: the run folder locked for the run's life, and a
  run that ``--overwrite`` set aside put back if the new one fails before its
  first checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minipt import checkpoint as ckpt
from minipt.config import make_config
from minipt.errors import TrainingError
from minipt.runlog import Progress, StopRequest, TrainWindow, append_metrics
from minipt.runtime import Runtime


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
    schedule's times the scale. AdamW's is 1, so its learning rate is the schedule's own, bit for bit.
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


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device) -> Optimizers:
    """AdamW with weight decay on matrices and embeddings, none on biases and LayerNorm (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused AdamW runs on CPU and CUDA tensors since torch 2.4, one kernel for all parameters.
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type in ("cpu", "cuda"))
    return Optimizers({"adamw": (adamw, 1.0)})


def wrap_ddp(model: torch.nn.Module, rt: Runtime, *, find_unused_parameters: bool) -> torch.nn.Module:
    """``model`` as DistributedDataParallel when the run has several ranks, else as it is."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def flush_window(window: TrainWindow, rt: Runtime, progress: Progress, *, step: int, lr: float, out: Path) -> None:
    """Log the mean train loss of the steps since the last log; stop on a non-finite one."""
    if window.steps == 0:
        return
    loss = float(rt.all_reduce_sum(window.loss.clone()).item()) / (window.steps * rt.world_size)
    if not math.isfinite(loss):
        kept = f"The last checkpoint in {out} is kept" if ckpt.has_run(out) else "No checkpoint was saved"
        raise TrainingError(
            f"the training loss became {loss} between steps {window.first_step} and {step}; stopping. "
            f"{kept}; try a lower --learning_rate or --grad_clip"
        )
    row = {"iter": step, "train_loss": loss, "lr": lr, "tokens_per_s": window.tokens * rt.world_size / window.seconds()}
    if rt.is_main:
        append_metrics(out, row)
    progress.train_row(row)
    window.reset(step)


def stop_requested(stop: StopRequest, rt: Runtime, *, step: int, log_interval: int) -> bool:
    if not rt.distributed:
        return stop.requested
    # Ranks agree on stopping at log steps only, where they meet anyway.
    if step % log_interval != 0:
        return False
    return bool(rt.all_reduce_sum(torch.tensor(float(stop.requested), device=rt.device)).item() > 0)


def resumed_config(cls, overrides: dict):
    """The config of ``--resume``: the settings the run in ``out_dir`` saved, under those given now."""
    saved = ckpt.read_config(overrides.get("out_dir", cls.out_dir))["train"]
    known = {f.name for f in dataclasses.fields(cls)} - {"resume", "overwrite"}
    return make_config(cls, {**{k: v for k, v in saved.items() if k in known}, **overrides})


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
