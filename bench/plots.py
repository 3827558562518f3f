"""Bar charts of benchmark rows: one panel per benchmark name, one bar per provider at each size.

The plotted measure is the first of tokens/s (training steps), TFLOP/s, GB/s and
time that the rows carry, so an op's panel shows the same quantity as its roofline.
``python -m bench.plots [RESULTS_DIR]`` redraws every PNG from the JSON files there,
with a benchmark's own ``plot`` where its module has one.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, config_fields

# (row field, axis label), in order of preference.
MEASURES = (
    ("tokens_per_s", "tokens/s"),
    ("tflops", "TFLOP/s"),
    ("gbps", "GB/s"),
    ("median_ms", "median time (ms)"),
)


def _measure(rows: list[dict]) -> tuple[str, str] | None:
    for field, label in MEASURES:
        if any(isinstance(r.get(field), (int, float)) for r in rows):
            return field, label
    return None


def _size_label(row: dict, fields: list[str]) -> str:
    return " ".join(f"{f}={row[f]}" for f in fields if row.get(f) is not None) or "-"


def plot_rows(title: str, rows: list[dict], path: Path) -> Path | None:
    """Draw ``rows`` into ``path`` (PNG); None when no row holds a measurement."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    measured = [r for r in rows if _measure([r]) is not None]
    names = list(dict.fromkeys(r["name"] for r in measured))
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        group = [r for r in measured if r["name"] == name]
        field, label = _measure(group)
        # The fields that change within the panel tell its bars apart; a panel of one size shows it whole.
        fields = [f for f in config_fields(group) if f != "backend"]  # the provider already names it
        varying = [f for f in fields if len({str(r.get(f)) for r in group}) > 1] or fields
        sizes = list(dict.fromkeys(_size_label(r, varying) for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {_size_label(r, varying): r.get(field) for r in group if r["provider"] == provider}
            xs = [j + i * width for j, size in enumerate(sizes) if isinstance(values.get(size), (int, float))]
            ys = [values[size] for size in sizes if isinstance(values.get(size), (int, float))]
            ax.bar(xs, ys, width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes, rotation=20 if len(sizes) > 1 else 0, ha="right" if len(sizes) > 1 else "center", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_json(json_path: Path) -> Path | None:
    """Redraw the PNG beside one results file written by ``bench.common.write_json``."""
    data = json.loads(json_path.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        return None
    title = f"{json_path.stem} on {data.get('machine', {}).get('device', '?')}"
    try:  # the benchmark's own figure, where it draws one
        plot = importlib.import_module(f"bench.{json_path.stem}").plot
    except (ImportError, AttributeError):
        plot = plot_rows
    return plot(title, data["rows"], json_path.with_suffix(".png"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else RESULTS_DIR
    for json_path in sorted(root.glob("*/*.json")):
        png = plot_json(json_path)
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
