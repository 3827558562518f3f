"""Broken input, a broken cache and an unfriendly file system, met through the commands as a user meets them.

Each case ends in one named line (the file, its line, offset or row group, and
what to do) or in a run that works; never in a traceback, a silent gap in the
corpus, or a cache entry that a later run would read as complete. After every
broken-input case the cache holds no ``.partial`` folder.

The tests run as root, where ``chmod 000`` stops no read: an unreadable folder
or file is made by patching ``os.scandir`` or ``open`` to raise the
``PermissionError`` the kernel gives any other user.
"""

import builtins
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minipt import eval as E
from minipt import finetune as FT
from minipt import train as T
from minipt.data import prepare as P
from minipt.data import prepare_data
from minipt.data import sources as S
from minipt.errors import EXIT_USAGE
from minipt.tokenizer import TextTokenizer, train_tokenizer

from hf_folders import bert_folder, gpt2_folder

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king queen fool sword crown night day love war peace heart hand eye".split()
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=1",
        "--eval_interval=1", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--sample_tokens=0",
        "--progress=false", "--vocab_size=300"]


def quiet(message):
    pass


def prose(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choices(WORDS, k=40)).capitalize() + "." for _ in range(words // 40)) + "\n"


def train(data, cache, out, *extra, tokenizer="char") -> int:
    return T.main([f"--data={data}", f"--cache_dir={cache}", f"--out_dir={out}", f"--tokenizer={tokenizer}", *TINY,
                   *extra])


def no_partial(cache: Path) -> bool:
    return not cache.exists() or not any(p.name.endswith(".partial") for p in cache.iterdir())


def refused(capsys, code: int, pattern: str) -> str:
    """The one-line error of a command that refused its input, checked against ``pattern``."""
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def unreadable(monkeypatch):
    """``deny(path)``: opening ``path``, or listing it if it is a folder, raises PermissionError."""
    denied = set()
    real_open, real_scandir = builtins.open, os.scandir

    def check(path):
        if isinstance(path, (str, os.PathLike)) and Path(path).absolute() in denied:
            raise PermissionError(13, "Permission denied", str(path))

    def guarded_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_scandir(path="."):
        check(path)
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # pathlib's read_bytes opens through io.open
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    return lambda path: denied.add(Path(path).absolute())


# ----------------------------------------------------------------------------- token files and the cache key
def test_token_files_are_read_from_any_working_folder(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    np.random.default_rng(0).integers(0, 300, 3000).astype(np.uint16).tofile(tmp_path / "in" / "train.bin")
    cache = tmp_path / "c"
    monkeypatch.chdir(tmp_path)
    assert T.main(["--data=in", f"--cache_dir={cache}", f"--out_dir={tmp_path / 'a'}", *TINY]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the cache recorded where the ids are, not the path as typed
    assert T.main(["--data=../in", f"--cache_dir={cache}", f"--out_dir={tmp_path / 'b'}", *TINY]) == 0


def test_token_files_rewritten_with_their_times_kept_are_read_again(tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, 3000).astype(np.uint16)
    (tmp_path / "in").mkdir()
    ids.tofile(tmp_path / "in" / "train.bin")
    cache = tmp_path / "c"
    assert T.main([f"--data={tmp_path / 'in'}", f"--cache_dir={cache}", f"--out_dir={tmp_path / 'a'}", *TINY]) == 0

    def rewrite(path, new):  # same size, same modification time
        st = path.stat()
        new.tofile(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    shutil.copytree(tmp_path / "in", tmp_path / "copy")  # copy2: the times are kept
    rewrite(tmp_path / "copy" / "train.bin", (ids + 1) % 300)
    assert T.main([f"--data={tmp_path / 'copy'}", f"--cache_dir={cache}", f"--out_dir={tmp_path / 'b'}", *TINY]) == 0
    copy = prepare_data(model="gpt", data=str(tmp_path / "copy"), vocab_size=300, cache_dir=cache, log=quiet)
    assert np.asarray(copy.train.shards[0].tokens)[:10].tolist() == ((ids[:10] + 1) % 300).tolist()

    rewrite(tmp_path / "in" / "train.bin", (ids + 2) % 300)  # in place: the hash of its first bytes differs
    again = prepare_data(model="gpt", data=str(tmp_path / "in"), vocab_size=300, cache_dir=cache, log=quiet)
    assert np.asarray(again.train.shards[0].tokens)[:10].tolist() == ((ids[:10] + 2) % 300).tolist()


def test_a_large_corpus_rewritten_with_its_times_kept_is_tokenized_again(tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    records = [json.dumps({"text": prose(i)}) for i in range(40)]
    data.write_text("\n".join(records) + "\n")
    large = "--tokenizer_sample_mb=0.001"  # keyed on names, sizes and times, as a corpus of gigabytes is
    assert train(data, tmp_path / "c", tmp_path / "a", large) == 0
    st = data.stat()
    data.write_text("\n".join([json.dumps({"text": prose(0).upper()}), *records[1:]]) + "\n")  # as long
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert train(data, tmp_path / "c", tmp_path / "b", large) == 0
    out = capsys.readouterr().out
    assert "reusing" not in out and "cached in" in out


# ----------------------------------------------------------------------------- folders and globs
def test_an_unreadable_folder_is_named(tmp_path, capsys, unreadable):
    data = tmp_path / "in"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(prose(0))
    (data / "sub" / "b.txt").write_text(prose(1))
    unreadable(data / "sub")
    refused(capsys, train(data, tmp_path / "c", tmp_path / "run"),
            rf"{re.escape(str(data / 'sub'))}: cannot list this folder \(Permission denied\)")
    refused(capsys, train(data / "**" / "*.txt", tmp_path / "c", tmp_path / "run"), "sub: cannot list this folder")
    assert no_partial(tmp_path / "c")


@pytest.mark.parametrize("spelling", ["folder", "glob", "glob through the loop"])
def test_a_link_loop_or_a_second_link_adds_no_copy(tmp_path, capsys, spelling):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(prose(0))
    (data / "loop").symlink_to(".")  # data/loop/loop/... is data again
    (data / "again.txt").symlink_to("a.txt")
    argument = {"folder": data, "glob": data / "**" / "*.txt", "glob through the loop": data / "loop" / "**" / "*.txt"}
    assert train(argument[spelling], tmp_path / "c", tmp_path / "run") == 0
    assert "on the 1 training documents" in capsys.readouterr().out


# ----------------------------------------------------------------------------- text in pieces
def test_a_single_line_text_is_tokenized_in_pieces_as_it_would_be_whole(tmp_path, monkeypatch):
    # PIECE_BYTES scaled down: a 100 KB line stands for the 50 MB that peaked at 6.7 GB read whole
    monkeypatch.setattr(S, "PIECE_BYTES", 4096)
    rng = random.Random(0)
    text = " ".join(rng.choices(WORDS, k=20_000)) + " 1,000 ok?!  \t spaced"
    data = tmp_path / "big.txt"
    data.write_text(text)
    bpe = tmp_path / "bpe.json"
    train_tokenizer("bpe", [prose(i) for i in range(20)], 300, "gpt").save(str(bpe))
    seen = []
    encode = TextTokenizer.encode_batch
    monkeypatch.setattr(TextTokenizer, "encode_batch", lambda self, texts: seen.extend(texts) or encode(self, texts))
    trainer = P.train_tokenizer
    monkeypatch.setattr(P, "train_tokenizer", lambda kind, texts, *a: seen.extend(texts) or trainer(kind, texts, *a))
    for tokenizer in ("bpe", str(bpe)):
        assert train(data, tmp_path / "c", tmp_path / tokenizer[-3:], tokenizer=tokenizer) == 0
    assert len(seen) > 40 and max(map(len, seen)) <= 4096

    tok = TextTokenizer.from_file(bpe, "gpt")
    prep = prepare_data(model="gpt", data=str(data), tokenizer=str(bpe), cache_dir=tmp_path / "c", log=quiet)
    cut = S.tail_start(data, 0.1)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        tokens = np.asarray(getattr(prep, split).shards[0].tokens).tolist()
        assert tokens == tok.encode(part) + [tok.eot_id]  # every cut fell where the whole text splits words too


# ----------------------------------------------------------------------------- Parquet
def test_a_dictionary_encoded_text_column_is_text(tmp_path):
    texts = [prose(i % 5) for i in range(40)]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "d.parquet")
    assert train(tmp_path / "d.parquet", tmp_path / "c", tmp_path / "run") == 0


def test_a_parquet_file_corrupt_in_its_middle_is_named_with_its_row_group(tmp_path, capsys):
    rng = random.Random(0)
    texts = ["".join(rng.choices("abcdefghij klmnop\n", k=3000)) for _ in range(30)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    body = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    body[middle:middle + 200] = bytes(rng.randrange(256) for _ in range(200))
    path.write_bytes(bytes(body))
    refused(capsys, train(path, tmp_path / "c", tmp_path / "run"),
            r"c\.parquet: row group 1 \(rows 10 to 19\) is corrupt or unreadable")
    assert no_partial(tmp_path / "c")


# ----------------------------------------------------------------------------- unreadable and undecodable files
def test_an_unreadable_file_is_named_by_train_and_eval(tmp_path, capsys, unreadable):
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.txt").write_text(prose(0))
    (data / "b.txt").write_text(prose(1))
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    gpt = gpt2_folder(tmp_path / "gpt2")
    for path in (data / "b.txt", tmp_path / "train.bin"):
        unreadable(path)
        pattern = rf"{re.escape(str(path))}: cannot be read \(Permission denied\)"
        tokens = path.suffix == ".bin"
        refused(capsys, train(path if tokens else data, tmp_path / "c", tmp_path / "run",
                              tokenizer="auto" if tokens else "char"), pattern)
        refused(capsys, E.main([f"--out_dir={gpt}", f"--data={path}"]), pattern)
    assert no_partial(tmp_path / "c")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("bert") / "bert")


@pytest.mark.parametrize("name, body, line", [
    ("t.csv", b"text,label\ngood,yes\ncaf\xe9,no\n", 3),
    ("t.jsonl", b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n', 2),
])
def test_fine_tune_examples_that_are_not_utf8_are_named_by_line(tmp_path, capsys, bert, name, body, line):
    (tmp_path / name).write_bytes(body)
    refused(capsys, FT.main([f"--init_from={bert}", f"--data={tmp_path / name}", f"--out_dir={tmp_path / 'o'}"]),
            rf"{re.escape(name)}:{line} is not UTF-8 text \(byte 0xe9 at offset {body.index(0xE9)}\)")


def test_a_text_that_is_not_utf8_is_named_by_offset_past_the_first_piece(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(S, "PIECE_BYTES", 4096)
    (tmp_path / "l.txt").write_bytes(prose(0, 4000).encode() + b" caf\xe9 au lait")
    offset = len(prose(0, 4000).encode()) + 4
    refused(capsys, train(tmp_path / "l.txt", tmp_path / "c", tmp_path / "run"),
            rf"l\.txt is not UTF-8 text \(byte 0xe9 at offset {offset}\)")
    assert no_partial(tmp_path / "c")


# ----------------------------------------------------------------------------- fine-tune labels
@pytest.mark.parametrize("label, kind, rule", [
    ("0.5", "float", "a class is a string or an integer"), ("1.0", "float", "a class is a string or an integer"),
    ("true", "bool", "a label is a string or a number"), ('["a"]', "list", "a label is a string or a number")])
def test_fine_tune_labels_are_strings_or_integers(tmp_path, capsys, bert, label, kind, rule):
    lines = ['{"text": "a cat", "label": 1}', '{"text": "a dog", "label": "1"}', '{"text": "the sea", "label": 0}',
             f'{{"text": "the sky", "label": {label}}}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    refused(capsys, FT.main([f"--init_from={bert}", f"--data={tmp_path / 't.jsonl'}", f"--out_dir={tmp_path / 'o'}"]),
            rf"t\.jsonl:4: the label {re.escape(label)} is a {kind}; {rule}")


# ----------------------------------------------------------------------------- the cache
@pytest.mark.slow
def test_a_full_disk_is_named_and_the_finished_work_resumes(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": prose(i, 2000)}) + "\n" for i in range(40)))
    cache = tmp_path / "c"
    argv = [sys.executable, "-m", "minipt.train", f"--data={data}", f"--cache_dir={cache}",
            f"--out_dir={tmp_path / 'run'}", "--tokenizer=char", *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def small_files():  # no file may grow past 64 KB, as on a disk about to fill; SIGXFSZ would kill, not fail
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    full = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert full.returncode == EXIT_USAGE, full.stderr[-3000:]
    assert re.search(r"error: cannot write the cache in .*\.partial \(.*\): is the disk full\? Its 0 finished "
                     r"shard\(s\) are kept: free some space and run again to resume", full.stderr), full.stderr
    assert "Traceback" not in full.stderr
    assert not list(cache.glob("*/meta.json"))  # nothing a later run could take for a complete entry
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "data: resuming the tokenization" in again.stdout and no_partial(cache)
    fresh = prepare_data(model="gpt", data=str(data), tokenizer="char", vocab_size=300, cache_dir=tmp_path / "f",
                         log=quiet)
    resumed = prepare_data(model="gpt", data=str(data), tokenizer="char", vocab_size=300, cache_dir=cache, log=quiet)
    for split in ("train", "val"):
        np.testing.assert_array_equal(getattr(resumed, split).shards[0].tokens, getattr(fresh, split).shards[0].tokens)


@pytest.mark.parametrize("damage, note", [
    (lambda entry: os.truncate(entry / "train-00000.bin", 100), r"train-00000\.bin holds 100 bytes, meta\.json"),
    (lambda entry: (entry / "meta.json").write_text('{"splits": {'), "meta.json is unreadable"),
    (lambda entry: (entry / "val-00000.documents.npy").unlink(), r"val-00000\.documents\.npy is missing"),
])
def test_a_damaged_cache_entry_is_built_again_with_a_note(tmp_path, capsys, damage, note):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(40)))
    assert train(data, tmp_path / "c", tmp_path / "a") == 0
    (entry,) = [p for p in (tmp_path / "c").iterdir() if not p.is_symlink()]
    damage(entry)
    capsys.readouterr()
    assert train(data, tmp_path / "c", tmp_path / "b") == 0
    out = capsys.readouterr().out
    assert re.search(rf"data: the cache entry .* is damaged \({note}.*\): building it again", out), out
    assert len(P.read_cache(entry, "gpt").train.shards[0].tokens) > 100


@pytest.mark.slow
def test_two_processes_tokenizing_one_corpus_build_it_once(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(40)))
    # Shards that take two seconds to close: the second process starts while the first is still writing.
    slow = ("import sys, time\nfrom minipt.data import prepare as P\nfrom minipt import train\n"
            "close = P._ShardWriter.close\n"
            "P._ShardWriter.close = lambda self: (time.sleep(2), close(self))\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", slow, f"--data={data}", f"--cache_dir={tmp_path / 'c'}",
                               f"--out_dir={tmp_path / f'run{i}'}", "--tokenizer=char", *TINY],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(out for out, _ in outs)
    assert logs.count("(doc split), cached in") == 1 and logs.count("data: reusing the tokenized corpus") == 1
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.is_symlink()] == [
        re.search(r"cached in .*/(\w+)\n", logs).group(1)]  # no partial folder, no lock left behind


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    (tmp_path / "a.txt").write_text(prose(0))
    refused(capsys, train(tmp_path / "a.txt", tmp_path / "cache", tmp_path / "run"),
            rf"the cache folder {re.escape(str(tmp_path / 'cache'))} \(--cache_dir\) is a file")
    refused(capsys, train(tmp_path / "a.txt", tmp_path / "cache" / "sub", tmp_path / "run"),
            r"cannot create the cache folder .*cache/sub \(--cache_dir\): Not a directory")


# ----------------------------------------------------------------------------- eval: nothing to score
@pytest.mark.parametrize("model, text, pattern", [
    ("gpt", " \n\n\t \n", r"holds no text to score: its documents are empty or whitespace only"),
    ("bert", "hello\n", r"the masks at mlm_probability=0\.15 select none of its tokens: MLM has nothing to score"),
])
def test_eval_refuses_text_with_nothing_to_score(tmp_path, capsys, bert, model, text, pattern):
    (tmp_path / "held.txt").write_text(text)
    folder = gpt2_folder(tmp_path / "gpt2") if model == "gpt" else bert
    refused(capsys, E.main([f"--out_dir={folder}", f"--data={tmp_path / 'held.txt'}"]), pattern)
