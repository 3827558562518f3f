"""minipt's own errors, and the exit codes the commands map them to.

Every error minipt raises on purpose (bad settings, data, tokenizer, checkpoint,
an unavailable backend, a diverged run) derives from :class:`MiniptError` and
carries the exit code of its kind. The commands catch ``MiniptError`` and
``KeyboardInterrupt`` only: anything else is a bug, and keeps its traceback.

This module imports nothing from minipt, so every layer may import it.
"""

from __future__ import annotations

import difflib
import sys

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class MiniptError(Exception):
    """An error minipt reports as one line: what was wrong and what to do."""

    exit_code = EXIT_USAGE
    points_to_help = False  # a bad setting: the report points to the command's --help


class ConfigError(MiniptError, ValueError):
    """A setting that cannot be used: unknown key, wrong type or a value out of range."""

    points_to_help = True


def unknown_setting(key: str, names, where: str = "") -> ConfigError:
    """The error for a setting that is none of ``names``, with the nearest of them as a hint."""
    near = difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join('--' + n for n in near)}?" if near else "; see --help for the list"
    return ConfigError(f"unknown setting {key!r}{where}{hint}")


class TrainingError(MiniptError, RuntimeError):
    """The run cannot go on (a non-finite loss); its last checkpoint is kept."""

    exit_code = EXIT_FAILED


class MissingDependency(MiniptError, ImportError):
    """An optional dependency that the call needs is not installed."""


class Interrupted(Exception):
    """A stop request (Ctrl-C, SIGTERM) was honoured: the run saved its state at step ``args[0]``."""


def report(command: str, exc: MiniptError) -> int:
    """Print ``exc`` as the error of ``python -m {command}`` and return its exit code."""
    hint = f"\n(see python -m {command} --help)" if exc.points_to_help else ""
    print(f"{command}: error: {exc}{hint}", file=sys.stderr)
    return exc.exit_code
