"""nanoGPT's own files, as nanoGPT writes them: data folders with meta.pkl, and Python config files.

The data folder is written by the few lines of nanoGPT's ``data/shakespeare_char/prepare.py``
(sorted characters, stoi/itos, uint16 ``.tofile``, ``pickle.dump`` of meta); the config files are
nanoGPT's own, verbatim, and what they mean is worked out the way nanoGPT works it out: its
``train.py`` globals, then ``exec`` of the file (its configurator), here in the test only.
"""

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest

from minipt import eval as E
from minipt import sample as S
from minipt import train as T
from minipt.config import ConfigError, FinetuneConfig, TrainConfig, make_config, parse_overrides
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


# ----------------------------------------------------------------------------- config files
# nanoGPT's train.py globals, as train.py sets them (its dtype line asks torch; a file sets it if it must)
TRAIN_PY = """
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
init_from = 'scratch' # 'scratch' or 'resume' or 'gpt2*'
wandb_log = False # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2' # 'run' + str(time.time())
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8 # used to simulate larger batch sizes
batch_size = 12 # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
learning_rate = 6e-4 # max learning rate
max_iters = 600000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
decay_lr = True # whether to decay the learning rate
warmup_iters = 2000 # how many steps to warm up for
lr_decay_iters = 600000 # should be ~= max_iters per Chinchilla
min_lr = 6e-5 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
backend = 'nccl' # 'nccl', 'gloo', etc.
device = 'cuda' # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1' etc., or try 'mps' on macbooks
compile = True # use PyTorch 2.0 to compile the model to be faster
"""
SAME_NAME = ("out_dir", "eval_interval", "log_interval", "eval_iters", "always_save_checkpoint", "batch_size",
             "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate", "max_iters",
             "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr")

NANOGPT_CONFIGS = {
    "train_shakespeare_char.py": """# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
""",
    "train_gpt2.py": """# config for training GPT-2 (124M) down to very nice loss of ~2.85 on 1 node of 8X A100 40GB
# launch as the following (e.g. in a screen session) and wait ~5 days:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name='gpt2-124M'

# these make the total batch size be ~0.5M
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1
""",
    "eval_gpt2.py": """# evaluate the base gpt2
# n_layer=12, n_head=12, n_embd=768
# 124M parameters
batch_size = 8
eval_iters = 500 # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
""",
    "finetune_shakespeare.py": """import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
""",
}


def write_config(folder: Path, name: str, text: str | None = None) -> Path:
    path = folder / "config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(NANOGPT_CONFIGS[name] if text is None else text, encoding="utf-8")
    return path


def as_nanogpt_reads_it(text: str) -> dict:
    settings = {}
    exec(TRAIN_PY, settings)
    exec(text, settings)  # nanoGPT's configurator: exec(open(config_file).read())
    return settings


@pytest.mark.parametrize("name, world_size", [("train_shakespeare_char.py", 1), ("train_gpt2.py", 1),
                                              ("train_gpt2.py", 8)])
def test_nanogpts_training_configs_give_the_train_config_nanogpt_runs(tmp_path, capsys, monkeypatch, name,
                                                                      world_size):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    path = write_config(tmp_path, name)
    cfg = make_config(TrainConfig, parse_overrides(TrainConfig, ["--config", str(path)], "", ""))
    nanogpt = as_nanogpt_reads_it(NANOGPT_CONFIGS[name])
    for key in SAME_NAME:
        assert getattr(cfg, key) == nanogpt[key], key
    assert cfg.data == os.path.join("data", nanogpt["dataset"]) and not cfg.resume and not cfg.init_from
    # nanoGPT's count is over all ranks; minipt's is per rank, as train.py divides it
    assert cfg.gradient_accumulation_steps * world_size == nanogpt["gradient_accumulation_steps"]
    # the system settings nanoGPT's train.py fixes (cuda, compile) stay minipt's automatic ones
    assert (cfg.device, cfg.dtype, cfg.compile) == ("auto", "auto", False)
    # nanoGPT trains with AdamW, whose settings the file holds; minipt's own default is Muon
    assert cfg.optimizer == "adamw" and TrainConfig().optimizer == "muon"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"note: {path}: nanoGPT settings with nothing to do in minipt, ignored: wandb_log, wandb_project, "
        "wandb_run_name")


def test_the_command_line_overrides_a_nanogpt_config(tmp_path):
    path = write_config(tmp_path, "train_shakespeare_char.py")
    cfg = make_config(TrainConfig, parse_overrides(
        TrainConfig, ["--config", str(path), "--n_layer=2", "--device=cpu", "--compile=False", "--max_iters=20"],
        "", ""))
    assert (cfg.n_layer, cfg.device, cfg.compile, cfg.max_iters, cfg.n_embd) == (2, "cpu", False, 20, 384)
    assert make_config(TrainConfig, parse_overrides(
        TrainConfig, ["--config", str(path), "--optimizer=muon"], "", "")).optimizer == "muon"


@pytest.mark.parametrize("name, line, pattern", [
    ("eval_gpt2.py", 6, r"eval_only = True: minipt scores a run with python -m minipt\.eval"),
    ("finetune_shakespeare.py", 1, r"'import time': a nanoGPT config file is read, not run"),
])
def test_nanogpts_other_configs_are_refused_with_the_line_and_what_to_do(tmp_path, name, line, pattern):
    path = write_config(tmp_path, name)
    with pytest.raises(ConfigError, match=rf"{path}:{line}: {pattern}"):
        parse_overrides(TrainConfig, ["--config", str(path)], "", "")


BAD_CONFIGS = {
    "a call": ("n_layer = 6\nout_dir = os.getcwd()\n", 2, r"'os.getcwd\(\)' is not a literal"),
    "a name not assigned above": ("max_iters = lr_decay_iters\n", 1, r"'lr_decay_iters' is not a literal"),
    "a list": ("n_layer = [6]\n", 1, r"'\[6\]' is not a literal"),
    "a tuple target": ("n_layer, n_head = 6, 6\n", 1, r"'n_layer, n_head = \(6, 6\)': a nanoGPT config file is read"),
    "a loop": ("for i in range(3):\n    n_layer = i\n", 1, r"'for i in range\(3\):'"),
    "a huge power": ("max_iters = 10 ** 10 ** 10\n", 1, r"'10 \*\* 10 \*\* 10' is not a literal"),
    "a division by zero": ("max_iters = 1 // 0\n", 1, r"1 // 0: integer division or modulo by zero"),
    "not Python": ("n_layer = = 6\n", 1, r"not valid Python"),
    "an unknown key": ("n_layers = 6\n", 1, r"unknown setting 'n_layers' at .*:1; did you mean --n_layer"),
    "a dataset that is not a name": ("dataset = 3\n", 1, r"dataset must be the name of a folder under data/"),
    "gpt2 weights": ("init_from = 'gpt2-medium'\n", 1,
                     r"init_from = 'gpt2-medium': nanoGPT downloads OpenAI's weights; minipt reads a local Hugging "
                     r"Face folder instead"),
    "float16": ("dtype = 'float16'\n", 1, r"dtype = 'float16': minipt trains in bfloat16 \(auto on a GPU\) or float32"),
    "uneven accumulation": ("gradient_accumulation_steps = 3\n", 1,
                            r"gradient_accumulation_steps = 3 is nanoGPT's count over all ranks, to be split evenly "
                            r"over the 2 of this run"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_file_that_would_need_running_or_means_nothing_here_is_named_by_its_line(tmp_path, monkeypatch,
                                                                                           case):
    monkeypatch.setenv("WORLD_SIZE", "2")
    text, line, pattern = BAD_CONFIGS[case]
    path = write_config(tmp_path, "bad.py", text)
    with pytest.raises(ConfigError) as error:
        parse_overrides(TrainConfig, ["--config", str(path)], "", "")
    assert f"{path}:{line}" in str(error.value) and re.search(pattern, str(error.value)), str(error.value)


def test_arithmetic_names_and_minipt_settings_in_a_config_file(tmp_path, capsys):
    text = ("max_iters = 2000\nlr_decay_iters = max_iters\nwarmup_iters = max_iters // 10\nlearning_rate = 3e-4 * 2\n"
            "min_lr = -(-6e-5)\nout_dir = 'out-' + 'char'\ninit_from = 'resume'\neval_only = False\n"
            "optimizer = 'muon'\nvocab_size = 65\n'''a docstring'''\n")
    values = parse_overrides(TrainConfig, ["--config", str(write_config(tmp_path, "mine.py", text))], "", "")
    assert values["max_iters"] == values["lr_decay_iters"] == 2000 and values["warmup_iters"] == 200
    assert values["learning_rate"] == 3e-4 * 2 and values["min_lr"] == 6e-5 and values["out_dir"] == "out-char"
    assert values["resume"] is True and values["optimizer"] == "muon" and values["vocab_size"] == 65
    assert "ignored: eval_only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"nanoGPT config files \(\.py\) set up training: python -m minipt\.train"):
        parse_overrides(FinetuneConfig, ["--config", str(tmp_path / "config" / "mine.py")], "", "")


def test_a_nanogpt_config_trains_end_to_end_on_a_nanogpt_data_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nanoGPT's data/<dataset> is relative to the folder it runs in
    write_shakespeare_char(tmp_path / "data" / "shakespeare_char")
    path = write_config(tmp_path, "train_shakespeare_char.py")
    code = T.main([f"--config={path}", f"--cache_dir={tmp_path / 'cache'}", "--max_iters=4", "--eval_interval=2",
                   "--lr_decay_iters=4", "--sample_tokens=10", *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "ignored: wandb_log, wandb_project, wandb_run_name" in err and "meta.pkl" in out
    run = tmp_path / "out-shakespeare-char"
    saved = load_run(run)[2]["train"]
    # dataset = 'shakespeare_char' is data/shakespeare_char from the current folder, saved resolved
    assert saved["data"] == str((tmp_path / "data" / "shakespeare_char").resolve()) and saved["beta2"] == 0.99
    assert saved["always_save_checkpoint"] is False and saved["dropout"] == 0.2 and saved["bias"] is False
    assert [r["iter"] for r in read_metrics(run) if "val_loss" in r] == [0, 2, 4]
