"""Set-up shared by the pytest-benchmark files: ``pytest bench/ --benchmark-only``.

``--bench-device cpu|cuda`` picks the device (CUDA when there is one). On the CPU
the benchmarks time the torch and native backends only: Triton's interpreter runs
the kernels for testing, and its speed says nothing about them, so this conftest
leaves TRITON_INTERPRET alone and the Triton benchmarks run on CUDA alone.

pytest-benchmark measures wall time, which on CUDA means nothing until the device
has finished: the ``measure`` fixture synchronises inside the timed call. With
``--benchmark-only`` and no ``--benchmark-json``, the report is written to
``bench/results/<device>/pytest-benchmark.json``.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from bench.common import RESULTS_DIR, default_device, device_slug

DEVICE_KEY = pytest.StashKey[str]()


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device", choices=("cpu", "cuda"), default=None,
        help="device the benchmarks run on (default: cuda when torch sees one, else cpu)",
    )


def pytest_configure(config):
    device = config.getoption("--bench-device") or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device")
    config.stash[DEVICE_KEY] = device
    # pytest-benchmark opens its report in its own pytest_configure, which runs after this one.
    wants_report = config.getoption("benchmark_only", False) and not config.getoption("benchmark_disable", False)
    if wants_report and config.getoption("benchmark_json", None) is None:
        folder = RESULTS_DIR / device_slug(device)
        folder.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = benchmark_json_option(folder / "pytest-benchmark.json")


def benchmark_json_option(path: Path):
    """``--benchmark-json PATH`` as the installed pytest-benchmark parses it: a path from 5.3, an open file before."""
    if Version(version("pytest-benchmark")) >= Version("5.3"):
        return path
    return open(path, "wb")  # noqa: SIM115 - pytest-benchmark closes it


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    return pytestconfig.stash[DEVICE_KEY]


@pytest.fixture
def measure(benchmark, bench_device):
    """``measure(fn, rounds=None)``: benchmark ``fn()``, with the device synchronised inside each timed call.

    On CUDA it runs ``rounds`` (default 10) timed calls after one warm-up call; on the
    CPU, without ``rounds``, pytest-benchmark calibrates the number of calls itself.
    Returns what the last call of ``fn`` returned.
    """

    def run(fn, rounds: int | None = None):
        if torch.device(bench_device).type == "cuda":

            def synchronised():
                out = fn()
                torch.cuda.synchronize()
                return out

            torch.cuda.synchronize()
            return benchmark.pedantic(synchronised, rounds=rounds or 10, warmup_rounds=1, iterations=1)
        if rounds is not None:
            return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        return benchmark(fn)

    return run
