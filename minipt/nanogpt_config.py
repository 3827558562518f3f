"""nanoGPT's Python config files (``config/train_shakespeare_char.py``) as TrainConfig settings, read, never run."""

from __future__ import annotations

import ast
import operator
import os
import sys
from pathlib import Path

from minipt.errors import ConfigError, unknown_setting

# nanoGPT's train.py globals that its config files override, at train.py's values: a config sets some and inherits
# the rest (config/train_gpt2.py sets no n_layer; GPT-2 124M's 12 is train.py's). Each is the TrainConfig field of
# the same name and meaning. device, dtype and compile are fields too, but keep minipt's defaults unless a file sets
# them: auto finds what train.py's defaults ask for (the GPU, bfloat16 where it runs).
NANOGPT_DEFAULTS = dict(
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, always_save_checkpoint=True,
    gradient_accumulation_steps=5 * 8, batch_size=12, block_size=1024, n_layer=12, n_head=12, n_embd=768,
    dropout=0.0, bias=False, learning_rate=6e-4, max_iters=600000, weight_decay=1e-1, beta1=0.9, beta2=0.95,
    grad_clip=1.0, decay_lr=True, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5,
    optimizer="adamw",  # nanoGPT's, whose settings above are AdamW's; minipt's own GPT default is Muon
)
NANOGPT_DATASET = "openwebtext"  # train.py's; the data folder is data/<dataset>, from the current folder
# train.py globals with nothing to do here (backend is DDP's, which minipt picks: NCCL on CUDA, else gloo)
NANOGPT_IGNORED = ("wandb_log", "wandb_project", "wandb_run_name", "backend", "eval_only")
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _literal(node: ast.expr, known: dict, where: str):
    """The value of a config line's right-hand side: a literal, a name assigned above it, or arithmetic on those
    (``5 * 8``, ``max_iters // 10``); anything else would need running code, and is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in known:
        return known[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _literal(node.operand, known, where)
        if _is_number(value):
            return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        a, b = _literal(node.left, known, where), _literal(node.right, known, where)
        if isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            return a + b
        # a bounded power keeps 10 ** 10 ** 10 from running for ever
        if _is_number(a) and _is_number(b) and not (isinstance(node.op, ast.Pow) and abs(b) > 64):
            try:
                return _ARITHMETIC[type(node.op)](a, b)
            except (ArithmeticError, ValueError) as exc:
                raise ConfigError(f"{where}: {ast.unparse(node)}: {exc}") from None
    raise ConfigError(f"{where}: {ast.unparse(node)!r} is not a literal: a nanoGPT config file is read, not run, "
                      "so its values are literals, names assigned above them, and arithmetic on numbers")


def read_nanogpt_config(path: Path, fields: set[str]) -> dict:
    """TrainConfig settings from a nanoGPT config file (``config/train_shakespeare_char.py``), read without running it.

    The file is parsed with ``ast``: each line is ``name = value`` (see :func:`_literal`); an import, a call
    or any other statement is an error naming its line. Its settings start from nanoGPT's train.py defaults
    (:data:`NANOGPT_DEFAULTS`), as they do in nanoGPT, and translate to minipt's: ``dataset=NAME`` is the
    folder ``data/NAME`` relative to the current folder (as train.py resolves it); ``init_from='resume'`` is
    ``resume``, ``'scratch'`` is nothing, ``'gpt2*'`` an error (minipt reads a local Hugging Face folder), and
    any other value a minipt starting point; ``gradient_accumulation_steps``, nanoGPT's count over all ranks,
    is divided by torchrun's ``WORLD_SIZE``. The keys in :data:`NANOGPT_IGNORED` are named in one note on
    stderr; a key that is neither nanoGPT's nor one of ``fields`` (TrainConfig's) is an error.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python ({exc.msg})") from None
    known, lines = {}, {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{where}: {ast.unparse(node).splitlines()[0]!r}: a nanoGPT config file is read, not "
                              "run: each line sets a name, as in name = 'value'")
        name = node.targets[0].id
        known[name], lines[name] = _literal(node.value, known, where), where
    values = {**NANOGPT_DEFAULTS, "data": os.path.join("data", NANOGPT_DATASET)}
    ignored = []
    for name, value in known.items():
        where = lines[name]
        if name == "eval_only" and value:
            raise ConfigError(f"{where}: eval_only = True: minipt scores a run with python -m minipt.eval "
                              "--out_dir RUN --data FILES")
        if name in NANOGPT_IGNORED:
            ignored.append(name)
        elif name == "dataset":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: dataset must be the name of a folder under data/, got {value!r}")
            values["data"] = os.path.join("data", value)
        elif name == "init_from" and value == "scratch":
            continue  # what minipt does without init_from
        elif name == "init_from" and value == "resume":
            values["resume"] = True
        elif name == "init_from" and isinstance(value, str) and value.startswith("gpt2"):
            raise ConfigError(
                f"{where}: init_from = {value!r}: nanoGPT downloads OpenAI's weights; minipt reads a local Hugging "
                f"Face folder instead: save one with transformers (GPT2LMHeadModel.from_pretrained({value!r}) and "
                f"GPT2TokenizerFast, .save_pretrained(DIR)) and set init_from = 'DIR'"
            )
        elif name == "dtype" and value == "float16":
            raise ConfigError(f"{where}: dtype = 'float16': minipt trains in bfloat16 (auto on a GPU) or float32")
        elif name in fields:
            values[name] = value
        else:
            raise unknown_setting(name, sorted(fields | set(NANOGPT_IGNORED) | {"dataset"}), f" at {where}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    steps = values["gradient_accumulation_steps"]
    if not _is_number(steps) or steps % world_size:
        raise ConfigError(f"{lines.get('gradient_accumulation_steps', path)}: gradient_accumulation_steps = {steps!r} "
                          f"is nanoGPT's count over all ranks, to be split evenly over the {world_size} of this run")
    values["gradient_accumulation_steps"] = steps // world_size
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"note: {path}: nanoGPT settings with nothing to do in minipt, ignored: {', '.join(ignored)}"
              + (" (--tensorboard=true logs the metrics)" if any(n.startswith("wandb") for n in ignored) else ""),
              file=sys.stderr)
    return values
