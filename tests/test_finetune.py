"""``python -m minipt.finetune``: BERT sequence classification, its scores and its export to transformers."""

import csv
import os
import signal
import json
import re
from pathlib import Path

import pytest
import torch

from minipt import finetune as FT
from minipt.data import genre
from minipt import hf
from minipt import sample as S
from minipt.models import CLASSIFIER, BertClassifier, build_model
from minipt.data.sources import read_documents, split_tail
from minipt.runtime import setup
from minipt import finetuning as FTL
from minipt import metrics as M
from minipt.config import FinetuneConfig, parse_overrides
from minipt.errors import Interrupted
from minipt.load import load_run

from hf_folders import bert_folder, gpt2_folder, transformers

POSITIVE = ["I like cats.", "They are cute.", "The sky is blue.", "Good morrow, my lord."]
NEGATIVE = ["The dog lies on the rug.", "The sea is green.", "How fares your grace?", "A cat sat on the mat."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("finetune")
    rows = [(text, pair, label) for label, texts in (("pos", POSITIVE), ("neg", NEGATIVE)) for text in texts
            for pair in ("", "They are cute.")]
    with open(tmp / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "text_pair", "label"])
        writer.writerows(rows)
    return {"bert": bert_folder(tmp / "bert"), "train": tmp / "train.csv", "tmp": tmp}


def test_scores_follow_the_definitions():
    truth, predicted = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 0]
    f1s = []
    for label in (0, 1, 2):
        precision = sum(p == t == label for p, t in zip(predicted, truth)) / predicted.count(label)
        recall = sum(p == t == label for p, t in zip(predicted, truth)) / truth.count(label)
        f1s.append(2 * precision * recall / (precision + recall))
    matrix = [[0] * 3 for _ in range(3)]
    for p, t in zip(predicted, truth):
        matrix[t][p] += 1
    assert M.confusion_matrix(truth, predicted, 3).tolist() == matrix
    result = M.classification_scores(matrix)
    assert result["accuracy"] == pytest.approx(4 / 7) and result["macro_f1"] == pytest.approx(sum(f1s) / 3)
    # a label absent from both the truth and the predictions does not count in the macro average
    assert M.classification_scores([[0, 0, 0], [0, 2, 0], [0, 0, 0]])["macro_f1"] == 1.0
    table = FTL.format_confusion([[1, 3], [0, 12]], ["neg", "pos"]).splitlines()
    assert table[1].split() == ["neg", "1", "3"] and table[2].split() == ["pos", "0", "12"]


def test_fine_tuning_learns_the_training_labels_and_exports_with_parity(folders, tmp_path):
    cfg = FinetuneConfig(init_from=str(folders["bert"]), data=str(folders["train"]), val_data=str(folders["train"]),
                            epochs=25, batch_size=8, learning_rate=3e-3, dropout=0.0, out_dir=str(tmp_path),
                            backend="torch", progress=False)
    run = FTL.finetune(cfg, setup("cpu", "float32"), log=lambda msg: None)
    model, tok, labels = run.model, run.tok, run.labels
    assert labels == ["neg", "pos"] and isinstance(model, BertClassifier)
    assert run.best["accuracy"] == 1.0 and run.best["macro_f1"] == 1.0  # 16 examples learnt by heart
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "epoch" in r]
    assert [r["epoch"] for r in evals] == list(range(1, 26)) and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # a train row at every epoch's end (two steps), the log interval (10) being longer
    assert [r["iter"] for r in rows if "train_loss" in r] == list(range(2, 51, 2))

    # the final weights are the best epoch's (the first to score highest), not the last epoch's
    best = max(evals, key=lambda r: (r["macro_f1"], -r["epoch"]))
    assert run.best["epoch"] == best["epoch"] < 25
    assert json.loads((tmp_path / "confusion.json").read_text())["validation"]["matrix"] == [[8, 0], [0, 8]]
    saved, _, config = load_run(tmp_path, backend="torch")
    assert config["model_type"] == CLASSIFIER and isinstance(saved, BertClassifier)
    assert run.evaluate(run.val_rows)["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert abs(best["val_loss"] - evals[-1]["val_loss"]) > 1e-4
    for p, q in zip(saved.parameters(), model.parameters()):
        assert torch.equal(p, q)

    FTL.export(model, tok, labels, tmp_path / "hf")
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label == {0: "neg", 1: "pos"}
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = hf_tok(["I like cats.", "The sea is green and the sky is blue."], ["They are cute.", "No."],
                   padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        expected = theirs(**batch).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert expected.abs().max() > 0.1

    default = hf.to_hf(model)  # transformers' own label names when none are given
    assert default.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(ValueError, match="labels has 3 names for a classifier of 2"):
        hf.to_hf(model, labels=["a", "b", "c"])


def test_fine_tuning_with_muon_learns_the_training_labels(folders, tmp_path):
    cfg = FinetuneConfig(init_from=str(folders["bert"]), data=str(folders["train"]), val_data=str(folders["train"]),
                         epochs=15, batch_size=8, learning_rate=3e-3, optimizer="muon", muon_learning_rate=1e-2,
                         dropout=0.0, out_dir=str(tmp_path), backend="torch", progress=False)
    run = FTL.finetune(cfg, setup("cpu", "float32"), log=lambda msg: None)
    assert set(run.optimizer.parts) == {"adamw", "muon"}
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch" in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2 and run.best["accuracy"] == 1.0
    assert json.loads((tmp_path / "config.json").read_text())["train"]["optimizer"] == "muon"


TWO = '{"text": "a", "label": "yes"}\n{"text": "b", "label": "no"}\n'


@pytest.mark.parametrize(
    "name, content, extra, pattern",
    [
        ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', [],
         r"train.jsonl:2: every example needs a 'label'"),
        ("train.jsonl", '{"text": "a", "label": 1}\nnot json\n', [], r"train.jsonl:2: not a JSON object"),
        ("train.jsonl", '{"label": 1}\n', [], r"train.jsonl:1: every example needs a non-empty 'text'"),
        ("train.jsonl", "", [], r"train.jsonl holds no examples"),
        ("train.csv", "text,labels\na,1\n", [],
         r"train.csv:1: the header has no 'label' column \(it has 'text', 'labels'\)"),
        ("train.csv", "text,label\na,1\nb,\n", [], r"train.csv:3: every example needs a 'label'"),
        ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ["--val_data=VAL"],
         r"train.jsonl all have the label 'x': a classifier needs two labels or more"),
        ("train.jsonl", '{"text": "a", "label": "x"}\n', [], r"holds 1 example\(s\): too few to hold out"),
        ("train.jsonl", TWO, ["--val_data=VAL"],
         r"val.jsonl:2: the validation label 'maybe' never occurs in the training examples of .*train.jsonl "
         r"\(labels: no, yes\)"),
        ("train.jsonl", TWO, ["--max_length=65"], "max_length=65 exceeds the model's 64 positions"),
        ("train.jsonl", TWO, ["--init_from=GPT"],
         "fine-tuning a GPT model is not supported: --init_from=.* holds a gpt"),
        ("train.jsonl", TWO, ["--epochs=0"], "epochs must be a positive integer"),
        ("train.jsonl", TWO, ["--metric=loss"],
         "metric must be one of accuracy, macro_f1, f1, matthews, pearson, spearman; got 'loss'"),
        ("train.jsonl", TWO, ["--init_from="],
         r"--init_from \(a BERT run or Hugging Face BERT folder, or scratch\) is required"),
        ("", "", ["--val_data=VAL"], "--val_data needs --data: without --data the genre task gives all three"),
        ("", "", ["--test_data=VAL"], "--test_data needs --data"),
        ("train.jsonl", TWO, ["--val_data=TRAIN", "--test_data=VAL"],
         r"val.jsonl:2: the test label 'maybe' never occurs in the training examples of .*train.jsonl"),
        ("train.jsonl", TWO, ["--init_from=scratch"], "--init_from=scratch needs --arch_from=PATH"),
        ("train.jsonl", TWO, ["--arch_from=GPT"], "arch_from is read only with --init_from=scratch"),
        ("train.jsonl", TWO, ["--init_from=scratch", "--arch_from=GPT"],
         "fine-tuning a GPT model is not supported: --arch_from=.* holds a gpt"),
        ("train.jsonl", TWO, ["--init_from=scratch", "--arch_from=MISSING"],
         "is not a folder: expected a minipt run or a Hugging Face model folder"),
        ("train.jsonl", TWO, ["--init_from=scratch", "--arch_from=OUT"],
         "--arch_from and --out_dir name the same folder"),
        ("", "", ["--init_from=GPT"], "fine-tuning a GPT model is not supported"),
    ],
)
def test_bad_input_is_named(folders, tmp_path, capsys, name, content, extra, pattern):
    if name:
        (tmp_path / name).write_text(content)
    (tmp_path / "val.jsonl").write_text('{"text": "b", "label": "yes"}\n{"text": "c", "label": "maybe"}\n')
    gpt = folders["tmp"] / "gpt2"
    if not gpt.exists():
        gpt2_folder(gpt)
    names = {"GPT": gpt, "VAL": tmp_path / "val.jsonl", "MISSING": tmp_path / "missing",
             "TRAIN": tmp_path / name, "OUT": tmp_path / "o"}
    for key, path in names.items():
        extra = [a.replace(key, str(path)) for a in extra]
    data = tmp_path / name if name else ""  # no --data: the bundled genre task
    argv = [f"--init_from={folders['bert']}", f"--data={data}", f"--out_dir={tmp_path / 'o'}"]
    assert FT.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err


def test_the_command_writes_the_run_and_sample_classifies_with_it(folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"--init_from={folders['bert']}", f"--data={folders['train']}", f"--out_dir={out}", "--epochs=2",
            "--val_fraction=0.25", "--max_length=16", "--batch_size=4", "--log_interval=1", "--backend=torch"]
    assert FT.main(args) == 0
    captured = capsys.readouterr()
    # not a terminal: a plain line per log step instead of a bar
    assert "step 1/6: train loss" in captured.out and "epoch 2: val loss" in captured.out
    assert "true \\ predicted" in captured.out and "\r" not in captured.err
    for name in ("config.json", "tokenizer.json", "model.safetensors", "state.pt", "metrics.jsonl", "loss.png",
                 "confusion.json", "hf/config.json"):
        assert (out / name).is_file(), name
    assert not (out / FTL.BEST).exists()
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["labels"] == ["neg", "pos"] and sum(map(sum, confusion["validation"]["matrix"])) == 4
    assert "test" not in confusion  # no --test_data

    model, tok, config = load_run(out)
    assert config["labels"] == ["neg", "pos"]
    rebuilt = build_model(CLASSIFIER, config["model"])
    assert isinstance(rebuilt, BertClassifier) and rebuilt.config.num_labels == 2
    assert S.main([f"--out_dir={out}", "--text=I like cats.", "--text_b=They are cute."]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    probs = dict((line.split()[0], float(line.split()[1].removesuffix("%")) / 100) for line in printed)
    ids = [tok.cls_id, *tok.encode("I like cats."), tok.sep_id, *tok.encode("They are cute."), tok.sep_id]
    types = [0] * (len(tok.encode("I like cats.")) + 2) + [1] * (len(tok.encode("They are cute.")) + 1)
    expected = model(torch.tensor([ids]), torch.tensor([types]), torch.ones(1, len(ids), dtype=torch.long))
    expected = expected[0].double().softmax(-1).tolist()
    assert probs == pytest.approx({"neg": expected[0], "pos": expected[1]}, abs=1e-3)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)

    again = tmp_path / "again"  # a fine-tune run is a starting point too: its encoder, a fresh head
    assert FT.main([f"--init_from={out}", f"--data={folders['train']}", f"--out_dir={again}", "--epochs=1",
                    "--backend=torch"]) == 0
    torch.testing.assert_close(load_run(again)[0].bert.embeddings.word_embeddings.weight,
                               model.bert.embeddings.word_embeddings.weight, rtol=0, atol=1e-4)
    capsys.readouterr()
    assert S.main([f"--out_dir={out}"]) == 2
    assert "is a fine-tune run: give --text" in capsys.readouterr().err
    assert FT.main([f"--out_dir={out}", "--resume"]) == 2
    assert "has finished" in capsys.readouterr().err
    assert FT.main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_an_interrupted_run_resumes_exactly(folders, tmp_path, capsys):
    def run(out, interrupt_at=None):
        def log(message):
            if interrupt_at and message.startswith(f"step {interrupt_at}/"):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the step ends, then the run saves
        args = [f"--init_from={folders['bert']}", f"--data={folders['train']}", f"--out_dir={out}", "--epochs=2",
                "--val_fraction=0.25", "--batch_size=5", "--log_interval=1", "--backend=torch",
                "--learning_rate=1e-3"]
        cfg = FinetuneConfig(**parse_overrides(FinetuneConfig, args, "", ""))
        return FTL.finetune(cfg, setup("cpu", "float32"), log=log)

    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", interrupt_at=4)  # three steps an epoch: in the middle of the second
    assert FT.main([f"--out_dir={tmp_path / 'cut'}", "--resume", "--progress=false"]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed, _, _ = load_run(tmp_path / "cut")
    for (name, p), q in zip(straight.model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "cut")]
    # throughput is the one field that may differ
    kept = [[{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in lines] for lines in rows]
    assert kept[0] == kept[1] and len(kept[0]) == 6 + 2
    assert straight.model.config.dropout > 0  # so the restored random state matters


# ----------------------------------------------------------------------------- the bundled genre task
def test_genres_follow_the_folio_and_the_splits_keep_characters_apart(tmp_path):
    plays = {play: g for play, g, _ in genre.play_genres()}
    counts = {label: list(plays.values()).count(label) for label in genre.LABELS}
    assert counts == {"comedy": 16, "history": 11, "tragedy": 11}
    assert plays["troilus-and-cressida"] == "tragedy" and plays["the-tempest"] == "comedy"
    assert plays["measure-for-measure"] == "comedy" and plays["julius-caesar"] == "tragedy"
    sides = genre.split_plays()
    assert set(sides) == set(plays)
    for side, size in (("test", 11), ("validation", 6), ("train", 21)):
        assert sum(s == side for s in sides.values()) == size
        assert {plays[p] for p in sides if sides[p] == side} == set(genre.LABELS), side
    for group in genre.SHARED_CHARACTERS:
        assert len({sides[p] for p in group}) == 1, group

    files = genre.build(tmp_path, 0.1)
    assert [f.name for f in files] == ["genre-train.csv", "genre-validation.csv", "genre-test.csv"]
    rows = {side: list(csv.DictReader(open(path, encoding="utf-8"))) for side, path in zip(genre.SIDES, files)}
    for side, side_rows in rows.items():
        assert {r["play"] for r in side_rows} == {p for p in sides if sides[p] == side}
    # Falstaff and his company speak in the histories and in a comedy: all of them train
    speakers = {side: {line for r in side_rows for line in r["text"].splitlines() if line.endswith(":")}
                for side, side_rows in rows.items()}
    for name in ("FALSTAFF:", "PISTOL:", "BARDOLPH:"):
        assert name in speakers["train"] and name not in speakers["test"] | speakers["validation"], name
    texts = {play: read_documents(source).__next__()[2] for play, _, source in genre.play_genres()}
    for row in [r for side_rows in rows.values() for r in side_rows[::25]]:
        head, tail = split_tail(texts[row["play"]], 0.1)
        assert row["label"] == plays[row["play"]]
        first_line = row["text"].splitlines()[0]
        assert first_line in tail and len(row["text"]) >= genre.PASSAGE_CHARS // 2
        assert row["text"].split("\n")[-1] in tail
    assert len(rows["train"]) > len(rows["test"]) > len(rows["validation"]) > 100


def test_passages_are_whole_speeches_of_the_minimum_length():
    speeches = ["A:\n" + "x" * n for n in (50, 300, 100, 500, 30)]
    out = genre.passages("\n\n".join(speeches), passage_chars=200)
    assert out == ["\n".join(speeches[:2]), "\n".join(speeches[2:4])]  # the 33-character rest is dropped
    assert genre.passages("\n\n".join(speeches[:1]), passage_chars=100) == [speeches[0]]  # half the minimum: kept


def test_the_genre_task_is_the_default_data(folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"--init_from={folders['bert']}", f"--out_dir={out}", "--epochs=1", "--batch_size=64", "--max_length=24",
            "--backend=torch", "--progress=false"]
    assert FT.main(args) == 0
    printed = capsys.readouterr().out
    assert "whose pretraining data is unknown" in printed and "the genre task: passages from" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["labels"] == list(genre.LABELS)
    assert [saved["train"][k] for k in ("data", "val_data", "test_data")] == list(map(str, genre.paths(out)))
    results = json.loads((out / "confusion.json").read_text())
    for split in ("validation", "test"):
        matrix = results[split]["matrix"]
        truth = [sum(row) for row in matrix]
        assert results[split]["majority_rate"] == pytest.approx(max(truth) / sum(truth))
        assert results[split]["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / sum(truth))
    test_rows = list(csv.DictReader(open(out / "genre-test.csv", encoding="utf-8")))
    assert sum(map(sum, results["test"]["matrix"])) == len(test_rows)
    assert f"test: accuracy {results['test']['accuracy']:.4f}" in printed
    test_row = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert test_row["test_accuracy"] == results["test"]["accuracy"] and test_row["epoch"] == results["epoch"]


def test_scratch_takes_the_architecture_and_tokenizer_and_draws_the_weights(folders, tmp_path):
    def run(name, **kw):
        cfg = FinetuneConfig(data=str(folders["train"]), val_data=str(folders["train"]), epochs=1, batch_size=16,
                                learning_rate=1e-9, out_dir=str(tmp_path / name), backend="torch", progress=False,
                                **kw)
        return FTL.finetune(cfg, setup("cpu", "float32"), log=lambda msg: None)

    pretrained, _, _ = load_run(folders["bert"], backend="torch")
    started = run("pretrained", init_from=str(folders["bert"]))
    scratch, again, other = (run(name, init_from="scratch", arch_from=str(folders["bert"]), seed=seed)
                             for name, seed in (("scratch", 1), ("again", 1), ("other", 2)))
    assert scratch.model.config == started.model.config and scratch.tok.to_str() == started.tok.to_str()
    embedding = lambda run: run.model.bert.embeddings.word_embeddings.weight  # noqa: E731
    # a learning rate of 1e-9 leaves every start where it was
    torch.testing.assert_close(embedding(started), pretrained.bert.embeddings.word_embeddings.weight if hasattr(
        pretrained, "bert") else pretrained.embeddings.word_embeddings.weight, rtol=0, atol=1e-6)
    assert (embedding(scratch) - embedding(started)).abs().max() > 0.05
    assert embedding(scratch).std().item() == pytest.approx(0.02, rel=0.1)  # BERT's initialiser
    for p, q in zip(scratch.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)  # the seed draws the weights
    assert not torch.equal(embedding(scratch), embedding(other))
    saved = json.loads((tmp_path / "scratch" / "config.json").read_text())["train"]
    assert saved["init_from"] == "scratch" and saved["arch_from"] == str(folders["bert"])


def test_the_pretraining_runs_held_out_share_is_used(tmp_path):
    notes = []
    run = tmp_path / "bert-run"
    run.mkdir()
    train = {"val_fraction": 0.2, "split": "doc", "data": ""}
    (run / "config.json").write_text(json.dumps({"model_type": "bert", "train": train, "model": {}}))
    assert FTL.pretraining_val_fraction(str(run), notes.append) == 0.2 and not notes
    (run / "config.json").write_text(json.dumps({"model_type": "bert", "train": {**train, "data": "web/"},
                                                 "model": {}}))
    assert FTL.pretraining_val_fraction(str(run), notes.append) == 0.2
    assert "may not be held out" in notes[0]
