"""``python -m minipt.finetune``: BERT sequence classification, its scores and its export to transformers."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from minipt import finetune as FT
from minipt.runtime import setup

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
    result = FT.scores(predicted, truth)
    assert result["accuracy"] == pytest.approx(4 / 7) and result["macro_f1"] == pytest.approx(sum(f1s) / 3)
    assert FT.scores([1, 1], [1, 1]) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_fine_tuning_learns_the_training_labels_and_exports_with_parity(folders, tmp_path):
    cfg = FT.FinetuneConfig(init_from=str(folders["bert"]), data=str(folders["train"]), val_data=str(folders["train"]),
                            epochs=25, batch_size=8, learning_rate=3e-3, dropout=0.0, out_dir=str(tmp_path),
                            backend="torch")
    model, tok, labels, result = FT.finetune(cfg, setup("cpu", "float32"), log=lambda msg: None)
    assert labels == ["neg", "pos"]
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0  # 16 examples learnt by heart
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 26)) and rows[-1]["train_loss"] < rows[0]["train_loss"]

    FT.export(model, tok, labels, tmp_path / "hf")
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


def test_the_command_writes_metrics_and_the_export(folders, tmp_path, capsys):
    args = [f"--init_from={folders['bert']}", f"--data={folders['train']}", f"--out_dir={tmp_path}", "--epochs=1",
            "--val_fraction=0.25", "--max_length=16"]
    assert FT.main(args) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_jsonl_examples_and_truncation(folders, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "I like cats. " * 20, "text_pair": "They are cute.", "label": 1},
        {"text": "The sea is green.", "label": 0},
    ]) + "\n")
    examples = FT.read_examples(str(path))
    assert [e.label for e in examples] == ["1", "0"] and examples[1].text_pair is None
    _, tok, _ = FT.sample.load_run(folders["bert"])
    (long_ids, long_types, _), (short_ids, _, _) = FT.encode(examples, tok, {"0": 0, "1": 1}, 16)
    assert len(long_ids) == 16 and long_ids.count(tok.sep_id) == 2 and long_types[-1] == 1
    assert short_ids == [tok.cls_id, *tok.encode("The sea is green."), tok.sep_id]


@pytest.mark.parametrize(
    "content, extra, pattern",
    [
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', [], r"train.jsonl:2: every example needs a 'label'"),
        ('{"text": "a", "label": 1}\nnot json\n', [], r"train.jsonl:2: not a JSON object"),
        ('{"label": 1}\n', [], r"train.jsonl:1: every example needs a non-empty 'text'"),
        ('', [], "holds no examples"),
        ('{"text": "a", "label": 1}\n', ["--max_length=65"], "max_length=65 exceeds the model's 64 positions"),
        ('{"text": "a", "label": 1}\n', ["--init_from=GPT"], "holds a gpt model; fine-tuning needs BERT"),
        ('{"text": "a", "label": 1}\n', ["--val_data=VAL"], r"validation labels \['2'\] never occur"),
        ('{"text": "a", "label": 1}\n', ["--epochs=0"], "epochs must be a positive integer"),
    ],
)
def test_bad_input_is_named(folders, tmp_path, capsys, content, extra, pattern):
    (tmp_path / "train.jsonl").write_text(content)
    (tmp_path / "val.jsonl").write_text('{"text": "b", "label": 2}\n')
    gpt = folders["tmp"] / "gpt2"
    if not gpt.exists():
        gpt2_folder(gpt)
    extra = [a.replace("GPT", str(gpt)).replace("VAL", str(tmp_path / "val.jsonl")) for a in extra]
    argv = [f"--init_from={folders['bert']}", f"--data={tmp_path / 'train.jsonl'}", f"--out_dir={tmp_path / 'o'}"]
    assert FT.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
