"""The files a user names are read, and what cannot be read is named: gzipped text, files of no known
extension, the files a folder's search skips, and broken JSONL and CSV lines with the parser's reason."""

import gzip
import random

import numpy as np
import pytest

from minipt import finetune as FT
from minipt import train as T
from minipt.data import prepare_data
from minipt.data import sources as S
from minipt.tokenizer import train_tokenizer
from hf_folders import bert_folder
from test_data_formats import TEXTS, WORDS, all_tokens, quiet, write_text_corpus


def train(tmp_path, data, capsys, **settings) -> tuple[int, str, str]:
    """``python -m minipt.train`` on ``data`` with a tiny model: (exit code, stdout, stderr)."""
    args = dict(data=data, cache_dir=tmp_path / "cache", out_dir=tmp_path / "run", tokenizer="char", n_layer=1,
                n_head=2, n_embd=16, block_size=16, batch_size=2, max_iters=1, eval_interval=1, eval_iters=1,
                progress="false", sample_tokens=0, overwrite="true", **settings)
    code = T.main([f"--{k}={v}" for k, v in args.items()])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    train_tokenizer("bpe", TEXTS, 300, "gpt").save(str(path))
    return path


def tokens(data, bpe, cache, **kw) -> dict[str, np.ndarray]:
    prep = prepare_data(model="gpt", data=str(data), tokenizer=str(bpe), split="doc", cache_dir=cache, log=quiet,
                        **kw)
    return {split: all_tokens(getattr(prep, split)) for split in ("train", "val")}


# ----------------------------------------------------------------------------- gzipped text, any name
@pytest.mark.parametrize("fmt", ["txt", "md"])
def test_gzipped_txt_and_md_give_the_tokens_of_the_plain_files(tmp_path, bpe, fmt):
    plain = write_text_corpus(tmp_path / "plain", fmt)
    packed = tmp_path / "packed"
    packed.mkdir()
    for path in plain.iterdir():
        (packed / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    want, got = tokens(plain, bpe, tmp_path / "c"), tokens(packed, bpe, tmp_path / "c")
    for split in want:
        np.testing.assert_array_equal(got[split], want[split])


def test_a_gzipped_text_larger_than_a_piece_splits_as_the_plain_file(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(S, "PIECE_BYTES", 2048)  # 60 KB of text stands for many pieces
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(1000)) + "\n"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "big.txt").write_text(text)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "big.txt.gz").write_bytes(gzip.compress(text.encode()))
    want, got = tokens(tmp_path / "p", bpe, tmp_path / "c"), tokens(tmp_path / "g", bpe, tmp_path / "c")
    assert len(want["val"]) > 100
    for split in want:
        np.testing.assert_array_equal(got[split], want[split])


def test_train_reads_a_txt_gz_and_a_named_file_of_any_extension(tmp_path, bpe, capsys):
    text = "".join(TEXTS)
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(text.encode()))
    code, out, _ = train(tmp_path, tmp_path / "corpus.txt.gz", capsys)
    assert code == 0 and "done: run saved" in out
    for name in ("notes", "corpus.text", "plays.csv"):  # no extension, or one minipt does not know: UTF-8 text
        (tmp_path / name).write_text(text)
        code, out, _ = train(tmp_path, tmp_path / name, capsys)
        assert code == 0 and "done: run saved" in out
    (tmp_path / "ref.txt").write_text(text)
    for name in ("notes", "corpus.txt.gz"):
        assert tokens(tmp_path / name, bpe, tmp_path / "c2")["train"].tolist() == \
            tokens(tmp_path / "ref.txt", bpe, tmp_path / "c2")["train"].tolist()


@pytest.mark.parametrize("name, body, message", [
    ("scan.pdf", b"%PDF-1.4\n\x00\x01binary", "scan.pdf: not a text file (a NUL byte at offset 9)"),
    ("old.text", "Ça va très bien\n".encode("latin-1"), "old.text is not UTF-8 text (byte 0xc7 at offset 0)"),
    ("corpus.gz", gzip.compress(b"some text"), "corpus.gz: a gzip file whose name does not say what it holds: "
                                               "name it .txt.gz, .md.gz or .jsonl.gz"),
    ("cut.txt.gz", gzip.compress(b"some text " * 500)[:40], "cut.txt.gz: corrupt or truncated gzip stream"),
    ("late.txt", b"fine text\n" * 10000 + b"\xff", "late.txt is not UTF-8 text (byte 0xff at offset 100000)"),
])
def test_a_named_file_that_is_not_utf8_text_is_named(tmp_path, capsys, name, body, message):
    (tmp_path / name).write_bytes(body)
    code, _, err = train(tmp_path, tmp_path / name, capsys)
    assert code == 2 and message in err, err


# ----------------------------------------------------------------------------- a folder's skipped files
def test_a_folder_lists_the_files_it_skips_in_one_line(tmp_path, capsys):
    folder = write_text_corpus(tmp_path / "corpus", "txt", TEXTS[:20])
    for name in ("README", "LICENSE", "notes.docx", "data.csv", "x.pdf", "y.pdf", "z.pdf"):
        (folder / name).write_text("not read")
    code, out, _ = train(tmp_path, folder, capsys)
    assert code == 0
    (line,) = [line for line in out.splitlines() if "skipped" in line]
    assert line.startswith(f"data: skipped 7 files (LICENSE, README, data.csv, notes.docx, x.pdf, ...) in {folder}, "
                           "of no format minipt reads (.bin, .jsonl")
    assert "name a file in --data to read it as text" in line


def test_a_folder_of_only_unknown_files_names_them(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("a.doc", "b.doc"):
        (folder / name).write_text("text")
    code, _, err = train(tmp_path, folder, capsys)
    assert code == 2
    assert f"data folder '{folder}' holds no file of a known format (.bin, " in err
    assert "it holds only 2 files (a.doc, b.doc); name a file in --data to read it as text" in err
    (folder / "a.doc").unlink(), (folder / "b.doc").unlink()
    code, _, err = train(tmp_path, folder, capsys)
    assert code == 2 and "(it is empty)" in err


# ----------------------------------------------------------------------------- the parser's whole reason
def test_a_broken_jsonl_line_gives_the_parsers_reason_and_column(tmp_path, capsys):
    good = '{"text": "a fine line of text"}\n'
    cases = {
        '{"text": "a raw\ttab"}\n': "bad.jsonl:2: not valid JSON: Invalid control character '\\t' inside a string "
                                    "(escape it, as \\t, \\n or \\u00XX) at column 16, "
                                    "near '{\"text\": \"a raw\\ttab\"}'",
        '{"text": "no end}\n': "bad.jsonl:2: not valid JSON: the line ends inside a string (a quote left open?) "
                               "at column 18",
        '{"text": "no end}': "bad.jsonl:2: not valid JSON: Unterminated string starting at column 10",
        '{"text": "x" "y"}\n': "bad.jsonl:2: not valid JSON: Expecting ',' delimiter at column 14",
    }
    for line, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(good + line)
        code, _, err = train(tmp_path, tmp_path / "bad.jsonl", capsys)
        assert code == 2 and message in err, err


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("bert") / "bert")


@pytest.mark.parametrize("name, body, message", [
    ("train.csv", 'text,label\ngood,1\n"open quote, 0\nfine,1\nmore,0\n',
     "train.csv:3: a quoted field opened on line 3 is never closed (the file ends inside it)"),
    ("train.csv", "text,label\ngood,1\nhello, world,0\n",
     'train.csv:3: 3 field(s) where the header has 2 (text, label); a text holding a comma must be quoted'),
    ("train.csv", 'text,label\ngood,1\n"quoted" tail,0\n',
     "train.csv:3: not valid CSV (',' expected after '\"')"),
    ("train.csv", "text,label\ngood,1\n\"two\nlines\",0\nshort\n", "train.csv:5: 1 field(s) where the header has 2"),
    ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b\tc", "label": 0}\n',
     "train.jsonl:2: not a JSON object: Invalid control character '\\t' inside a string"),
])
def test_a_broken_examples_line_is_named_with_the_parsers_reason(bert, tmp_path, capsys, name, body, message):
    (tmp_path / name).write_text(body)
    assert FT.main([f"--init_from={bert}", f"--data={tmp_path / name}", f"--out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_quoted_text_over_several_lines_is_one_example(tmp_path):
    from minipt.data.examples import read_examples

    (tmp_path / "t.csv").write_text('text,label\n\n"two\nlines, and a comma",1\nx,0\n')
    assert [(e.line, e.text, e.label) for e in read_examples(str(tmp_path / "t.csv"))] == [
        (3, "two\nlines, and a comma", "1"), (5, "x", "0")]
