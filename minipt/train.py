"""``python -m minipt.train``: pretrain GPT (causal LM) or BERT (MLM + NSP).

With no arguments it trains a small GPT on the CPU on the bundled Shakespeare
plays, evaluates as it goes, saves the run to ``out-gpt/`` and ends with a
sample; ``--model bert`` does the same for MLM + NSP, in ``out-bert/``. Every
field of the training config is an option (--help lists them, with their
defaults). Under ``torchrun --nproc_per_node=N -m minipt.train ...`` it runs
DDP. The trainer itself is minipt/pretraining.py, with minipt/loop.py beside it.

Examples:

    python -m minipt.train
    python -m minipt.train --model bert --max_iters=2000
    python -m minipt.train --resume --out_dir out-gpt
    python -m minipt.train --init_from ~/models/gpt2 --data my_corpus/ --out_dir out-gpt2
    python -m minipt.train --config config/train_shakespeare_char.py   # nanoGPT's config, from nanoGPT's folder
"""

from __future__ import annotations

import sys

from minipt import runtime
from minipt.config import TrainConfig, parse_overrides
from minipt.errors import EXIT_INTERRUPTED, Interrupted, MiniptError, report
from minipt.pretraining import final_report, resolve_config, train

PROG = "python -m minipt.train"


def main(argv: list[str] | None = None) -> int:
    rt = None
    try:
        cfg = resolve_config(parse_overrides(TrainConfig, argv, PROG, __doc__))
        rt = runtime.setup(cfg.device, cfg.dtype, cfg.tf32)
        log = print if rt.is_main else (lambda *a, **k: None)
        run = train(cfg, rt, log)
        final_report(run, log)
        text = ' --text "... [MASK] ..."' if cfg.model == "bert" else ""
        log(f"done: run saved in {run.out} (metrics.jsonl, loss.png); sample with: "
            f"python -m minipt.sample --out_dir {run.out}{text}")
        return 0
    except MiniptError as exc:
        return report("minipt.train", exc)
    except Interrupted as exc:
        if rt.is_main:
            print(f"\ninterrupted: saved step {exc.args[0]} in {cfg.out_dir}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if rt is not None and rt.is_main:
            print(f"\ninterrupted: nothing saved since the last checkpoint in {cfg.out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if rt is not None:
            runtime.shutdown(rt)


if __name__ == "__main__":
    sys.exit(main())
