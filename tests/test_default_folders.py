"""Run folders without --out_dir: each model kind trains into its own (out-gpt, out-bert), so the README's
commands run one after the other, and sample, eval and export look where training wrote."""

import json

import pytest

from minipt import checkpoint as ckpt
from minipt import eval as E
from minipt import export as X
from minipt import sample as S
from minipt import train as T
from minipt.config import TrainConfig, make_config, parse_overrides
from minipt.pretraining import resolve_config
from test_train import tiny_args


def without_out_dir(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("--out_dir=")]


BERT = ["--model=bert", "--tokenizer=wordpiece", "--vocab_size=200", "--block_size=32"]


def test_gpt_then_bert_train_into_their_own_folders_and_the_other_commands_find_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = without_out_dir(tiny_args(tmp_path, max_iters=2, eval_interval=2))
    assert T.main(args) == 0
    assert "python -m minipt.sample --out_dir out-gpt\n" in capsys.readouterr().out
    assert T.main(args + BERT) == 0  # before: "out_dir 'out' already holds a run"
    out = capsys.readouterr().out
    assert 'python -m minipt.sample --out_dir out-bert --text "... [MASK] ..."' in out
    assert ckpt.read_config("out-gpt")["model_type"] == "gpt" and ckpt.read_config("out-bert")["model_type"] == "bert"

    assert S.main(["--max_new_tokens=4"]) == 0  # out-gpt, without --out_dir
    assert E.main([f"--data={tmp_path / 'corpus'}", "--json=scores.json"]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["settings"]["out_dir"] == "out-gpt"
    assert X.main(["--to=gpt-hf"]) == 0 and (tmp_path / "gpt-hf" / "config.json").is_file()

    # resuming without --out_dir finds the run of the kind named (GPT by default)
    assert T.main(["--resume", "--max_iters=3"]) == 0
    assert "resuming out-gpt at step 2" in capsys.readouterr().out
    assert T.main(["--resume", "--model=bert", "--max_iters=3"]) == 0
    assert "resuming out-bert at step 2" in capsys.readouterr().out
    assert ckpt.load_state("out-gpt")["iter"] == ckpt.load_state("out-bert")["iter"] == 3


def test_an_explicit_out_dir_is_kept_and_init_from_takes_the_checkpoints_kind(tmp_path):
    cfg = make_config(TrainConfig, parse_overrides(TrainConfig, ["--out_dir=mine", "--model=bert"], "", ""))
    assert cfg.out_dir == "mine"
    assert make_config(TrainConfig, {}).out_dir == "out-gpt"
    assert make_config(TrainConfig, {"model": "bert"}).out_dir == "out-bert"
    assert T.main(tiny_args(tmp_path, out="bert-run", max_iters=2, eval_interval=2) + BERT) == 0
    # a GPT default would not fit: --init_from of a BERT run trains a BERT, into out-bert
    assert resolve_config({"init_from": str(tmp_path / "bert-run")}).out_dir == "out-bert"


@pytest.mark.parametrize("command", [S, E, X])
def test_the_other_commands_default_to_the_gpt_run_folder(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--to=somewhere"] if command is X else []
    assert command.main(argv) == 2
    assert "out-gpt" in capsys.readouterr().err
