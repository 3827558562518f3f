"""pytest-benchmark timings of the LM-head cross-entropy, a check that every provider computes the same, and
checks of the rows bench.linear_cross_entropy writes (one process per provider, peaks and ratios).

``pytest bench/test_linear_cross_entropy.py --benchmark-only [--bench-device cpu|cuda]``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import linear_cross_entropy as bench
from minipt.ops import BackendUnavailableError, linear_cross_entropy_ref


def _case(device: str):
    if torch.device(device).type == "cuda":
        return bench.make_inputs(*bench.GPU_QUICK_SIZES[0], device, torch.bfloat16)
    return bench.make_inputs(256, 64, 2048, device, torch.float32)


def _step_or_skip(provider, device, hidden, weight, target):
    try:
        step = bench.make_step(provider, hidden, weight, target)
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


def _capped_reference_step(hidden, weight, target):
    """The baseline of a capped row: the reference op on the materialised logits, with the same options."""
    return lambda: torch.autograd.grad(linear_cross_entropy_ref(hidden, weight, target, **bench.SOFTCAP),
                                       (hidden, weight))


@pytest.mark.parametrize("provider", [p for p in bench.PROVIDERS if p != bench.BASELINE])
def test_providers_agree_with_the_baseline(bench_device, provider):
    hidden, weight, target = _case(bench_device)
    step = _step_or_skip(provider, bench_device, hidden, weight, target)
    tol = 2e-2 if hidden.dtype == torch.bfloat16 else 1e-5
    capped = provider.endswith(bench.CAPPED)
    baseline = _capped_reference_step(hidden, weight, target) if capped else bench.make_step(
        bench.BASELINE, hidden, weight, target)
    wanted = baseline()
    for got, want in zip(step(), wanted):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    if capped and hidden.dtype == torch.float32:  # the options are in effect: the plain gradients differ by
        # about 1e-3 here, which float32's tolerance sees and bf16's (2e-2) would not
        plain = bench.make_step(provider.removesuffix(bench.CAPPED), hidden, weight, target)()
        assert not any(torch.allclose(p, w, rtol=tol, atol=tol * w.abs().max().item()) for p, w in zip(plain, wanted))


def test_rows_time_each_provider_in_a_process_of_its_own(bench_device):
    """Peaks and medians come from each provider's own process, with ratios against both baselines."""
    if torch.device(bench_device).type == "cuda":
        pytest.skip("the row checks run at CPU sizes; on CUDA the benchmark itself is the check")
    N, V = 512, 8192  # unfused holds (N, V) float32 logits and more: 16 MiB each
    providers = (bench.BASELINE, bench.CHUNKED, "minipt-triton", "minipt-native")
    rows = bench.size_rows(N, 64, V, "cpu", rounds=2, rep=1, providers=providers)
    assert [r["provider"] for r in rows] == list(providers)
    unfused, chunked, triton, native = rows
    assert "interprets" in triton["skipped"] and "median_ms" not in triton
    timed = [r for r in (unfused, chunked, native) if "median_ms" in r]
    if "skipped" in chunked:  # a torch without the chunked op
        assert "not available in this torch" in chunked["skipped"] and len(timed) == 2
    for r in timed:
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["peak_mem_mb"] > 0, r
        assert r["ratio"] == unfused["median_ms"] / r["median_ms"]
        assert r["mem_ratio"] == r["peak_mem_mb"] / unfused["peak_mem_mb"]
    assert unfused["peak_mem_mb"] >= N * V * 4 / 2**20 and native["peak_mem_mb"] < unfused["peak_mem_mb"]
    if "median_ms" in chunked:
        assert native["ratio_vs_chunked"] == chunked["median_ms"] / native["median_ms"]
        assert native["mem_vs_chunked"] == native["peak_mem_mb"] / chunked["peak_mem_mb"]


def test_capped_rows_are_timed_against_their_plain_backend(bench_device):
    """The soft-capped row of a backend gets ratio_vs_plain, its plain row's median over its own, which reads
    off the target that capping costs at most 10%."""
    if torch.device(bench_device).type == "cuda":
        pytest.skip("the row checks run at CPU sizes; on CUDA the benchmark itself is the check")
    providers = ("minipt-native", f"minipt-native{bench.CAPPED}", f"minipt-triton{bench.CAPPED}")
    plain, capped, triton = bench.size_rows(256, 32, 2048, "cpu", rounds=2, rep=1, providers=providers)
    assert capped["ratio_vs_plain"] == plain["median_ms"] / capped["median_ms"] and "ratio_vs_plain" not in plain
    assert "interprets" in triton["skipped"] and "ratio_vs_plain" not in triton


def test_a_torch_without_the_chunked_op_gets_a_row_saying_so(monkeypatch):
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    assert "not available in this torch" in bench.unavailable(bench.CHUNKED, "cpu")
    with pytest.raises(BackendUnavailableError, match="not available in this torch"):
        bench.make_step(bench.CHUNKED, *_case("cpu"))
    (row,) = bench.size_rows(64, 8, 300, "cpu", rounds=1, rep=1, providers=(bench.CHUNKED,))
    assert "not available in this torch" in row["skipped"] and "median_ms" not in row


def test_cpu_peak_is_the_step_over_what_came_before():
    held = torch.ones(2**24)  # 64 MiB resident before the step: not part of its peak
    # A 64 MiB temporary: above glibc's largest mmap threshold (32 MiB), so fresh pages even in a process
    # that has freed memory before, which a smaller one could reuse unseen (hence one process a provider).
    peak = bench.cpu_peak_bytes(lambda: torch.ones(2**24).sum())
    if peak is None:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert 60 * 2**20 <= peak < 76 * 2**20 and held.numel()  # give or take pages freed meanwhile
