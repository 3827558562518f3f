"""``train --init_from``: continued pretraining from a Hugging Face folder or a minipt run, and what is refused."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from minipt import checkpoint as ckpt
from minipt import eval as E
from minipt import train as T
from minipt.tokenizer import TextTokenizer
from minipt.load import load_run, read_model_config

from hf_folders import bert_folder, gpt2_folder, hf_tokenizer, transformers
from test_train import write_corpus

LR = 1e-4
STEPS = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("init_from")
    return {
        "gpt2": gpt2_folder(tmp / "gpt2"),
        "bert": bert_folder(tmp / "bert"),
        "bert-mlm": bert_folder(tmp / "bert-mlm", architecture="BertForMaskedLM", weights="bin"),
        "corpus": write_corpus(tmp / "corpus"), "cache": tmp / "cache",
    }


def train_args(folders, out: Path, init_from, **overrides) -> list[str]:
    settings = dict(
        init_from=init_from, data=folders["corpus"], cache_dir=folders["cache"], out_dir=out, block_size=32,
        batch_size=2, max_iters=STEPS, eval_interval=STEPS, eval_iters=1, warmup_iters=0, learning_rate=LR,
        decay_lr="false", weight_decay=0.0, progress="false", sample_tokens=0,
        optimizer="adamw",  # each weight moves by about the learning rate a step: the tests bound the change by it
    )
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


def max_change(model, reference) -> float:
    ours, theirs = model.state_dict(), reference.state_dict()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


# ----------------------------------------------------------------------------- continued pretraining
def test_gpt2_folder_continues_pretraining_with_its_tokenizer(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(train_args(folders, out, folders["gpt2"])) == 0
    log = capsys.readouterr().out
    assert f"initialised from {folders['gpt2']}; the optimizer starts fresh" in log
    config = ckpt.read_config(out)
    assert config["model_type"] == "gpt" and config["train"]["init_from"] == str(folders["gpt2"])
    # the checkpoint's architecture, its vocabulary not rounded up: the embedding keeps its rows
    hf = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2"])
    assert {k: config["model"][k] for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")} == dict(
        vocab_size=hf.config.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    text = "The cat sits on the mat by the door."
    assert TextTokenizer.from_file(out / ckpt.TOKENIZER, "gpt").encode(text) == hf_tokenizer(folders["gpt2"])(text)[
        "input_ids"]
    trained, _, _ = load_run(out)
    start, _, _ = load_run(folders["gpt2"])
    # Adam moves each weight by about the learning rate a step: the run started from the checkpoint
    change = max_change(trained, start)
    assert 0 < change <= 1.5 * LR * STEPS


def test_bert_for_masked_lm_gets_a_fresh_nsp_head_and_says_so(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main(train_args(folders, out, folders["bert-mlm"])) == 0
    log = capsys.readouterr().out
    assert "the BertForMaskedLM in " in log
    assert "has no pooler or NSP head (pooler.weight, pooler.bias, nsp_head.weight, nsp_head.bias): they start" in log
    assert ckpt.read_config(out)["model_type"] == "bert"
    trained, _, _ = load_run(out)
    start, _, _ = load_run(folders["bert-mlm"])
    encoder = {k for k in trained.state_dict() if k.startswith(("embeddings.", "layers.", "mlm_head."))}
    change = max((trained.state_dict()[k] - start.state_dict()[k]).abs().max().item() for k in encoder)
    assert 0 < change <= 1.5 * LR * STEPS


def test_a_masked_lm_config_over_pretraining_weights_keeps_its_nsp_head(folders, tmp_path):
    """bert-base-uncased's config.json names BertForMaskedLM while its file holds the pooler and NSP head."""
    folder = broken_copy(folders, tmp_path, "bert", edit_config(architectures=["BertForMaskedLM"]))
    model, _, config = load_run(folder)
    assert config["notes"] == []
    hf = transformers.BertForPreTraining.from_pretrained(folders["bert"])
    assert torch.equal(model.nsp_head.weight, hf.cls.seq_relationship.weight)
    assert torch.equal(model.pooler.weight, hf.bert.pooler.dense.weight)


def test_a_run_started_from_a_checkpoint_resumes_with_its_architecture(folders, tmp_path):
    out = tmp_path / "run"
    assert T.main(train_args(folders, out, folders["bert"], max_iters=1, eval_interval=1)) == 0
    assert T.main(train_args(folders, out, folders["bert"], max_iters=2, eval_interval=1) + ["--resume"]) == 0
    assert ckpt.read_config(out)["model"]["n_inner"] == 128
    assert [r["iter"] for r in map(json.loads, (out / ckpt.METRICS).read_text().splitlines()) if "val_loss" in r] == [
        0, 1, 2]


def test_a_minipt_run_is_a_starting_point_too(folders, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert T.main(train_args(folders, first, folders["gpt2"], dropout=0.0)) == 0
    assert T.main(train_args(folders, second, first, block_size=16)) == 0
    assert ckpt.read_config(second)["model"]["block_size"] == 64  # shorter windows, the same positions
    assert 0 < max_change(load_run(second)[0], load_run(first)[0]) <= 1.5 * LR * STEPS


def test_a_fine_tune_run_gives_its_encoder(folders, tmp_path, capsys):
    from minipt import finetune as FT
    from minipt.models import BERT, CLASSIFIER, BertClassifier

    rows = [f'{{"text": "{t}", "label": "{l}"}}' for t, l in (("A cat.", "pet"), ("A king.", "court")) * 4]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    run = tmp_path / "finetuned"
    assert FT.main([f"--init_from={folders['bert']}", f"--data={tmp_path / 'train.jsonl'}", f"--out_dir={run}",
                    "--epochs=1", "--learning_rate=1e-2", "--backend=torch", "--progress=false"]) == 0
    classifier, _, _ = load_run(run)
    assert isinstance(classifier, BertClassifier)
    kind, arch = read_model_config(run, encoder=True)
    assert kind == "bert" and "num_labels" not in arch and read_model_config(run)[0] == CLASSIFIER
    bert, tok, config = load_run(run, encoder=True)
    assert type(bert) is BERT and type(bert.config).__name__ == "BertConfig" and config["model_type"] == "bert"
    assert "is a fine-tune run: its BERT encoder is read" in config["notes"][0]
    theirs = classifier.bert.state_dict()
    assert bert.state_dict().keys() == theirs.keys()
    for name, tensor in bert.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    start, _, _ = load_run(folders["bert"])
    assert max_change(bert, start) > 1e-3  # the fine-tune moved the encoder: these are its weights

    continued = tmp_path / "continued"  # pretraining goes on from the fine-tuned encoder
    assert T.main(train_args(folders, continued, run)) == 0
    assert ckpt.read_config(continued)["model_type"] == "bert"
    assert 0 < max_change(load_run(continued)[0], bert) <= 1.5 * LR * STEPS
    assert E.main([f"--out_dir={run}", f"--data={folders['corpus']}", "--backend=torch", "--block_size=32"]) == 0
    printed = capsys.readouterr().out
    assert "model_type" in printed and "bert" in printed and "mlm_acc" in printed


# ----------------------------------------------------------------------------- refusals
def broken_copy(folders, tmp_path, name, edit) -> Path:
    folder = tmp_path / f"broken-{name}"
    shutil.copytree(folders[name], folder)
    edit(folder)
    return folder


def edit_config(**fields):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return edit


def add_tokens(folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    n = len(vocab)
    (folder / "vocab.json").write_text(json.dumps({**vocab, "extra1": n, "extra2": n + 1}))


def delete(name):
    return lambda folder: (folder / name).unlink()


@pytest.mark.parametrize(
    "name, edit, pattern",
    [
        ("gpt2", delete("config.json"), "is neither a minipt run nor a Hugging Face model: it holds no config.json"),
        ("bert", edit_config(architectures=["BertForSequenceClassification"]),
         "describes BertForSequenceClassification; minipt reads GPT2LMHeadModel, BertForPreTraining, BertForMaskedLM"),
        ("gpt2", edit_config(architectures=None, model_type="llama"),
         r"describes no architectures \(model_type 'llama'"),
        ("gpt2", edit_config(activation_function="relu"), "activation_function='relu'"),
        ("gpt2", edit_config(n_layer=1),
         r"holds tensors its config.json does not describe \(12, e.g. \['transformer.h.1.attn.c_attn.bias'"),
        ("gpt2", edit_config(n_layer=3), "lacks the tensor 'transformer.h.2.ln_1.weight' that its config.json"),
        ("bert", edit_config(hidden_size=64, num_attention_heads=4),
         r"model.safetensors does not fit its config.json: \d+ tensors have other shapes, e.g. minipt's "
         r"embeddings.word_embeddings.weight is \[119, 32\] in the file but \[119, 64\]"),
        ("gpt2", delete("model.safetensors"), "holds no weights: expected model.safetensors or pytorch_model.bin"),
        ("bert-mlm", lambda f: (f / "pytorch_model.bin").write_bytes(b"not a zip"), "cannot read the weights in "),
        ("bert", delete("vocab.txt"), "holds no tokenizer: expected tokenizer.json, vocab.txt"),
        ("gpt2", add_tokens, "has 302 tokens but the model's embedding has 300 rows: ids 300 to 301 would index"),
    ],
)
def test_a_folder_that_cannot_start_a_run_is_named(folders, tmp_path, capsys, name, edit, pattern):
    folder = broken_copy(folders, tmp_path, name, edit)
    assert T.main(train_args(folders, tmp_path / "run", folder)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("minipt.train: error: ")
    assert re.search(pattern, err), err


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--model=bert"], "--model=bert contradicts --init_from=.*gpt2, which holds a gpt model"),
        (["--n_layer=3"], "--n_layer=3 contradicts --init_from=.*gpt2, whose model has n_layer=2"),
        (["--n_embd=64"], "--n_embd=64 contradicts .* whose model has n_embd=32"),
        (["--block_size=128"], "--block_size=128 exceeds the 64 positions of --init_from="),
        (["--preset=gpt2"], "preset and init_from both set the architecture"),
        (["--tokenizer=char"], "--tokenizer does not apply with --init_from=.*: the data is tokenized with its"),
        (["--vocab_size=512"], "--vocab_size does not apply with --init_from"),
    ],
)
def test_settings_that_contradict_the_checkpoint_are_named(folders, tmp_path, capsys, extra, pattern):
    assert T.main(train_args(folders, tmp_path / "run", folders["gpt2"]) + extra) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()  # refused before any folder is made or data read


def test_a_missing_folder_is_named(folders, tmp_path, capsys):
    assert T.main(train_args(folders, tmp_path / "run", tmp_path / "nowhere")) == 2
    assert "nowhere is not a folder: expected a minipt run or a Hugging Face model folder" in capsys.readouterr().err


def test_a_run_written_over_its_own_starting_point_is_refused(folders, tmp_path, capsys):
    start = tmp_path / "start"
    assert T.main(train_args(folders, start, folders["gpt2"])) == 0
    weights = sorted(p.name for p in start.iterdir())
    capsys.readouterr()
    assert T.main(train_args(folders, start, start) + ["--overwrite"]) == 2
    assert "init_from and out_dir name the same folder" in capsys.readouterr().err
    assert sorted(p.name for p in start.iterdir()) == weights  # nothing deleted
