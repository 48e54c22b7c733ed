"""Shared output helpers for the benchmarks: a plain-text table, a JSON file, and bar charts as PNG.

Every benchmark prints what it ran beside its figures; these helpers only format. matplotlib is
imported lazily (headless, Agg backend), so a benchmark still prints and writes JSON without it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


def format_value(value: Any) -> str:
    """Numbers with 3-4 significant digits, None as '-', everything else as str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """Left-aligned first column, right-aligned numbers, a rule under the header."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]

    # Text columns read best left-aligned, numbers right-aligned.
    numeric = [
        i > 0 and all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
        for i, c in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(columns)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None, file=None) -> None:
    print(format_table(rows, columns, title), file=file or sys.stdout, flush=True)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_report(out_stem: str | Path, payload: Any, plot: Callable[[Path], None] | None = None) -> None:
    """Write OUT_STEM.json and, when `plot` is given and matplotlib is installed, OUT_STEM.png."""
    json_path = write_json(str(out_stem) + ".json", payload)
    if plot is None:
        print(f"wrote {json_path}")
        return
    png_path = Path(str(out_stem) + ".png")
    try:
        plot(png_path)
    except ImportError:
        print(f"wrote {json_path} (matplotlib missing: no plot)")
        return
    print(f"wrote {json_path} and {png_path}")


def script_main(description: str, add_arguments: Callable, run: Callable, argv: list[str] | None = None) -> int:
    """Entry point for running a benchmark module directly (`python -m bench.NAME`)."""
    parser = argparse.ArgumentParser(description=description.strip().split("\n")[0])
    add_arguments(parser)
    return int(run(parser.parse_args(argv)) or 0)


def bar_panels(
    path: str | Path,
    panels: Sequence[dict],
    suptitle: str,
    footnote: str | None = None,
) -> Path | None:
    """One PNG with a bar chart per panel. A panel: {"title", "ylabel", "labels": [...],
    "series": {name: [values...]}}. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)", file=sys.stderr)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = min(3, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows + 0.9), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        labels = list(panel["labels"])
        series = panel["series"]
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            heights = [v if v is not None else 0.0 for v in values]
            bars = ax.bar(xs, heights, width=width, label=name)
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.annotate(format_value(float(v)), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if footnote else 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
