"""nanoGPT's CPU recipe on the bundled plays at character level: minipt's trainer against the recipe itself.

The settings are those of nanoGPT's README for a CPU ("shakespeare_char" on a
laptop): n_layer=4 n_head=4 n_embd=128 block_size=64 batch_size=12, 2000 steps
of AdamW at 1e-3 (beta2 0.99, weight decay 0.1, grad clip 1) warmed up over 100
steps and decayed to 1e-4, dropout 0, no bias, evaluation every 250 steps on
20 batches. The data is the plays as plain text, tokenized by minipt's ``char``
tokenizer, split 90/10 along the character stream as nanoGPT's ``prepare.py``
splits ``input.txt``.

Four runs, one after the other, on the same tokens:

* ``nanogpt-recipe``: nanoGPT's source is not available offline, so this is a
  plain-PyTorch GPT-2 written after nanoGPT's ``model.py`` (SDPA attention,
  erf GELU, tied head, its initialisation) trained by a transcription of its
  ``train.py`` loop: fresh memmap and ``torch.randint`` windows per batch,
  train and val loss estimated on 20 random batches each every 250 steps, a
  checkpoint whenever val improves, ``loss.item()`` every step
  (``--log_interval=1``), non-fused AdamW on the CPU, and its 2001 steps (its
  loop runs the last evaluation before a final step). It is the baseline of
  ``ratio`` (per step), ``run_ratio`` (whole run) and ``to_loss_ratio``.
* ``minipt-native`` and ``minipt-torch``: ``python -m minipt.train`` with the same
  settings (``--tokenizer=char --split=stream --bias=false``) and
  ``--backend=native`` (the C++ kernels, what ``auto`` picks on a CPU) or
  ``--backend=torch`` (PyTorch's ops), run in-process and timed from call to
  return: config, cached data, model, 2000 steps, evaluations on 20 fixed
  validation batches, checkpoints and the final loss plot. Tokenizing the corpus
  is timed apart (``prep_s``), as nanoGPT's ``prepare.py`` is. These two change
  the kernels alone: same model, same optimizer (``--optimizer=adamw``), same
  schedule.
* ``minipt-native-muon``: ``minipt-native`` with ``--optimizer=muon`` (Muon for the
  blocks' matrices at its default rate, AdamW as before for the rest), as minipt
  trains a GPT by default: the same model and steps, another optimizer, so its
  ``to_loss_ratio`` is the recipe's gain, not the kernels'.

``val_loss`` is each run's last validation loss. ``target_val_loss`` is the
highest of them, a loss every run reaches; ``to_loss_s`` is the wall time
from a run's start until its validation loss first reaches it, interpolated
linearly between the two evaluations around the crossing (each evaluation's
time is taken when it ends; evaluations come every 250 steps), and
``to_loss_ratio`` is the recipe's ``to_loss_s`` over the row's. The
published nanoGPT figures
measured on this kind of machine (val loss 1.80, 33 ms a step, 74 s a run) are
printed as a reference row; they were not measured here, and their corpus
(the plays with their markdown kept, or not) may differ from this one. The CPU
is shared: ``load_1min`` records the load average before each run, and figures
taken under load (above the core count) are marked in ``note``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import cli
from minipt import checkpoint as ckpt
from minipt import train as minipt_train
from minipt.runlog import read_metrics
from minipt.data import prepare_data

RECIPE = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr_decay_iters=2000,
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, dropout=0.0, eval_iters=20, eval_interval=250,
)
QUICK = dict(max_iters=100, lr_decay_iters=100, warmup_iters=10, eval_interval=50, eval_iters=5)
ANCHOR = dict(val_loss=1.80, median_ms=33.0, run_s=74.0)  # nanoGPT, measured on this kind of machine
WEIGHT_DECAY, BETA1, GRAD_CLIP = 0.1, 0.9, 1.0
# minipt's runs: (backend, extra flags); the recipe's own loop is the baseline, first.
MINIPT = {"minipt-native": ("native", ["--optimizer=adamw"]), "minipt-torch": ("torch", ["--optimizer=adamw"]),
          "minipt-native-muon": ("native", ["--optimizer=muon"])}
PROVIDERS = ("nanogpt-recipe", *MINIPT)


# ----------------------------------------------------------------------------- the nanoGPT-recipe baseline
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(), nn.Linear(4 * n_embd, n_embd, bias=False)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RecipeGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def recipe_lr(it: int, s: dict) -> float:
    if it < s["warmup_iters"]:
        return s["learning_rate"] * (it + 1) / (s["warmup_iters"] + 1)
    if it > s["lr_decay_iters"]:
        return s["min_lr"]
    ratio = (it - s["warmup_iters"]) / (s["lr_decay_iters"] - s["warmup_iters"])
    return s["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s["learning_rate"] - s["min_lr"])


def nanogpt_recipe_run(paths: dict[str, Path], dtype: str, vocab_size: int, s: dict, out_dir: Path) -> dict:
    """nanoGPT's train.py loop on CPU; returns its last val loss, step times and run time."""
    start = time.perf_counter()
    torch.manual_seed(1337)
    T, B = s["block_size"], s["batch_size"]

    def get_batch(split):
        data = np.memmap(paths[split], dtype=dtype, mode="r")  # nanoGPT re-opens it per batch
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(s["eval_iters"])
            for k in range(s["eval_iters"]):
                losses[k] = model(*get_batch(split)).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    model = RecipeGPT(vocab_size, T, s["n_layer"], s["n_head"], s["n_embd"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=s["learning_rate"], betas=(BETA1, s["beta2"]),
    )
    X, Y = get_batch("train")
    best_val, step_ms, evals, it, t0 = 1e9, [], [], 0, time.perf_counter()
    while True:
        for group in optimizer.param_groups:
            group["lr"] = recipe_lr(it, s)
        if it % s["eval_interval"] == 0:
            losses = estimate_loss()
            evals.append((time.perf_counter() - start, losses["val"]))
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it},
                               out_dir / "ckpt.pt")
        loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        step_ms.append((t1 - t0) * 1e3)
        t0 = t1
        loss.item()  # --log_interval=1
        it += 1
        if it > s["max_iters"]:
            break
    return {"optimizer": "adamw", "val_loss": losses["val"], "median_ms": statistics.median(step_ms),
            "run_s": time.perf_counter() - start, "evals": evals}


# ----------------------------------------------------------------------------- minipt
class _TimedLines(io.TextIOBase):
    """A stdout that passes lines on and notes when each evaluation's line ("step N: ...") was printed."""

    def __init__(self, stream, start: float):
        self.stream, self.start, self.eval_s, self.pending = stream, start, {}, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            match = re.match(r"step (\d+): .*val_loss", line)
            if match:
                self.eval_s[int(match.group(1))] = time.perf_counter() - self.start
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def minipt_run(cache_dir: Path, s: dict, out_dir: Path, backend: str, extra: list[str]) -> dict:
    argv = [f"--{k}={v}" for k, v in s.items()] + [
        "--tokenizer=char", "--split=stream", "--bias=false", f"--cache_dir={cache_dir}", f"--out_dir={out_dir}",
        "--device=cpu", "--progress=false", "--sample_tokens=0", "--log_interval=10", f"--backend={backend}", *extra,
    ]
    start = time.perf_counter()
    lines = _TimedLines(sys.stdout, start)
    with contextlib.redirect_stdout(lines):
        status = minipt_train.main(argv)
    if status != 0:
        raise RuntimeError("the minipt run failed; see its output above")
    run_s = time.perf_counter() - start
    rows = read_metrics(out_dir)
    tokens_per_step = s["batch_size"] * s["block_size"]
    step_ms = [1e3 * tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    evals = [(lines.eval_s[r["iter"]], r["val_loss"]) for r in rows if "val_loss" in r]
    optimizer = ckpt.read_config(out_dir)["train"]["optimizer"]
    return {"optimizer": optimizer, "val_loss": evals[-1][1], "median_ms": statistics.median(step_ms), "run_s": run_s,
            "evals": evals}


def seconds_to_loss(evals: list[tuple[float, float]], target: float) -> float:
    """When the validation loss first reaches ``target``, interpolated linearly between the evaluations
    ``(seconds, loss)`` around the crossing."""
    for i, (t, loss) in enumerate(evals):
        if loss <= target:
            if i == 0:
                return t
            t0, loss0 = evals[i - 1]
            return t0 + (t - t0) * (loss0 - target) / (loss0 - loss)
    raise ValueError(f"the validation loss never reached {target}: {evals}")


def run(device: str, quick: bool) -> list[dict]:
    settings = {**RECIPE, **(QUICK if quick else {})}
    size = {k: settings[k] for k in ("n_layer", "n_embd", "block_size", "batch_size", "max_iters")}
    if torch.device(device).type != "cpu":
        return [{"name": "shakespeare_char", "provider": "minipt", **size,
                 "skipped": "nanoGPT's CPU recipe runs on the CPU; the GPU figures are in e2e"}]
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        prep = prepare_data(model="gpt", tokenizer="char", split="stream", cache_dir=tmp / "cache", log=lambda m: None)
        prep_s = time.perf_counter() - t0
        # the plays fit one shard per split: the nanoGPT loop reads each as its train.bin / val.bin
        assert len(prep.train.shards) == len(prep.val.shards) == 1
        paths = {split: prep.cache_path / f"{split}-00000.bin" for split in ("train", "val")}
        evals = {}
        for provider in PROVIDERS:
            load = os.getloadavg()[0]
            out = tmp / provider
            out.mkdir()
            if provider in MINIPT:
                result = minipt_run(tmp / "cache", settings, out, *MINIPT[provider])
            else:
                result = nanogpt_recipe_run(paths, prep.train.shards[0].tokens.dtype, prep.tokenizer.vocab_size, settings, out)
            evals[provider] = result.pop("evals")
            note = f"under load ({load:.1f} > {cores} cores): rerun when quiet" if load > cores else None
            rows.append({"name": "shakespeare_char", "provider": provider, **size, **result, "load_1min": load,
                         **({"prep_s": prep_s} if provider != PROVIDERS[0] else {}), **({"note": note} if note else {})})
    base = rows[0]
    target = max(r["val_loss"] for r in rows)
    for r in rows:
        r["ratio"] = base["median_ms"] / r["median_ms"]
        r["run_ratio"] = base["run_s"] / r["run_s"]
        r["target_val_loss"] = target
        r["to_loss_s"] = seconds_to_loss(evals[r["provider"]], target)
    for r in rows:
        r["to_loss_ratio"] = base["to_loss_s"] / r["to_loss_s"]
    rows.append({"name": "shakespeare_char", "provider": "nanogpt (published, not rerun)", **size, **ANCHOR})
    return rows


if __name__ == "__main__":
    cli("train_cpu", run)
