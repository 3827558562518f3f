"""The quick-start benchmark runs the trainer as the README gives it, in a fresh process, and reads its run back."""

from __future__ import annotations

import math

import pytest

from bench import quickstart

LINES = ["Now is the winter of our discontent made glorious summer by this sun of York.",
         "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried."]


def test_quick_rows_run_both_commands_in_fresh_processes(bench_device, monkeypatch, tmp_path):
    if bench_device != "cpu":
        pytest.skip("the quick start is timed on the CPU")
    # the README's commands on a small corpus and model: the bundled plays take minutes to tokenize
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(LINES * 60))
    small = [f"--data={corpus}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--vocab_size=300",
             "--eval_iters=2", "--batch_size=4"]
    monkeypatch.setattr(quickstart, "COMMANDS", {name: args + small for name, args in quickstart.COMMANDS.items()})
    rows = quickstart.run("cpu", quick=True)
    assert [r["name"] for r in rows] == ["gpt", "bert"]
    for r in rows:
        assert "error" not in r, r
        assert r["command"].startswith("python -m minipt.train") and "--max_iters=20" in r["command"]
        assert r["steps"] == 20 and math.isfinite(r["val_loss"]) and r["first_run_s"] > 0
        assert r["tokens_per_s"] > 0 and r["backends"] == "native"  # what auto picks on a CPU
        assert r["printed_lines"] > 5  # the defaults print: backends, sizes, progress, evaluations, the demo


def test_a_failing_run_is_an_error_row(tmp_path):
    row = quickstart.run_trainer(["--model=gpt5"], tmp_path, "bad")
    assert row["error"].startswith("exit 2") and "gpt5" in row["error"], row
