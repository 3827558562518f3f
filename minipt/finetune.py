"""``python -m minipt.finetune --init_from DIR --data train.csv``: fine-tune BERT for sequence classification.

``DIR`` is a BERT run, a fine-tune run, or a Hugging Face BERT folder;
``--init_from=scratch --arch_from=DIR`` starts from random weights in the
architecture, and with the tokenizer, of ``DIR``. The examples are a ``.csv`` or
``.tsv`` (GLUE's files) or a ``.jsonl``: the text is in ``--text_field`` (default
``text``), an optional second text in ``--text_pair_field`` (default
``text_pair`` where present) and the label in ``--label_field`` (default
``label``); ``--header=false`` reads a file without a header row, its columns
named by index (CoLA: ``--text_field=3 --label_field=1``). ``--num_labels=1``
fine-tunes a regressor on numbers (STS-B), ``--num_labels=N`` takes labels 0 to
N-1. ``--metric`` picks the epoch kept: accuracy, macro_f1 (the default), f1
(of label 1 of two), matthews, or for regression pearson (the default) or
spearman. Without ``--val_data``, a seeded shuffle of ``--data`` gives up its
last ``val_fraction`` for validation; ``--test_data`` is scored once, at the
end, with the weights that validation picked. Without ``--data`` it fine-tunes
on the bundled genre task: comedy, history or tragedy, from passages of the
held-out part of every play. The trainer itself is minipt/finetuning.py.

The run folder gets metrics.jsonl, loss.png, confusion.json (the scores of the
validation and test sets, and a classifier's confusion matrices) and, where
transformers is installed, hf/ with the model as a
BertForSequenceClassification (problem_type regression for --num_labels=1).

Examples:

    python -m minipt.finetune --init_from out-bert
    python -m minipt.finetune --init_from out-bert --data train.csv --val_data dev.csv --learning_rate=1e-4
    python -m minipt.finetune --init_from ~/models/bert-base-uncased --data SST-2/train.tsv --val_data SST-2/dev.tsv \\
        --text_field=sentence
    python -m minipt.finetune --init_from ~/models/bert-base-uncased --data STS-B/train.tsv --val_data STS-B/dev.tsv \\
        --text_field=sentence1 --text_pair_field=sentence2 --label_field=score --num_labels=1
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
