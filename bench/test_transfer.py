"""The transfer experiment end to end on a tiny BERT: its rows, its summary and its errors.

Runs under ``pytest bench/ --benchmark-disable`` (there is nothing to time): a
one-layer BERT pretrained for two steps on a few lines, fine-tuned on the genre
task for one epoch from it and from random weights, for two seeds.
"""

from __future__ import annotations

import statistics

import pytest

from bench import transfer
from minipt import train as T


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"Part {i}. The king is dead; long live the king. Good morrow, my lord.\n\n"
                              for i in range(60)))
    out = tmp / "bert"
    assert T.main([f"--data={corpus}", f"--out_dir={out}", f"--cache_dir={tmp / 'cache'}", "--model=bert",
                   "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=2",
                   "--eval_interval=2", "--eval_iters=1", "--vocab_size=200", "--progress=false",
                   "--sample_tokens=0"]) == 0
    return out


def test_rows_per_run_then_the_means_then_the_margin(tiny_bert, tmp_path):
    rows = transfer.run(tiny_bert, [1, 2], "cpu", {"epochs": 1, "batch_size": 64, "max_length": 32}, tmp_path)
    runs, means, margin = rows[:4], rows[4:6], rows[6]
    assert [(r["start"], r["seed"]) for r in runs] == [("pretrained", 1), ("scratch", 1), ("pretrained", 2),
                                                       ("scratch", 2)]
    for r in runs:
        assert 0 <= r["test_accuracy"] <= 1 and r["majority_rate"] == runs[0]["majority_rate"] > 1 / 3
        assert r["pretrained_run"].startswith("bert: 2 steps")
    for mean, start in zip(means, transfer.STARTS):
        accuracy = [r["test_accuracy"] for r in runs if r["start"] == start]
        assert mean["start"] == start and mean["test_accuracy"] == pytest.approx(statistics.mean(accuracy))
        assert mean["accuracy_sd"] == pytest.approx(statistics.stdev(accuracy))
        assert (mean["accuracy_min"], mean["accuracy_max"]) == (min(accuracy), max(accuracy))
    assert margin["margin_points"] == pytest.approx(100 * (means[0]["test_accuracy"] - means[1]["test_accuracy"]))
    assert "epochs=1" in margin["note"]


def test_bad_arguments_are_named(tiny_bert, tmp_path, capsys):
    gpt_like = tmp_path / "gpt"
    gpt_like.mkdir()
    (gpt_like / "config.json").write_text('{"model_type": "gpt", "train": {}, "model": {}}')
    for argv, pattern in [
        ([f"--pretrained={tiny_bert}", "--seeds=1,x"], "--seeds: expected comma-separated integers"),
        ([f"--pretrained={tiny_bert}", "--set", "epochz=2"], "--set: unknown setting 'epochz'; did you mean --epochs"),
        ([f"--pretrained={gpt_like}"], "expected a minipt BERT run, got gpt"),
        ([f"--pretrained={tmp_path / 'missing'}"], "missing is not a minipt run"),
    ]:
        with pytest.raises(SystemExit):
            transfer.main(argv)
        assert pattern in capsys.readouterr().err
