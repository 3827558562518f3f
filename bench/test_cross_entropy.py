"""pytest-benchmark timings of cross-entropy forward + backward, and a check that every provider computes the same.

``pytest bench/test_cross_entropy.py --benchmark-only [--bench-device cpu|cuda]``.
"""

from __future__ import annotations

import pytest
import torch

from bench import cross_entropy as bench
from minipt.ops import BackendUnavailableError


def _case(device: str):
    if torch.device(device).type == "cuda":
        return bench.make_inputs(8192, 32768, device, torch.bfloat16)
    return bench.make_inputs(256, 1024, device, torch.float32)


def _step_or_skip(provider, device, logits, target):
    if provider == "triton" and torch.device(device).type != "cuda":
        pytest.skip("Triton is timed on CUDA only: on the CPU it runs in the interpreter")
    if provider == "torch-compile" and torch.device(device).type != "cuda":
        pytest.skip("torch.compile is timed on CUDA only: compiling takes tens of seconds on a small CPU")
    step = bench.make_step(provider, logits, target)
    try:
        step()
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider} cannot run on {device}: {exc}")
    return step


@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_cross_entropy_fwd_bwd(measure, bench_device, provider):
    logits, target = _case(bench_device)
    step = _step_or_skip(provider, bench_device, logits, target)
    grad = measure(step)
    assert grad.shape == logits.shape


@pytest.mark.parametrize("provider", [p for p in bench.PROVIDERS if p != bench.BASELINE])
def test_providers_agree_with_the_baseline(bench_device, provider):
    logits, target = _case(bench_device)
    step = _step_or_skip(provider, bench_device, logits, target)
    want = bench.make_step(bench.BASELINE, logits, target)()
    tol = 1e-2 if logits.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(step().float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
