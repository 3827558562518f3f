"""Every input format, streaming tokenization into shards, resuming, and bad input.

Each test writes its small corpus itself: text as txt, md, jsonl (plain, gzip,
zstd) and parquet; tokens as nanoGPT ``.bin`` files and llm.c shards with their
header, written with numpy.
"""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from minipt import train as T
from minipt.data import prepare as P
from minipt.data import prepare_data
from minipt.data.sources import DataError, segments
from minipt.data.tokens import LLMC_MAGIC
from minipt.runlog import read_metrics
from minipt.tokenizer import TextTokenizer, train_tokenizer
from minipt.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king queen fool sword crown night day love war peace heart hand eye".split()


def quiet(message):
    pass


def prose(seed: int) -> str:
    rng = random.Random(seed)
    paras = [" ".join(rng.choices(WORDS, k=rng.randint(4, 30))).capitalize() + "." for _ in range(rng.randint(1, 5))]
    return "\n\n".join(paras) + "\n"


TEXTS = [prose(i) for i in range(40)]


def write_text_corpus(folder: Path, fmt: str, texts=TEXTS, field: str = "text") -> Path:
    """``texts`` in format ``fmt``; the path to pass as --data."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("txt", "md"):
        for i, t in enumerate(texts):
            (folder / f"doc{i:03d}.{fmt}").write_text(t, encoding="utf-8")
        return folder
    if fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), folder / "c.parquet")
        return folder / "c.parquet"
    body = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    path = folder / f"c.{fmt}"
    if fmt == "jsonl.gz":
        body = gzip.compress(body)
    elif fmt == "jsonl.zst":
        body = zstandard.ZstdCompressor().compress(body)
    path.write_bytes(body)
    return path


def write_llmc(path: Path, ids, *, magic=LLMC_MAGIC, version=1, count=None) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(ids) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(ids, dtype="<u2").tobytes())
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    train_tokenizer("bpe", TEXTS, 300, "gpt").save(str(path))
    return path


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "wordpiece.json"
    train_tokenizer("wordpiece", TEXTS, 200, "bert").save(str(path))
    return path


def all_tokens(split) -> np.ndarray:
    return np.concatenate([np.asarray(s.tokens) for s in split.shards])


# ----------------------------------------------------------------------------- formats
TEXT_FORMATS = ("txt", "md", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")


@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_every_text_format_gives_the_same_tokens(tmp_path, fmt, bpe):
    reference = prepare_data(model="gpt", data=str(write_text_corpus(tmp_path / "ref", "txt")), tokenizer=str(bpe),
                             split="doc", cache_dir=tmp_path / "c", log=quiet)
    data = write_text_corpus(tmp_path / fmt, fmt, field="body")
    prep = prepare_data(model="gpt", data=str(data), tokenizer=str(bpe), split="doc", text_field="body",
                        cache_dir=tmp_path / "c", log=quiet)
    for split in ("train", "val"):
        np.testing.assert_array_equal(all_tokens(getattr(prep, split)), all_tokens(getattr(reference, split)))


def test_nanogpt_bin_files_are_read_as_they_are(tmp_path, bpe, monkeypatch):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 300, 5000).astype(np.uint16), rng.integers(0, 300, 700).astype(np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    prep = prepare_data(model="gpt", data=str(tmp_path), vocab_size=300, cache_dir=tmp_path / "c", log=quiet)
    np.testing.assert_array_equal(all_tokens(prep.train), train)
    np.testing.assert_array_equal(all_tokens(prep.val), val)
    assert prep.tokenizer.vocab_size == 300 and prep.tokenizer.decode([7, 299]) == "<7><299>"
    with monkeypatch.context() as m:  # a resumed run passes the saved stand-in: its ids were checked already
        m.setattr(P.TF, "check_ids", None)
        again = prepare_data(model="gpt", data=str(tmp_path), tokenizer=str(prep.cache_path / "tokenizer.json"),
                             cache_dir=tmp_path / "c", log=quiet)
    assert again.cache_path.resolve() == prep.cache_path
    given = prepare_data(model="gpt", data=str(tmp_path / "train.bin"), tokenizer=str(bpe), val_fraction=0.1,
                         cache_dir=tmp_path / "c", log=quiet)
    assert given.tokenizer.to_str() == TextTokenizer.from_file(bpe, "gpt").to_str()
    assert all_tokens(given.train).tolist() == train[:4500].tolist()  # no val.bin: the stream's tail
    assert all_tokens(given.val).tolist() == train[4500:].tolist()


def test_llmc_shards_are_read_after_their_header(tmp_path):
    rng = np.random.default_rng(1)
    shards = [rng.integers(0, 50257, n) for n in (3000, 1234, 800)]
    write_llmc(tmp_path / "fineweb_val_000000.bin", shards[2])
    write_llmc(tmp_path / "fineweb_train_000001.bin", shards[0])
    write_llmc(tmp_path / "fineweb_train_000002.bin", shards[1])
    prep = prepare_data(model="gpt", data=str(tmp_path / "fineweb_*.bin"), vocab_size=50257,
                        cache_dir=tmp_path / "c", log=quiet)
    assert [len(s.tokens) for s in prep.train.shards] == [3000, 1234] and prep.train.shards[0].tokens.dtype == "uint16"
    np.testing.assert_array_equal(all_tokens(prep.train), np.concatenate(shards[:2]))
    np.testing.assert_array_equal(all_tokens(prep.val), shards[2])


# ----------------------------------------------------------------------------- streaming into shards
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_streamed_shards_hold_exactly_the_in_memory_tokens(tmp_path, model, bpe, wordpiece):
    tok_path = bpe if model == "gpt" else wordpiece
    tok = TextTokenizer.from_file(tok_path, model)
    data = write_text_corpus(tmp_path, "jsonl")
    prep = prepare_data(model=model, data=str(data), tokenizer=str(tok_path), split="holdout", val_fraction=0.2,
                        shard_tokens=300, cache_dir=tmp_path / "c", log=quiet)
    assert len(prep.train.shards) > 3
    for split in ("train", "val"):
        texts = [t for i, t in enumerate(TEXTS) if P.S.held_out(f"c.jsonl:{i + 1}", 0.2) == (split == "val")]
        if model == "gpt":
            expected = [ids + [tok.eot_id] for ids in tok.encode_batch(texts)]
        else:
            expected = [ids for t in texts for ids in tok.encode_batch(segments(t)) if ids]
        assert all_tokens(getattr(prep, split)).tolist() == [i for ids in expected for i in ids]
        for shard in getattr(prep, split).shards:  # each shard's index marks document bounds
            bounds = shard.document_offsets if model == "gpt" else shard.segment_offsets[shard.document_offsets]
            assert bounds[0] == 0 and bounds[-1] == len(shard.tokens)
            if model == "gpt":
                assert (np.asarray(shard.tokens)[bounds[1:] - 1] == tok.eot_id).all()
    assert all(len(s.tokens) >= 300 for s in prep.train.shards[:-1])  # a shard closes once it holds shard_tokens


def test_an_interrupted_tokenization_resumes_with_identical_shards(tmp_path, monkeypatch):
    data = str(write_text_corpus(tmp_path, "jsonl.zst"))
    kwargs = dict(model="gpt", data=data, tokenizer="char", split="holdout", shard_tokens=400, log=quiet)
    whole = prepare_data(**kwargs, cache_dir=tmp_path / "whole")

    close = P._ShardWriter.close

    def killed_at_the_third_shard(self):
        if self.stem.name == "train-00002":
            raise KeyboardInterrupt
        close(self)

    monkeypatch.setattr(P._ShardWriter, "close", killed_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(**kwargs, cache_dir=tmp_path / "resumed")
    partial = next((tmp_path / "resumed").iterdir())
    assert partial.name.endswith(".partial") and len(list(partial.glob("part-*.json"))) == 2
    monkeypatch.undo()

    opened = []
    init = P._ShardWriter.__init__

    def recording(self, folder, split, part, *args):
        opened.append(part)
        init(self, folder, split, part, *args)

    monkeypatch.setattr(P._ShardWriter, "__init__", recording)
    resumed = prepare_data(**kwargs, cache_dir=tmp_path / "resumed")
    assert min(opened) == 2  # the finished shards were kept, not written again
    assert resumed.cache_path.name == whole.cache_path.name
    files = sorted(p.name for p in whole.cache_path.iterdir())
    assert files == sorted(p.name for p in resumed.cache_path.iterdir()) and len(files) > 10
    for name in files:
        assert (whole.cache_path / name).read_bytes() == (resumed.cache_path / name).read_bytes(), name
    assert [p.name for p in (tmp_path / "resumed").iterdir() if not p.is_symlink()] == [whole.cache_path.name]


def test_a_large_corpus_trains_its_tokenizer_on_a_sample_from_all_of_it(tmp_path):
    # Document i holds one character of its own, so the vocabulary shows which documents the sample read.
    texts = [f"{chr(0x4E00 + i)} " + "x" * 95 + "\n" for i in range(80)]
    data = write_text_corpus(tmp_path, "txt", texts)
    prep = prepare_data(model="gpt", data=str(data), tokenizer="char", tokenizer_sample_mb=2000 / P.MB,
                        cache_dir=tmp_path / "c", log=quiet)
    seen = [i for i in range(80) if chr(0x4E00 + i) in prep.tokenizer.tokenizer.get_vocab()]
    assert 10 <= len(seen) <= 21 and seen[0] < 8 and seen[-1] >= 60  # about 2000 characters, head to tail
    assert json.loads((prep.cache_path / "meta.json").read_text())["settings"]["split"] == "holdout"


# ----------------------------------------------------------------------------- bad input
def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def truncated(body: bytes) -> bytes:
    return body[:len(body) // 2]


BIG = "".join(json.dumps({"text": prose(i)}) + "\n" for i in range(200)).encode()
BAD = {
    "non-UTF-8 text": (lambda p: (p / "l.txt").write_bytes(b"caf\xe9 au lait") and p / "l.txt",
                       r"l\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    "non-UTF-8 record": (lambda p: (p / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n') and
                         p / "u.jsonl", r"u\.jsonl:2 is not UTF-8"),
    "record without the field": (lambda p: jsonl(p / "t.jsonl", ['{"text": "a"}', '{"body": "x"}']),
                                 r't\.jsonl:2: expected an object with a string field "text", got no such field'),
    "record with a number": (lambda p: jsonl(p / "n.jsonl", ['{"text": 3}']), r"n\.jsonl:1: .*got a int"),
    "truncated gzip": (lambda p: (p / "c.jsonl.gz").write_bytes(truncated(gzip.compress(BIG))) and p / "c.jsonl.gz",
                       r"c\.jsonl\.gz: corrupt or truncated compressed stream after line \d+"),
    "corrupt gzip": (lambda p: (p / "x.jsonl.gz").write_bytes(gzip.compress(BIG)[:30] + b"\xff" * 64) and
                     p / "x.jsonl.gz", r"x\.jsonl\.gz: corrupt or truncated compressed stream"),
    "truncated zstd": (lambda p: (p / "c.jsonl.zst").write_bytes(truncated(zstandard.compress(BIG))) and
                       p / "c.jsonl.zst", r"c\.jsonl\.zst: corrupt or truncated .*ends inside a zstd frame"),
    "parquet without the column": (lambda p: pq.write_table(pa.table({"body": ["a"]}), p / "p.parquet") or
                                   p / "p.parquet", r"p\.parquet: no column 'text' \(columns: body\)"),
    "parquet column of numbers": (lambda p: pq.write_table(pa.table({"text": [1, 2]}), p / "q.parquet") or
                                  p / "q.parquet", r"q\.parquet: column 'text' holds int64, expected strings"),
    "llm.c wrong magic": (lambda p: write_llmc(p / "web_train_000001.bin", [1, 2], magic=123),
                          r"web_train_000001\.bin: not an llm\.c token shard \(expected magic 20240520 at offset 0, "
                          r"magic 123\)"),
    "llm.c wrong version": (lambda p: write_llmc(p / "web_train_000001.bin", [1, 2], version=2),
                            r"web_train_000001\.bin: llm\.c shard version 2 at offset 4, expected 1"),
    "llm.c count": (lambda p: write_llmc(p / "web_train_000001.bin", [1, 2, 3], count=100),
                    r"web_train_000001\.bin: the header's token count 100 \(offset 8\) needs 1224 bytes, "
                    r"the file has 1030"),
    "token id past the vocabulary": (lambda p: np.array([1, 2, 3, 4, 5, 300, 6], np.uint16).tofile(p / "train.bin")
                                     or p / "train.bin",
                                     r"train\.bin: token id 300 at token 5 \(byte offset 10\) is not below the "
                                     r"vocabulary size 256"),
    "empty corpus": (lambda p: jsonl(p / "e.jsonl", ['{"text": "  "}', '{"text": ""}']), "is empty"),
    "empty files": (lambda p: (p / "a.txt").write_text("") or (p / "b.md").write_text("") or p, "is empty"),
    "glob matching nothing": (lambda p: p / "*.parquet", r"data glob .*\*\.parquet' matches no file"),
    "text beside tokens": (lambda p: (p / "notes.txt").write_text("a") and (p / "web.bin").write_bytes(b"ab") and p,
                           r"mixes text files and \.bin token files; .* e\.g\. --data='.*in/\*\.bin'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_named_and_leaves_nothing_in_the_cache(tmp_path, case):
    make, pattern = BAD[case]
    (tmp_path / "in").mkdir()
    data = make(tmp_path / "in")
    with pytest.raises(DataError, match=pattern):
        prepare_data(model="gpt", data=str(data), tokenizer="char" if "bin" not in str(data) else "auto",
                     vocab_size=256, cache_dir=tmp_path / "c", log=quiet)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_bert_refuses_token_files(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=r"BERT cannot train on token files: .*\[CLS\], \[SEP\] and \[MASK\]"):
        prepare_data(model="bert", data=str(tmp_path / "train.bin"), cache_dir=tmp_path / "c", log=quiet)


def test_the_cli_names_bad_input_without_a_traceback(tmp_path, capsys):
    data = jsonl(tmp_path / "t.jsonl", ['{"text": "a"}', '{"body": "x"}'])
    code = T.main([f"--data={data}", f"--cache_dir={tmp_path / 'c'}", f"--out_dir={tmp_path / 'run'}",
                   "--progress=false"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and f"error: {data}:2: expected an object" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- training from each format
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=2",
        "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--sample_tokens=0",
        "--progress=false", "--vocab_size=300"]


@pytest.mark.parametrize("model, fmt", [("gpt", f) for f in TEXT_FORMATS + ("nanogpt", "llm.c")] +
                         [("bert", f) for f in TEXT_FORMATS])
def test_a_few_steps_train_from_each_format(tmp_path, model, fmt):
    if fmt == "nanogpt":
        data = tmp_path / "in"
        data.mkdir()
        np.random.default_rng(0).integers(0, 300, 3000).astype(np.uint16).tofile(data / "train.bin")
    elif fmt == "llm.c":
        data = write_llmc(tmp_path / "fineweb_train_000001.bin", np.random.default_rng(0).integers(0, 300, 3000))
    else:
        data = write_text_corpus(tmp_path / "in", fmt)
    out = tmp_path / "run"
    argv = [f"--model={model}", f"--data={data}", f"--cache_dir={tmp_path / 'c'}", f"--out_dir={out}", *TINY]
    assert T.main(argv) == 0
    rows = read_metrics(out)
    assert [r["iter"] for r in rows if "train_loss" in r] == [1, 2] and any("val_loss" in r for r in rows)


@pytest.mark.slow
def test_two_ranks_read_one_shared_cache(tmp_path):
    data = write_text_corpus(tmp_path / "in", "jsonl.zst")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minipt.train",
           f"--data={data}", "--split=holdout", "--tokenizer=char", f"--cache_dir={tmp_path / 'c'}",
           f"--out_dir={tmp_path / 'run'}", *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(holdout split), cached in") == 1  # rank 0 tokenized; rank 1 read its cache
    assert len([p for p in (tmp_path / "c").iterdir() if not p.is_symlink()]) == 1


@pytest.mark.parametrize("fmt", ["nanogpt", "llm.c"])
def test_a_run_on_token_files_ends_cleanly_with_its_default_final_sample(tmp_path, capsys, fmt):
    data = tmp_path / "in"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 300, 3000)
    if fmt == "llm.c":
        # llm.c's GPT-2 shards: documents open with <|endoftext|>, id 50256 of GPT-2's 50257
        ids[::100] = 50256
        write_llmc(data / "fineweb_train_000001.bin", ids)
        vocab = "--vocab_size=50257"
    else:  # nanoGPT's prepare.py writes bare ids; a small vocabulary has no <|endoftext|>
        ids.astype(np.uint16).tofile(data / "train.bin")
        vocab = "--vocab_size=300"
    defaults_kept = [a for a in TINY if not a.startswith(("--sample_tokens", "--progress", "--vocab_size"))]
    code = T.main([f"--data={data}", f"--cache_dir={tmp_path / 'c'}", f"--out_dir={tmp_path / 'run'}", vocab,
                   *defaults_kept])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "done: run saved" in out
    if fmt == "llm.c":
        assert "\nsample:\n" in out
    else:
        assert "no sample: the tokenizer has no <|endoftext|> to start a document from" in out
