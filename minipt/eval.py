"""python -m minipt.eval --out_dir DIR --data HELD_OUT: score a model on held-out text.

DIR is a minipt run (a fine-tune run is scored as the BERT it fine-tuned)
or a Hugging Face GPT-2/BERT folder;
--data is in any format the trainer reads (txt, md, their .gz, jsonl[.gz|.zst],
parquet, and for GPT nanoGPT/llm.c .bin token files; a file, folder or
glob), read whole: every document is held out. It prints a table, and --json
PATH writes it too.

GPT: loss, perplexity and bits per byte over consecutive windows of the
documents, each separated by <|endoftext|> as in training. BERT: MLM loss and
accuracy, NSP accuracy beside the share of the commoner label, and the share of
padding. How each is computed: minipt/evaluation.py.

--task=hellaswag scores a GPT on HellaSwag: --data is the dataset's jsonl
(hellaswag_val.jsonl, tokenized with the model's tokenizer) or llm.c's
hellaswag_val.bin (GPT-2 token ids). It reports acc (the ending of the lowest
summed loss, llm.c's and lm-evaluation-harness's acc), acc_norm (the lowest
loss per token, llm.c's) and acc_norm_chars (per character,
lm-evaluation-harness's acc_norm), and the number of examples. A context
longer than the model's block_size loses its start. Definitions:
minipt/multiple_choice.py.

Examples:

    python -m minipt.eval --out_dir out-gpt --data held_out/ --json scores.json
    python -m minipt.eval --out_dir out-bert --data held_out.jsonl --pack=true
    python -m minipt.eval --task hellaswag --data hellaswag_val.jsonl --out_dir ~/models/gpt2
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from minipt import checkpoint as ckpt
from minipt import runtime
from minipt.config import EvalConfig, make_config, parse_overrides
from minipt.errors import MiniptError, report
from minipt.evaluation import evaluate, table

PROG = "python -m minipt.eval"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(EvalConfig, parse_overrides(EvalConfig, argv, PROG, __doc__))
        rt = runtime.setup(cfg.device, cfg.dtype, cfg.tf32)
        if cfg.json:  # its folder is made before the scoring, not found missing after it
            Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        result = evaluate(cfg, rt)
        print(table(result))
        if cfg.json:
            ckpt.atomic_write_text(Path(cfg.json), json.dumps({**result, "settings": asdict(cfg)}, indent=2))
        return 0
    except MiniptError as exc:
        return report("minipt.eval", exc)


if __name__ == "__main__":
    sys.exit(main())
