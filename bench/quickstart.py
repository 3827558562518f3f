"""The README's first commands as a user runs them: ``python -m minipt.train``, defaults and all.

Each row is one run of the trainer in a fresh process, timed from launch to
exit, with nothing but its defaults: the bundled plays, the tokenizer trained on
them, the default model and schedule, the progress lines, the evaluations, the
checkpoints, the loss plot and the final sample (GPT) or fill-mask demo (BERT).
Only ``--out_dir`` and ``--cache_dir`` point into a temporary folder, so that the
run starts from an empty cache as on a fresh machine (``first_run_s``) and
leaves nothing behind. The ``gpt`` row is the README's quick start; the ``bert``
row is ``--model bert``. ``--quick`` runs 20 steps of each, which checks the
commands rather than timing them.

``val_loss`` is the run's last validation loss, ``tokens_per_s`` the median of
its progress lines, ``backends`` what ``auto`` resolved each op to (from the
run's config). The CPU is shared: ``load_1min`` is the load average as each run
started, and a run started under load (above the core count) says so in ``note``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"gpt": [], "bert": ["--model=bert"]}
QUICK = ["--max_iters=20", "--eval_interval=10"]


def run_trainer(args: list[str], tmp: Path, name: str) -> dict:
    """One ``python -m minipt.train`` in a fresh process: its wall time, last validation loss and throughput."""
    out = tmp / f"out-{name}"
    cmd = [sys.executable, "-m", "minipt.train", *args, f"--out_dir={out}", f"--cache_dir={tmp / f'cache-{name}'}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[:300]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    config = json.loads((out / "config.json").read_text())
    backends = config["backends"]
    return {
        "steps": evals[-1]["iter"],
        "val_loss": evals[-1]["val_loss"],
        "first_run_s": wall,
        "tokens_per_s": statistics.median(speed) if speed else None,
        "backends": ",".join(sorted(set(backends.values()))),
        "printed_lines": len(proc.stdout.splitlines()),
    }


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    cores = os.cpu_count() or 1
    extra = [] if device == "cpu" else [f"--device={device}"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in COMMANDS.items():
            load = os.getloadavg()[0]
            command = " ".join(["python -m minipt.train", *args, *extra, *(QUICK if quick else [])])
            row = {"name": name, "provider": "minipt.train", "command": command,
                   **run_trainer([*args, *extra, *(QUICK if quick else [])], Path(tmp), name), "load_1min": load}
            if load > cores:
                row["note"] = f"under load ({load:.1f} > {cores} cores): rerun when quiet"
            rows.append(row)
    return rows


if __name__ == "__main__":
    cli("quickstart", run)
