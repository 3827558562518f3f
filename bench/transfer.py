"""Does pretraining transfer? The bundled genre task fine-tuned from a pretrained BERT and from random weights.

``python -m bench.transfer --pretrained out-bert`` fine-tunes, for each seed,
twice with the same budget (``python -m minipt.finetune``'s defaults unless
overridden with ``--set key=value``):

* ``pretrained``: ``--init_from=<the run>``;
* ``scratch``: ``--init_from=scratch --arch_from=<the run>``: the same
  architecture and tokenizer, randomly initialised from the same seed's draw.

The task is :mod:`minipt.genre`'s: comedy, history or tragedy of a passage from
the held-out tail of a play; the epoch is chosen on the validation plays and
the test plays are scored once. A row per run gives its test accuracy and
macro-F1 and the test set's majority-label rate (what always guessing the
commonest genre scores); a row per start gives the mean, the sample standard
deviation and the range over the seeds; the last row gives the margin in
accuracy points, pretrained minus scratch. The pretrained run is named with
its steps and its last validation scores, so the figure says which BERT it is.

Not part of ``python -m bench``: it needs a pretrained BERT run, and each
fine-tune takes a minute or more on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS_DIR, default_device, machine, print_table, table_columns, write_json
from minipt import runtime
from minipt.config import ConfigError, make_config, parse_overrides
from minipt.config import SCRATCH, FinetuneConfig
from minipt.finetuning import finetune
from minipt.runlog import read_metrics

STARTS = ("pretrained", "scratch")


def describe(pretrained: Path) -> str:
    """The pretrained run in a few words: its steps and its last validation scores."""
    try:
        config = json.loads((pretrained / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{pretrained} is not a minipt run: {exc}") from None
    if config.get("model_type") != "bert" or "train" not in config:
        raise ValueError(f"{pretrained}: expected a minipt BERT run, got {config.get('model_type')}")
    evals = [r for r in read_metrics(pretrained) if "mlm_acc" in r]
    last = evals[-1] if evals else {}
    words = f"{pretrained.name}: {last.get('iter', '?')} steps, dropout {config['model'].get('dropout')}"
    if last:
        words += f", MLM acc {last['mlm_acc']:.3f}, NSP acc {last['nsp_acc']:.3f} (majority {last['nsp_majority']:.3f})"
    return words


def one_run(pretrained: Path, start: str, seed: int, device: str, settings: dict, out: Path) -> dict:
    given = {"init_from": str(pretrained)} if start == "pretrained" else {"init_from": SCRATCH,
                                                                         "arch_from": str(pretrained)}
    cfg = make_config(FinetuneConfig, {**settings, **given, "seed": seed, "out_dir": str(out), "device": device,
                                       "progress": False})
    rt = runtime.setup(cfg.device, cfg.dtype, cfg.tf32)
    began = time.perf_counter()
    run = finetune(cfg, rt, log=lambda *a, **k: None)
    test, validation = run.results["test"], run.results["validation"]
    return {
        "start": start, "seed": seed, "best_epoch": run.best["epoch"],
        "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "majority_rate": test["majority_rate"],
        "val_accuracy": validation["accuracy"], "run_s": time.perf_counter() - began,
    }


def summary(rows: list[dict], start: str) -> dict:
    accuracy = [r["test_accuracy"] for r in rows if r["start"] == start]
    f1 = [r["test_macro_f1"] for r in rows if r["start"] == start]
    return {
        "start": start, "seed": "mean", "test_accuracy": statistics.mean(accuracy),
        "test_macro_f1": statistics.mean(f1), "accuracy_sd": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
        "accuracy_min": min(accuracy), "accuracy_max": max(accuracy),
    }


def run(pretrained: Path, seeds: list[int], device: str, settings: dict, work: Path) -> list[dict]:
    name = describe(pretrained)
    rows = []
    for seed in seeds:
        for start in STARTS:
            rows.append({**one_run(pretrained, start, seed, device, settings, work / f"{start}-{seed}"),
                         "pretrained_run": name})
            print(f"{start} seed {seed}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    means = [summary(rows, start) for start in STARTS]
    margin = 100 * (means[0]["test_accuracy"] - means[1]["test_accuracy"])
    note = f"{', '.join(f'{k}={v}' for k, v in settings.items()) or 'the fine-tune defaults'}"
    return rows + means + [{"start": "pretrained - scratch", "seed": "mean", "margin_points": margin,
                            "note": note}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="a minipt BERT run folder")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated fine-tune seeds (default 1,2,3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a python -m minipt.finetune setting for both starts (repeatable)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--name", default="transfer", help="results file name (default transfer)")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    try:
        settings = parse_overrides(FinetuneConfig, [f"--{item}" for item in args.set], "--set", "")
    except ConfigError as exc:
        parser.error(f"--set: {exc}")
    try:
        describe(args.pretrained)
    except ValueError as exc:
        parser.error(f"--pretrained: {exc}")
    with tempfile.TemporaryDirectory() as work:
        rows = run(args.pretrained, seeds, args.device, settings, Path(work))
    print_table(f"{args.name} on {machine()['device']}", rows, table_columns(rows))
    print(f"\nwrote {write_json(args.name, rows, args.device, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
