"""The training loop: schedule, optimizer groups, model config, end-to-end runs, exact
resume, atomic checkpoints, non-finite losses and Ctrl-C."""

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minipt import checkpoint as ckpt
from minipt import finetune as FT
from minipt import train as T
from minipt.runlog import Progress, read_metrics
from minipt.config import ConfigError, TrainConfig
from minipt.models import GPT, GPTConfig, build_model
from minipt.tokenizer import TextTokenizer, train_tokenizer
from minipt import pretraining as P
from minipt.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from minipt.load import load_run
from minipt.loop import make_optimizer
from minipt.scoring import mask_seed

REPO = Path(__file__).resolve().parents[1]
VERSES = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May. And summer's lease hath all too short a date.",
    "Sometime too hot the eye of heaven shines! And often is his gold complexion dimm'd.",
    "So long as men can breathe or eyes can see, so long lives this, and this gives life to thee.",
]


def write_corpus(folder: Path, n_docs: int = 4, repeats: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        paras = [f"SPEAKER{d}:\n" + VERSES[(d + i) % 4] for i in range(repeats)]
        (folder / f"play{d}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return folder


def tiny_args(tmp_path: Path, out: str = "run", **overrides) -> list[str]:
    settings = dict(
        data=write_corpus(tmp_path / "corpus"), cache_dir=tmp_path / "cache", out_dir=tmp_path / out,
        tokenizer="char", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=6,
        eval_interval=3, eval_iters=2, log_interval=1, warmup_iters=2, learning_rate=3e-3, progress="false",
        sample_tokens=8,
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def rows(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["iter"], r[key]) for r in read_metrics(out) if key in r]


# ----------------------------------------------------------------------------- pieces
def test_learning_rate_warms_up_then_follows_the_cosine_to_min_lr():
    lr = P.schedule(TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)).lr
    assert lr(0) == pytest.approx(1 / 11)
    assert lr(9) == pytest.approx(10 / 11)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half way down the cosine
    assert lr(110) == lr(500) == pytest.approx(0.1)
    assert P.schedule(TrainConfig(learning_rate=2.0)).min_lr == pytest.approx(0.2)
    assert P.schedule(TrainConfig(learning_rate=0.5, decay_lr=False)).lr(3) == 0.5


def test_weight_decay_reaches_matrices_and_embeddings_only():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = make_optimizer(model, learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.3, device=torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert any(p is model.transformer.wte.weight for p in decayed["params"])


def test_model_config_from_defaults_preset_and_overrides():
    tok = TextTokenizer.wrap(train_tokenizer("char", ["abc"], 0, "gpt"), "gpt")
    cfg = P.model_config(TrainConfig(), tok.vocab_size, tok.pad_id)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (4, 128, 128, 64)
    cfg = P.model_config(TrainConfig(preset="gpt2", n_layer=2, dropout=0.2), tok.vocab_size, tok.pad_id)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.block_size) == (2, 12, 768, 0.2, 1024)
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        P.model_config(TrainConfig(n_embd=100, n_head=3), tok.vocab_size, tok.pad_id)
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        P.model_config(TrainConfig(preset="gpt5"), tok.vocab_size, tok.pad_id)


def test_attn_window_and_global_every_reach_the_saved_model(tmp_path):
    """--attn_window and --global_every build the windowed model, which the run saves and loads back;
    global_every without attn_window, and a window that contradicts --init_from's model, are named."""
    out = tmp_path / "run"
    assert T.main(tiny_args(tmp_path, n_layer=3, attn_window=6, global_every=2)) == 0
    model = build_model("gpt", ckpt.read_config(out)["model"])
    assert (model.config.attn_window, model.config.global_every) == (6, 2)
    assert [b.attn.window_size for b in model.transformer.h] == [None, (5, 0), None]
    bert = P.model_config(TrainConfig(model="bert", attn_window=128, global_every=3), vocab_size=64, pad_id=0)
    assert (bert.attn_window, bert.global_every) == (128, 3)
    with pytest.raises(ConfigError, match="global_every needs attn_window"):
        P.resolve_config({"global_every": 3})
    with pytest.raises(ConfigError, match="--attn_window=8 contradicts --init_from=.* whose model has attn_window=6"):
        P.resolve_config({"init_from": str(out), "out_dir": str(tmp_path / "next"), "attn_window": 8})


@pytest.mark.parametrize("model, extra", [("gpt", {}), ("bert", dict(tokenizer="wordpiece", vocab_size=200,
                                                                         block_size=32))])
def test_logit_softcap_and_z_loss_reach_the_model_and_the_logs(tmp_path, capsys, model, extra):
    """--logit_softcap is saved with the model and caps what the loaded model returns; --z_loss is a training
    setting, logged as train_z_loss beside train_loss (the cross-entropy) in metrics.jsonl and the progress
    line, but not in the validation rows. The run ends with its sample; bad values are named."""
    args = tiny_args(tmp_path, model=model, logit_softcap=30, z_loss=1e-4, max_iters=4, eval_interval=2,
                     log_interval=2, progress="true", **extra)
    assert T.main(args) == 0
    out = tmp_path / "run"
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["logit_softcap"] == 30.0 and saved["train"]["z_loss"] == 1e-4
    train = [r for r in read_metrics(out) if "train_loss" in r]
    assert [r["iter"] for r in train] == [2, 4]
    # z·lse² with lse about log(vocab) at the start: far below the cross-entropy, far above 0
    assert all(1e-6 < r["train_z_loss"] < 1e-2 * r["train_loss"] for r in train)
    assert all("z_loss" not in key for r in read_metrics(out) if "val_loss" in r for key in r)
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if " train loss " in line and ", z-loss " in line]) == 2
    assert ("sample:" if model == "gpt" else "fill-mask") in printed
    loaded, *_ = load_run(out)
    assert loaded.config.logit_softcap == 30.0
    if model == "gpt":
        x = torch.randint(0, loaded.config.vocab_size, (1, 8))
        uncapped = torch.nn.functional.linear(loaded.hidden_states(x), loaded.transformer.wte.weight)
        torch.testing.assert_close(loaded(x).logits, 30 * torch.tanh(uncapped / 30))
    else:  # a fine-tune from it (the classifier's own logits are not capped) runs and exports
        data = tmp_path / "labelled.csv"
        with open(data, "w", newline="", encoding="utf-8") as f:  # quoted where a verse holds a comma
            csv.writer(f).writerows([("text", "label"), *((v, i % 2) for i, v in enumerate(VERSES * 2))])
        assert FT.main([f"--init_from={out}", f"--data={data}", f"--val_data={data}", "--epochs=1",
                        "--batch_size=4", f"--out_dir={tmp_path / 'tuned'}", "--progress=false"]) == 0
        tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())["model"]
        assert tuned["logit_softcap"] == 30.0 and (tmp_path / "tuned" / "hf" / "config.json").is_file()
    # the cap is the model's: --init_from keeps it, and another is a contradiction
    with pytest.raises(ConfigError, match="--logit_softcap=20.0 contradicts --init_from=.* logit_softcap=30.0"):
        P.resolve_config({"init_from": str(out), "out_dir": str(tmp_path / "next"), "logit_softcap": 20.0})
    for bad, message in (("--z_loss=-1", "z_loss must be a finite float >= 0"),
                         ("--logit_softcap=0", "logit_softcap must be a positive finite float")):
        assert T.main(tiny_args(tmp_path, out="bad", model=model, **extra) + [bad]) == EXIT_USAGE
        assert message in capsys.readouterr().err


def test_mlm_mask_seeds_differ_per_step_microstep_and_rank():
    seeds = {mask_seed(1337, it, m, r) for it in range(50) for m in range(3) for r in range(2)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert mask_seed(1, 2, 3) == mask_seed(1, 2, 3)


# ----------------------------------------------------------------------------- runs
def test_gpt_run_learns_and_saves_a_complete_run_folder(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=40, eval_interval=20, learning_rate=1e-2, n_embd=48)) == 0
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == {*ckpt.RUN_FILES, ckpt.LOCK}
    val = rows(out, "val_loss")
    assert [it for it, _ in val] == [0, 20, 40]
    assert val[-1][1] < val[0][1] - 1.0  # the verses repeat: a tiny model learns them fast
    assert len(rows(out, "train_loss")) == 40
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt" and config["train"]["max_iters"] == 40 and config["model"]["n_embd"] == 48
    state = ckpt.load_state(out)
    assert state["iter"] == 40 and state["best_val"] == pytest.approx(val[-1][1])
    assert "sample:" in capsys.readouterr().out


def test_bert_run_reports_mlm_and_nsp_metrics(tmp_path):
    args = tiny_args(
        tmp_path, model="bert", tokenizer="wordpiece", vocab_size=200, block_size=32, max_iters=4, eval_interval=2
    )
    assert T.main(args) == 0
    last = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]
    assert set(last) == {"iter", "val_loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "nsp_majority", "pad_share"}
    assert 0.5 <= last["nsp_majority"] <= 1
    assert last["val_loss"] == pytest.approx(last["mlm_loss"] + last["nsp_loss"])
    assert 0 <= last["mlm_acc"] <= 1 and 0 <= last["nsp_acc"] <= 1
    speeds = [r["tokens_per_s"] for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r]
    assert len(speeds) == 4 and all(s > 0 for s in speeds)

    assert T.main(args + ["--objective=mlm", "--overwrite"]) == 0
    last = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]
    assert "nsp_loss" not in last and last["val_loss"] == pytest.approx(last["mlm_loss"])

    assert T.main(args + ["--pack=true", "--overwrite"]) == 0
    packed = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]
    assert packed["unpacked_pad_share"] == pytest.approx(last["pad_share"])  # the same validation pairs
    assert 0 <= packed["pad_share"] <= packed["unpacked_pad_share"] and 0 <= packed["nsp_acc"] <= 1


@pytest.mark.parametrize(
    "model, extra",
    [
        ("gpt", ["--dropout=0.1"]),
        ("gpt", ["--dropout=0.1", "--doc_mask=true", "--reset_positions=true"]),
        ("bert", ["--tokenizer=wordpiece", "--vocab_size=200", "--block_size=32"]),
        # short pairs in long rows: most rows hold several
        ("bert", ["--tokenizer=wordpiece", "--vocab_size=200", "--block_size=128", "--short_seq_prob=1",
                  "--pack=true"]),
        ("gpt", ["--dropout=0.1", "--optimizer=adamw"]),
        ("bert", ["--tokenizer=wordpiece", "--vocab_size=200", "--block_size=32", "--optimizer=muon"]),
        ("gpt", ["--logit_softcap=5", "--z_loss=1e-2"]),
    ],
    ids=["gpt", "gpt-doc_mask", "bert", "bert-pack", "gpt-adamw", "bert-muon", "gpt-softcap-z_loss"],
)
def test_resume_follows_the_uninterrupted_trajectory_exactly(tmp_path, model, extra):
    common = [f"--model={model}", "--lr_decay_iters=8", *extra]
    assert T.main(tiny_args(tmp_path, out="straight", max_iters=8, eval_interval=4) + common) == 0
    assert T.main(tiny_args(tmp_path, out="halves", max_iters=4, eval_interval=4) + common) == 0
    assert T.main([f"--out_dir={tmp_path / 'halves'}", "--resume", "--max_iters=8"]) == 0
    for key in ("train_loss", "train_z_loss", "val_loss"):
        assert rows(tmp_path / "halves", key) == rows(tmp_path / "straight", key)
    assert len(rows(tmp_path / "halves", "train_z_loss")) == (8 if "--z_loss=1e-2" in extra else 0)
    assert len(rows(tmp_path / "straight", "train_loss")) == 8
    a = ckpt.load_state(tmp_path / "straight")["optimizer"]
    b = ckpt.load_state(tmp_path / "halves")["optimizer"]
    muon = "--optimizer=muon" in extra or (model == "gpt" and "--optimizer=adamw" not in extra)  # the defaults
    assert ckpt.read_config(tmp_path / "halves")["train"]["optimizer"] == ("muon" if muon else "adamw")
    assert a.keys() == b.keys() == ({"adamw", "muon"} if muon else {"adamw"})
    for name in a:  # AdamW's moments, Muon's momentum buffers
        for pa, pb in zip(a[name]["state"].values(), b[name]["state"].values()):
            assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_pretraining_defaults_to_muon_for_gpt_and_adamw_for_bert():
    """What won each model's default run on the bundled plays (bench/optimizers.py); either is a flag away."""
    assert (TrainConfig().optimizer, TrainConfig(model="bert").optimizer) == ("muon", "adamw")
    assert (TrainConfig(optimizer="adamw").optimizer, TrainConfig(model="bert", optimizer="muon").optimizer) == (
        "adamw", "muon")


@pytest.mark.parametrize("model, extra", [
    ("gpt", ["--n_embd=48", "--max_iters=40", "--eval_interval=20"]),
    ("bert", ["--tokenizer=wordpiece", "--vocab_size=200", "--block_size=32", "--max_iters=30", "--eval_interval=15",
              "--objective=mlm"]),
])
def test_a_muon_run_learns_and_records_its_optimizer(tmp_path, model, extra):
    assert T.main(tiny_args(tmp_path, model=model, optimizer="muon", learning_rate=1e-2) + extra) == 0
    val = [loss for _, loss in rows(tmp_path / "run", "val_loss")]
    assert len(val) == 3 and val[-1] < val[0] - (1.0 if model == "gpt" else 0.5)
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["optimizer"], train["muon_learning_rate"]) == ("muon", TrainConfig.muon_learning_rate)


@pytest.mark.parametrize("trained, other", [("adamw", "muon"), ("muon", "adamw")])
def test_resuming_with_another_optimizer_is_refused(tmp_path, capsys, trained, other):
    assert T.main(tiny_args(tmp_path, max_iters=3, optimizer=trained)) == 0
    out = tmp_path / "run"
    assert T.main([f"--out_dir={out}", "--resume", "--max_iters=6", f"--optimizer={other}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--optimizer={other} cannot resume the run in {out}, which trains with {trained}" in err
    assert f"--init_from={out}" in err and ckpt.load_state(out)["iter"] == 3
    # resumed without --optimizer, the run keeps its own, whatever the default
    assert T.main([f"--out_dir={out}", "--resume", "--max_iters=6"]) == 0
    assert ckpt.read_config(out)["train"]["optimizer"] == trained
    assert set(ckpt.load_state(out)["optimizer"]) == ({"adamw"} if trained == "adamw" else {"adamw", "muon"})


# torch.save reports a full disk from its zip writer as a RuntimeError; a plain write as an OSError
@pytest.mark.parametrize("full_disk", [OSError("No space left on device"),
                                       RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_a_full_disk_while_saving_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys,
                                                                              full_disk):
    args = tiny_args(tmp_path, max_iters=6, eval_interval=2)
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: the weights are written, then the disk "fills"
            Path(f).write_bytes(b"partial")
            raise full_disk
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    assert T.main(args) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "(is the disk full?)" in err
    assert "the checkpoint of step 2 before it is intact" in err and "Traceback" not in err
    monkeypatch.undo()
    out = tmp_path / "run"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    model = build_model("gpt", ckpt.read_config(out)["model"])
    assert ckpt.load_checkpoint(out, model)["iter"] == 2
    assert T.main([f"--out_dir={out}", "--resume"]) == 0
    assert ckpt.load_state(out)["iter"] == 6


def test_progress_is_a_plain_line_per_log_step_when_output_is_not_a_terminal(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=6, eval_interval=6, log_interval=2, progress="true")) == 0
    captured = capsys.readouterr()  # pytest's capture is not a terminal, as a log file or CI is not
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if " train loss " in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert T.main(tiny_args(tmp_path, max_iters=2, log_interval=1, overwrite="true")) == 0  # progress=false
    assert " train loss " not in capsys.readouterr().out


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_tqdm_bar_on_a_terminal():
    terminal, logged = Terminal(), []
    progress = Progress(total=3, initial=1, enabled=True, log=logged.append, stream=terminal)
    for _ in range(2):
        progress.step()
    progress.train_row({"iter": 3, "train_loss": 1.5, "train_z_loss": 1e-3, "lr": 1e-3, "tokens_per_s": 100.0})
    progress.log("step 3: val_loss 1.4")
    progress.close()
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert "loss=1.500, z=1.00e-03, tok_s=100" in terminal.getvalue()  # a run with a z-loss shows its term
    assert logged == []  # other lines go through the bar, which keeps it whole
    quiet = Terminal()
    Progress(total=3, initial=0, enabled=False, log=logged.append, stream=quiet).train_row(
        {"iter": 1, "train_loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0}
    )
    assert quiet.getvalue() == "" and logged == []


def test_checkpoint_pair_from_different_saves_is_refused(tmp_path):
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ckpt.save_checkpoint(tmp_path, model, {"iter": 3})
    torch.save({"iter": 5}, tmp_path / ckpt.STATE)
    with pytest.raises(ckpt.CheckpointError, match="from iteration 3 but state.pt from 5"):
        ckpt.load_checkpoint(tmp_path, model)


def test_tied_weights_survive_the_safetensors_round_trip(tmp_path):
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ckpt.save_checkpoint(tmp_path, model, {"iter": 0})
    fresh = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ckpt.load_weights(tmp_path, fresh)
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = P.Run.step

    def step(self):
        loss, z_loss = real_step(self)
        return (loss * float("nan") if self.iter == 5 else loss), z_loss

    monkeypatch.setattr(P.Run, "step", step)
    assert T.main(tiny_args(tmp_path, max_iters=10, eval_interval=2)) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "training loss became nan between steps 4 and 5" in err and "Traceback" not in err
    assert ckpt.load_state(tmp_path / "run")["iter"] == 4
    assert rows(tmp_path / "run", "train_loss")[-1][0] == 4


def test_sigint_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tmp_path, max_iters=100_000, eval_interval=100_000, sample_tokens=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minipt.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not rows(out, "train_loss"):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted: saved step" in err and "Traceback" not in err
    saved = ckpt.load_state(out)["iter"]
    assert saved >= 1 and f"saved step {saved} " in err
    assert T.main([f"--out_dir={out}", "--resume", f"--max_iters={saved + 2}"]) == 0
    assert ckpt.load_state(out)["iter"] == saved + 2
    assert ckpt.read_config(out)["train"]["max_iters"] == saved + 2  # the next --resume goes on from here
    assert [it for it, _ in rows(out, "train_loss")][-3:] == [saved, saved + 1, saved + 2]
    assert math.isfinite(rows(out, "val_loss")[-1][1])


# ----------------------------------------------------------------------------- backends
def test_the_backend_of_every_op_is_printed_and_recorded_with_the_run(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, backend="torch")) == 0
    expected = {op: "torch" for op in ("attention", "mlm_mask", "cross_entropy", "linear_cross_entropy")}
    assert ckpt.read_config(tmp_path / "run")["backends"] == expected
    assert "backends: attention torch, mlm_mask torch, cross_entropy torch, linear_cross_entropy torch" in (
        capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--backend=triton", "MINIPT_BACKEND=triton"])
def test_a_backend_that_cannot_serve_the_run_is_refused_before_any_work(tmp_path, how):
    # Outside the interpreter, Triton serves CUDA tensors only: on this CPU it is refused at once.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    args = [a for a in tiny_args(tmp_path, max_iters=2) if not a.startswith("--backend")]
    if how.startswith("--"):
        args.append(how)
    else:
        env["MINIPT_BACKEND"] = how.split("=")[1]
    proc = subprocess.run([sys.executable, "-m", "minipt.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "attention: backend='triton' runs on CUDA tensors; got a tensor on cpu" in proc.stderr
    assert "data:" not in proc.stdout and not (tmp_path / "run").exists()  # nothing tokenized, no folder made


def test_resume_builds_the_model_its_run_saved_not_todays_defaults(tmp_path, monkeypatch):
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    args = [a for a in tiny_args(tmp_path, max_iters=4, eval_interval=2) if a.lstrip("-").split("=")[0] not in shape]
    monkeypatch.setattr(P, "DEFAULT_SIZES", dict(n_layer=1, n_head=2, n_embd=32, block_size=16))
    assert T.main([*args, "--max_iters=2"]) == 0
    # the sizes a new run would get change; the run in the folder keeps its own
    monkeypatch.setattr(P, "DEFAULT_SIZES", dict(n_layer=2, n_head=4, n_embd=64, block_size=16))
    assert T.main([f"--out_dir={tmp_path / 'run'}", "--resume", "--max_iters=4"]) == 0
    assert ckpt.read_config(tmp_path / "run")["model"]["n_layer"] == 1
    assert ckpt.load_state(tmp_path / "run")["iter"] == 4


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_the_runs_setting_recorded_with_it(tmp_path, tf32):
    assert T.main(tiny_args(tmp_path, max_iters=1, eval_interval=1, tf32=str(tf32).lower())) == 0
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert ckpt.read_config(tmp_path / "run")["train"]["tf32"] is tf32


def test_resume_refuses_a_setting_that_contradicts_the_saved_model(tmp_path, capsys):
    """--resume keeps the saved model; a shape, window or cap given that differs is named, not dropped."""
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, logit_softcap=30.0)) == 0
    run = f"--out_dir={tmp_path / 'run'}"
    for given, saved in (("--logit_softcap=15.0", "logit_softcap=30.0"), ("--n_layer=2", "n_layer=1"),
                         ("--attn_window=4", "attn_window=None"), ("--model=bert", "a gpt run"),
                         ("--block_size=32", "16 positions")):
        capsys.readouterr()
        assert T.main([run, "--resume", "--max_iters=4", given]) == 2, given
        err = capsys.readouterr().err
        assert given.lstrip("-") in err and saved in err and "Traceback" not in err, err
    # the same values, or none, resume; so do shorter windows than the model's positions
    assert T.main([run, "--resume", "--max_iters=4", "--logit_softcap=30.0", "--n_layer=1", "--block_size=8"]) == 0
    assert ckpt.load_state(tmp_path / "run")["iter"] == 4
