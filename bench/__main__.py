"""``python -m bench``: every benchmark module in one run, with tables, plots and JSON.

Each module ``bench/<name>.py`` exposes ``run(device, quick) -> list[dict]``, and
may expose ``plot(title, rows, path)`` to draw its own figure in place of the
default bars (``bench.plots.plot_rows``). This runs the modules in turn, prints
each table, writes ``<name>.json`` and ``<name>.png`` under ``<out>/<device>/``
(``bench/results/`` by default), and records in ``summary.json`` there how the
latest run of each module went. A module that is missing or raises is reported
as failed and the others still run; so is a row carrying an ``error``. The exit
status is 1 when anything failed, so that a failure is never mistaken for a result.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, default_device, device_slug, machine, print_table, table_columns, write_json
from bench.plots import plot_rows

# In run order: the ops, then training: nanoGPT's CPU recipe, the README's first commands, and the training
# step on the device.
MODULES = ("attention", "mlm_mask", "cross_entropy", "linear_cross_entropy", "native_cpu", "data_prep", "train_cpu",
           "quickstart", "e2e")


def _names(parser: argparse.ArgumentParser, option: str, value: str | None) -> list[str]:
    if value is None:
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        parser.error(f"{option}: unknown benchmark(s) {unknown}; expected names from {list(MODULES)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (under 2 minutes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(), help="default: cuda if present")
    parser.add_argument("--only", metavar="NAME,NAME", help=f"run only these, from: {','.join(MODULES)}")
    parser.add_argument("--skip", metavar="NAME,NAME", help="run all but these")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    only, skip = _names(parser, "--only", args.only), _names(parser, "--skip", args.skip)
    args.modules = [m for m in (only or MODULES) if m not in skip]
    if not args.modules:
        parser.error("--only and --skip leave no benchmark to run")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def run_module(name: str, device: str, quick: bool, out: Path) -> dict:
    """Run one module; return its summary entry, whatever happens inside it."""
    entry = {"module": name, "status": "ok", "rows": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        if importlib.util.find_spec(f"bench.{name}") is None:
            entry.update(status="missing", detail=f"bench/{name}.py does not exist")
            return entry
        module = importlib.import_module(f"bench.{name}")
        rows = module.run(device, quick)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
            raise TypeError(f"run() must return a list of dicts with a 'name', got {type(rows).__name__}")
        entry["rows"] = len(rows)
        print_table(f"{name} on {machine()['device']}", rows, table_columns(rows))
        entry["json"] = str(write_json(name, rows, device, out))
        plot = getattr(module, "plot", plot_rows)  # a module may draw its own figure
        png = plot(f"{name} on {machine()['device']}", rows, Path(entry["json"]).with_suffix(".png"))
        entry["png"] = None if png is None else str(png)
        errors = [f"{r['name']}/{r.get('provider', '?')}: {r['error']}" for r in rows if r.get("error")]
        if errors:
            entry.update(status="row errors", detail="; ".join(errors))
    except Exception as exc:  # a broken benchmark must not take the others' results with it
        traceback.print_exc()
        entry.update(status="failed", detail=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return entry


def write_summary(folder: Path, entries: list[dict]) -> Path:
    """Merge ``entries`` into ``folder/summary.json``: the latest run of each module, so that
    runs of different modules into one folder (``--only``, ``--skip``) add up."""
    path = folder / "summary.json"
    try:
        kept = [e for e in json.loads(path.read_text())["modules"] if e["module"] not in {n["module"] for n in entries}]
    except (OSError, ValueError, KeyError, TypeError):
        kept = []
    order = {name: i for i, name in enumerate(MODULES)}
    merged = sorted(kept + entries, key=lambda e: order.get(e["module"], len(order)))
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "modules": merged}, indent=2))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"benchmarks on {machine()['device']} ({'quick' if args.quick else 'full'}): {', '.join(args.modules)}")
    summary = []
    for name in args.modules:
        entry = run_module(name, args.device, args.quick, args.out)
        entry["quick"] = args.quick
        print(f"-- {name}: {entry['status']}, {entry['rows']} rows in {entry['seconds']} s", flush=True)
        summary.append(entry)
    print_table("summary", summary, ["module", "status", "rows", "seconds", "detail"])
    path = write_summary(args.out / device_slug(args.device), summary)
    print(f"\nwrote {path}")
    failed = [e["module"] for e in summary if e["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
