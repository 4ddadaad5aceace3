"""Figures as PNG files, drawn with matplotlib's object API on the Agg canvas (no display,
no global pyplot state, safe in worker processes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: Path,
            title: str = "", xlabel: str = "", colorbar: str = "", annotate: bool = True,
            vmin: float | None = None, vmax: float | None = None) -> Path:
    """A (R, C) matrix as a heatmap with labelled rows and columns; cells annotated with their
    values when the matrix is small enough to read."""
    matrix = np.asarray(matrix, dtype=float)
    r, c = matrix.shape
    fig = new_figure(min(2.5 + 0.45 * c, 24), min(1.6 + 0.4 * r, 24))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(c), list(cols), rotation=90 if c > 8 else 0, fontsize=8)
    ax.set_yticks(range(r), list(rows), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar, shrink=0.9)
    if annotate and r * c <= 400:
        top = np.nanmax(matrix) if np.isfinite(matrix).any() else 0.0
        for i in range(r):
            for j in range(c):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if matrix[i, j] > 0.6 * top else "white")
    return save(fig, path)
