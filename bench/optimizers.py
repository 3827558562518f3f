"""The training recipes on the CPU: AdamW, Muon, a softcapped LM head and z-loss, at equal steps and equal time.

Four recipes, each run as ``python -m minipt.train``:

* ``gpt default, 200 steps``: the trainer's defaults (the bundled plays, a
  byte-level BPE of 8192, a GPT of 4 layers, 4 heads, 128 wide, block 128, batch
  16, a learning rate of 1e-3 warmed up over 50 steps and decayed along a cosine
  to 1e-4, weight decay 0.1, clipping at 1) but fewer steps, ``STEPS``, the
  cosine ending there;
* ``shakespeare_char``: nanoGPT's CPU recipe at character level, as
  ``bench.train_cpu`` runs it (2000 steps of a 4-layer, 128-wide GPT on blocks
  of 64);
* ``bert default, 200 steps``: the same for ``--model=bert``: the trainer's BERT
  defaults (MLM and NSP on the plays, a WordPiece of 8192, 4 layers, 4 heads,
  128 wide, block 128) cut to ``STEPS``. Its validation loss is the MLM loss
  plus the NSP loss;
* ``bert default``: the whole default BERT run, 800 steps, evaluated every 100
  on 20 batches. Run for AdamW and Muon alone, after Muon's lead at 200 steps
  turned out not to last.

Each recipe runs four ways, one flag apart: ``adamw`` (``--optimizer=adamw``, the
baseline of the ``*_vs_adamw`` deltas), ``muon`` (``--optimizer=muon``: Muon for
the blocks' matrices, AdamW at its own rate for the rest), and AdamW with
``--logit_softcap=30`` (``softcap``) or ``--z_loss=1e-4`` (``z_loss``). Every
variant names its optimizer, whatever the trainer's default. Every seed runs all
four, one after the other, so that the load of a shared CPU falls on them alike;
the seed draws the initialisation and the data order.

* ``val_loss``: the last validation loss (``eval_iters`` batches): equal steps.
* ``train_s``: training time, summed from the run's log rows (steps over steps
  per second): forward, backward and optimizer step, without the evaluations
  and checkpoints. ``median_ms`` is the median step over the log windows.
* ``val_loss_at_time``: equal wall time. The budget of a seed
  (``time_budget_s``) is the training time of its fastest run; the other runs'
  validation loss at that time is interpolated linearly between their
  evaluations (their schedule was set for the full run, not cut short to fit).
* ``load_1min``: the load average before the run; above the core count, other
  work shared the CPU, and ``note`` says so.

Rows ``mean`` average the seeds, and ``val_loss_vs_adamw`` and
``val_loss_at_time_vs_adamw`` subtract AdamW's mean (below 0: the variant helps). On a CPU that other jobs share, run it as
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

from bench import train_cpu
from bench.common import cli
from minipt import checkpoint as ckpt
from minipt import train as minipt_train
from minipt.runlog import read_metrics

STEPS = 200  # of the default 800: 3 seeds x 4 variants take about 40 minutes of a shared 2-core CPU
# The recipes: the default GPT cut to STEPS, and nanoGPT's CPU recipe at character level (bench.train_cpu).
RECIPES = {
    f"gpt default, {STEPS} steps": dict(max_iters=STEPS, eval_interval=25, eval_iters=10, log_interval=5),
    "shakespeare_char": dict(train_cpu.RECIPE, tokenizer="char", split="stream", bias=False, log_interval=25),
    f"bert default, {STEPS} steps": dict(model="bert", max_iters=STEPS, eval_interval=25, eval_iters=10,
                                         log_interval=5),
    "bert default": dict(model="bert"),  # the whole default run, 800 steps
}
QUICK = dict(max_iters=40, eval_interval=20, eval_iters=5, log_interval=10, warmup_iters=10, lr_decay_iters=40)
SEEDS = (1337, 1338, 1339)
# What each variant adds to its recipe's command; adamw, the default, is the baseline of every delta.
VARIANTS = {
    "adamw": ["--optimizer=adamw"],
    "muon": ["--optimizer=muon"],
    "softcap": ["--optimizer=adamw", "--logit_softcap=30"],  # modded-nanogpt's cap of the LM head's logits
    "z_loss": ["--optimizer=adamw", "--z_loss=1e-4"],  # PaLM's coefficient
}


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


def one_run(variant: str, seed: int, settings: dict, cache_dir: Path, out_dir: Path) -> dict:
    argv = [f"--{k}={v}" for k, v in settings.items()] + VARIANTS[variant] + [
        f"--seed={seed}", f"--cache_dir={cache_dir}", f"--out_dir={out_dir}",
        "--device=cpu", "--progress=false", "--sample_tokens=0",
    ]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if minipt_train.main(argv) != 0:
        raise RuntimeError(f"the {variant} run failed; see its output above")
    run_s = time.perf_counter() - start
    config = ckpt.read_config(out_dir)
    cfg = config["train"]
    tokens_per_step = cfg["batch_size"] * config["model"]["block_size"] * cfg["gradient_accumulation_steps"]
    rows = read_metrics(out_dir)
    curve = train_curve(rows, tokens_per_step)
    step_s = [tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    lrs = f"adamw {cfg['learning_rate']:g}" + (f", muon {cfg['muon_learning_rate']:g}" if variant == "muon" else "")
    return {"provider": variant, "seed": seed, "max_iters": cfg["max_iters"], "learning_rates": lrs,
            "val_loss": curve[-1][1], "train_s": curve[-1][0], "run_s": run_s,
            "median_ms": 1e3 * statistics.median(step_s), "load_1min": load, "curve": curve}


def run(device: str, quick: bool, recipes: tuple[str, ...] | None = None,
        variants: tuple[str, ...] | None = None) -> list[dict]:
    """Every variant (or ``variants``, adamw first) of every recipe (or ``recipes``), each seed in turn."""
    variants = tuple(variants or VARIANTS)
    if variants[0] != "adamw":
        raise ValueError(f"variants must start with adamw, the baseline of the deltas, got {variants}")
    seeds = SEEDS[:1] if quick else SEEDS
    if torch.device(device).type != "cpu":
        return [{"name": name, "provider": "adamw", "skipped": "measured on the CPU, where these recipes train"}
                for name in RECIPES]
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in recipes or RECIPES:
            settings = {**RECIPES[name], **(QUICK if quick else {})}
            mine = []
            for seed in seeds:
                # every variant of a seed runs in turn, so that the load of a shared CPU falls on them alike
                group = [one_run(v, seed, settings, tmp / f"cache-{name}", tmp / f"{name}-{v}-{seed}")
                         for v in variants]
                budget = min(r["train_s"] for r in group)
                for r in group:
                    r["time_budget_s"] = budget
                    r["val_loss_at_time"] = loss_at(r.pop("curve"), budget)
                    if r["load_1min"] > cores:
                        r["note"] = f"under load ({r['load_1min']:.1f} > {cores} cores)"
                mine += [{"name": name, **r} for r in group]
            rows += mine
            means = {}
            for v in variants:
                runs = [r for r in mine if r["provider"] == v]
                means[v] = {k: statistics.mean(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
            for v in variants:
                delta = {f"{k}_vs_adamw": means[v][k] - means["adamw"][k] for k in ("val_loss", "val_loss_at_time")}
                first = next(r for r in mine if r["provider"] == v)  # as every seed's run: the trainer's own count
                rows.append({"name": name, "provider": v, "seed": "mean", "max_iters": first["max_iters"],
                             "learning_rates": first["learning_rates"], **means[v], **delta})
    return rows


if __name__ == "__main__":
    cli("optimizers", run)
