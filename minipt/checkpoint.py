"""Run folders: atomic writes, the weights in safetensors, the training state beside them.

A run folder (``out_dir``) holds

* ``config.json``: the resolved training config, the model config, the tokenizer kind;
* ``tokenizer.json``: the tokenizer, as Hugging Face ``tokenizers`` saves it;
* ``model.safetensors``: the weights. Tied weights (the LM head and the word
  embedding) are one tensor in the module; ``safetensors.torch.save_model``
  stores it once and ``load_model`` restores the tie;
* ``state.pt``: optimizer, iteration, data sampler and RNG states (``torch.save``
  of a dict of tensors and plain values, read back with ``weights_only=True``);
* ``metrics.jsonl`` and ``loss.png``; with ``--tensorboard``, ``tb/``: the
  same scalars as TensorBoard events.

Every file is written atomically (:mod:`minipt.atomic`: a temporary name,
fsync, rename, fsync of the folder). A checkpoint is two files, model and state: both are written completely under
temporary names before either is renamed, so a crash while writing (the slow
part) leaves the previous checkpoint whole. Both record their iteration, and
loading refuses a pair that disagrees, which is what a crash in the instant
between the two renames would leave.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from minipt.atomic import atomic_write_text, commit, write_temporary
from minipt.errors import EXIT_FAILED, MiniptError

CONFIG, TOKENIZER, MODEL, STATE, METRICS, PLOT = (
    "config.json", "tokenizer.json", "model.safetensors", "state.pt", "metrics.jsonl", "loss.png",
)
RUN_FILES = (CONFIG, TOKENIZER, MODEL, STATE, METRICS, PLOT)
TENSORBOARD = "tb"  # a folder, written only with --tensorboard


class CheckpointError(MiniptError, RuntimeError):
    """A run folder that cannot be resumed or loaded: files missing, corrupt or mismatched."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, say); the one before it is whole."""

    exit_code = EXIT_FAILED


def rng_state(device: torch.device) -> dict:
    """The generators a resumed run must continue: torch's CPU one, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(states: list[dict] | dict, device: torch.device, rank: int = 0) -> None:
    """Restore ``rank``'s generators from a checkpoint's ``rng`` entry: one state per rank.

    Each rank draws its own dropout masks, so each saves and restores its own
    generators. A checkpoint from a run with fewer ranks gives rank r the state
    of rank r modulo its count (the run cannot then continue exactly); one
    written before states were kept per rank holds a single state, rank 0's.
    """
    state = states[rank % len(states)] if isinstance(states, list) else states
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out_dir: str | Path, model: torch.nn.Module, state: dict) -> None:
    """Write ``model.safetensors`` and ``state.pt`` (which must hold ``"iter"``) as one checkpoint."""
    out = Path(out_dir)
    metadata = {"format": "pt", "iter": str(state["iter"])}
    written: list[tuple[Path, Path]] = []
    try:
        write_model = lambda p: save_model(model, str(p), metadata=metadata)  # noqa: E731
        written.append((write_temporary(out / MODEL, write_model), out / MODEL))
        written.append((write_temporary(out / STATE, lambda p: torch.save(state, p)), out / STATE))
    except BaseException as exc:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError from its zip writer, safetensors as an OSError
        if isinstance(exc, (OSError, RuntimeError)):
            before = (f"the checkpoint of step {load_state(out)['iter']} before it is intact"
                      if (out / STATE).is_file() else "no earlier checkpoint exists")
            raise CheckpointWriteError(f"could not write the checkpoint of step {state['iter']} in {out} "
                                       f"(is the disk full?): {exc}; {before}") from None
        raise
    commit(written)
    replacement_done(out)


def load_weights(out_dir: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> int:
    """Load ``model.safetensors`` into ``model``; return the iteration it was saved at.

    What does not fit is named: a file that is not safetensors (or is cut short), a
    tensor of another shape, a tensor missing or extra. Other errors (out of memory)
    are not checkpoint errors and pass through as they are."""
    path = Path(out_dir) / MODEL
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {out_dir}: {MODEL} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            saved_iter = int((f.metadata() or {}).get("iter", -1))
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: not a readable safetensors file ({exc})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [f"{name} is {list(shape)}, the model's {list(expected[name])}"
             for name, shape in shapes.items() if name in expected and shape != expected[name]]
    if wrong:
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(wrong[:5])}")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except SafetensorError as exc:  # a header that reads but data that does not: a file cut short
        raise CheckpointError(f"{path} is corrupt: not a readable safetensors file ({exc})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return saved_iter


def load_state(out_dir: str | Path) -> dict:
    path = Path(out_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {out_dir}: {STATE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip or pickle raises one of several types
        raise CheckpointError(f"{path} is corrupt: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or "iter" not in state:
        raise CheckpointError(f"{path} is not a minipt training state (no 'iter' entry)")
    return state


def load_checkpoint(out_dir: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict:
    """Weights into ``model``, and the training state, checked to be one checkpoint."""
    state = load_state(out_dir)
    saved_iter = load_weights(out_dir, model, device)
    if saved_iter != state["iter"]:
        raise CheckpointError(
            f"{out_dir}: {MODEL} is from iteration {saved_iter} but {STATE} from {state['iter']}; "
            "the last save was cut short between the two files"
        )
    return state


def read_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no run in {out_dir}: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if not isinstance(config, dict) or not {"train", "model"} <= set(config):
        raise CheckpointError(f"{path} is not a minipt run config (expected 'train' and 'model' entries)")
    return config


LOCK = ".lock"  # held by the process that runs in the folder
REPLACED = ".replaced"  # with --overwrite: the old run, until the new one has its first checkpoint


def has_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a run with a checkpoint (one stopped before its first is no run to keep)."""
    return all((Path(out_dir) / name).is_file() for name in (MODEL, STATE))


def lock_run_folder(out_dir: str | Path):
    """Hold ``out_dir`` for this process: a second process that tries stops with a CheckpointError.

    Returns the open lock file; the lock lasts until it is closed, or the process ends
    (kill -9 included: the kernel releases it)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out_dir {str(out)!r} is a file, not a folder: name a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise CheckpointError(f"out_dir {str(out)!r} is in use by another minipt process"
                              f"{f' (pid {holder})' if holder else ''}; wait for it, or give another --out_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _leftovers(out: Path) -> list[Path]:
    """A run's files, and the temporaries a write killed mid-way left beside them."""
    names = {*RUN_FILES, TENSORBOARD}
    return [p for p in out.iterdir() if p.name in names or (p.name.startswith(".") and ".tmp" in p.name)]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_resumable(out_dir: str | Path) -> None:
    """A run folder ``--resume`` can continue: its tokenizer and checkpoint are there, or the error says why."""
    out = Path(out_dir)
    for name in (TOKENIZER, MODEL, STATE):
        if not (out / name).is_file():
            raise CheckpointError(f"cannot resume: {out / name} is missing"
                                  + ("" if has_run(out) else "; the run stopped before its first checkpoint: "
                                     "start it again without --resume"))


def prepare_run_folder(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out_dir`` ready: complete for a resumed run, free for a new one.

    With ``overwrite``, the old run is set aside in ``.replaced``, not deleted:
    :func:`replacement_done` deletes it once the new run has its first checkpoint,
    and :func:`undo_replacement` puts it back if the new run fails before then
    (a typo in ``--data`` costs nothing). A replacement that a crash cut short is
    undone here first.
    """
    out = Path(out_dir)
    undo_replacement(out)
    if resume:
        check_resumable(out)
        return
    if has_run(out):
        if not overwrite:
            raise CheckpointError(
                f"out_dir {str(out)!r} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        (out / REPLACED).mkdir()
        for path in _leftovers(out):
            path.rename(out / REPLACED / path.name)
    else:  # the files of a run stopped before its first checkpoint: nothing in them to keep
        for path in _leftovers(out):
            _remove(path)
    out.mkdir(parents=True, exist_ok=True)


def replacement_done(out_dir: str | Path) -> None:
    """The new run has a checkpoint: the run it replaces goes."""
    shutil.rmtree(Path(out_dir) / REPLACED, ignore_errors=True)


def undo_replacement(out_dir: str | Path) -> bool:
    """Put back the run that ``--overwrite`` set aside, if the new one has no checkpoint yet; True if it did."""
    out = Path(out_dir)
    old = out / REPLACED
    if not old.is_dir():
        return False
    for path in _leftovers(out):
        _remove(path)
    for path in old.iterdir():
        path.rename(out / path.name)
    old.rmdir()
    return True


def write_config(out_dir: str | Path, config: dict) -> None:
    atomic_write_text(Path(out_dir) / CONFIG, json.dumps(config, indent=2))
