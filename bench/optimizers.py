"""AdamW against Muon on the default GPT: validation loss at equal steps and at equal training time.

Each run is ``python -m minipt.train`` with its defaults (the bundled plays, a
byte-level BPE of 8192, a GPT of 4 layers, 4 heads, 128 wide, block 128, batch
16, AdamW at 1e-3 warmed up over 50 steps, cosine decay to 1e-4, weight decay
0.1, clipping at 1) but fewer steps, ``STEPS``, the cosine ending there; the
Muon run adds ``--optimizer=muon`` and keeps everything else, AdamW's
learning rate for the embeddings, head, norms and biases included. Every seed
runs both, one after the other, so that the load of a shared CPU falls on the
pair alike; the seed draws the initialisation and the data order.

* ``val_loss``: the last validation loss (``eval_iters`` batches): equal steps.
* ``train_s``: training time, summed from the run's log rows (steps over steps
  per second): forward, backward and optimizer step, without the evaluations
  and checkpoints. ``median_ms`` is the median step over the log windows.
* ``val_loss_at_time``: equal wall time. The budget of a seed
  (``time_budget_s``) is the training time of its faster run; the slower run's
  validation loss at that time is interpolated linearly between its
  evaluations (its schedule was set for ``STEPS``, not cut short to fit).
* ``load_1min``: the load average before the run; above the core count, other
  work shared the CPU, and ``note`` says so.

Rows ``mean`` average the seeds. On a CPU that other jobs share, run it as
``OMP_NUM_THREADS=1 python -m bench.optimizers``: two threads then wait on the
busier core at every op, and a step took twice as long (the machine line says
how many threads the recorded run had).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import cli
from minipt import checkpoint as ckpt
from minipt import train as minipt_train
from minipt.runlog import read_metrics

STEPS = 200  # of the default 800: 3 seeds x 2 optimizers take about 20 minutes of a shared 2-core CPU
SETTINGS = dict(max_iters=STEPS, eval_interval=25, eval_iters=10, log_interval=5)
QUICK = dict(max_iters=40, eval_interval=20, eval_iters=5, log_interval=10, warmup_iters=10)
SEEDS = (1337, 1338, 1339)
OPTIMIZERS = ("adamw", "muon")


def train_curve(rows: list[dict], tokens_per_step: int) -> list[tuple[float, float]]:
    """``[(training seconds, validation loss)]`` at each evaluation of a run's metrics rows."""
    curve, seconds, last_iter = [], 0.0, 0
    for r in rows:
        if "tokens_per_s" in r:
            seconds += (r["iter"] - last_iter) * tokens_per_step / r["tokens_per_s"]
            last_iter = r["iter"]
        if "val_loss" in r:
            curve.append((seconds, r["val_loss"]))
    return curve


def loss_at(curve: list[tuple[float, float]], seconds: float) -> float:
    """The validation loss at ``seconds`` of training, linear between evaluations."""
    times, losses = zip(*curve)
    return float(np.interp(seconds, times, losses))


def one_run(optimizer: str, seed: int, settings: dict, cache_dir: Path, out_dir: Path) -> dict:
    argv = [f"--{k}={v}" for k, v in settings.items()] + [
        f"--optimizer={optimizer}", f"--seed={seed}", f"--cache_dir={cache_dir}", f"--out_dir={out_dir}",
        "--device=cpu", "--progress=false", "--sample_tokens=0",
    ]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if minipt_train.main(argv) != 0:
        raise RuntimeError(f"the {optimizer} run failed; see its output above")
    run_s = time.perf_counter() - start
    config = ckpt.read_config(out_dir)
    cfg = config["train"]
    tokens_per_step = cfg["batch_size"] * config["model"]["block_size"] * cfg["gradient_accumulation_steps"]
    rows = read_metrics(out_dir)
    curve = train_curve(rows, tokens_per_step)
    step_s = [tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    lrs = f"adamw {cfg['learning_rate']:g}" + (f", muon {cfg['muon_learning_rate']:g}" if optimizer == "muon" else "")
    return {"provider": optimizer, "seed": seed, "max_iters": cfg["max_iters"], "learning_rates": lrs,
            "val_loss": curve[-1][1], "train_s": curve[-1][0], "run_s": run_s,
            "median_ms": 1e3 * statistics.median(step_s), "load_1min": load, "curve": curve}


def run(device: str, quick: bool) -> list[dict]:
    settings = {**SETTINGS, **(QUICK if quick else {})}
    seeds = SEEDS[:1] if quick else SEEDS
    name = f"gpt default, {settings['max_iters']} steps"
    if torch.device(device).type != "cpu":
        return [{"name": name, "provider": "adamw", "skipped": "measured on the CPU, where the default GPT trains"}]
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in seeds:
            pair = [one_run(opt, seed, settings, tmp / "cache", tmp / f"{opt}-{seed}") for opt in OPTIMIZERS]
            budget = min(r["train_s"] for r in pair)
            for r in pair:
                r["time_budget_s"] = budget
                r["val_loss_at_time"] = loss_at(r.pop("curve"), budget)
                if r["load_1min"] > cores:
                    r["note"] = f"under load ({r['load_1min']:.1f} > {cores} cores)"
            rows += [{"name": name, **r} for r in pair]
    for opt in OPTIMIZERS:
        mine = [r for r in rows if r["provider"] == opt]
        mean = {k: statistics.mean(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], float)}
        rows.append({"name": name, "provider": opt, "seed": "mean", "max_iters": mine[0]["max_iters"],
                     "learning_rates": mine[0]["learning_rates"], **mean})
    return rows


if __name__ == "__main__":
    cli("optimizers", run)
