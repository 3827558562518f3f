"""The cache of tokenized corpora as a user sees it: where it is and how big after a run, and
``python -m minipt.cache`` listing it and clearing minipt's entries only, never one a process holds."""

import fcntl
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipt import cache as CC
from minipt import train as T
from minipt.data import cache as C
from minipt.data import prepare_data
from test_train import tiny_args

REPO = Path(__file__).resolve().parents[1]


def du(root: Path) -> int:
    """Bytes of the files under ``root``, links not followed: what ``du --apparent-size -b`` counts for files."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def run(tmp_path, capsys, **settings) -> str:
    assert T.main(tiny_args(tmp_path, max_iters=1, eval_interval=1, sample_tokens=0, **settings)) == 0
    return capsys.readouterr().out


def test_a_run_says_where_the_cache_is_and_how_big(tmp_path, capsys):
    out = run(tmp_path, capsys)
    cache = tmp_path / "cache"
    line = [line for line in out.splitlines() if line.startswith("data: the cache ")]
    assert line == [f"data: the cache {cache} holds 1 tokenized corpus, {C.human(du(cache))} (python -m minipt.cache "
                    "--list shows them, --clear deletes them)"]
    out = run(tmp_path, capsys, out="again", vocab_size=100, tokenizer="bpe")  # a second corpus, then reused
    assert f"data: the cache {cache} holds 2 tokenized corpora, {C.human(du(cache))}" in out
    assert f"data: the cache {cache} holds 2 tokenized corpora" in run(tmp_path, capsys, out="third")


@pytest.mark.parametrize("size, shown", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KB"), (5 << 20, "5.0 MB"),
                                         (3 << 30, "3.0 GB")])
def test_sizes_are_shown_in_their_unit(size, shown):
    assert C.human(size) == shown


def test_list_shows_each_entry_with_its_size_and_source(tmp_path, capsys):
    run(tmp_path, capsys)
    cache = tmp_path / "cache"
    assert CC.main([f"--cache_dir={cache}"]) == 0  # --list is the default
    listed = capsys.readouterr().out.splitlines()
    (entry,) = [p for p in cache.iterdir() if p.is_dir() and not p.is_symlink()]
    (corpus,) = [line for line in listed if line.startswith(entry.name)]
    assert C.human(du(entry)) in corpus and f"corpus: gpt, char, doc split: {tmp_path / 'corpus'}" in corpus
    assert any("alias: the same corpus as " + entry.name in line for line in listed)  # the saved tokenizer's key
    assert listed[-1].startswith(f"the cache {cache} holds 1 tokenized corpus")
    assert CC.main([f"--cache_dir={cache}", "--list"]) == 0 and capsys.readouterr().out.splitlines() == listed


def test_the_command_reads_the_default_cache_of_the_environment(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIPT_CACHE": str(tmp_path / "env-cache")}
    proc = subprocess.run([sys.executable, "-m", "minipt.cache"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"the cache {tmp_path / 'env-cache'} does not exist yet\n"
    assert not (tmp_path / "env-cache").exists()  # listing creates nothing


def test_clear_deletes_minipts_entries_only_and_the_next_run_tokenizes_again(tmp_path, capsys):
    run(tmp_path, capsys)
    cache = tmp_path / "cache"
    (cache / "notes.txt").write_text("mine")
    (cache / "my-models").mkdir()
    (cache / "0123456789abcdef0123.partial").mkdir()  # a tokenization stopped half-way
    (cache / "0123456789abcdef0123.partial" / "part-00000.json").write_text("{}")
    (cache / "fedcba9876543210fedc.lock").write_text("")  # a lock nobody holds
    assert CC.main([f"--cache_dir={cache}", "--clear"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted 4 entries (1 tokenized corpora, the rest aliases, partial entries and leftovers)")
    assert sorted(p.name for p in cache.iterdir()) == ["my-models", "notes.txt"]
    assert "training a char tokenizer" in run(tmp_path, capsys, out="again")


def test_clear_keeps_an_entry_a_process_reads_or_builds(tmp_path, capsys):
    cache = tmp_path / "cache"
    run(tmp_path, capsys)
    prepared = prepare_data(model="gpt", data=str(tmp_path / "corpus"), tokenizer="char", cache_dir=cache,
                            log=lambda msg: None)  # holds its entry, as a training run does
    partial = cache / "0123456789abcdef0123.partial"
    partial.mkdir()
    with open(cache / "0123456789abcdef0123.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process tokenizing into it holds it
        assert CC.main([f"--cache_dir={cache}", "--list"]) == 0
        listed = capsys.readouterr().out
        assert f"{prepared.cache_path.name}" in listed and "(in use: a running process reads it)" in listed
        assert "(in use: a process is tokenizing into it)" in listed
        assert CC.main([f"--cache_dir={cache}", "--clear"]) == 0
        out = capsys.readouterr().out
    assert f"kept {prepared.cache_path.name}: a running process reads it" in out
    assert "kept 0123456789abcdef0123.partial: a process is tokenizing into it" in out
    assert prepared.cache_path.is_dir() and partial.is_dir()
    assert any(p.is_symlink() for p in cache.iterdir())  # the alias of the kept entry stays with it
    assert len(prepared.train.shards[0].tokens) > 0

    del prepared
    gc.collect()  # the data let go: its lock goes with it
    assert CC.main([f"--cache_dir={cache}", "--clear"]) == 0
    assert "kept" not in capsys.readouterr().out and list(cache.iterdir()) == []


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert CC.main([f"--cache_dir={tmp_path / 'file'}", "--clear"]) == 2
    err = capsys.readouterr().err
    assert f"minipt.cache: error: the cache folder {tmp_path / 'file'} (--cache_dir) is a file" in err
    assert (tmp_path / "file").read_text() == "x"


def test_help_gives_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        CC.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "python -m minipt.cache --clear" in out and "--cache_dir" in out
