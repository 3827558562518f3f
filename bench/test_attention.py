"""pytest-benchmark timings of attention forward + backward, and checks of what bench.attention measures.

``pytest bench/test_attention.py --benchmark-only [--bench-device cpu|cuda]``. On
the CPU the torch providers and the native backend's C++ kernels run (fp32,
small); Triton is timed on CUDA alone.
"""

from __future__ import annotations

import pytest
import torch

from bench import attention as bench
from minipt.ops._backend import BackendUnavailableError
from minipt.ops import attention_ref

PROVIDERS = ("minipt-torch", "sdpa", "naive", "minipt-triton", "minipt-native")


def _case(device: str):
    """(q, k, v, key_mask): a padded batch, small on the CPU."""
    if torch.device(device).type == "cuda":
        B, H, T, D, dtype = 8, 16, 1024, 64, torch.bfloat16
    else:
        B, H, T, D, dtype = 2, 4, 128, 64, torch.float32
    lengths = bench.bert_lengths(B, T, T // 8, device)
    return (*bench.make_qkv(B, H, T, D, device, dtype), torch.arange(T, device=device)[None, :] < lengths[:, None])


def _step_or_skip(provider, device, q, k, v, key_mask, is_causal):
    if provider == "minipt-triton" and torch.device(device).type != "cuda":
        pytest.skip("minipt-triton is timed on CUDA only: on the CPU Triton would run in the interpreter")
    step = bench.make_step(bench.make_fn(provider, is_causal, key_mask), q, k, v, "fwd+bwd")
    try:
        step()
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider} cannot run on {device}: {exc}")
    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["padded", "causal"])
def test_attention_fwd_bwd(measure, bench_device, provider, is_causal):
    q, k, v, key_mask = _case(bench_device)
    key_mask = None if is_causal else key_mask
    step = _step_or_skip(provider, bench_device, q, k, v, key_mask, is_causal)
    dq, dk, dv = measure(step)
    assert dq.shape == dk.shape == dv.shape == q.shape


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_computes_attention(bench_device, provider):
    """What is timed is attention: each provider's output and gradients match the reference."""
    q, k, v, key_mask = _case(bench_device)
    _step_or_skip(provider, bench_device, q, k, v, key_mask, False)
    fn = bench.make_fn(provider, False, key_mask)
    grad_out = torch.randn_like(q)
    out = fn(q, k, v)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = attention_ref(*ref, attention_mask=key_mask)
    wanted = [want, *torch.autograd.grad(want, ref, grad_out.float())]
    # A sanity check of the benchmark's wiring; the kernels' precision is tested in tests/.
    rel = 3e-2 if q.dtype == torch.bfloat16 else 1e-4
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, wanted):
        err = (g.float() - w).abs().max().item()
        assert err <= rel * w.abs().max().item(), f"{provider} {name}: max error {err:.3g}"


def test_flop_counts():
    assert bench.forward_flops(2, 3, 128, 64, False) == 4 * 2 * 3 * 128 * 128 * 64
    assert bench.forward_flops(2, 3, 128, 64, True) == 2 * 2 * 3 * 128 * 128 * 64


def test_padded_rows_report_every_provider(bench_device):
    if torch.device(bench_device).type == "cuda":
        pytest.skip("the row checks run at the CPU sizes; on CUDA the benchmark itself is the check")
    rows = bench.padded_rows("cpu", quick=True)
    providers = bench.PROVIDERS + bench.PEERS
    assert [r["mode"] for r in rows] == ["fwd"] * len(providers) + ["fwd+bwd"] * len(providers)
    for r in rows:
        assert ("median_ms" in r) != ("skipped" in r) and "error" not in r, r
        if "median_ms" in r:
            assert r["tflops"] > 0 and r["ratio"] > 0
    baseline = [r for r in rows if r["provider"] == bench.PADDED_BASELINE]
    assert all(r["ratio"] == 1.0 for r in baseline)
    assert any("interprets" in r.get("skipped", "") for r in rows if r["provider"] == "minipt-triton")
    assert all("timed on CUDA" in r["skipped"] for r in rows if r["provider"] in bench.PEERS)


def test_packed_rows_are_packed_as_described():
    ids, key_mask, lengths = bench.packed_rows_ids(2, 8192, 256, 2048, False, "cpu")
    assert key_mask is None and (ids.diff(dim=1) >= 0).all() and sum(lengths) == ids.numel()
    assert all(n <= 2048 for n in lengths) and sorted(lengths)[2] >= 256  # only each row's last document is cut
    ids, key_mask, lengths = bench.packed_rows_ids(8, 512, 32, 256, True, "cpu")
    assert (ids.diff(dim=1) >= 0).all() and all(64 <= n <= 512 for n in lengths)
    counts = [torch.unique_consecutive(row[real], return_counts=True)[1] for row, real in zip(ids, key_mask)]
    assert torch.cat(counts).tolist() == lengths


def test_packed_tile_counts_follow_the_documents():
    gpt, bert = bench.packed_rows("cpu", quick=True)  # on the CPU: the exact tile counts alone
    assert gpt["fwd_tiles"] < gpt["fwd_tiles_without_documents"] < gpt["dense_tiles"]
    assert bert["fwd_tiles"] < bert["fwd_tiles_without_documents"] <= bert["dense_tiles"]
    # Whole documents plus the blocks their edges cut: never below Σ lenᵢ² (halved when causal).
    assert gpt["fwd_fraction"] >= gpt["sum_len2_fraction"] / 2 and bert["fwd_fraction"] >= bert["sum_len2_fraction"]


def test_cpu_native_rows_pair_native_with_sdpa(monkeypatch):
    """The CPU cases at toy sizes: each row pairs the C++ kernels with SDPA, in both modes, with a ratio."""
    monkeypatch.setattr(bench, "CPU_NATIVE", {"cpu-causal": (1, 2, 70, 16), "cpu-packed": (1, 2, 96, 16),
                                              "cpu-bert-padded": (2, 2, 80, 16), "cpu-window": (2, 2, 90, 16)})
    monkeypatch.setattr(bench, "CPU_BERT_MIN_LEN", 8)
    monkeypatch.setattr(bench, "CPU_PEER_CASES", ())  # FlexAttention's rows: test_cpu_cases_time_flex_forward
    monkeypatch.setattr(bench, "CPU_WINDOW", 20)
    rows = bench.cpu_native_rows(quick=True)
    assert [(r["name"], r["provider"]) for r in rows] == [
        (f"{name} {mode}", p) for name in bench.CPU_NATIVE for mode in bench.MODES for p in ("sdpa", "minipt-native")]
    for r in rows:
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["ratio"] > 0, r
    assert all(r["ratio"] == 1.0 for r in rows if r["provider"] == "sdpa")
    assert {r["documents"] for r in rows if r["name"].startswith("cpu-packed")} == {bench.CPU_DOCUMENTS}
    assert {r["window"] for r in rows if r["name"].startswith("cpu-window")} == {20}


def test_rows_cut_into_documents():
    ids, lengths = bench.cut_into_documents(3, 4096, 8)
    assert ids.shape == (3, 4096) and (ids.diff(dim=1) >= 0).all() and sum(lengths) == ids.numel()
    assert all(torch.unique_consecutive(row).tolist() == list(range(8)) for row in ids) and min(lengths) >= 1


@pytest.mark.parametrize("name", ["cpu-packed", "cpu-bert-padded", "cpu-window"])
def test_cpu_cases_give_sdpa_the_same_masks(name):
    """SDPA's boolean masks and the native kernels' arguments describe the same attention."""
    masks, _, _ = bench.cpu_case(name, 2, 2, 200, 16)
    q, k, v = bench.make_qkv(2, 2, 200, 16, "cpu", torch.float32)
    got = bench.make_fn("minipt-native", **masks)(q, k, v)
    torch.testing.assert_close(got, bench.make_fn("sdpa", **masks)(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider, is_causal", [("sdpa", True), ("sdpa", False), ("minipt-torch", True)])
def test_packed_providers_compute_attention(provider, is_causal):
    ids, key_mask, _ = bench.packed_rows_ids(2, 96, 8, 24, not is_causal, "cpu")
    q, k, v = bench.make_qkv(2, 2, 96, 16, "cpu", torch.float32)
    got = bench.make_fn(provider, is_causal, key_mask, ids)(q, k, v)
    want = attention_ref(q, k, v, is_causal=is_causal, attention_mask=key_mask, document_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider", ["sdpa", "minipt-torch", "minipt-native"])
def test_window_providers_compute_attention(provider):
    q, k, v = bench.make_qkv(2, 2, 96, 16, "cpu", torch.float32)
    got = bench.make_fn(provider, True, None, window_size=(10, 0))(q, k, v)
    want = attention_ref(q, k, v, is_causal=True, window_size=(10, 0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_window_case_counts_its_tiles_and_pairs():
    """On the CPU the window case reports its exact tiles alone: about the share of causal pairs it keeps."""
    (row,) = bench.window_rows("cpu", quick=True)
    assert bench.window_pairs(10, 3) == sum(min(i + 1, 3) for i in range(10))
    assert row["pairs_fraction"] < row["fwd_fraction"] < 0.27 and row["dkdv_fraction"] < 0.27


def test_quick_cpu_cases_leave_compiled_flex_out(monkeypatch):
    monkeypatch.setattr(bench, "CPU_NATIVE", {"cpu-causal": (1, 2, 70, 16)})
    rows = bench.cpu_native_rows(quick=True)
    assert [r["provider"] for r in rows] == ["sdpa", "minipt-native", "flex"] * 2
    assert all("--quick" in r["skipped"] for r in rows if r["provider"] == "flex")


def test_cpu_cases_time_flex_forward(monkeypatch):
    """FlexAttention joins a CPU case beside SDPA and the C++ kernels in the forward; its fwd+bwd row says
    why it cannot run (run eagerly here: compiling it takes a minute)."""
    monkeypatch.setattr(bench, "CPU_NATIVE", {"cpu-packed": (1, 2, 96, 16)})
    monkeypatch.setattr(bench, "FLEX_COMPILED", False)
    rows = bench.cpu_native_rows(quick=False)
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (mode, p) for mode in bench.MODES for p in ("sdpa", "minipt-native", "flex")]
    fwd, bwd = rows[:3], rows[3:]
    assert all(r["median_ms"] > 0 and r["ratio_vs_flex"] > 0 for r in fwd)
    assert fwd[2]["ratio_vs_flex"] == 1.0 and fwd[1]["ratio_vs_flex"] == fwd[2]["median_ms"] / fwd[1]["median_ms"]
    assert "backward" in bwd[2]["skipped"] and all("ratio_vs_flex" not in r for r in bwd)


@pytest.mark.parametrize("name", ["cpu-causal", "cpu-packed", "cpu-bert-padded"])
def test_flex_is_given_the_cases_masks(name, monkeypatch):
    """FlexAttention's BlockMask describes the same attention as minipt's arguments (eager, forward)."""
    monkeypatch.setattr(bench, "FLEX_COMPILED", False)
    masks, _, _ = bench.cpu_case(name, 2, 2, 200, 16)
    q, k, v = bench.make_qkv(2, 2, 200, 16, "cpu", torch.float32)
    with torch.no_grad():
        got = bench.make_fn("flex", **masks)(q, k, v)
    want = attention_ref(q, k, v, is_causal=masks["is_causal"], attention_mask=masks["key_mask"],
                         document_ids=masks.get("document_ids"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_varlen_sequences_are_the_documents_real_tokens():
    ids, key_mask, lengths = bench.packed_rows_ids(3, 128, 8, 24, True, "cpu")
    tokens, cu_seq, max_len = bench.varlen_sequences(key_mask, ids)
    assert tokens.tolist() == key_mask.reshape(-1).nonzero().squeeze(1).tolist()
    assert cu_seq.dtype == torch.int32 and cu_seq.diff().tolist() == lengths and max_len == max(lengths)
    lengths = torch.tensor([5, 9, 2])
    padded = torch.arange(9)[None, :] < lengths[:, None]
    tokens, cu_seq, max_len = bench.varlen_sequences(padded, None)
    assert cu_seq.tolist() == [0, 5, 14, 16] and max_len == 9 and tokens.tolist()[5:7] == [9, 10]


def test_varlen_is_reported_unavailable_on_the_cpu():
    ids, key_mask, _ = bench.packed_rows_ids(2, 96, 8, 24, True, "cpu")
    with pytest.raises(BackendUnavailableError, match="varlen_attn"):
        bench.make_fn("varlen", False, key_mask, ids)
