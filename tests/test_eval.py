"""``python -m minipt.eval``: GPT loss, perplexity and bits per byte, BERT MLM and NSP, against transformers."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minipt import eval as E
from minipt import train as T
from minipt.ops import IGNORE_INDEX, mlm_mask
from minipt.runtime import setup
from minipt.tokenizer import TextTokenizer, train_tokenizer
from minipt import evaluation as EV
from minipt.config import EvalConfig
from minipt.load import load_run
from minipt.scoring import mask_seed

from hf_folders import bert_folder, gpt2_folder, transformers

HELD_OUT = [
    "The cat sits on the mat — café au lait.\n\nI like cats. They are cute.\n",
    "Good morrow, my lord. How fares your grace?\n\nThe dog lies on the rug by the door.\n\nThe sea is green.\n",
    "A cat and a dog sat on the warm mat.\n\nThe sky is blue and the sea is green.\n",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    held = tmp / "held"
    held.mkdir()
    for i, text in enumerate(HELD_OUT):
        (held / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return {"gpt2": gpt2_folder(tmp / "gpt2"), "bert": bert_folder(tmp / "bert"), "held": held}


def run_eval(folders, name, **settings) -> dict:
    cfg = EvalConfig(out_dir=str(folders[name]), data=str(folders["held"]), **settings)
    return EV.evaluate(cfg, setup("cpu", "float32"))


# ----------------------------------------------------------------------------- GPT
def test_gpt_scores_match_transformers_and_count_utf8_bytes(folders):
    result = run_eval(folders, "gpt2")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2"]).eval().double()
    tok = load_run(folders["gpt2"])[1]
    stream, targets = [], []
    for text in HELD_OUT:
        ids = tok.encode(text)
        stream += [tok.eot_id, *ids]
        targets += [IGNORE_INDEX, *ids]
    assert len(stream) > 2 * 64  # three windows of the model's 64 positions, the last one short
    nats = 0.0
    for start in range(0, len(stream) - 1, 64):
        with torch.no_grad():
            logits = hf(torch.tensor([stream[start:start + 64]])).logits[0]
        window_targets = torch.tensor(targets[start + 1:start + 65])
        nats += F.cross_entropy(logits[:len(window_targets)], window_targets, reduction="sum").item()
    n_bytes = sum(len(text.encode("utf-8")) for text in HELD_OUT)
    assert n_bytes > sum(map(len, HELD_OUT))  # the dash and the accent are more bytes than characters
    assert result["tokens"] == sum(len(tok.encode(text)) for text in HELD_OUT) and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(nats / result["tokens"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / result["tokens"]), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_gpt_windows_score_every_document_token_once():
    bpe = TextTokenizer.wrap(train_tokenizer("bpe", HELD_OUT, 280, "gpt"), "gpt")
    for block_size, batch_size in [(5, 2), (7, 3), (200, 4)]:
        ids, targets, n_bytes, documents = EV.text_stream(HELD_OUT, bpe)
        assert n_bytes == sum(len(t.encode("utf-8")) for t in HELD_OUT) and documents == len(HELD_OUT)
        batches = EV.gpt_windows(ids, targets, block_size, batch_size)
        x = np.concatenate([b["x"].reshape(-1) for b in batches])
        y = np.concatenate([b["y"].reshape(-1) for b in batches])
        stream = [t for text in HELD_OUT for t in [bpe.eot_id, *bpe.encode(text)]]
        assert x.tolist() == stream[:-1]  # consecutive windows, no overlap
        assert y[y != IGNORE_INDEX].tolist() == [t for text in HELD_OUT for t in bpe.encode(text)]
        assert all(b["x"].shape == b["y"].shape and b["x"].shape[1] <= block_size for b in batches)


def write_tokens(path: Path, ids: list[int], llmc: bool = False) -> Path:
    body = np.asarray(ids, np.uint16).tobytes()
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 1, len(ids))
    path.write_bytes((header.tobytes() if llmc else b"") + body)
    return path


def test_gpt_token_files_score_as_the_text_they_hold(folders, tmp_path):
    tok = load_run(folders["gpt2"])[1]
    stream = [t for text in HELD_OUT for t in [tok.eot_id, *tok.encode(text)]]
    half = len(stream) // 2  # two files, one of them llm.c's, read as one stream
    write_tokens(tmp_path / "a.bin", stream[:half])
    write_tokens(tmp_path / "b.bin", stream[half:], llmc=True)
    text = run_eval(folders, "gpt2")
    tokens = EV.evaluate(EvalConfig(out_dir=str(folders["gpt2"]), data=str(tmp_path)), setup("cpu", "float32"))
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert tokens[key] == pytest.approx(text[key], rel=1e-6), key
    assert (tokens["tokens"], tokens["bytes"], tokens["documents"]) == (text["tokens"], text["bytes"], len(HELD_OUT))


@pytest.mark.parametrize("model, ids, pattern", [
    ("gpt2", [5, 299, 300, 7], r"x.bin: token id 300 at token 2 \(byte offset 4\) is not below the vocabulary size"),
    ("gpt2", [5], "holds 1 token"),
    ("bert", [5, 6, 7], "names token files, which hold GPT token ids; BERT is scored on text"),
])
def test_token_files_that_cannot_be_scored_are_named(folders, tmp_path, capsys, model, ids, pattern):
    write_tokens(tmp_path / "x.bin", ids)
    assert E.main([f"--out_dir={folders[model]}", f"--data={tmp_path / 'x.bin'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


# ----------------------------------------------------------------------------- BERT
def test_bert_scores_match_transformers_on_the_same_masks(folders):
    settings = dict(seed=3, mlm_probability=0.3, batch_size=2)
    result = run_eval(folders, "bert", **settings)
    hf = transformers.BertForPreTraining.from_pretrained(folders["bert"]).eval()
    _, tok, _ = load_run(folders["bert"])
    batches, padding = EV.bert_pairs(EV.read_texts(EvalConfig(data=str(folders["held"]))), tok, 64, 2, 0.1, 3)
    assert len(batches) >= 2 and result["pairs"] == sum(len(b["input_ids"]) for b in batches)
    mlm_losses, hits, masked, nsp_hits, labels_b = [], 0, 0, 0, []
    for i, b in enumerate(batches):
        batch = {k: torch.from_numpy(v).long() for k, v in b.items()}
        ids, labels = mlm_mask(batch["input_ids"], mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
                               special_tokens_mask=batch["special_tokens_mask"].bool(), mlm_probability=0.3,
                               seed=mask_seed(3, 2**32, i), backend="torch")
        with torch.no_grad():
            out = hf(ids, token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"])
        chosen = labels != IGNORE_INDEX
        mlm_losses.append(F.cross_entropy(out.prediction_logits[chosen], labels[chosen]).item())
        hits += (out.prediction_logits[chosen].argmax(-1) == labels[chosen]).sum().item()
        masked += chosen.sum().item()
        nsp_hits += (out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
        labels_b += batch["next_sentence_label"].tolist()
    assert result["mlm_probability"] == 0.3
    assert result["mlm_loss"] == pytest.approx(sum(mlm_losses) / len(mlm_losses), abs=1e-4)
    assert result["mlm_acc"] == pytest.approx(hits / masked)
    assert result["nsp_acc"] == pytest.approx(nsp_hits / len(labels_b))
    share = sum(labels_b) / len(labels_b)
    assert result["nsp_majority"] == pytest.approx(max(share, 1 - share))
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert result["pad_share"] == padding["pad_share"] == pytest.approx(1 - real / sum(b["attention_mask"].size
                                                                                      for b in batches))
    assert result["pack"] is False and "unpacked_pad_share" not in result


def test_packing_reports_both_padding_shares_of_the_same_pairs(folders):
    plain = run_eval(folders, "bert", seed=3, batch_size=2, block_size=64)
    packed = run_eval(folders, "bert", seed=3, batch_size=2, block_size=64, pack=True)
    assert packed["pack"] is True and packed["pairs"] == plain["pairs"]
    assert packed["unpacked_pad_share"] == pytest.approx(plain["pad_share"])
    # short held-out paragraphs: unpacked rows are mostly padding, packed rows mostly text
    assert packed["pad_share"] < plain["pad_share"]
    assert 0 <= packed["nsp_acc"] <= 1 and math.isfinite(packed["mlm_loss"])


def test_bert_masks_follow_the_seed(folders):
    a, b = run_eval(folders, "bert", seed=1), run_eval(folders, "bert", seed=1)
    assert a == b
    assert run_eval(folders, "bert", seed=2)["mlm_loss"] != a["mlm_loss"]


def test_a_run_is_scored_at_its_own_masking_rate(folders, tmp_path):
    out = tmp_path / "run"
    args = [f"--init_from={folders['bert']}", f"--data={folders['held']}", f"--out_dir={out}",
            f"--cache_dir={tmp_path / 'cache'}", "--mlm_probability=0.25", "--max_iters=1", "--eval_iters=1",
            "--batch_size=2", "--progress=false", "--val_fraction=0.3"]
    assert T.main(args) == 0
    assert EV.evaluate(EvalConfig(out_dir=str(out), data=str(folders["held"])), setup("cpu", "float32"))[
        "mlm_probability"] == 0.25


# ----------------------------------------------------------------------------- the command
def test_the_command_prints_a_table_and_writes_json(folders, tmp_path, capsys):
    path = tmp_path / "scores.json"
    assert E.main([f"--out_dir={folders['gpt2']}", f"--data={folders['held']}", "--block_size=9",
                   f"--json={path}"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["block_size"] == 9 and saved["settings"]["data"] == str(folders["held"])
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert f"{saved[key]:.4f}" in printed and key in printed


@pytest.mark.parametrize(
    "argv, pattern",
    [
        ([], "--data is required: the held-out text to score"),
        (["--data={held}", "--out_dir=nowhere"], "nowhere is not a folder"),
        (["--data={held}", "--block_size=65"], "block_size=65 exceeds the model's 64 positions"),
        (["--data={held}", "--mlm_probability=1.5"], "mlm_probability must be in \\(0.0, 1.0\\)"),
        (["--data={empty}"], "holds no text to score"),
        (["--data={held}", "--batch_size=0"], "batch_size must be a positive integer"),
        (["--data={held}", "--block_size=4"], "block_size=4 holds no .CLS. A .SEP. B .SEP. pair"),
        (["--data={held}", "--out_dir={gpt2}", "--pack=true"], "--pack applies to BERT models only; .* holds a gpt"),
    ],
)
def test_bad_input_is_named(folders, tmp_path, capsys, argv, pattern):
    (tmp_path / "empty.txt").write_text("")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    paths = dict(held=folders["held"], empty=tmp_path / "empty.txt", tokens=tmp_path / "train.bin",
                 gpt2=folders["gpt2"])
    argv = [f"--out_dir={folders['bert']}"] + [a.format(**paths) for a in argv]  # a later --out_dir wins
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err


def test_eval_reads_held_out_text_with_the_runs_own_text_field(tmp_path):
    from test_train import tiny_args

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"content": f"Line {i}: a horse, a horse, my kingdom for a horse!"})
                                for i in range(60)) + "\n")
    args = [a for a in tiny_args(tmp_path, max_iters=2, eval_interval=2) if not a.startswith("--data")]
    assert T.main([*args, f"--data={corpus}", "--text_field=content"]) == 0
    result = EV.evaluate(EvalConfig(out_dir=str(tmp_path / "run"), data=str(corpus)), setup("cpu", "float32"))
    assert result["tokens"] > 0  # read from 'content', as the run trained, without --text_field


def test_an_untrained_nsp_head_is_not_scored(tmp_path, folders):
    masked_lm = bert_folder(tmp_path / "mlm", architecture="BertForMaskedLM")
    result = EV.evaluate(EvalConfig(out_dir=str(masked_lm), data=str(folders["held"])), setup("cpu", "float32"))
    assert "nsp_acc" not in result and "nsp_loss" not in result and "nsp_majority" not in result
    assert result["nsp"].startswith("not scored: the NSP head") and result["mlm_acc"] >= 0
    trained = EV.evaluate(EvalConfig(out_dir=str(folders["bert"]), data=str(folders["held"])), setup("cpu", "float32"))
    assert "nsp_acc" in trained and "nsp" not in trained
