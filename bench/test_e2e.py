"""The end-to-end training-step benchmark: pytest-benchmark timings, and checks of what it measures.

``pytest bench/test_e2e.py --benchmark-only`` times one training step per model and
provider (tiny models on the CPU, the benchmark's real sizes on CUDA). Without
``--benchmark-only`` the checks run too: the batches are what they claim to be,
the FLOP count is the model's, every provider is reported with consistent
figures, a failure becomes a row instead of an exception, and ``python -m bench``
reports a missing or broken module and exits non-zero.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types

import pytest
import torch

import bench.__main__ as bench_main
from bench import e2e, report
from bench.e2e import BASELINE, CLS_ID, FIRST_WORD_ID, MASK_ID, PROVIDERS, SEP_ID, Case
from minipt.ops import BackendUnavailableError, IGNORE_INDEX
from minipt.models import BERT, BertConfig, GPTConfig

TINY_CASES = (
    Case("gpt-tiny", "gpt", "gpt-tiny", seq_len=32, batch=8),
    Case("bert-tiny-T64", "bert", "bert-tiny", seq_len=64, batch=8),
    Case("bert-tiny-T128", "bert", "bert-tiny", seq_len=128, batch=4),
)


# ----------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_index", [0, 1, 2], ids=["gpt", "bert-short", "bert-long"])
def test_training_step(benchmark, measure, bench_device, case_index, provider):
    on_cuda = torch.device(bench_device).type == "cuda"
    if provider == "torch-compile" and not on_cuda:
        pytest.skip("torch.compile is timed on CUDA only: compiling takes ~20 s a model on two CPU cores")
    case = (e2e.GPU_CASES if on_cuda else TINY_CASES)[case_index]
    batch = e2e.make_batch(case, e2e.minipt_config(case, "torch"), bench_device)
    step = e2e.TrainingStep(case, provider, bench_device, batch)
    try:
        step()  # warm-up, and compilation for torch-compile
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider} has no kernel for this step on {bench_device}: {exc}")
    loss = measure(step, rounds=5 if on_cuda else None)
    assert math.isfinite(loss.item())
    benchmark.extra_info.update(batch=case.batch, seq_len=case.seq_len, backend=e2e.backend_for(provider, bench_device))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = case.batch * case.seq_len / benchmark.stats.stats.median


# ----------------------------------------------------------------------------- batches and FLOPs
def _bert_batch(seed=0, batch=64, seq_len=32):
    case = Case("bert", "bert", "bert-tiny", seq_len=seq_len, batch=batch)
    return e2e.make_batch(case, BertConfig.preset("bert-tiny"), "cpu", seed=seed)


def test_bert_batch_is_padded_sentence_pairs():
    b = _bert_batch()
    ids, types_, real, labels = b["input_ids"], b["token_type_ids"], b["attention_mask"].bool(), b["labels"]
    lengths = real.sum(1)
    assert lengths.min() >= 32 // 4 and lengths.max() <= 32
    assert (real == (torch.arange(32)[None] < lengths[:, None])).all(), "padding must follow the real tokens"
    assert lengths.unique().numel() > 5, "lengths must spread over [T/4, T]"
    assert (ids[~real] == 0).all() and (types_[~real] == 0).all() and (labels[~real] == IGNORE_INDEX).all()
    # [CLS] first; [SEP] closes A and B, where the masking never reaches.
    assert (ids[:, 0] == CLS_ID).all() and (labels[:, 0] == IGNORE_INDEX).all()
    rows = torch.arange(ids.shape[0])
    assert (ids[rows, lengths - 1] == SEP_ID).all()
    assert ((ids == SEP_ID) & real).sum(1).eq(2).all()
    for i in range(ids.shape[0]):
        sep_a = int((ids[i] == SEP_ID).nonzero()[0])
        assert 2 <= sep_a <= int(lengths[i]) - 3, "both segments hold at least one token"
        assert (types_[i, : sep_a + 1] == 0).all() and (types_[i, sep_a + 1 : int(lengths[i])] == 1).all()
    picked = labels != IGNORE_INDEX
    assert (labels[picked] >= FIRST_WORD_ID).all(), "only sentence tokens are selected"
    fraction = picked.sum() / (real.sum() - 3 * ids.shape[0])
    assert 0.10 < fraction < 0.20, f"about 15% of the sentence tokens are selected, got {fraction:.3f}"
    assert (ids[picked] == MASK_ID).float().mean() > 0.6
    assert set(b["next_sentence_label"].tolist()) == {0, 1}


def test_batches_are_reproducible_and_seeded():
    a, b, c = _bert_batch(seed=0), _bert_batch(seed=0), _bert_batch(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_gpt_batch_targets_are_the_next_tokens():
    case = Case("gpt", "gpt", "gpt-tiny", seq_len=32, batch=4)
    b = e2e.make_batch(case, GPTConfig.preset("gpt-tiny"), "cpu")
    assert b["input_ids"].shape == b["labels"].shape == (4, 32)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


def test_flops_per_token_is_the_models_at_the_length_run():
    gpt = e2e.Case("gpt2", "gpt", "gpt2", seq_len=256, batch=1)
    n = 123_689_472  # GPT-2 124M at vocabulary 50304 without its position embeddings, as nanoGPT counts it
    assert e2e.train_flops_per_token(gpt, GPTConfig.preset("gpt2"), 1.0) == 6 * n + 12 * 12 * 768 * 256
    bert = e2e.Case("bert-tiny", "bert", "bert-tiny", seq_len=128, batch=1)
    cfg = BertConfig.preset("bert-tiny")
    model = BERT(cfg)
    assert e2e.train_flops_per_token(bert, cfg, 1.0) == model.flops_per_token(128)
    # At a 15% masking rate only 15% of the decoder's 6·V·C FLOPs per token are spent.
    decoder = 6 * cfg.vocab_size * cfg.n_embd
    assert e2e.train_flops_per_token(bert, cfg, 0.15) == pytest.approx(model.flops_per_token(128) - 0.85 * decoder)


# ----------------------------------------------------------------------------- the rows
@pytest.fixture
def tiny_run(monkeypatch):
    """``e2e.run`` on the CPU at the tiny sizes, with one warm-up and two timed steps."""
    monkeypatch.setattr(e2e, "CPU_CASES", TINY_CASES[:2])
    monkeypatch.setattr(e2e, "_steps", lambda device, quick: (1, 2))
    return lambda quick=True: e2e.run("cpu", quick=quick)


def test_run_reports_every_provider_with_consistent_figures(tiny_run):
    rows = tiny_run()
    peak = rows[0]
    assert peak["name"] == "matmul_peak" and peak["tflops"] > 0
    assert [(r["name"], r["provider"]) for r in rows[1:]] == [(c.name, p) for c in TINY_CASES[:2] for p in PROVIDERS]
    for case in TINY_CASES[:2]:
        group = {r["provider"]: r for r in rows if r["name"] == case.name}
        # On a CPU minipt runs what auto picks there, the C++ kernels, attention included.
        assert group["minipt"]["backend"] == "native" and group["minipt"]["median_ms"] > 0, group["minipt"]
        assert "compil" in group["torch-compile"]["skipped"]
        assert group[BASELINE]["ratio"] == 1.0 and group["hf"]["ratio_vs_hf"] == 1.0
        vocab = e2e.minipt_config(case, "torch").vocab_size
        for r in group.values():
            if "median_ms" not in r:
                assert r.get("skipped") or r.get("error"), r
                continue
            assert r["tokens_per_s"] == pytest.approx(case.batch * case.seq_len / (r["median_ms"] / 1e3))
            assert r["real_tokens_per_s"] <= r["tokens_per_s"]
            assert r["mfu"] == pytest.approx(r["tflops"] / peak["tflops"])
            assert r["ratio"] == pytest.approx(group[BASELINE]["median_ms"] / r["median_ms"])
            assert r["ratio_vs_hf"] == pytest.approx(group["hf"]["median_ms"] / r["median_ms"])
            # A freshly initialised model predicts about uniformly: the loss is near ln(V).
            assert abs(r["loss"] - math.log(vocab) - (0.7 if case.family == "bert" else 0)) < 1.0, r


class _FailingStep:
    """Runs like ``e2e.TrainingStep`` until its ``fail_at``-th call, which raises ``error``."""

    def __init__(self, step, error, fail_at):
        self.step, self.error, self.fail_at, self.calls = step, error, fail_at, 0

    def __call__(self):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error
        return self.step()


@pytest.mark.parametrize(
    "error, expected, fail_at",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "out of memory at batch", 1),  # in the warm-up
        (RuntimeError("boom"), "RuntimeError: boom", 2),  # in the timed steps
    ],
    ids=["oom-in-warmup", "error-in-timed-steps"],
)
def test_a_failing_provider_becomes_a_row(tiny_run, monkeypatch, error, expected, fail_at):
    real = e2e.TrainingStep

    def failing_for_hf(case, provider, device, batch):
        step = real(case, provider, device, batch)
        return _FailingStep(step, error, fail_at) if provider == "hf" else step

    monkeypatch.setattr(e2e, "TrainingStep", failing_for_hf)
    rows = tiny_run()
    hf_rows = [r for r in rows if r["provider"] == "hf"]
    assert len(hf_rows) == 2 and all(expected in r["error"] and "median_ms" not in r for r in hf_rows)
    torch_rows = [r for r in rows if r["provider"] == BASELINE and r["name"] != "matmul_peak"]
    assert all(r["ratio"] == 1.0 and "ratio_vs_hf" not in r for r in torch_rows)


def test_a_spent_time_budget_skips_the_compiled_runs_not_started(tiny_run, monkeypatch):
    monkeypatch.setenv(e2e.BUDGET_ENV, "0")
    rows = tiny_run(quick=False)
    assert len(rows) == 1 + 2 * len(PROVIDERS)
    for r in rows[1:]:
        if r["provider"] == "torch-compile":
            assert "budget" in r["skipped"] and "median_ms" not in r
        elif r["provider"] != "minipt":
            assert r["median_ms"] > 0, "the eager runs are cheap and always made"

# ----------------------------------------------------------------------------- python -m bench
def _fake_benchmark(monkeypatch, name, run):
    module = types.ModuleType(f"bench.{name}")
    module.__spec__ = importlib.machinery.ModuleSpec(f"bench.{name}", None)
    module.run = run
    monkeypatch.setitem(sys.modules, f"bench.{name}", module)


def test_main_reports_missing_and_broken_modules_and_exits_nonzero(monkeypatch, tmp_path):
    def good(device, quick):
        return [{"name": "op", "provider": p, "n": n, "median_ms": 1.0 + n, "gbps": 10.0 * n} for p in ("a", "b") for n in (1, 2)]

    def broken(device, quick):
        raise RuntimeError("kernel exploded")

    _fake_benchmark(monkeypatch, "fake_good", good)
    drawn = []
    sys.modules["bench.fake_good"].plot = lambda title, rows, path: drawn.append((title, len(rows), path.name))
    _fake_benchmark(monkeypatch, "fake_broken", broken)
    monkeypatch.setattr(bench_main, "MODULES", ("fake_missing", "fake_broken", "fake_good"))
    assert bench_main.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1

    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    status = {m["module"]: m for m in summary["modules"]}
    assert status["fake_missing"]["status"] == "missing"
    assert status["fake_broken"]["status"] == "failed" and "kernel exploded" in status["fake_broken"]["detail"]
    assert status["fake_good"]["status"] == "ok" and status["fake_good"]["rows"] == 4
    written = json.loads((tmp_path / "cpu" / "fake_good.json").read_text())
    assert written["rows"] == good("cpu", True) and written["machine"]["device"].startswith("CPU")
    assert drawn == [(f"fake_good on {written['machine']['device']}", 4, "fake_good.png")]
    _fake_benchmark(monkeypatch, "fake_good", good)  # without a plot of its own: the default bars

    assert bench_main.main(["--device", "cpu", "--only", "fake_good", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cpu" / "fake_good.png").stat().st_size > 0
    # A run of some modules updates theirs in the summary and keeps the others'.
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert [(m["module"], m["status"], m["quick"]) for m in summary["modules"]] == [
        ("fake_missing", "missing", True), ("fake_broken", "failed", True), ("fake_good", "ok", False)
    ]


def test_main_counts_error_rows_as_failures(monkeypatch, tmp_path):
    _fake_benchmark(monkeypatch, "fake_oom", lambda d, q: [{"name": "x", "provider": "a", "error": "out of memory"}])
    monkeypatch.setattr(bench_main, "MODULES", ("fake_oom",))
    assert bench_main.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "cpu" / "summary.json").read_text())["modules"][0]["status"] == "row errors"


@pytest.mark.parametrize(
    "argv, message",
    [(["--only", "nope"], "unknown benchmark"), (["--only", "e2e", "--skip", "e2e"], "no benchmark to run")]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
)
def test_main_refuses_bad_options(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench_main.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- BENCHMARKS.md
def _results(folder, name, device, rows):
    folder.mkdir(parents=True, exist_ok=True)
    machine = {"date": "2026-01-01", "torch": "2.11.0", "python": "3.12", "triton": "3.6.0", "device": device}
    (folder / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}))


def test_report_keeps_gpu_and_cpu_apart_and_says_when_the_gpu_run_is_owed(tmp_path):
    _results(tmp_path / "cpu", "e2e", "CPU: AMD EPYC, 2 threads", [{"name": "gpt", "provider": "torch", "median_ms": 7.25}])
    (tmp_path / "cpu" / "summary.json").write_text(json.dumps({"machine": {}, "modules": []}))
    text = report.render(tmp_path)
    gpu, cpu = text.split("## Rooflines")
    assert "still owed" in gpu and "bash bench/gpu_check.sh OUT_DIR WHEEL_DIR" in gpu and "7.25" not in gpu
    assert "AMD EPYC, 2 threads" in cpu and "| gpt | torch | 7.25 |" in cpu and "summary" not in cpu


def test_report_puts_gpu_rows_against_the_cards_limits(tmp_path):
    rows = [
        {"name": "ce", "provider": "triton", "N": 8, "median_ms": 1.0, "gbps": 1675.0},
        {"name": "lce", "provider": "triton", "N": 8, "median_ms": 1.0, "tflops": 494.5},
    ]
    _results(tmp_path / "nvidia-h100-80gb-hbm3", "cross_entropy", "NVIDIA H100 80GB HBM3", rows)
    text = report.render(tmp_path)
    gpu = text.split("## Rooflines")[0]
    assert "still owed" not in gpu and "of H100 SXM limit" in gpu
    assert "| ce | triton | 8 | 1 | - | 1,675 | 50.0% |" in gpu and "| lce | triton | 8 | 1 | 494 | - | 50.0% |" in gpu
    assert "Roofline: memory" in gpu


def test_report_check_fails_when_the_file_is_stale(tmp_path):
    _results(tmp_path / "cpu", "e2e", "CPU: x, 1 threads", [{"name": "gpt", "provider": "torch", "median_ms": 1.0}])
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(tmp_path), "--output", str(out), "--check"]) == 1
    assert report.main(["--results", str(tmp_path), "--output", str(out)]) == 0
    assert report.main(["--results", str(tmp_path), "--output", str(out), "--check"]) == 0
    _results(tmp_path / "cpu", "e2e", "CPU: x, 1 threads", [{"name": "gpt", "provider": "torch", "median_ms": 2.0}])
    assert report.main(["--results", str(tmp_path), "--output", str(out), "--check"]) == 1

