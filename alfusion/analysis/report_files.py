"""The report's outputs: a Markdown table per backbone, CSV files, a bar plot of the gains."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from alfusion.analysis.paper_names import BACKBONES
from alfusion.analysis.plots import new_figure, save
from alfusion.analysis.table import Cell


def cell_text(c: Cell, baseline: str) -> str:
    """'93.20 (+4.10) · paper 95.00 (+3.00)', or 'missing (failed)' without a result."""
    if c.bal_acc is None:
        text = "missing" if c.status == "missing" else f"missing ({c.status})"
    else:
        text = f"{c.bal_acc:.2f}"
        if c.probe != baseline and c.gain is not None:
            text += f" ({c.gain:+.2f})"
    if c.paper is not None:
        text += f" · paper {c.paper:.2f}"
        if c.probe != baseline and c.paper_gain is not None:
            text += f" ({c.paper_gain:+.2f})"
    return text


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(cells: list[Cell], summary: list[dict], baseline: str, title: str = "") -> str:
    """One table per backbone: rows datasets, columns probes, then mean gain and mean rank."""
    lines = [f"# {title or 'alfusion results'}", "",
             f"Test balanced accuracy x 100; in brackets the gain over `{baseline}` (last-layer "
             "CLS linear probe); `paper`: arXiv 2601.09322 for the same backbone and dataset.",
             ""]
    for backbone in dict.fromkeys(c.backbone for c in cells):
        mine = [c for c in cells if c.backbone == backbone]
        probes = list(dict.fromkeys(c.probe for c in mine))
        paper_model = BACKBONES.get(backbone)
        lines += [f"## {backbone}" + (f" (paper: {paper_model})" if paper_model else ""), "",
                  "| dataset | " + " | ".join(probes) + " |",
                  "|:--|" + "--:|" * len(probes)]
        for dataset in dict.fromkeys(c.dataset for c in mine):
            row = {c.probe: c for c in mine if c.dataset == dataset}
            lines.append(f"| {dataset} | "
                         + " | ".join(cell_text(row[p], baseline) for p in probes) + " |")
        stats = {s["probe"]: s for s in summary if s["backbone"] == backbone}
        gains = []
        for p in probes:
            s = stats[p]
            text = _num(s["mean_gain"], "+.2f")
            if s["paper_mean_gain"] is not None:
                text += f" · paper {s['paper_mean_gain']:+.2f}"
            gains.append(text)
        lines.append("| **mean gain** | " + " | ".join(gains) + " |")
        lines.append("| **mean rank** | "
                     + " | ".join(_num(stats[p]["mean_rank"], ".2f") for p in probes) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def cell_rows(cells: list[Cell]) -> list[dict]:
    return [dataclasses.asdict(c) for c in cells]


def plot_gains(cells: list[Cell], summary: list[dict], baseline: str, path: Path) -> Path:
    """Grouped bars of the gain over ``baseline`` per dataset and the mean gain (``summary``),
    one panel per backbone; the paper's gain as a black marker on the same position."""
    stats = {(s["backbone"], s["probe"]): s for s in summary}
    backbones = list(dict.fromkeys(c.backbone for c in cells))
    fig = new_figure(10, 3.5 * len(backbones) + 0.5)
    axes = fig.subplots(len(backbones), 1, squeeze=False)[:, 0]
    for ax, backbone in zip(axes, backbones, strict=True):
        mine = [c for c in cells if c.backbone == backbone and c.probe != baseline]
        datasets = list(dict.fromkeys(c.dataset for c in mine))
        probes = list(dict.fromkeys(c.probe for c in mine))
        width = 0.8 / max(len(probes), 1)
        for j, probe in enumerate(probes):
            row = {c.dataset: c for c in mine if c.probe == probe}
            means = stats[backbone, probe]
            ours = [row[d].gain for d in datasets] + [means["mean_gain"]]
            paper = [row[d].paper_gain for d in datasets] + [means["paper_mean_gain"]]
            x = np.arange(len(datasets) + 1) + (j - (len(probes) - 1) / 2) * width
            bars = ax.bar(x, [np.nan if g is None else g for g in ours], width, label=probe)
            marks = [(xi, p) for xi, p in zip(x, paper, strict=True) if p is not None]
            if marks:
                ax.scatter(*zip(*marks, strict=True), color=bars.patches[0].get_facecolor(),
                           edgecolors="black", marker="D", s=30, label=f"{probe} (paper)",
                           zorder=3)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(datasets) + 1), [*datasets, "mean"], rotation=45, ha="right",
                      fontsize=8)
        ax.set_ylabel(f"gain over {baseline} (points)")
        ax.set_title(backbone, fontsize=10)
        if probes:
            ax.legend(fontsize=7, ncol=2)
    return save(fig, path)
