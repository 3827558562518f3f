"""pytest-benchmark timings of the LM-head cross-entropy, and a check that every provider computes the same.

``pytest bench/test_linear_cross_entropy.py --benchmark-only [--bench-device cpu|cuda]``.
"""

from __future__ import annotations

import pytest
import torch

from bench import linear_cross_entropy as bench
from minipt.ops import BackendUnavailableError


def _case(device: str):
    if torch.device(device).type == "cuda":
        return bench.make_inputs(*bench.GPU_QUICK_SIZES[0], device, torch.bfloat16)
    return bench.make_inputs(256, 64, 2048, device, torch.float32)


def _step_or_skip(provider, device, hidden, weight, target):
    if provider == "triton" and torch.device(device).type != "cuda":
        pytest.skip("Triton is timed on CUDA only: on the CPU it runs in the interpreter")
    step = bench.make_step(provider, hidden, weight, target)
    try:
        step()
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider} cannot run on {device}: {exc}")
    return step


@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_linear_cross_entropy_fwd_bwd(measure, bench_device, provider):
    hidden, weight, target = _case(bench_device)
    step = _step_or_skip(provider, bench_device, hidden, weight, target)
    grad_hidden, grad_weight = measure(step)
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape


@pytest.mark.parametrize("provider", [p for p in bench.PROVIDERS if p != bench.BASELINE])
def test_providers_agree_with_the_baseline(bench_device, provider):
    hidden, weight, target = _case(bench_device)
    step = _step_or_skip(provider, bench_device, hidden, weight, target)
    tol = 2e-2 if hidden.dtype == torch.bfloat16 else 1e-5
    for got, want in zip(step(), bench.make_step(bench.BASELINE, hidden, weight, target)()):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
