"""The CPU training benchmark: pytest-benchmark timings of one training step, checks
that the nanoGPT-recipe baseline is the model and schedule it claims to be, and a
20-step run of the benchmark itself, both loops, to its table.

``pytest bench/test_train_cpu.py --benchmark-only`` times one optimizer step of
minipt's trainer (data sampling included) and of the recipe baseline, at tiny sizes
on the CPU with the torch backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import train_cpu
from minipt import runtime
from minipt.config import TrainConfig
from minipt.models import GPT, GPTConfig
from minipt import pretraining as P

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4)


@pytest.fixture
def cpu_only(bench_device):
    if bench_device != "cpu":
        pytest.skip("the CPU recipe is timed on the CPU; GPU training steps are in bench/test_e2e.py")


def test_minipt_trainer_step(benchmark, measure, cpu_only, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40)
    cfg = TrainConfig(data=str(corpus), tokenizer="char", split="stream", cache_dir=str(tmp_path / "cache"),
                      out_dir=str(tmp_path / "run"), backend="torch", bias=False, eval_iters=1, **TINY)
    run = P.Run(cfg, runtime.setup("cpu", "float32"), log=lambda *a: None)
    loss, z_term = measure(run.step)  # the step's cross-entropy, and its z term (None without --z_loss)
    assert math.isfinite(loss.item()) and z_term is None


def test_recipe_baseline_step(benchmark, measure, cpu_only):
    model = train_cpu.RecipeGPT(65, TINY["block_size"], TINY["n_layer"], TINY["n_head"], TINY["n_embd"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (TINY["batch_size"], TINY["block_size"]))

    def step():
        loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    assert math.isfinite(measure(step).item())


def test_seconds_to_loss_interpolates_between_evaluations():
    evals = [(1.0, 4.0), (3.0, 3.0), (5.0, 2.0), (7.0, 1.5)]
    assert train_cpu.seconds_to_loss(evals, 4.5) == 1.0
    assert train_cpu.seconds_to_loss(evals, 2.5) == 4.0
    assert train_cpu.seconds_to_loss(evals, 1.5) == 7.0
    with pytest.raises(ValueError, match="never reached"):
        train_cpu.seconds_to_loss(evals, 1.0)


def test_recipe_model_is_nanogpts_size_and_minipts_shape():
    s = train_cpu.RECIPE
    recipe = train_cpu.RecipeGPT(65, s["block_size"], s["n_layer"], s["n_head"], s["n_embd"])
    n = sum(p.numel() for p in recipe.parameters()) - recipe.wpe.weight.numel()
    assert f"{n / 1e6:.2f}M" == "0.80M"  # what nanoGPT prints for shakespeare_char on the CPU
    ours = GPT(GPTConfig(vocab_size=65, block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                         n_embd=s["n_embd"], bias=False))
    assert sorted(p.numel() for p in ours.parameters()) == sorted(p.numel() for p in recipe.parameters())


def test_recipe_schedule_is_minipts_schedule():
    s = train_cpu.RECIPE
    cfg = TrainConfig(**{k: s[k] for k in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "max_iters")})
    ours = np.array([P.schedule(cfg).lr(it) for it in range(s["max_iters"] + 1)])
    recipe = np.array([train_cpu.recipe_lr(it, s) for it in range(s["max_iters"] + 1)])
    np.testing.assert_allclose(ours, recipe, rtol=1e-12)


def test_the_quick_run_compares_both_loops_on_the_same_tokens(cpu_only, monkeypatch):
    # the quick schedule, with fewer evaluations, is all the table needs to be built
    monkeypatch.setattr(train_cpu, "QUICK", {**train_cpu.QUICK, "max_iters": 20, "lr_decay_iters": 20,
                                             "eval_interval": 10, "eval_iters": 2})
    rows = train_cpu.run("cpu", quick=True)
    recipe, native, torch_ops, muon, published = rows
    assert [r["provider"] for r in rows] == [
        "nanogpt-recipe", "minipt-native", "minipt-torch", "minipt-native-muon", "nanogpt (published, not rerun)"]
    assert recipe["ratio"] == recipe["run_ratio"] == recipe["to_loss_ratio"] == 1.0
    target = max(r["val_loss"] for r in rows[:4])
    for ours in (native, torch_ops, muon):
        assert ours["ratio"] == pytest.approx(recipe["median_ms"] / ours["median_ms"])
        assert ours["run_ratio"] == pytest.approx(recipe["run_s"] / ours["run_s"])
        assert ours["to_loss_ratio"] == pytest.approx(recipe["to_loss_s"] / ours["to_loss_s"])
        assert ours["prep_s"] > 0
    for r in (recipe, native, torch_ops, muon):
        assert r["max_iters"] == 20 and r["n_layer"] == train_cpu.RECIPE["n_layer"]
        # the plays have 78 characters: after 20 steps every loop is below ln 65, nanoGPT's uniform guess
        assert 0 < r["val_loss"] < math.log(65)
        assert r["median_ms"] > 0 and r["run_s"] > 0
        # every run reaches the highest last loss, within its own run
        assert r["target_val_loss"] == target and 0 < r["to_loss_s"] <= r["run_s"]
    assert [r["optimizer"] for r in rows[:4]] == ["adamw", "adamw", "adamw", "muon"]
    assert published == {**published, **train_cpu.ANCHOR}
    assert train_cpu.run("cuda", quick=True)[0]["skipped"].startswith("nanoGPT's CPU recipe runs on the CPU")
