"""GLUE-shaped fine-tuning: TSV, CSV and JSONL in named columns, regression, and the metrics that pick the epoch.

Every run's validation scores are recomputed by scikit-learn or SciPy from the
predictions of its exported model, run by transformers."""

import csv
import json
import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from minipt import finetune as FT
from minipt import metrics as M
from minipt import sample as S

from hf_folders import TEXTS, bert_folder, transformers

WORDS = sorted(set(" ".join(TEXTS).lower().replace(".", "").replace(",", "").replace("?", "").split()))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("tasks") / "bert")


def sentences(rng: random.Random, n: int, labels: list[int] | None = None, k: int = 2) -> list[str]:
    """Random sentences; with ``labels``, each sentence's words come mostly from its label's share of the
    words, so that a few epochs learn something and the predictions vary."""
    def word(label):
        pool = WORDS if label is None or rng.random() < 0.2 else WORDS[label::k]
        return rng.choice(pool)
    return [" ".join(word(label) for _ in range(rng.randint(2, 9))) for label in (labels or [None] * n)]


def write_table(path: Path, header: list[str] | None, rows: list[list], delimiter: str = "\t") -> Path:
    if delimiter == "\t":  # as GLUE writes them: nothing quoted, a quote mark is text
        path.write_text("".join("\t".join(map(str, r)) + "\n" for r in ([header] if header else []) + rows),
                        encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(([header] if header else []) + rows)
    return path


def predictions(out: Path, texts: list[str], pairs: list[str] | None) -> tuple[np.ndarray, object]:
    """transformers' predictions with the run's exported model and tokenizer: classes, or numbers for regression."""
    model = transformers.BertForSequenceClassification.from_pretrained(out / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    batch = tok(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if model.config.problem_type == "regression":
        return logits[:, 0].numpy(), model
    return logits.argmax(-1).numpy(), model


def sklearn_scores(truth, predicted, num_labels: int) -> dict:
    scores = {"accuracy": skm.accuracy_score(truth, predicted), "macro_f1": skm.f1_score(truth, predicted,
                                                                                         average="macro"),
              "matthews": skm.matthews_corrcoef(truth, predicted)}
    if num_labels == 2:
        scores["f1"] = skm.f1_score(truth, predicted, zero_division=0)
    return scores


def scipy_scores(truth, predicted) -> dict:
    return {"pearson": stats.pearsonr(predicted, truth).statistic, "spearman": stats.spearmanr(predicted, truth).statistic}


def run(bert: Path, out: Path, argv: list[str], capsys) -> tuple[dict, list[dict], str]:
    """The command as a user runs it, its default settings but a small model's: (confusion.json, the evaluations,
    what it printed). Full float32 on a GPU too, so that the predictions are those transformers makes on the CPU."""
    assert FT.main([f"--init_from={bert}", f"--out_dir={out}", "--epochs=3", "--batch_size=8",
                    "--learning_rate=3e-3", "--dtype=float32", "--tf32=false", *argv]) == 0
    printed = capsys.readouterr().out
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    return json.loads((out / "confusion.json").read_text()), evals, printed


def check_the_kept_epoch(results: dict, evals: list[dict], metric: str) -> None:
    """The epoch kept is the first with the best score by ``metric``, and its scores are the validation's."""
    assert results["metric"] == metric and len(evals) == 3
    best = max(evals, key=lambda r: (M.rank_key(r[metric]), -r["epoch"]))
    assert results["epoch"] == best["epoch"]
    assert results["validation"]["loss"] == pytest.approx(best["val_loss"])


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")  # scikit-learn and SciPy warn on the degenerate cases checked here
    cases = [(k, rng.integers(0, k, n), rng.integers(0, k, n)) for k in (2, 3, 5) for n in (1, 7, 50, 333)]
    cases += [(2, [1, 1, 1], [1, 1, 1]), (2, [0, 1, 0, 1], [0, 0, 0, 0]), (2, [0, 0, 1], [1, 1, 0]),
              (2, [0, 0], [0, 0]), (3, [2, 0, 2], [2, 0, 2]), (4, [3, 3, 0], [1, 1, 1])]
    for k, truth, predicted in cases:
        ours = M.classification_scores(M.confusion_matrix(truth, predicted, k))
        expected = sklearn_scores(truth, predicted, k)
        assert ours.keys() == expected.keys()
        for name in expected:
            assert ours[name] == pytest.approx(expected[name], abs=1e-12), (name, truth, predicted)
    for n in (2, 5, 100, 1001):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        for a, b in ((x, y), (np.round(x), np.round(y * 2) / 2), (x, -x**3)):  # ties; a monotone relation
            np.testing.assert_allclose(M.average_ranks(a), stats.rankdata(a))
            assert M.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
            assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(M.pearson([1, 2, 3], [2, 2, 2])) and math.isnan(stats.pearsonr([1, 2, 3], [2, 2, 2])[0])
    assert M.rank_key(math.nan) < M.rank_key(-1.0) < M.rank_key(0.5)


# ----------------------------------------------------------------------------- one run per task shape
def test_single_sentence_tsv_like_sst2(bert, tmp_path, capsys):
    rng = random.Random(1)
    labels = [rng.randint(0, 1) for _ in range(40)]
    texts = sentences(rng, 40, labels)
    texts[3] = 'a "quoted word and a lone quote'  # GLUE's TSVs quote nothing
    rows = [[t, label] for t, label in zip(texts, labels)]
    train = write_table(tmp_path / "train.tsv", ["sentence", "label"], rows[:28])
    dev = write_table(tmp_path / "dev.tsv", ["sentence", "label"], rows[28:] + [rows[3]])
    results, evals, printed = run(bert, tmp_path / "out", [f"--data={train}", f"--val_data={dev}",
                                                         "--text_field=sentence"], capsys)
    check_the_kept_epoch(results, evals, "macro_f1")  # the default for classification
    assert results["labels"] == ["0", "1"] and "f1" in results["validation"]
    val = rows[28:] + [rows[3]]
    predicted, model = predictions(tmp_path / "out", [t for t, _ in val], None)
    assert model.config.problem_type == "single_label_classification"
    expected = sklearn_scores([int(label) for _, label in val], predicted, 2)
    assert {k: results["validation"][k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert re.search(r"validation: accuracy [\d.]+, macro_f1 [\d.]+, f1 [\d.]+, matthews -?[\d.]+, loss", printed)


def test_sentence_pair_tsv_like_mrpc_picks_by_the_positive_f1(bert, tmp_path, capsys):
    rng = random.Random(2)
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    labels = [rng.randint(0, 1) for _ in range(36)]
    rows = [[label, 1000 + i, 2000 + i, *sentences(rng, 2, [label, label])] for i, label in enumerate(labels)]
    train, dev = (write_table(tmp_path / name, header, part) for name, part in
                  (("train.tsv", rows[:24]), ("dev.tsv", rows[24:])))
    train.write_text("\ufeff" + train.read_text(encoding="utf-8"), encoding="utf-8")  # a byte-order mark: not a name
    results, evals, _ = run(bert, tmp_path / "out", [
        f"--data={train}", f"--val_data={dev}", "--text_field=#1 String", "--text_pair_field=#2 String",
        "--label_field=Quality", "--num_labels=2", "--metric=f1"], capsys)
    check_the_kept_epoch(results, evals, "f1")
    predicted, _ = predictions(tmp_path / "out", [r[3] for r in rows[24:]], [r[4] for r in rows[24:]])
    expected = sklearn_scores([r[0] for r in rows[24:]], predicted, 2)
    assert {k: results["validation"][k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_regression_tsv_like_stsb_exports_a_regressor_transformers_agrees_with(bert, tmp_path, capsys):
    rng = random.Random(3)
    header = ["index", "genre", "sentence1", "sentence2", "score"]
    labels = [rng.randint(0, 1) for _ in range(40)]
    rows = [[i, "main-news", *sentences(rng, 2, [label, label]), f"{label * 4 + rng.uniform(0, 1):.3f}"]
            for i, label in enumerate(labels)]
    train, dev = (write_table(tmp_path / name, header, part) for name, part in
                  (("train.tsv", rows[:28]), ("dev.tsv", rows[28:])))
    out = tmp_path / "out"
    results, evals, printed = run(bert, out, [
        f"--data={train}", f"--val_data={dev}", f"--test_data={dev}", "--text_field=sentence1",
        "--text_pair_field=sentence2", "--label_field=score", "--num_labels=1"], capsys)
    check_the_kept_epoch(results, evals, "pearson")  # the default for regression
    assert results["labels"] is None and "matrix" not in results["validation"]
    assert results["test"] == pytest.approx(results["validation"])  # the same examples, the kept weights
    assert "regression" in printed and re.search(r"validation: pearson -?[\d.]+, spearman -?[\d.]+, loss", printed)
    truth = [float(r[4]) for r in rows[28:]]
    predicted, model = predictions(out, [r[2] for r in rows[28:]], [r[3] for r in rows[28:]])
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    expected = scipy_scores(truth, predicted)
    assert {k: results["validation"][k] for k in expected} == pytest.approx(expected, abs=1e-5)
    # transformers' loss from labels is the mean squared error the run reports
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    batch = tok([r[2] for r in rows[28:]], [r[3] for r in rows[28:]], padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=torch.tensor(truth)).loss.item()
    assert loss == pytest.approx(results["validation"]["loss"], rel=1e-5)

    assert S.main([f"--out_dir={out}", f"--text={rows[0][2]}", f"--text_b={rows[0][3]}"]) == 0
    score = float(capsys.readouterr().out.split("score")[1])
    single, _ = predictions(out, [rows[0][2]], [rows[0][3]])
    assert score == pytest.approx(float(single[0]), abs=1e-3)


def test_csv_in_named_columns_picks_by_matthews(bert, tmp_path, capsys):
    rng = random.Random(4)
    labels = [rng.randint(0, 2) for _ in range(45)]
    rows = [[["bad", "fine", "good"][label], t] for label, t in zip(labels, sentences(rng, 45, labels, k=3))]
    train = write_table(tmp_path / "train.csv", ["stars", "review"], rows, delimiter=",")
    results, evals, _ = run(bert, tmp_path / "out", [f"--data={train}", "--val_fraction=0.3", "--text_field=review",
                                                     "--label_field=stars", "--metric=matthews"], capsys)
    check_the_kept_epoch(results, evals, "matthews")
    assert results["labels"] == ["bad", "fine", "good"] and "f1" not in results["validation"]
    matrix = np.array(results["validation"]["matrix"])
    truth = np.repeat(np.arange(3), matrix.sum(1))
    predicted = np.concatenate([np.repeat(np.arange(3), row) for row in matrix])
    expected = sklearn_scores(truth, predicted, 3)
    assert {k: results["validation"][k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_jsonl_in_named_fields(bert, tmp_path, capsys):
    rng = random.Random(5)
    labels = [rng.randint(0, 2) for _ in range(40)]
    records = [{"premise": a, "hypothesis": b, "gold": label} for a, b, label in
               zip(sentences(rng, 40, labels, k=3), sentences(rng, 40, labels, k=3), labels)]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[:30]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in records[30:]))
    results, evals, _ = run(bert, tmp_path / "out", [
        f"--data={train}", f"--val_data={dev}", "--text_field=premise", "--text_pair_field=hypothesis",
        "--label_field=gold", "--num_labels=3", "--metric=accuracy"], capsys)
    check_the_kept_epoch(results, evals, "accuracy")
    assert results["labels"] == ["0", "1", "2"]
    predicted, _ = predictions(tmp_path / "out", [r["premise"] for r in records[30:]],
                               [r["hypothesis"] for r in records[30:]])
    expected = sklearn_scores([r["gold"] for r in records[30:]], predicted, 3)
    assert {k: results["validation"][k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_a_tsv_without_header_like_cola(bert, tmp_path, capsys):
    rng = random.Random(6)
    labels = [rng.randint(0, 1) for _ in range(30)]
    rows = [[f"src{i % 3}", label, "*" if not label else "", text]
            for i, (label, text) in enumerate(zip(labels, sentences(rng, 30, labels)))]
    train = write_table(tmp_path / "train.tsv", None, rows)
    argv = [f"--data={train}", "--val_fraction=0.3", "--text_field=3", "--label_field=1"]
    assert FT.main([f"--init_from={bert}", f"--out_dir={tmp_path / 'no'}", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(r"train.tsv:1: the header has no '3'( or '1')? column \(it has 'src0', .*\); a file without "
                     r"a header row: --header=false", err), err
    results, evals, _ = run(bert, tmp_path / "out", [*argv, "--header=false", "--metric=matthews"], capsys)
    check_the_kept_epoch(results, evals, "matthews")
    assert sum(map(sum, results["validation"]["matrix"])) == 9  # 0.3 of the 30 rows, none taken as a header


# ----------------------------------------------------------------------------- bad input
REGRESSION = ["--num_labels=1", "--label_field=score"]


@pytest.mark.parametrize("files, argv, pattern", [
    ({"train.tsv": "text\tscore\na\t1.5\nb\thigh\n"}, REGRESSION,
     r"train.tsv:3: the label 'high' is not a finite number: --num_labels=1 is regression"),
    ({"train.jsonl": '{"text": "a", "score": 1}\n{"text": "b", "score": "nan"}\n'}, REGRESSION,
     r"train.jsonl:2: the label 'nan' is not a finite number"),
    ({"train.tsv": "text\tlabel\na\t0\nb\t1\n", "val.tsv": "text\tlabel\nc\t1\nd\t2\n"}, ["--num_labels=2"],
     r"val.tsv:3: the validation label '2' is not one of 0 to 1 \(--num_labels=2\)"),
    ({"train.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": -1}\n'}, ["--num_labels=3"],
     r"train.jsonl:2: the (training|validation) label -1 is not one of 0 to 2"),
    ({"train.jsonl": '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1.5}\n'}, [],
     r"train.jsonl:\d: the label [\d.]+ is a float; a class is a string or an integer \(numbers to predict: "
     r"--num_labels=1"),
    ({"train.jsonl": '{"text": "a", "label": [1]}\n'}, [], r"train.jsonl:1: the label \[1\] is a list"),
    ({"train.tsv": "sentence\tlabel\na\t0\n"}, [], r"train.tsv:1: the header has no 'text' column \(it has "
                                                   r"'sentence', 'label'\)"),
    ({"train.csv": "text,label\na,0\n"}, ["--text_pair_field=text2"], r"train.csv:1: the header has no 'text2'"),
    ({"train.jsonl": '{"text": "a", "b": "c", "label": 0}\n{"text": "a", "label": 1}\n'}, ["--text_pair_field=b"],
     r"train.jsonl:2: the example has no 'b' \(--text_pair_field\)"),
    ({"train.tsv": "a\t0\n"}, ["--header=false", "--text_field=0", "--label_field=2"],
     r"train.tsv:1: every example needs a '2'"),
    ({"train.txt": "a"}, [], r"examples must be a .csv, .tsv or .jsonl file"),
    ({"train.tsv": "text\tlabel\n" + "a\tx\nb\ty\nc\tz\n" * 3}, ["--metric=f1"],
     r"--metric=f1 scores the positive class of two labels; .*train.tsv has 3 \(x, y, z\): use macro_f1"),
    ({}, ["--metric=pearson"], r"metric=pearson scores regression, which --num_labels=1 asks for: use accuracy or "
                               r"macro_f1 or f1 or matthews"),
    ({}, ["--num_labels=1", "--metric=accuracy"], r"metric=accuracy scores classes; --num_labels=1 is regression: "
                                                  r"use pearson or spearman"),
    ({}, ["--num_labels=3", "--metric=f1"], r"metric=f1 scores the positive class of two labels; num_labels=3"),
    ({}, ["--num_labels=0"], r"num_labels must be a positive integer \(1: regression\) or none, got 0"),
])
def test_bad_labels_and_settings_are_named(bert, tmp_path, capsys, files, argv, pattern):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    paths = {"train": "--data", "val": "--val_data"}
    given = [f"{paths[Path(name).stem]}={tmp_path / name}" for name in files]
    assert FT.main([f"--init_from={bert}", f"--out_dir={tmp_path / 'out'}", *given, *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
