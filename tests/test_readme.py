"""Every command of the README, read from its text, run in the order it gives them in a fresh folder.

What a CI machine lacks is stood in for by small files written here (the user's own data, a Hugging Face
folder in ~/models, nanoGPT's data folder and config file, HellaSwag's jsonl and llm.c's .bin, GLUE's TSVs) or
the command is skipped with its reason (tests/readme_commands.py holds the rules); training runs a few steps
(CI runs the default training as written once, see .ci/run)."""

import csv
import json
import pickle
import re

import pytest

import readme_commands as R
from hf_folders import bert_folder, gpt2_folder, hf_tokenizer
from test_multiple_choice import context_of, random_examples, write_eval_file, write_jsonl
from test_nanogpt import NANOGPT_CONFIGS, write_shakespeare_char

pytestmark = pytest.mark.slow

LINES = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken.",
]


# GLUE's TSV files as the benchmark ships them: every column, tab-separated, nothing quoted; CoLA without header.
GLUE = {
    "SST-2": (["sentence", "label"], lambda i, a, b: [a, i % 2]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda i, a, b: [i % 2, 100 + i, 200 + i, a, b]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], lambda i, a, b: [i, "main-captions", "MSRvid", "2012test", i, "none", "none", a, b,
                                          f"{i * 5 / 7:.3f}"]),
    "CoLA": (None, lambda i, a, b: ["gj04", i % 2, "" if i % 2 else "*", a]),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, a, b: [i, 31193, f"{31193 + i}n", "government", "( a )", "( b )", "(ROOT a)", "(ROOT b)", a, b,
                              *[("neutral", "contradiction", "entailment")[i % 3]] * 2]),
}


def write_glue(folder, header, row, dev="dev.tsv") -> None:
    """train.tsv (8 rows) and the dev file (4) of one GLUE task, its sentences one with a lone double quote."""
    folder.mkdir()
    sentences = LINES + ['a "quoted word and a lone quote']
    for name, rows in (("train.tsv", range(8)), (dev, range(8, 12))):
        lines = [] if header is None else ["\t".join(header)]
        lines += ["\t".join(map(str, row(i, sentences[i % 5], sentences[(i + 2) % 5]))) for i in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


OUTPUT = {"minipt.train": "--out_dir", "minipt.finetune": "--out_dir", "minipt.export": "--to", "minipt.eval": "--json"}


def write_stand_ins(work, home) -> dict:
    """What the README's commands expect the user to have, small: {name in the README: path written}."""
    (work / "my_run.toml").write_text('n_layer = 2\nlearning_rate = 2e-3\n')
    for folder in ("held_out", "my_corpus"):
        (work / folder).mkdir()
        for i in range(3):
            (work / folder / f"part{i}.txt").write_text("\n\n".join(LINES[i:] + LINES[:i]) * 4 + "\n")
    for name, rows in (("train.csv", 8), ("val.csv", 4), ("test.csv", 4)):
        with open(work / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((LINES[i % 4], "verse" if i % 2 else "prose") for i in range(rows))
    # nanoGPT's folder, where its commands run: data/shakespeare_char as its prepare.py leaves it, and its config
    write_shakespeare_char(work / "data" / "shakespeare_char")
    (work / "config").mkdir()
    (work / "config" / "train_shakespeare_char.py").write_text(NANOGPT_CONFIGS["train_shakespeare_char.py"])
    for task, (header, row) in GLUE.items():
        write_glue(work / task, header, row, dev="dev_matched.tsv" if task == "MNLI" else "dev.tsv")
    gpt2 = gpt2_folder(home / "models" / "gpt2", positions=256)
    # HellaSwag's jsonl, and llm.c's .bin of the same records in the ids of the (stand-in) GPT-2 tokenizer
    records = random_examples(seed=0)
    tok = hf_tokenizer(gpt2)
    tokens = [(tok.encode(context_of(r)), [tok.encode(" " + e) for e in r["endings"]], int(r["label"]))
              for r in records]
    return {
        "hellaswag_val.jsonl": write_jsonl(work / "hellaswag_val.jsonl", records),
        "hellaswag_val.bin": write_eval_file(work / "hellaswag_val.bin", tokens),
        "data/shakespeare_char": work / "data" / "shakespeare_char",
        "config/train_shakespeare_char.py": work / "config" / "train_shakespeare_char.py",
        **{f"{task}/train.tsv": work / task / "train.tsv" for task in GLUE},
        "my_run.toml": work / "my_run.toml", "held_out/": work / "held_out", "my_corpus/": work / "my_corpus",
        "train.csv": work / "train.csv", "val.csv": work / "val.csv", "test.csv": work / "test.csv",
        "~/models/gpt2": gpt2,
        "~/models/bert-base-uncased": bert_folder(home / "models" / "bert-base-uncased"),
    }


def test_every_readme_command_runs_in_order(tmp_path, monkeypatch, capsys):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MINIPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    text = R.README.read_text(encoding="utf-8")
    stand_ins = write_stand_ins(work, home)
    assert all(name in text for name in stand_ins), "a stand-in the README no longer names"

    ran, skipped, printed = [], [], {}
    for command in R.commands(text):
        if command.skip:
            skipped.append(command)
            continue
        code = R.run_in_process(command)
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in err, f"{command.text}: exit {code}\n{err[-2000:]}"
        ran.append(command)
        printed[command.text] = out
    with capsys.disabled():  # the skipped commands are named, never passed over in silence
        for command in skipped:
            print(f"\nREADME command not run: {command.text}  ({command.skip})", end="")

    assert len(ran) >= 18 and {c.words[0] for c in skipped} == {"pip", "python", "torchrun"}
    for command in ran:  # every folder or file a command names as its output is there
        flag = OUTPUT.get(command.words[2])
        if flag in command.words:
            assert (work / command.words[command.words.index(flag) + 1]).exists(), command.text
    assert json.loads((work / "scores.json").read_text())["settings"]["out_dir"] == "out-gpt"
    for run in ("out-gpt", "out-bert", "out-finetune"):  # the default folders the README relies on
        assert (work / run / "model.safetensors").is_file(), run

    # from nanoGPT's folder: its config's out_dir, and every run on meta.pkl's characters of data/shakespeare_char
    meta = pickle.loads((work / "data" / "shakespeare_char" / "meta.pkl").read_bytes())
    for run in ("out-shakespeare-char", "out-char-cpu", "out-char"):
        config = json.loads((work / run / "config.json").read_text())
        assert config["tokenizer_vocab_size"] == meta["vocab_size"], run
        assert config["train"]["data"] == str(work / "data" / "shakespeare_char"), run
    hellaswag = [c for c in ran if "hellaswag" in c.words]
    assert {R.setting(c.words, "data") for c in hellaswag} == {"hellaswag_val.jsonl", "hellaswag_val.bin"}
    for command in hellaswag:  # every record of the stand-in scored
        assert re.search(r"^examples\s+9$", printed[command.text], re.M), command.text
    glue = {task: c for task in GLUE for c in ran if R.setting(c.words, "data") == f"{task}/train.tsv"}
    runs = {task: work / R.setting(c.words, "out_dir") for task, c in glue.items()}
    assert glue.keys() == GLUE.keys() and len(set(runs.values())) == len(GLUE), "GLUE runs sharing a folder"
    labels = {task: json.loads((run / "config.json").read_text())["labels"] for task, run in runs.items()}
    # the columns the commands name were read: each task's labels, STS-B's scores as a regression
    assert labels == {"SST-2": ["0", "1"], "MRPC": ["0", "1"], "STS-B": None, "CoLA": ["0", "1"],
                      "MNLI": ["contradiction", "entailment", "neutral"]}
    assert json.loads((runs["STS-B"] / "hf" / "config.json").read_text())["problem_type"] == "regression"


def test_the_readmes_python_example_runs():
    (block,) = R.blocks(R.README.read_text(encoding="utf-8"), "python")
    exec(compile(block, "README.md", "exec"), {})


def test_a_command_without_a_rule_is_an_error_and_comments_and_chains_are_split():
    with pytest.raises(ValueError, match="no rule runs the README command 'make all'"):
        R.commands("```bash\nmake all\n```\n")
    found = R.commands('```bash\npip install x && python -m minipt.train --n_layer=2   # a comment\n'
                       'python -m minipt.sample --prompt "a # not a comment"\n```\n```python\nprint(1)\n```\n')
    assert [c.words for c in found] == [["pip", "install", "x"], ["python", "-m", "minipt.train", "--n_layer=2"],
                                        ["python", "-m", "minipt.sample", "--prompt", "a # not a comment"]]
    assert found[0].skip and found[1].extra == R.SHORT_TRAIN and not found[2].extra
    # nanoGPT's prepare.py is skipped (its output is a stand-in); its config's model shrinks where the command
    # leaves a size to the file, and another script is still an error
    found = R.commands("```bash\npython data/shakespeare_char/prepare.py\npython -m minipt.train --config "
                       "config/train_shakespeare_char.py --n_layer=4 --block_size 32\n```\n")
    assert "nanoGPT's own script" in found[0].skip and "stand-in" in found[0].skip
    assert found[1].extra == R.SHORT_TRAIN + [f"--{k}={v}" for k, v in R.SMALL_MODEL.items()
                                              if k not in ("n_layer", "block_size")]
    with pytest.raises(ValueError, match="no rule runs the README command 'python train.py'"):
        R.commands("```bash\npython train.py\n```\n")
