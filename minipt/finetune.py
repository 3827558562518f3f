"""``python -m minipt.finetune --init_from DIR --data train.csv``: fine-tune BERT for sequence classification.

``DIR`` is a BERT run, a fine-tune run, or a Hugging Face BERT folder;
``--init_from=scratch --arch_from=DIR`` starts from random weights in the
architecture, and with the tokenizer, of ``DIR``. The examples are a ``.csv``
with a header row or a ``.jsonl``, with ``text``, an optional ``text_pair`` and
``label``. Without ``--val_data``, a seeded shuffle of ``--data`` gives up its
last ``val_fraction`` for validation; ``--test_data`` is scored once, at the
end, with the weights that validation picked. Without ``--data`` it fine-tunes
on the bundled genre task: comedy, history or tragedy, from passages of the
held-out part of every play. The trainer itself is minipt/finetuning.py.

The run folder gets metrics.jsonl, loss.png, confusion.json (scores and
confusion matrices of the validation and test sets) and, where transformers is
installed, hf/ with the model as a BertForSequenceClassification.

Examples:

    python -m minipt.finetune --init_from out-bert
    python -m minipt.finetune --init_from out-bert --data train.csv --val_data dev.csv --learning_rate=1e-4
    python -m minipt.finetune --init_from scratch --arch_from out-bert
    python -m minipt.sample --out_dir out-finetune --text "Now is the winter of our discontent"
"""

from __future__ import annotations

import sys
from pathlib import Path

from minipt import runtime
from minipt.config import FinetuneConfig, make_config, parse_overrides
from minipt.errors import EXIT_INTERRUPTED, Interrupted, MiniptError, report
from minipt.finetuning import CONFUSION, export, finetune
from minipt.loop import resumed_config

PROG = "python -m minipt.finetune"


def main(argv: list[str] | None = None) -> int:
    rt = None
    try:
        overrides = parse_overrides(FinetuneConfig, argv, PROG, __doc__)
        cfg = make_config(FinetuneConfig, overrides)
        cfg = resumed_config(FinetuneConfig, overrides) if cfg.resume else cfg
        rt = runtime.setup(cfg.device, cfg.dtype, cfg.tf32)
        run = finetune(cfg, rt, log=print if rt.is_main else (lambda *a, **k: None))
        if rt.is_main:
            folder = Path(cfg.out_dir) / "hf"
            exported = export(run.model, run.tok, run.labels, folder)
            print(f"done: run saved in {cfg.out_dir} (metrics.jsonl, loss.png, {CONFUSION}); " + (
                f"{folder} holds it as a BertForSequenceClassification; " if exported else "") +
                f"classify with: python -m minipt.sample --out_dir {cfg.out_dir} --text \"...\"")
        return 0
    except MiniptError as exc:
        return report("minipt.finetune", exc)
    except Interrupted as exc:
        if rt.is_main:
            print(f"\ninterrupted: saved step {exc.args[0]} in {cfg.out_dir}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if rt is not None:
            runtime.shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
