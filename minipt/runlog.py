"""What a training run reports while it runs: metrics rows, the loss plot, progress, stop requests.

* ``metrics.jsonl`` gets one JSON row per log step (train loss, learning rate,
  throughput; with a z-loss, ``train_z_loss`` beside the cross-entropy's
  ``train_loss``) and per evaluation; ``loss.png`` is drawn from it at the end.
  :class:`MetricsLog` writes the rows, and with ``--tensorboard`` the same
  scalars as TensorBoard events.
* :class:`TrainWindow` sums the train loss on the device between log steps, so
  the host reads it (one sync) every ``log_interval`` steps, not every step.
* :class:`Progress` is a tqdm bar on a terminal. Elsewhere (a log file, CI,
  nohup) a bar is thousands of carriage-return updates in one line, so it
  prints a plain line at every log step instead.
* :class:`StopRequest` turns SIGINT/SIGTERM into a flag the loop reads between steps.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minipt import checkpoint as ckpt
from minipt.errors import MissingDependency


# ----------------------------------------------------------------------------- metrics and plot
def read_metrics(out: Path) -> list[dict]:
    path = out / ckpt.METRICS
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
    return rows


def require_tensorboard() -> None:
    """Refuse ``--tensorboard`` before any work when the optional dependency is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
    except ImportError as exc:
        raise MissingDependency("--tensorboard=true needs the optional dependency tensorboard: "
                                "pip install tensorboard, or pip install minipt[tensorboard]") from exc


class MetricsLog:
    """A run's metrics: rows of ``metrics.jsonl`` and, with ``tensorboard``, the same scalars as TensorBoard events.

    The events go to ``out/tb`` (``tensorboard --logdir out/tb``): every number of a row but its ``iter``,
    tagged with its key, at step ``iter``. Rank 0 alone writes. The events are flushed at each evaluation (a
    row without ``train_loss``) and at :meth:`close`, which the trainers call at the end of a run, interrupted
    or not. On resume, :meth:`keep_until` drops the rows logged after the checkpoint from both."""

    def __init__(self, out: Path, tensorboard: bool = False):
        self.out, self.tensorboard = out, tensorboard
        self.writer = None

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards the events from there on that an earlier, cut-short process wrote
        self.writer = SummaryWriter(str(self.out / ckpt.TENSORBOARD), purge_step=purge_step)

    def keep_until(self, step: int) -> None:
        """Drop the rows logged after ``step``: on resume they belong to the part being redone."""
        kept = [r for r in read_metrics(self.out) if r["iter"] <= step]
        ckpt.atomic_write_text(self.out / ckpt.METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        if self.tensorboard:
            self._open(purge_step=step + 1)

    def append(self, row: dict) -> None:
        with open(self.out / ckpt.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if not self.tensorboard:
            return
        if self.writer is None:
            self._open()
        for key, value in row.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["iter"])
        if "train_loss" not in row:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_losses(out: Path) -> None:
    """``loss.png``: the train and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set(xlabel="step", ylabel="loss", title=f"{out.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = out / f".{ckpt.PLOT}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out / ckpt.PLOT)


# ----------------------------------------------------------------------------- the train loss between log steps
class TrainWindow:
    """The steps since the last log row: their summed loss and z term (on the device), tokens and wall time.

    ``z_loss`` stays None unless steps add one: a run without a z-loss logs none."""

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.z_loss = None
        self.steps, self.tokens = 0, 0
        self.first_step = step  # the step the window starts after: the last one known to be finite
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation time is not training throughput: the clock restarts after one."""
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, z_loss: torch.Tensor | None = None) -> None:
        self.loss += loss
        if z_loss is not None:
            self.z_loss = z_loss.clone() if self.z_loss is None else self.z_loss + z_loss
        self.steps += 1
        self.tokens += tokens

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar on a terminal, else a plain line every log step; nothing when not ``enabled``.

    ``log`` prints the run's other lines (evaluations); through the bar's own
    ``write`` while a bar is drawn, so that they do not tear it.
    """

    def __init__(self, total: int, initial: int, enabled: bool, log, stream=None):
        stream = sys.stderr if stream is None else stream
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and stream.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream)
        self.log = self.bar.write if self.bar is not None else log

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train_row(self, row: dict) -> None:
        """Show a ``metrics.jsonl`` train row: as the bar's postfix, or as a line of its own."""
        z = row.get("train_z_loss")
        if self.bar is not None:
            shown = dict(loss=f"{row['train_loss']:.3f}", **({"z": f"{z:.2e}"} if z is not None else {}),
                         tok_s=f"{row['tokens_per_s']:,.0f}")
            self.bar.set_postfix(shown, refresh=False)
        elif self.enabled:
            self.log(f"step {row['iter']}/{self.total}: train loss {row['train_loss']:.4f}, "
                     + (f"z-loss {z:.3e}, " if z is not None else "")
                     + f"lr {row['lr']:.2e}, {row['tokens_per_s']:,.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- stop requests
class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
