"""The README's commands, read from its fenced ``bash`` blocks in the order it gives them, and how each is run
by tests/test_readme.py: as written, with its training shortened, with a stand-in for a file the user brings,
or skipped with the reason. A command no rule covers is an error, so a new README command needs a rule here.

Run as a script, it runs one README command exactly as written in a fresh folder (CI runs the default
training this way, which is too long for the test)::

    python tests/readme_commands.py --as-written "python -m minipt.train"
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Appended to a training command (later settings win): a few steps and one-batch evaluations instead of
# the default 800 steps (minutes on 2 cores); every other setting stays the README's.
SHORT_TRAIN = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1"]
SHORT_FINETUNE = ["--epochs=1"]
# Also appended to a training command that reads a nanoGPT config file (.py), for each size the command does not
# set itself: shakespeare_char's baby GPT (6 layers, 384 wide, block 256, batch 64) takes 10-20 s per step on 2
# cores, so the shortened run trains a smaller model; every other setting stays the file's and the README's.
SMALL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 8}


@dataclass
class Command:
    words: list[str]  # as the shell splits it, `~` expanded as the shell expands it
    text: str  # as the README writes it
    skip: str = ""  # why it is not run, if it is not
    extra: list[str] = field(default_factory=list)  # settings appended to shorten it


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def commands(text: str) -> list[Command]:
    """Every command of the README's bash blocks in order: a line split by the shell's rules (comments
    dropped, ``&&`` separating commands), each command with the rule that runs it."""
    found = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append(plan(words[:end]))
                words = words[end + 1:]
    return found


def plan(words: list[str]) -> Command:
    """The rule for one command; a command no rule covers raises."""
    text = shlex.join(words)
    words = [os.path.expanduser(w) if w.startswith("~") else w for w in words]
    if words[:2] == ["pip", "install"]:
        return Command(words, text, skip="installs packages: the test runs in the checkout CI installed with it")
    if words[:3] == ["python", "-m", "pytest"]:
        return Command(words, text, skip="runs the test suite, which holds this test")
    if words[0] == "torchrun":
        procs = next((w.split("=")[1] for w in words if w.startswith("--nproc_per_node=")), "?")
        return Command(words, text, skip=f"needs {procs} CUDA GPUs (--device cuda); DDP on 2 CPU processes is "
                                         "tested by tests/test_ddp.py")
    if len(words) == 2 and words[0] == "python" and re.fullmatch(r"data/\w+/prepare\.py", words[1]):
        return Command(words, text, skip="nanoGPT's own script, not in this repository: what it writes (train.bin, "
                                         "val.bin, meta.pkl) is the stand-in tests/test_readme.py writes")
    if words[:2] != ["python", "-m"] or not words[2].startswith("minipt."):
        raise ValueError(f"no rule runs the README command {text!r}: add one to tests/readme_commands.py")
    if words[2] == "minipt.train" and "--help" not in words:
        extra = SHORT_TRAIN
        if setting(words, "config").endswith(".py"):  # a nanoGPT config file
            given = {w[2:].split("=")[0] for w in words[3:] if w.startswith("--")}
            extra = SHORT_TRAIN + [f"--{k}={v}" for k, v in SMALL_MODEL.items() if k not in given]
        if "--resume" in words:  # continue past the shortened run, whatever step count the README gives
            extra = [f"--max_iters={2 * int(SHORT_TRAIN[0].split('=')[1])}"]
        return Command(words, text, extra=extra)
    if words[2] == "minipt.finetune":
        return Command(words, text, extra=SHORT_FINETUNE)
    return Command(words, text)


def setting(words: list[str], name: str) -> str:
    """The value a command gives ``--name`` (``--name=value`` or ``--name value``); "" if it gives none."""
    for i, word in enumerate(words):
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
        if word == f"--{name}" and i + 1 < len(words):
            return words[i + 1]
    return ""


def run_in_process(command: Command) -> int:
    """The command's ``main(argv)``, as ``python -m`` would call it; its exit code."""
    import importlib

    module = importlib.import_module(command.words[2])
    try:
        return module.main(command.words[3:] + command.extra)
    except SystemExit as stop:  # --help
        return stop.code or 0


def as_written(text: str) -> int:
    """Run the README command ``text`` exactly as written, through bash, in a fresh folder with a fresh cache."""
    wanted = shlex.split(text)
    if not any(c.words == wanted for c in commands(README.read_text(encoding="utf-8"))):
        print(f"{text!r} is not a command of {README}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "MINIPT_CACHE": str(Path(folder) / "cache")}
        start = time.perf_counter()
        code = subprocess.run(["bash", "-c", text], cwd=folder, env=env).returncode
        print(f"{text!r} as written: exit {code} in {time.perf_counter() - start:.0f} s")
        return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--as-written", required=True, metavar="COMMAND", help="a README command, as written")
    sys.exit(as_written(parser.parse_args().as_written))
