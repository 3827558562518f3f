"""The optimizer benchmark: its training-time curve and equal-time interpolation, and a tiny run
of the benchmark itself, both optimizers, to its table."""

from __future__ import annotations

import math

import pytest

from bench import optimizers


def test_training_time_sums_the_log_windows_and_skips_evaluations():
    rows = [
        {"iter": 0, "val_loss": 9.0},
        {"iter": 10, "train_loss": 8.0, "tokens_per_s": 1000.0},  # 10 steps of 100 tokens: 1 s
        {"iter": 20, "train_loss": 7.0, "tokens_per_s": 500.0},  # 2 s
        {"iter": 20, "val_loss": 6.0},
        {"iter": 25, "train_loss": 6.5, "tokens_per_s": 250.0},  # a window cut short by a stop: 5 steps, 2 s
        {"iter": 25, "val_loss": 5.0},
    ]
    curve = optimizers.train_curve(rows, tokens_per_step=100)
    assert curve == [(0.0, 9.0), (3.0, 6.0), (5.0, 5.0)]
    assert optimizers.loss_at(curve, 1.5) == pytest.approx(7.5)
    assert optimizers.loss_at(curve, 5.0) == 5.0 and optimizers.loss_at(curve, 9.0) == 5.0


def test_the_quick_run_compares_every_variant_at_equal_steps_and_time(bench_device, monkeypatch):
    if bench_device != "cpu":
        pytest.skip("the recipes are compared on the CPU")
    # the bundled plays at character level and a tiny model: all the table needs to be built
    tiny = {"tokenizer": "char", "n_layer": 1, "n_embd": 32, "block_size": 32, "batch_size": 4}
    monkeypatch.setattr(optimizers, "RECIPES", {"tiny": tiny})
    monkeypatch.setattr(optimizers, "QUICK", {
        "max_iters": 6, "eval_interval": 3, "eval_iters": 2, "log_interval": 3, "warmup_iters": 2})
    rows = optimizers.run("cpu", quick=True)
    variants = list(optimizers.VARIANTS)
    assert variants[0] == "adamw" and {"muon", "softcap", "z_loss"} <= set(variants)
    assert [(r["provider"], r["seed"]) for r in rows] == [(v, 1337) for v in variants] + [(v, "mean") for v in variants]
    runs = {r["provider"]: r for r in rows[:len(variants)]}
    assert runs["adamw"]["learning_rates"] == "adamw 0.001" and runs["muon"]["learning_rates"].startswith("adamw 0.001, muon ")
    budget = min(r["train_s"] for r in runs.values())
    for r in runs.values():
        assert r["name"] == "tiny" and r["max_iters"] == 6
        assert 0 < r["val_loss"] < math.log(128)  # below a uniform guess over the 128 logits
        assert 0 < r["train_s"] < r["run_s"] and r["median_ms"] > 0 and r["time_budget_s"] == budget
    fastest = min(runs.values(), key=lambda r: r["train_s"])
    assert fastest["val_loss_at_time"] == fastest["val_loss"]
    # the variants differ by their flag only: the same seed draws the same start, so the losses differ by training
    assert len({r["val_loss"] for r in runs.values()}) == len(variants)
    means = {r["provider"]: r for r in rows[len(variants):]}
    for v in variants:
        assert means[v]["val_loss"] == runs[v]["val_loss"] and means[v]["max_iters"] == 6
        assert means[v]["val_loss_vs_adamw"] == pytest.approx(runs[v]["val_loss"] - runs["adamw"]["val_loss"])
    assert means["adamw"]["val_loss_vs_adamw"] == 0.0
    assert optimizers.run("cuda", quick=True)[0]["skipped"].startswith("measured on the CPU")


def test_the_report_sums_each_option_up_and_judges_it_by_every_seed():
    from bench.report import recipes_summary

    def run(provider, seed, at_time, steps=None):
        return {"name": "r", "provider": provider, "seed": seed, "val_loss": at_time if steps is None else steps,
                "val_loss_at_time": at_time}

    rows = [run("adamw", 1, 5.0), run("muon", 1, 4.8), run("softcap", 1, 5.1), run("z_loss", 1, 4.9),
            run("adamw", 2, 5.2), run("muon", 2, 5.0), run("softcap", 2, 5.3), run("z_loss", 2, 5.3)]
    for v, d_steps, d_time in (("muon", -0.2, -0.2), ("softcap", 0.1, 0.1), ("z_loss", 0.0, 0.0)):
        rows.append({"name": "r", "provider": v, "seed": "mean", "val_loss_vs_adamw": d_steps,
                     "val_loss_at_time_vs_adamw": d_time})
    lines = recipes_summary([("optimizers_r", {}, rows), ("attention", {}, [{"provider": "x", "seed": "mean"}])])
    table = [line for line in lines if line.startswith("| r |")]
    assert table == ["| r | muon | -0.200 | -0.200 | 2 | helps |", "| r | softcap | +0.100 | +0.100 | 2 | hurts |",
                     "| r | z_loss | +0.000 | +0.000 | 2 | no consistent effect |"]
    assert recipes_summary([("attention", {}, rows)]) == []
