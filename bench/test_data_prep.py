"""The data preparation benchmark at a tiny size: its corpus, its measurements and its comparison run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import data_prep


def test_the_synthetic_corpus_mixes_document_lengths(tmp_path):
    (small, jsonl), txt = data_prep.write_corpus(tmp_path, (2**19, 2**20))
    assert jsonl.read_text().startswith(small.read_text())  # each size a prefix of the next
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    lengths = np.array([len(t) for t in texts])
    assert 2**20 <= jsonl.stat().st_size < 1.2 * 2**20
    assert lengths.max() > 8 * np.median(lengths) and lengths.min() < np.median(lengths) / 4  # a long tail
    small_texts = [json.loads(line)["text"] for line in small.read_text().splitlines()]
    assert sorted(p.read_text() for p in txt.rglob("*.txt")) == sorted(small_texts)


@pytest.mark.slow
def test_quick_run_measures_minipt_and_datasets_on_the_same_corpus(bench_device):
    if bench_device != "cpu":
        pytest.skip("data preparation runs on the CPU")
    rows = data_prep.run("cpu", quick=True)
    tokenize = [r for r in rows if r["name"] == "tokenize"]
    assert [r["provider"] for r in tokenize] == ["minipt-jsonl", "minipt-txt", "datasets.map"]
    for r in tokenize:
        assert r["mb_per_s"] * r["wall_s"] == pytest.approx(r["corpus_mb"], abs=0.5) and r["peak_rss_mb"] > 10
    assert tokenize[-1]["ratio"] == 1.0
    first = rows[-1]
    assert first["provider"] == "minipt.train" and 0 < first["first_step_s"] < 600
