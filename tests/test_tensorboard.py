"""``--tensorboard=true``: the scalars of metrics.jsonl as TensorBoard events in out_dir/tb, read back by
TensorBoard's own EventAccumulator; and the missing extra refused before any work."""

import csv
import sys
from pathlib import Path

import pytest

from minipt import finetune as FT
from minipt import train as T
from minipt.config import TrainConfig, make_config, parse_overrides
from minipt.errors import EXIT_USAGE
from minipt.pretraining import train
from minipt.runlog import read_metrics
from minipt.runtime import setup

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra (minipt[test] has it)")

VERSES = ["Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n",
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n"]


def corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"sonnet{i}.txt").write_text("\n".join(VERSES[(i + j) % 2] for j in range(8)), encoding="utf-8")
    return folder


def tiny(tmp_path: Path, out: Path, **overrides) -> list[str]:
    settings = dict(data=corpus(tmp_path / "corpus"), cache_dir=tmp_path / "cache", out_dir=out, tokenizer="char",
                    n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=6, eval_interval=3,
                    eval_iters=2, log_interval=1, warmup_iters=1, sample_tokens=0, device="cpu")
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def events(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads from out/tb, as {tag: [(step, value), ...]}, with orphans purged."""
    acc = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows_as_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    scalars = {}
    for row in read_metrics(out):
        for key, value in row.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(key, []).append((row["iter"], value))
    return scalars


def assert_same_scalars(out: Path) -> None:
    expected, found = rows_as_scalars(out), events(out)
    assert sorted(found) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in points], tag
        # TensorBoard keeps float32
        assert [v for _, v in found[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag


def test_a_training_run_writes_metrics_jsonl_as_events(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(tiny(tmp_path, out, tensorboard="true")) == 0
    assert_same_scalars(out)
    tags = set(events(out))
    assert {"train_loss", "lr", "tokens_per_s", "val_loss", "val_ppl"} <= tags
    # a new run over it takes the old run's events with it
    assert T.main(tiny(tmp_path, out, overwrite="true", max_iters=3)) == 0
    assert not (out / "tb").exists()


def test_events_of_a_run_cut_short_and_resumed_match_its_rows(tmp_path):
    out = tmp_path / "run"

    def log(message):
        if message.startswith("step 5/"):
            raise KeyboardInterrupt  # a kill after the rows of steps 4 and 5; the last checkpoint is step 3

    cfg = make_config(TrainConfig, parse_overrides(TrainConfig, tiny(tmp_path, out, tensorboard="true"), "", ""))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, setup("cpu", "float32"), log=log)
    assert [r["iter"] for r in read_metrics(out) if "train_loss" in r] == [1, 2, 3, 4, 5]
    assert T.main([f"--out_dir={out}", "--resume", "--progress=false"]) == 0
    assert [r["iter"] for r in read_metrics(out) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_same_scalars(out)  # the events of steps 4 and 5 of the first process are gone, as its rows are


def test_a_fine_tune_writes_its_epochs_and_test_scores_as_events(tmp_path):
    from hf_folders import bert_folder

    rows = [("I like cats.", "pos"), ("They are cute.", "pos"), ("The sea is green.", "neg"),
            ("A dog sat on the mat.", "neg")] * 3
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    out = tmp_path / "ft"
    assert FT.main([f"--init_from={bert_folder(tmp_path / 'bert')}", f"--data={tmp_path / 'train.csv'}",
                    f"--test_data={tmp_path / 'train.csv'}", f"--out_dir={out}", "--epochs=2", "--batch_size=4",
                    "--device=cpu", "--progress=false", "--tensorboard=true"]) == 0
    assert_same_scalars(out)
    assert {"epoch", "val_loss", "accuracy", "macro_f1", "test_accuracy", "test_macro_f1"} <= set(events(out))


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_without_the_extra_the_run_stops_before_any_work(tmp_path, capsys, monkeypatch, command):
    for module in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.",
                                                                                  "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    out = tmp_path / "run"
    if command == "train":
        code = T.main(tiny(tmp_path, out, tensorboard="true"))
    else:
        code = FT.main([f"--init_from={tmp_path}", f"--out_dir={out}", "--tensorboard=true"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err
    assert (f"minipt.{command}: error: --tensorboard=true needs the optional dependency tensorboard: "
            "pip install tensorboard, or pip install minipt[tensorboard]") in err
    assert not out.exists() and not (tmp_path / "cache").exists()
