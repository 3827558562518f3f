"""Timing, memory and result helpers shared by every benchmark.

Every benchmark reports a ratio against its baseline measured in the same run, the
median time, and the machine it ran on. CUDA timings use CUDA events through
``triton.testing.do_bench`` (which also flushes the L2 cache between runs).
"""

from __future__ import annotations

import json
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
        info["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return info


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


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
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
