"""Every command of the README, read from its text, run in the order it gives them in a fresh folder.

What a CI machine lacks is stood in for by small files written here (the user's own data, a Hugging Face
folder in ~/models) or the command is skipped with its reason (tests/readme_commands.py holds the rules);
training runs a few steps (CI runs the default training as written once, see .ci/run)."""

import csv
import json

import pytest

import readme_commands as R
from hf_folders import bert_folder, gpt2_folder

pytestmark = pytest.mark.slow

LINES = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken.",
]


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
    return {
        "my_run.toml": work / "my_run.toml", "held_out/": work / "held_out", "my_corpus/": work / "my_corpus",
        "train.csv": work / "train.csv", "val.csv": work / "val.csv", "test.csv": work / "test.csv",
        "~/models/gpt2": gpt2_folder(home / "models" / "gpt2", positions=256),
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

    ran, skipped = [], []
    for command in R.commands(text):
        if command.skip:
            skipped.append(command)
            continue
        code = R.run_in_process(command)
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in err, f"{command.text}: exit {code}\n{err[-2000:]}"
        ran.append(command)
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
