"""``python -m minipt.eval --task=hellaswag``: ending losses against transformers, llm.c's eval file, bad files."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minipt import eval as E
from minipt import multiple_choice as MC
from minipt.load import load_run
from minipt.runtime import setup

from hf_folders import TEXTS, bert_folder, gpt2_folder, hf_tokenizer, transformers

BLOCK_SIZE = 64
WORDS = " ".join(TEXTS).split()


def random_examples(seed: int, n: int = 9) -> list[dict]:
    """HellaSwag records of random words: contexts of 1 to 12 words and one of 90 (past block_size), 2 to 5
    endings of 1 to 12 words, the context given as ``ctx`` or as ``ctx_a`` + ``ctx_b``, labels as ints or strings."""
    rng = random.Random(seed)
    phrase = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    records = []
    for i in range(n):
        context = phrase(90 if i == 3 else rng.randint(1, 12))
        endings = [phrase(rng.randint(1, 12)) for _ in range(4 if i % 3 else rng.choice((2, 3, 5)))]
        label = rng.randrange(len(endings))
        record = {"ind": i, "ctx": context, "endings": endings, "label": str(label) if i % 2 else label}
        if i % 4 == 1:  # the dataset's other spelling: ctx is ctx_a, a space, then ctx_b
            words = context.split()
            record = {**record, "ctx_a": " ".join(words[:-1]), "ctx_b": words[-1]}
            del record["ctx"]
        records.append(record)
    return records


def context_of(record: dict) -> str:
    return record.get("ctx") or " ".join(p for p in (record["ctx_a"], record["ctx_b"]) if p)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_eval_file(path: Path, examples: list[tuple[list[int], list[list[int]], int]]) -> Path:
    """llm.c's write_evalfile (dev/data/data_common.py), from its documented layout."""
    stream, longest = [], 0
    for index, (context, endings, label) in enumerate(examples):
        words = [2**16 - 1, 0, index, label, len(endings), len(context), *context]
        for ending in endings:
            words += [len(ending), *ending]
        words[1] = 2 * len(words)
        longest = max(longest, words[1])
        stream += words
    header = np.zeros(256, np.int32)
    header[:4] = [20240522, 1, len(examples), longest]
    path.write_bytes(header.tobytes() + np.asarray(stream, np.uint16).tobytes())
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hellaswag")
    gpt2 = gpt2_folder(tmp / "gpt2", n_embd=64, block_size=BLOCK_SIZE)
    records = random_examples(seed=0)
    hf_tok = hf_tokenizer(gpt2)
    tokens = [(hf_tok.encode(context_of(r)), [hf_tok.encode(" " + e) for e in r["endings"]], int(r["label"]))
              for r in records]
    return {"gpt2": gpt2, "records": records, "tokens": tokens, "jsonl": write_jsonl(tmp / "hellaswag.jsonl", records),
            "bin": write_eval_file(tmp / "hellaswag_val.bin", tokens), "tmp": tmp}


def reference_losses(folder: Path, tokens) -> list[np.ndarray]:
    """Each ending's summed loss by transformers' GPT2LMHeadModel in float64, one row at a time (llm.c's
    render_example), the row cut to its last block_size + 1 tokens."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval().double()
    out = []
    for context, endings, _ in tokens:
        sums = []
        for ending in endings:
            row = (context + ending)[-(BLOCK_SIZE + 1):]
            with torch.no_grad():
                logits = hf(torch.tensor([row[:-1]])).logits[0]
            sums.append(F.cross_entropy(logits[-len(ending):], torch.tensor(ending), reduction="sum").item())
        out.append(np.array(sums))
    return out


def test_ending_losses_and_accuracies_match_transformers(folders):
    model, tok, _ = load_run(folders["gpt2"])
    assert model.config.n_embd == 64 and model.config.block_size == BLOCK_SIZE
    questions = MC.read_questions(str(folders["jsonl"]), tok)
    # minipt's tokenizer reads the folder as transformers' does
    assert [(q.context, q.endings, q.label) for q in questions] == folders["tokens"]
    ours, truncated = MC.ending_losses(model, questions, setup("cpu", "float32"), block_size=BLOCK_SIZE,
                                       batch_size=4)
    expected = reference_losses(folders["gpt2"], folders["tokens"])
    assert truncated == 1 == sum(any(len(c) + len(e) > BLOCK_SIZE + 1 for e in es) for c, es, _ in folders["tokens"])
    for q, got, want in zip(questions, ours, expected):
        counts = np.array([len(e) for e in q.endings])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # summed
        np.testing.assert_allclose(got / counts, want / counts, rtol=0, atol=1e-4)  # per token

    records = folders["records"]
    picks = {
        "acc": [int(np.argmin(s)) for s in expected],
        "acc_norm": [int(np.argmin(s / [len(e) for e in t[1]])) for s, t in zip(expected, folders["tokens"])],
        # lm-evaluation-harness: log-likelihood over len(ending), the text without its leading space
        "acc_norm_chars": [int(np.argmax(-s / [len(e) for e in r["endings"]])) for s, r in zip(expected, records)],
    }
    assert len({tuple(p) for p in picks.values()}) == 3  # the three measures pick differently here
    result = MC.accuracies(questions, ours, tok)
    labels = [int(r["label"]) for r in records]
    assert result == {"examples": len(records), **{
        name: pytest.approx(np.mean(np.array(p) == labels)) for name, p in picks.items()}}


def test_the_scores_do_not_depend_on_the_batch_size(folders):
    model, tok, _ = load_run(folders["gpt2"], backend="torch")
    questions = MC.read_questions(str(folders["jsonl"]), tok)
    runs = [MC.ending_losses(model, questions, setup("cpu", "float32"), block_size=BLOCK_SIZE, batch_size=b)
            for b in (1, 2, 5, 100)]
    for losses, truncated in runs[1:]:
        assert truncated == runs[0][1]
        for got, want in zip(losses, runs[0][0]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert len({json.dumps(MC.accuracies(questions, losses, tok)) for losses, _ in runs}) == 1


def test_a_shorter_block_size_keeps_the_end_of_each_row(folders):
    model, tok, _ = load_run(folders["gpt2"])
    questions = MC.read_questions(str(folders["jsonl"]), tok)
    block_size = max(len(e) for q in questions for e in q.endings)  # an ending just fits: the context is cut most
    losses, truncated = MC.ending_losses(model, questions, setup("cpu", "float32"), block_size=block_size,
                                         batch_size=3)
    long = [q for q in questions if any(len(q.context) + len(e) > block_size + 1 for e in q.endings)]
    assert truncated == len(long) >= 2
    q, got = next((q, s) for q, s in zip(questions, losses) if q in long)
    ending = q.endings[0]
    row = torch.tensor([(q.context + ending)[-(block_size + 1):]])
    logits = model(row[:, :-1]).logits[0]
    assert got[0] == pytest.approx(F.cross_entropy(logits[-len(ending):], row[0, -len(ending):], reduction="sum")
                                   .item(), rel=1e-5)


def test_the_command_scores_the_jsonl_and_llmc_file_alike(folders, tmp_path, capsys):
    results = {}
    for name in ("jsonl", "bin"):
        out = tmp_path / f"{name}.json"
        # defaults: batch_size 8 and the model's block_size; full float32 on a GPU too, to compare with the CPU's
        assert E.main(["--task", "hellaswag", "--data", str(folders[name]), "--out_dir", str(folders["gpt2"]),
                       f"--json={out}", "--dtype=float32", "--tf32=false"]) == 0
        printed = capsys.readouterr().out
        assert re.search(r"^examples\s+9$", printed, re.M) and re.search(r"^acc_norm\s+0\.\d{4}$", printed, re.M)
        results[name] = {k: v for k, v in json.loads(out.read_text()).items() if k not in ("data", "settings")}
    assert results["jsonl"] == results["bin"]
    model, tok, _ = load_run(folders["gpt2"])
    questions = MC.read_questions(str(folders["jsonl"]), tok)
    losses, _ = MC.ending_losses(model, questions, setup("cpu", "float32"), block_size=BLOCK_SIZE, batch_size=8)
    assert results["bin"] == {"model": str(folders["gpt2"]), "model_type": "gpt", "task": "hellaswag",
                              "block_size": BLOCK_SIZE, **MC.accuracies(questions, losses, tok), "truncated": 1}


def corrupt(good: bytes, at: int, value: int, dtype: str = "<u2") -> bytes:
    data = bytearray(good)
    data[at:at + np.dtype(dtype).itemsize] = np.array([value], dtype).tobytes()
    return bytes(data)


def bad_files(good: bytes, second: int) -> list[tuple[str, bytes, str]]:
    """(name, content, the error expected) per malformed file; ``second``: the byte where example 1 starts."""
    return [
        ("short.bin", good[:1000], r"short.bin: byte 0: 1000 bytes, shorter than the 1024-byte header"),
        ("shard.bin", corrupt(good, 0, 20240520, "<i4"), r"byte 0: magic number 20240520, not 20240522 .*token shard"),
        ("version.bin", corrupt(good, 4, 2, "<i4"), r"version.bin: byte 4: version 2, expected 1"),
        ("more.bin", corrupt(good, 8, 10, "<i4"), r"byte \d+: the file ends after 9 of the 10 examples"),
        ("delimiter.bin", corrupt(good, second, 7), rf"byte {second} \(example 1\): expected the example delimiter "
                                                    r"65535, found 7"),
        ("size.bin", corrupt(good, second + 2, 60000), rf"byte {second} \(example 1\): the example's size \(60000"),
        ("label.bin", corrupt(good, second + 6, 9), r"\(example 1\): 4 ending\(s\) and the label 9"),
        ("length.bin", corrupt(good, second + 10, 0), rf"the length 0 at byte {second + 10} is empty"),
        ("token.bin", corrupt(good, second + 12, 50000),
         rf"\(example 1\): token id 50000 at byte {second + 12} is past the \d+ tokens of the model's tokenizer: "
         r"the file holds GPT-2 ids"),
        ("tail.bin", good + b"\x01\x00", r"byte \d+: 2 bytes follow the 9 examples the header counts"),
        ("odd.bin", good + b"\x01", r"the examples are uint16, but the file has an odd size"),
    ]


JSONL_ERRORS = [
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\nnot json\n', r"bad.jsonl:2: not a JSON object"),
    ('{"ctx": "a", "endings": ["b", "c"]}\n', r"bad.jsonl:1: no 'label' \(HellaSwag's test split is unlabelled"),
    ('\n{"ctx": "a", "endings": ["b", "c"], "label": 2}\n', r"bad.jsonl:2: the label 2 is not the index of one of "
                                                            r"its 2 endings"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": true}\n', r"bad.jsonl:1: the label true is not the index"),
    ('{"ctx": "a", "endings": ["b"], "label": 0}\n', r"bad.jsonl:1: 'endings' must be a list of two or more"),
    ('{"ctx": "a", "endings": ["b", ""], "label": 0}\n', r"bad.jsonl:1: 'endings' must be a list of two or more "
                                                         r"non-empty strings"),
    ('{"endings": ["b", "c"], "label": 0}\n', r"bad.jsonl:1: an example needs a non-empty 'ctx' \(or 'ctx_a'"),
    ('[1, 2]\n', r"bad.jsonl:1: not a JSON object but a list"),
    ('\n\n', r"bad.jsonl holds no examples"),
    ('{"ctx": "a", "endings": ["b", "' + "cat " * 70 + '"], "label": 0}\n',
     r"bad.jsonl:1: an ending of \d+ tokens is longer than block_size=64"),
]


def test_bad_files_are_named_with_their_line_or_byte(folders, tmp_path, capsys):
    good = folders["bin"].read_bytes()
    second = 1024 + 2 * (6 + len(folders["tokens"][0][0]) + sum(len(e) + 1 for e in folders["tokens"][0][1]))
    assert good[second:second + 2] == b"\xff\xff"
    cases = bad_files(good, second) + [("bad.jsonl", text.encode(), pattern) for text, pattern in JSONL_ERRORS]
    cases += [("bad.jsonl", b'{"ctx": "\xff", "endings": ["b", "c"], "label": 0}\n', r"bad.jsonl:1 is not UTF-8"),
              ("hellaswag.txt", b"x", r"--task=hellaswag reads HellaSwag's .jsonl or llm.c's eval .bin")]
    for name, content, pattern in cases:
        (tmp_path / name).write_bytes(content)
        assert E.main(["--task=hellaswag", f"--data={tmp_path / name}", f"--out_dir={folders['gpt2']}"]) == 2, name
        err = capsys.readouterr().err
        assert re.search(pattern, err) and str(tmp_path) in err, (name, err)
        assert "Traceback" not in err


def test_settings_that_do_not_fit_the_task_are_named(folders, tmp_path, capsys):
    bert = bert_folder(tmp_path / "bert")
    cases = [
        ([f"--out_dir={bert}", f"--data={folders['jsonl']}"], r"--task=hellaswag scores a GPT.* holds a bert model"),
        ([f"--out_dir={folders['gpt2']}"], r"--data is required: HellaSwag's .jsonl"),
        ([f"--out_dir={folders['gpt2']}", f"--data={tmp_path / 'missing.jsonl'}"], r"missing.jsonl is not a file"),
        ([f"--out_dir={folders['gpt2']}", f"--data={folders['jsonl']}", "--mlm_probability=0.2"],
         r"mlm_probability applies to --task=text"),
        ([f"--out_dir={folders['gpt2']}", f"--data={folders['jsonl']}", "--block_size=65"],
         r"block_size=65 exceeds the model's 64 positions"),
    ]
    for argv, pattern in cases:
        assert E.main(["--task=hellaswag", *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err), err
    assert E.main(["--task=mmlu", f"--out_dir={folders['gpt2']}"]) == 2
    assert "task must be one of text, hellaswag; got 'mmlu'" in capsys.readouterr().err
