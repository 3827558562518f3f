"""The run folder keeps one run's work whole: a lock against a second process, a --overwrite that
replaces nothing until the new run has a checkpoint, and leftovers of a killed run cleared."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minipt import checkpoint as ckpt
from minipt import eval as E
from minipt import train as T
from minipt.errors import EXIT_FAILED, EXIT_USAGE

from test_train import REPO, tiny_args, write_corpus


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_run_folder_stops_and_the_first_run_stays_whole(tmp_path, capsys):
    first = tiny_args(tmp_path, max_iters=300, eval_interval=100, sample_tokens=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minipt.train", *first], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ckpt.METRICS).is_file():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    other = write_corpus(tmp_path / "other", n_docs=2)
    second = [a for a in tiny_args(tmp_path, max_iters=2) if not a.startswith("--data")] + [f"--data={other}"]
    assert T.main(second) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"out_dir '{out}' is in use by another minipt process (pid {proc.pid})" in err
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    config = ckpt.read_config(out)
    assert config["train"]["data"] == str(tmp_path / "corpus") and ckpt.load_state(out)["iter"] == 300
    rows = [json.loads(line) for line in (out / ckpt.METRICS).read_text().splitlines()]
    assert [r["iter"] for r in rows if "train_loss" in r] == list(range(1, 301))  # one run's rows, once each


def test_overwrite_with_a_bad_setting_leaves_the_old_run_untouched(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2)) == 0
    out = tmp_path / "run"
    before = snapshot(out)
    bad = [a for a in tiny_args(tmp_path, max_iters=2) if not a.startswith("--data")]
    assert T.main([*bad, f"--data={tmp_path / 'typo'}", "--overwrite"]) == EXIT_USAGE
    assert "data path" in capsys.readouterr().err
    assert snapshot(out) == before and not (out / ckpt.REPLACED).exists()


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(tmp_path):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2)) == 0
    assert T.main(tiny_args(tmp_path, max_iters=4, eval_interval=2, overwrite="true")) == 0
    out = tmp_path / "run"
    assert ckpt.load_state(out)["iter"] == 4 and not (out / ckpt.REPLACED).exists()
    rows = [json.loads(line) for line in (out / ckpt.METRICS).read_text().splitlines()]
    assert [r["iter"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]  # the old run's rows are gone


def test_a_run_killed_before_its_first_checkpoint_is_run_again_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt.CONFIG).write_text(json.dumps({"train": {}, "model": {}}))
    (out / ".model.safetensors.tmp-4242").write_bytes(b"\0" * 1024)  # what kill -9 mid-write leaves
    assert T.main([f"--out_dir={out}", "--resume"]) == EXIT_USAGE
    assert "the run stopped before its first checkpoint: start it again without --resume" in capsys.readouterr().err
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2)) == 0
    assert ckpt.load_state(out)["iter"] == 2
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_a_diverged_run_without_a_checkpoint_does_not_claim_one(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, learning_rate="inf", warmup_iters=0, decay_lr="false")) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "the training loss became nan" in err and "No checkpoint was saved" in err
    assert "is kept" not in err


def test_an_out_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert T.main(tiny_args(tmp_path)) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "run").read_text() == "not a folder"


def test_a_failed_run_in_a_new_folder_leaves_no_folder(tmp_path):
    bad = [a for a in tiny_args(tmp_path, max_iters=2) if not a.startswith("--data")]
    assert T.main([*bad, f"--data={tmp_path / 'typo'}"]) == EXIT_USAGE
    assert not (tmp_path / "run").exists()


def test_eval_json_into_a_missing_folder_is_written(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2)) == 0
    report = tmp_path / "scores" / "deep" / "gpt.json"
    assert E.main([f"--out_dir={tmp_path / 'run'}", f"--data={tmp_path / 'corpus'}", f"--json={report}"]) == 0
    assert json.loads(report.read_text())["tokens"] > 0
