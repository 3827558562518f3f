"""python -m minipt.export --out_dir RUN --to DIR: a run as a Hugging Face model folder.

RUN is a pretraining run (GPT becomes a GPT2LMHeadModel, BERT a
BertForPreTraining) or a fine-tune run (a BertForSequenceClassification with
its labels). DIR gets the weights, config.json, tokenizer.json and
tokenizer_config.json, so that transformers' from_pretrained and AutoTokenizer
load it as it is. A model that transformers cannot express (sliding-window
attention, soft-capped LM or MLM logits) is refused by name. Needs transformers (pip install minipt[hf]).

Examples:

    python -m minipt.export --out_dir out-gpt --to gpt-hf
    python -m minipt.export --out_dir out-finetune --to classifier-hf
"""

from __future__ import annotations

import sys
from pathlib import Path

from minipt import hf
from minipt.config import ConfigError, ExportConfig, make_config, parse_overrides
from minipt.errors import MiniptError, report
from minipt.load import is_hf_folder, load_run

PROG = "python -m minipt.export"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = make_config(ExportConfig, parse_overrides(ExportConfig, argv, PROG, __doc__))
        if not cfg.to:
            raise ConfigError("--to is required: the folder to write the Hugging Face model to")
        if is_hf_folder(cfg.out_dir):
            raise ConfigError(f"{cfg.out_dir} is a Hugging Face folder already; export takes a minipt run")
        folder = Path(cfg.to)
        if folder.exists() and any(folder.iterdir()) and not cfg.overwrite:
            raise ConfigError(f"--to {folder} already holds files; pass --overwrite to write over them")
        model, tok, config = load_run(cfg.out_dir)
        hf.save_pretrained(model, tok, folder, labels=config.get("labels"))
        print(f"done: {cfg.out_dir} written to {folder} as a {hf.to_hf(model).__class__.__name__}")
        return 0
    except MiniptError as exc:
        return report("minipt.export", exc)


if __name__ == "__main__":
    sys.exit(main())
