"""Resuming a run from another folder (its paths saved absolute; an older run's relative ones found, or named),
and on another number of processes (the tokens per step kept where they can be, and the change said)."""

import json
from pathlib import Path

import pytest

from minipt import checkpoint as ckpt
from minipt import finetune as FT
from minipt import train as T
from minipt.config import TrainConfig, parse_overrides
from minipt.loop import resumed_accumulation, world_size_note
from minipt.pretraining import resolve_config
from hf_folders import bert_folder
from test_ddp import losses, torchrun, write_corpus
from test_train import rows, tiny_args

SMALL = ["--tokenizer=char", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
         "--eval_iters=1", "--log_interval=1", "--progress=false", "--sample_tokens=0"]


def relative_run(tmp_path: Path, monkeypatch, max_iters: int = 2) -> Path:
    """A run started in tmp_path/project with every path relative: --data corpus, --cache_dir cache, --out_dir run."""
    project = tmp_path / "project"
    write_corpus(project / "corpus")
    monkeypatch.chdir(project)
    assert T.main(["--data=corpus", "--cache_dir=cache", "--out_dir=run", f"--max_iters={max_iters}",
                   "--eval_interval=2", *SMALL]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return project / "run"


# ----------------------------------------------------------------------------- paths
def test_a_run_saves_its_paths_absolute_and_resumes_from_any_folder(tmp_path, monkeypatch, capsys):
    run = relative_run(tmp_path, monkeypatch)
    saved = ckpt.read_config(run)["train"]
    project = tmp_path / "project"
    assert (saved["data"], saved["cache_dir"], saved["out_dir"]) == (
        str(project / "corpus"), str(project / "cache"), str(project / "run"))
    assert saved["tokenizer"] == "char"  # a tokenizer kind is no path
    capsys.readouterr()
    assert T.main(["--resume", f"--out_dir={run}", "--max_iters=4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} at step 2" in out and "data: reusing the tokenized corpus" in out
    assert ckpt.load_state(run)["iter"] == 4 and not (tmp_path / "elsewhere" / "cache").exists()


def as_saved_before(run: Path, **paths) -> None:
    """Rewrite ``run``'s config.json as a run saved before paths were saved absolute."""
    config = json.loads((run / ckpt.CONFIG).read_text())
    config["train"].update(paths)
    (run / ckpt.CONFIG).write_text(json.dumps(config))


def test_an_older_runs_relative_paths_are_found_where_the_run_started(tmp_path, monkeypatch, capsys):
    run = relative_run(tmp_path, monkeypatch)
    as_saved_before(run, data="corpus", cache_dir="cache", out_dir="run")
    capsys.readouterr()
    assert T.main(["--resume", f"--out_dir={run}", "--max_iters=4"]) == 0  # run/ -> started in project/
    assert "data: reusing the tokenized corpus" in capsys.readouterr().out
    assert ckpt.read_config(run)["train"]["data"] == str(tmp_path / "project" / "corpus")  # saved absolute now


def test_an_older_runs_relative_path_not_found_is_named_as_relative(tmp_path, monkeypatch, capsys):
    run = relative_run(tmp_path, monkeypatch)
    as_saved_before(run, data="corpus", out_dir=str(run))  # where it started is unknown: only the current folder
    assert T.main(["--resume", f"--out_dir={run}", "--max_iters=4"]) == 2
    err = capsys.readouterr().err
    assert (f"--resume: the run in {run} saved data='corpus', a path relative to the folder it was started from, "
            f"found neither in {tmp_path / 'elsewhere'} (the current folder); resume from that folder, or give "
            "--data=ABSOLUTE_PATH") in err
    assert T.main(["--resume", f"--out_dir={run}", "--max_iters=4", f"--data={tmp_path / 'project' / 'corpus'}"]) == 0


def test_a_fine_tune_saves_its_example_files_absolute(tmp_path, monkeypatch):
    bert = bert_folder(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    rows_ = [{"text": t, "label": str(i % 2)} for i, t in enumerate(["a cat", "a dog", "the mat", "a rug"] * 2)]
    Path("train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    assert FT.main(["--init_from=bert", "--data=train.jsonl", "--val_data=train.jsonl", "--out_dir=ft", "--epochs=1",
                    "--progress=false"]) == 0
    saved = ckpt.read_config("ft")["train"]
    assert saved["data"] == saved["val_data"] == str(tmp_path / "train.jsonl")
    assert (saved["init_from"], saved["out_dir"], saved["test_data"]) == (str(bert), str(tmp_path / "ft"), "")


# ----------------------------------------------------------------------------- world size
@pytest.mark.parametrize("accumulation, saved, now, want", [
    (1, 2, 1, 2), (4, 1, 2, 2), (4, 2, 8, 1), (2, 4, 8, 1), (1, 1, 1, 1),
    (1, 2, 4, 1), (3, 1, 2, 3),  # no whole number keeps 2 (or 3) micro-batches: the saved one stays
])
def test_the_accumulation_that_keeps_the_micro_batches_per_step(accumulation, saved, now, want):
    assert resumed_accumulation(accumulation, saved, now) == want


def test_the_world_size_note_gives_both_counts_and_the_tokens_per_step():
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=2)
    saved = {"batch_size": 4, "gradient_accumulation_steps": 1}
    assert world_size_note(saved, 2, cfg, 1, 128) == (
        "resuming on 1 process(es) instead of 2: gradient_accumulation_steps 1 -> 2 keeps 1,024 tokens per step")
    assert world_size_note(saved, 1, TrainConfig(batch_size=4), 1, 128) is None
    assert world_size_note(saved, 2, TrainConfig(batch_size=4), 4, 128) == (
        "resuming on 4 process(es) instead of 2: gradient_accumulation_steps 1 makes 2,048 tokens per step instead "
        "of 1,024 (1 x 2 micro-batches per step do not divide among 4 processes; set --gradient_accumulation_steps "
        "or --batch_size to choose)")


def test_resolve_config_keeps_the_tokens_per_step_unless_the_accumulation_is_given(tmp_path):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, gradient_accumulation_steps=4)) == 0
    run = tmp_path / "run"
    assert ckpt.read_config(run)["world_size"] == 1

    def resolved(argv, world_size):
        return resolve_config(parse_overrides(TrainConfig, [f"--out_dir={run}", "--resume", *argv], "", ""),
                              world_size).gradient_accumulation_steps

    assert [resolved([], n) for n in (1, 2, 4, 3, 8)] == [4, 2, 1, 4, 4]
    assert resolved(["--gradient_accumulation_steps=3"], 2) == 3  # given: kept
    config = ckpt.read_config(run)
    del config["world_size"]  # a run saved before: its checkpoint's per-rank states tell (one here)
    (run / ckpt.CONFIG).write_text(json.dumps(config))
    assert resolved([], 2) == 2


def test_a_run_saved_on_two_processes_resumed_on_one_follows_the_straight_run(tmp_path, capsys):
    """Two processes with 1 micro-batch each read the windows one process reads with 2: a resume on one process
    with accumulation 2 goes on as the run would have, and the unchanged accumulation (1) would not."""
    common = ["--max_iters=4", "--eval_interval=2", "--lr_decay_iters=4", "--batch_size=2"]
    assert T.main(tiny_args(tmp_path, out="straight", gradient_accumulation_steps=2) + common) == 0
    assert T.main(tiny_args(tmp_path, out="halves", gradient_accumulation_steps=2) + common[1:] + ["--max_iters=2"]) == 0
    halves = tmp_path / "halves"
    config = ckpt.read_config(halves)  # as a two-process run with one micro-batch each saves it
    config["world_size"], config["train"]["gradient_accumulation_steps"] = 2, 1
    (halves / ckpt.CONFIG).write_text(json.dumps(config))
    capsys.readouterr()
    assert T.main([f"--out_dir={halves}", "--resume", "--max_iters=4"]) == 0
    assert ("resuming on 1 process(es) instead of 2: gradient_accumulation_steps 1 -> 2 keeps 64 tokens per step"
            in capsys.readouterr().out)
    assert rows(halves, "train_loss") == rows(tmp_path / "straight", "train_loss")
    assert ckpt.read_config(halves)["world_size"] == 1
    assert ckpt.read_config(halves)["train"]["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_a_ddp_run_resumed_on_one_process_keeps_its_global_batch(tmp_path, capsys):
    common = [f"--data={write_corpus(tmp_path / 'corpus')}", f"--cache_dir={tmp_path / 'cache'}", "--n_embd=32",
              "--eval_interval=4", "--lr_decay_iters=8", "--warmup_iters=2", "--learning_rate=3e-3",
              *[a for a in SMALL if not a.startswith("--n_embd")]]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert T.main([*common, f"--out_dir={single}", "--gradient_accumulation_steps=2", "--max_iters=8"]) == 0
    torchrun("minipt.train", [*common, f"--out_dir={ddp}", "--max_iters=4"], tmp_path)
    config = ckpt.read_config(ddp)
    assert config["world_size"] == 2 and config["train"]["gradient_accumulation_steps"] == 1
    del config["world_size"]  # as a run saved before the world size was: its two generator states tell
    (ddp / ckpt.CONFIG).write_text(json.dumps(config))
    capsys.readouterr()
    assert T.main([f"--out_dir={ddp}", "--resume", "--max_iters=8"]) == 0
    assert "resuming on 1 process(es) instead of 2: gradient_accumulation_steps 1 -> 2 keeps 64 tokens per step" \
        in capsys.readouterr().out
    a, b = losses(single, "train_loss"), losses(ddp, "train_loss")
    assert [i for i, _ in a] == [i for i, _ in b] == list(range(1, 9))
    # DDP sums the gradients in another order, which Muon's orthogonalisation (the default) amplifies: as test_ddp
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4, abs=1e-6)
