"""Timing, memory and result helpers shared by every benchmark.

Every benchmark reports a ratio against its baseline measured in the same run, the
median time, and the machine it ran on. CUDA timings use CUDA events through
``triton.testing.do_bench`` (which also flushes the L2 cache between runs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, *, warmup: int = 3, rep: int = 10, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_steps_ms(fn, device, *, steps: int, warmup: int = 0) -> list[float]:
    """Wall time of each of ``steps`` calls of ``fn()``, after ``warmup`` untimed calls, in milliseconds.

    For work long enough to time call by call, such as a training step: the device is
    synchronised around every call, so a step counts all its kernels and its host-side
    overhead, as a training loop pays them.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def add_ratios(rows: list[dict], baseline: str) -> dict | None:
    """Give each timed row ``ratio`` = baseline's median / its median; rows are one size's providers.

    Returns the baseline's row (None when it was not timed), for ratios of other measures.
    """
    base = next((r for r in rows if r.get("provider") == baseline and "median_ms" in r), None)
    if base is not None:
        for r in rows:
            if "median_ms" in r:
                r["ratio"] = base["median_ms"] / r["median_ms"]
    return base


def peak_memory_bytes(fn, device) -> int | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before; None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine() -> dict:
    """What the numbers were measured on: the card or CPU, and the versions."""
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = None
    else:
        info["device"] = f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads"
        # A shared CPU's figures depend on what else ran: the load says how much did.
        info["load_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return info


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; the kernel's cpuinfo names the part.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device) -> str:
    """Folder name under bench/results/ for this device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return "cpu"


def write_json(name: str, rows: list[dict], device, results_dir: Path | None = None) -> Path:
    folder = (results_dir or RESULTS_DIR) / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return path


# Row fields that are measurements rather than what was measured, in the order tables show them.
METRIC_FIELDS = (
    "median_ms", "tflops", "gbps", "tokens_per_s", "real_tokens_per_s", "mfu", "peak_mem_mb", "ratio",
)
# Row fields that are neither: what the row is, and why it holds no measurement.
LABEL_FIELDS = ("name", "provider")
NOTE_FIELDS = ("note", "skipped", "error")


def config_fields(rows: list[dict]) -> list[str]:
    """The fields that say what was measured (shape, dtype, backend): every field holding an
    int, str or bool, other than the name, the provider and the notes, in order of first appearance."""
    fields: dict[str, None] = {}
    for r in rows:
        for key, value in r.items():
            if key in LABEL_FIELDS or key in NOTE_FIELDS or key in METRIC_FIELDS:
                continue
            if value is None or isinstance(value, float):
                continue
            fields.setdefault(key)
    return list(fields)


def table_columns(rows: list[dict]) -> list[str]:
    """Columns for ``print_table``: name, provider, what was measured, then the measurements
    (the usual ones first, then any others a benchmark adds), then the notes."""
    present = {key for r in rows for key in r}
    extra: dict[str, None] = {}
    for r in rows:
        for key, value in r.items():
            if isinstance(value, float) and key not in METRIC_FIELDS:
                extra.setdefault(key)
    return [
        *(f for f in LABEL_FIELDS if f in present),
        *config_fields(rows),
        *(f for f in METRIC_FIELDS if f in present),
        *extra,
        *(f for f in NOTE_FIELDS if f in present),
    ]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cli(name: str, run, argv=None) -> Path:
    """The ``python -m bench.<name> [--quick] [--device cpu|cuda] [--out DIR]`` entry of a benchmark module."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=f"Run the {name} benchmark.")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(), help="default: cuda if present")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    rows = run(args.device, args.quick)
    print_table(f"{name} on {machine()['device']}", rows, table_columns(rows))
    path = write_json(name, rows, args.device, args.out)
    print(f"\nwrote {path}")
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
    if not rows:
        print("(no rows)")
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)
