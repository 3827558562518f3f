"""nanoGPT's own files, as nanoGPT writes them: data folders with meta.pkl.

The data folder is written by the few lines of nanoGPT's ``data/shakespeare_char/prepare.py``
(sorted characters, stoi/itos, uint16 ``.tofile``, ``pickle.dump`` of meta).
"""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from minipt import eval as E
from minipt import sample as S
from minipt import train as T
from minipt.data import prepare as P
from minipt.data import prepare_data
from minipt.data.sources import DataError
from minipt.errors import EXIT_USAGE
from minipt.load import load_run
from minipt.runlog import read_metrics
from minipt.tokenizer import GPT2_VOCAB_SIZE

LINES = ["ROMEO: But soft, what light through yonder window breaks?\n", "JULIET: O Romeo, Romeo!\n",
         "HAMLET: To be, or not to be; that is the question.\n", "Ça, señor — naïve café?\n"]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=1", "--device=cpu"]


def quiet(message):
    pass


def write_shakespeare_char(folder: Path, seed: int = 0, n_lines: int = 300) -> dict:
    """What nanoGPT's data/shakespeare_char/prepare.py leaves in its folder, written as it writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = "".join(rng.choice(LINES) for _ in range(n_lines))
    (folder / "input.txt").write_text(data, encoding="utf-8")
    (folder / "prepare.py").write_text("# nanoGPT's script, never read\n")
    (folder / "readme.md").write_text("# tiny shakespeare, character-level\n")
    # nanoGPT's lines
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    train_data, val_data = data[:int(n * 0.9)], data[int(n * 0.9):]
    train_ids = np.array([stoi[c] for c in train_data], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in val_data], dtype=np.uint16)
    train_ids.tofile(folder / "train.bin")
    val_ids.tofile(folder / "val.bin")
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return {"text": data, "train": train_data, "val": val_data, "stoi": stoi, "train_ids": train_ids,
            "val_ids": val_ids}


def all_tokens(split) -> np.ndarray:
    return np.concatenate([np.asarray(s.tokens) for s in split.shards])


# ----------------------------------------------------------------------------- data folders
def test_the_meta_pkl_vocabulary_keeps_nanogpts_ids(tmp_path):
    written = write_shakespeare_char(tmp_path / "shakespeare_char")
    logged = []
    prep = prepare_data(model="gpt", data=str(tmp_path / "shakespeare_char"), cache_dir=tmp_path / "c",
                        log=logged.append)
    # train.bin and val.bin as they are; input.txt, prepare.py and readme.md beside them are not read
    np.testing.assert_array_equal(all_tokens(prep.train), written["train_ids"])
    np.testing.assert_array_equal(all_tokens(prep.val), written["val_ids"])
    tok, stoi = prep.tokenizer, written["stoi"]
    assert tok.vocab_size == len(stoi) and tok.eot_id is None
    assert any("characters of" in line and "meta.pkl" in line for line in logged)
    rng = random.Random(1)
    for _ in range(20):  # every character and run of characters maps as nanoGPT's encode maps it, and back
        text = "".join(rng.choice(sorted(stoi)) for _ in range(rng.randint(1, 40)))
        assert tok.encode(text) == [stoi[c] for c in text]
        assert tok.decode(tok.encode(text)) == text
        assert tok.unknown_characters(text) == []
    assert tok.unknown_characters("ROMEO: Ω!x") == ["x", "Ω"]
    # the files named one by one read the meta.pkl of their folder too
    alone = prepare_data(model="gpt", data=str(tmp_path / "shakespeare_char" / "*.bin"), cache_dir=tmp_path / "c",
                         log=quiet)
    assert alone.tokenizer.to_str() == tok.to_str()


def test_token_files_without_meta_pkl_say_what_vocabulary_they_assume(tmp_path):
    ids = np.random.default_rng(0).integers(0, GPT2_VOCAB_SIZE, 4000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    logged = []
    prep = prepare_data(model="gpt", data=str(tmp_path / "train.bin"), cache_dir=tmp_path / "c", log=logged.append)
    assert prep.tokenizer.vocab_size == GPT2_VOCAB_SIZE
    assert [line for line in logged if "meta.pkl" in line] == [
        f"data: no meta.pkl beside the token files: their ids are taken to be GPT-2's BPE (vocab_size "
        f"{GPT2_VOCAB_SIZE}), as nanoGPT takes them; --vocab_size or --tokenizer says otherwise"]
    given = prepare_data(model="gpt", data=str(tmp_path / "train.bin"), vocab_size=60000, cache_dir=tmp_path / "c",
                         log=logged.append)
    assert given.tokenizer.vocab_size == 60000


class Payload:
    """A pickled object whose loading would run code: what a hostile meta.pkl holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def dump(value):
    return lambda folder: pickle.dump(value, open(folder / "meta.pkl", "wb"))


BAD_META = {
    "code in the pickle": (lambda folder: pickle.dump({"vocab_size": 3, "x": Payload(folder / "ran")},
                                                      open(folder / "meta.pkl", "wb")),
                           r"meta\.pkl: not a nanoGPT meta\.pkl \(UnpicklingError: it names pathlib"),
    "a class": (dump({"vocab_size": 3, "stoi": {}, "itos": {}, "when": np.float64(1.0)}), r"it names numpy"),
    "not a pickle": (lambda folder: (folder / "meta.pkl").write_text("vocab_size = 65\n"), r"not a nanoGPT meta\.pkl"),
    "cut short": (lambda folder: (folder / "meta.pkl").write_bytes(
        pickle.dumps({"vocab_size": 3, "stoi": {"a": 0, "b": 1, "c": 2}})[:-9]), r"not a nanoGPT meta\.pkl"),
    "a list": (dump([1, 2, 3]), r"meta\.pkl: a list; nanoGPT's meta\.pkl is \{'vocab_size': int"),
    "no vocab_size": (dump({"stoi": {"a": 0}, "itos": {0: "a"}}), r"no positive integer 'vocab_size'"),
    "vocab_size a string": (dump({"vocab_size": "3"}), r"no positive integer 'vocab_size'"),
    "stoi alone": (dump({"vocab_size": 3, "stoi": {"a": 0, "b": 1, "c": 2}}), r"'itos' is not a dict"),
    "stoi of ints": (dump({"vocab_size": 2, "stoi": {1: 0, 2: 1}, "itos": {0: 1, 1: 2}}),
                     r"'stoi' is not a dict of strings to integer ids"),
    "a gap in the ids": (dump({"vocab_size": 3, "stoi": {"a": 0, "b": 1, "c": 3}, "itos": {0: "a", 1: "b", 3: "c"}}),
                         r"'stoi' does not give the ids 0 to vocab_size - 1 = 2 one string each"),
    "vocab_size past stoi": (dump({"vocab_size": 4, "stoi": {"a": 0, "b": 1, "c": 2},
                                   "itos": {0: "a", 1: "b", 2: "c"}}), r"ids 0 to vocab_size - 1 = 3"),
    "itos not the inverse": (dump({"vocab_size": 3, "stoi": {"a": 0, "b": 1, "c": 2},
                                   "itos": {0: "a", 1: "c", 2: "b"}}),
                             r"'itos' is not the inverse of 'stoi': id 1 is 'c' in one, 'b' in the other"),
}


@pytest.mark.parametrize("case", BAD_META)
def test_a_malformed_meta_pkl_is_named_and_runs_no_code(tmp_path, case):
    make, pattern = BAD_META[case]
    folder = tmp_path / "in"
    folder.mkdir()
    np.array([0, 1, 2, 1, 0] * 40, np.uint16).tofile(folder / "train.bin")
    make(folder)
    with pytest.raises(DataError, match=pattern):
        prepare_data(model="gpt", data=str(folder), cache_dir=tmp_path / "c", log=quiet)
    assert not (folder / "ran").exists()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_vocab_size_against_meta_pkl_and_two_meta_pkls(tmp_path):
    write_shakespeare_char(tmp_path / "a")
    n = len(pickle.load(open(tmp_path / "a" / "meta.pkl", "rb"))["stoi"])
    with pytest.raises(DataError, match=rf"--vocab_size=300 contradicts .*meta\.pkl, whose vocab_size is {n}"):
        prepare_data(model="gpt", data=str(tmp_path / "a"), vocab_size=300, cache_dir=tmp_path / "c", log=quiet)
    assert prepare_data(model="gpt", data=str(tmp_path / "a"), vocab_size=n, cache_dir=tmp_path / "c",
                        log=quiet).tokenizer.vocab_size == n
    write_shakespeare_char(tmp_path / "b", seed=1)
    with pytest.raises(DataError, match=r"the token files lie in folders with a meta\.pkl each"):
        prepare_data(model="gpt", data=str(tmp_path / "*" / "train.bin"), cache_dir=tmp_path / "c", log=quiet)


def test_a_nanogpt_char_folder_trains_samples_evaluates_and_resumes(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data" / "shakespeare_char"
    written = write_shakespeare_char(folder)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = [f"--data={folder}", f"--out_dir={out}", f"--cache_dir={cache}", *TINY]
    assert T.main([*args, "--max_iters=4", "--eval_interval=2", "--sample_tokens=20"]) == 0
    printed = capsys.readouterr().out
    vocab = set(written["stoi"])
    # without <|endoftext|> the final sample starts at a newline, as nanoGPT's sample.py starts
    sample = printed.split("\nsample:\n", 1)[1].split("\n\ndone:", 1)[0]
    assert sample and set(sample) <= vocab

    assert S.main([f"--out_dir={out}", "--prompt=ROMEO: ", "--max_new_tokens=30", "--num_samples=2"]) == 0
    texts = capsys.readouterr().out.split("-" * 40 + "\n")[:2]
    for text in texts:
        assert text.startswith("ROMEO: ") and set(text.rstrip("\n")) <= vocab and len(text) > len("ROMEO: ") + 1
    assert S.main([f"--out_dir={out}", "--prompt=ROMEO: XZ"]) == EXIT_USAGE
    assert "the prompt holds characters the model's vocabulary lacks: 'XZ'" in capsys.readouterr().err

    assert E.main([f"--out_dir={out}", f"--data={folder / 'val.bin'}", "--device=cpu"]) == 0
    report = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    # the ids decode to the characters they were made from: bits per byte counts the val text's bytes
    assert int(report["bytes"]) == len(written["val"].encode("utf-8"))

    model, tok, _ = load_run(out)
    assert tok.encode(written["val"][:50]) == written["val_ids"][:50].tolist()
    with monkeypatch.context() as m:  # the resumed run reads its saved tokenizer: the same cache entry
        m.setattr(P.TF, "check_ids", None)
        assert T.main([*args, "--resume", "--max_iters=6", "--eval_interval=2", "--sample_tokens=0"]) == 0
    assert [r["iter"] for r in read_metrics(out) if "val_loss" in r] == [0, 2, 4, 6]
    assert load_run(out)[1].to_str() == tok.to_str()
