"""The command line of minipt.train: options from the config dataclass, config files, and a
clear message with a non-zero exit (never a traceback) for every kind of bad input."""

import re
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipt import checkpoint as ckpt
from minipt import train as T
from minipt.config import TrainConfig, field_help
from minipt.errors import EXIT_USAGE
from minipt.config import parse_overrides
from minipt import pretraining as P


def resolve_config(argv):
    """The config ``python -m minipt.train`` resolves from ``argv``."""
    return P.resolve_config(parse_overrides(TrainConfig, argv, "", ""))

REPO = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(3):
        text = "\n\n".join(f"VOICE{d}:\nNow is the winter of our discontent, line {i}." for i in range(8))
        (folder / f"doc{d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def base_args(tmp_path: Path, **overrides) -> list[str]:
    settings = dict(
        data=write_corpus(tmp_path / "corpus"), cache_dir=tmp_path / "cache", out_dir=tmp_path / "run",
        tokenizer="char", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_iters=2,
        eval_interval=2, eval_iters=1, progress="false", sample_tokens=0,
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def fails(argv, capsys, pattern: str, code: int = EXIT_USAGE) -> str:
    assert T.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("minipt.train: error: ") and "Traceback" not in err
    assert pattern in err, err
    return err


# ----------------------------------------------------------------------------- options
def test_help_lists_every_field_with_its_default_and_description(capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    helps, _ = field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text and helps[f.name].split(";")[0] in text, f.name
    assert "(default: 1337)" in text and '(default: "gpt")' in text and "(default: none)" in text


def test_both_option_spellings_and_config_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('n_layer = 3\nlearning_rate = 2e-3\nmodel = "bert"\ncompile = true\n')
    cfg = resolve_config([f"--config={toml}", "--n_layer", "2", "--seed=7", "--compile=false"])
    assert (cfg.n_layer, cfg.learning_rate, cfg.model, cfg.seed, cfg.compile) == (2, 2e-3, "bert", 7, False)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"max_iters": 5, "min_lr": None, "warmup_iters": 1}))
    cfg = resolve_config(["--config", str(js)])
    assert (cfg.max_iters, cfg.min_lr, cfg.warmup_iters) == (5, None, 1)


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--n_layr=2"], "unknown setting 'n_layr'; did you mean --n_layer"),
        (["--learnin_rate", "1e-3"], "did you mean --learning_rate"),
        (["--batch_size=eight"], "argument --batch_size: expected an int, got 'eight'"),
        (["--compile=perhaps"], "argument --compile: expected true or false, got 'perhaps'"),
        (["--dropout=lots"], "argument --dropout: expected a float or none, got 'lots'"),
        (["--model=gpt3"], "model must be one of gpt, bert; got 'gpt3'"),
        (["--val_fraction=1.5"], "val_fraction must be in (0.0, 1.0), got 1.5"),
        (["--batch_size=0"], "batch_size must be a positive integer, got 0"),
        (["--resume", "--overwrite"], "resume and overwrite contradict each other"),
        (["--model=bert", "--bias=false"], "bias applies to --model gpt only"),
        (["stray"], "unexpected argument 'stray'"),
        (["--n_embd=30", "--n_head=4", "--max_iters=0"], "max_iters must be a positive integer"),
        (["--device=tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--config=missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_bad_settings_are_named(argv, pattern, capsys):
    fails(argv, capsys, pattern)


def test_bad_config_files_are_named(tmp_path, capsys):
    bad_key = tmp_path / "k.toml"
    bad_key.write_text("n_embed = 64\n")
    fails([f"--config={bad_key}"], capsys, f"unknown setting 'n_embed' in {bad_key}; did you mean --n_embd")
    bad_type = tmp_path / "t.json"
    bad_type.write_text('{"batch_size": "8"}')
    fails([f"--config={bad_type}"], capsys, "batch_size must be int, got '8' (str)")
    broken = tmp_path / "b.toml"
    broken.write_text("n_layer = = 2")
    fails([f"--config={broken}"], capsys, "cannot parse config file")


def test_model_shape_errors_name_both_fields(tmp_path, capsys):
    fails(base_args(tmp_path, n_embd=30, n_head=4), capsys, "n_embd (30) must be divisible by n_head (4)")


@pytest.mark.parametrize(
    "setting, pattern",
    [("n_layer=0", "n_layer must be a positive int, got 0"), ("block_size=-4", "block_size must be a positive int"),
     ("dropout=1.0", "dropout must be a float in [0, 1), got 1.0")],
)
def test_model_fields_are_checked_by_the_model_config(tmp_path, capsys, setting, pattern):
    key, value = setting.split("=")
    fails(base_args(tmp_path, **{key: value}), capsys, pattern)
    # before any data is read: a missing corpus is not what the error is about
    fails(base_args(tmp_path, data=tmp_path / "nowhere.txt", **{key: value}), capsys, pattern)


# ----------------------------------------------------------------------------- data
def test_missing_empty_and_undecodable_corpora(tmp_path, capsys):
    fails(base_args(tmp_path, data=tmp_path / "nowhere.txt"), capsys, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails(base_args(tmp_path, data=empty), capsys, "is empty")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ça va très bien\n".encode("latin-1"))
    fails(base_args(tmp_path, data=latin), capsys, "is not UTF-8 text (byte 0xc7 at offset 0)")


def test_corpus_too_small_for_one_batch(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("To be.\nOr not.\nThat is\nthe question.\n")
    fails(base_args(tmp_path, data=small, block_size=32), capsys, "block_size + 1 = 33")


def test_bad_tokenizer_setting(tmp_path, capsys):
    fails(base_args(tmp_path, tokenizer="sentencepiece"), capsys, "tokenizer file sentencepiece does not exist")


# ----------------------------------------------------------------------------- run folders
def test_an_existing_run_is_not_overwritten_by_accident(tmp_path, capsys):
    assert T.main(base_args(tmp_path)) == 0
    before = (tmp_path / "run" / ckpt.MODEL).read_bytes()
    fails(base_args(tmp_path), capsys, "already holds a run; pass --resume to continue it or --overwrite")
    assert (tmp_path / "run" / ckpt.MODEL).read_bytes() == before
    assert T.main(base_args(tmp_path, seed=5, overwrite="true")) == 0
    assert (tmp_path / "run" / ckpt.MODEL).read_bytes() != before


def test_resume_without_a_run_or_with_a_corrupt_checkpoint(tmp_path, capsys):
    fails(base_args(tmp_path, resume="true"), capsys, "no run in")
    assert T.main(base_args(tmp_path)) == 0
    run = tmp_path / "run"
    state = (run / ckpt.STATE).read_bytes()
    (run / ckpt.STATE).write_bytes(state[: len(state) // 2])
    fails([f"--out_dir={run}", "--resume", "--max_iters=4"], capsys, "state.pt is corrupt")
    (run / ckpt.STATE).write_bytes(state)
    (run / ckpt.MODEL).write_bytes(b"\x00" * 64)
    fails([f"--out_dir={run}", "--resume", "--max_iters=4"], capsys, "model.safetensors is corrupt")
    (run / ckpt.MODEL).unlink()
    fails([f"--out_dir={run}", "--resume", "--max_iters=4"], capsys, "cannot resume: ")
    (run / ckpt.CONFIG).write_text("{not json")
    fails([f"--out_dir={run}", "--resume"], capsys, "config.json is corrupt")


def test_the_module_exits_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "minipt.train", "--n_layr=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert "unknown setting 'n_layr'; did you mean --n_layer" in proc.stderr and "Traceback" not in proc.stderr


def test_a_runs_own_config_json_repeats_the_run(tmp_path):
    from test_train import tiny_args

    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2)) == 0
    again = tmp_path / "again"
    assert T.main([f"--config={tmp_path / 'run' / ckpt.CONFIG}", f"--out_dir={again}"]) == 0
    first, second = ckpt.read_config(tmp_path / "run"), ckpt.read_config(again)
    assert {**first["train"], "out_dir": str(again)} == second["train"]
    assert ckpt.load_state(again)["iter"] == 2


@pytest.mark.parametrize("command", ["train", "finetune", "eval", "sample", "export"])
def test_every_commands_help_is_plain_text_with_an_example(command, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"minipt.{command}").main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m minipt.{command} " in text and "Examples:" in text
    assert not re.search(r":(func|class|mod|meth|data):|``", text), text[:2000]
