"""Report helpers shared by the commands that print and write results: terminal and Markdown
tables, byte sizes, and heatmaps (probe reports, target summaries, layer similarity, dry runs)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A table for the terminal: the first column left-aligned, the figures right-aligned, each
    column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the first column left-aligned, the figures right-aligned."""
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def human_bytes(nbytes: float) -> str:
    """'512 bytes', '1.5 KiB', '2.0 GiB'."""
    units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
    step = 0
    while abs(nbytes) >= 1024 and step < len(units) - 1:
        nbytes, step = nbytes / 1024, step + 1
    return f"{nbytes:.0f} bytes" if step == 0 else f"{nbytes:.1f} {units[step]}"


def heatmap(path: str, values: np.ndarray, rows: Sequence[str], columns: Sequence[str] | None, *, label: str, title: str,
            xlabel: str | None = None, annotate: bool = False) -> str:
    """values (rows x columns, NaN blank) as a heatmap up to 1, from 0 or the lowest value below
    it (R², CKA; -1 at the lowest), each cell's figure written in it where annotate and they fit;
    at most 40 names along an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = values.shape
    fig, ax = plt.subplots(figsize=(min(max(5, 0.45 * width + 3), 16), min(max(3, 0.35 * height + 1.5), 16)))
    finite = values[np.isfinite(values)]
    low = max(-1.0, min(0.0, float(finite.min()))) if finite.size else 0.0
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=1.0)
    fig.colorbar(image, ax=ax, label=label)
    if annotate and values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    step = max(1, math.ceil(height / 40))
    ax.set_yticks(range(0, height, step), list(rows)[::step], fontsize=8)
    if columns is not None:
        step = max(1, math.ceil(width / 40))
        ax.set_xticks(range(0, width, step), list(columns)[::step], fontsize=7,
                      rotation=90 if max(map(len, columns)) > 3 else 0)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
