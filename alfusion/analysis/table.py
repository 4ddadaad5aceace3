"""The comparison of the paper's tables: datasets x probes per backbone, test balanced accuracy
(x 100), gain over the last-layer linear probe, mean gain, mean rank, the paper's numbers beside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from alfusion.analysis.paper_results import paper_value
from alfusion.analysis.runs import RunRecord


@dataclass
class Cell:
    """One (backbone, dataset, probe) result. status: ok | failed | running | missing (no run);
    bal_acc and the paper's numbers are x 100; gains are points over the baseline probe."""

    backbone: str
    dataset: str
    probe: str
    status: str
    bal_acc: float | None = None
    gain: float | None = None
    paper: float | None = None
    paper_gain: float | None = None
    run_id: str | None = None


def choose_runs(records: list[RunRecord]) -> dict[tuple[str, str, str], RunRecord]:
    """Per (backbone, dataset, probe): the newest successful run, else the newest run."""
    chosen: dict[tuple[str, str, str], RunRecord] = {}
    for r in sorted(records, key=lambda r: r.start_time, reverse=True):
        key = (r.backbone, r.dataset, r.probe)
        if key not in chosen or (r.ok and not chosen[key].ok):
            chosen[key] = r
    return chosen


def _status(record: RunRecord | None) -> str:
    if record is None:
        return "missing"
    if record.ok:
        return "ok"
    return "running" if record.status == "RUNNING" else "failed"


def _ordered(names: set[str], baseline: str) -> list[str]:
    return sorted(names, key=lambda n: (n != baseline, n))


def build_cells(records: list[RunRecord], baseline: str = "linear",
                datasets: list[str] | None = None, probes: list[str] | None = None
                ) -> list[Cell]:
    """Every cell of datasets x probes for every backbone in ``records`` (given lists, or what
    the runs hold); a cell without a successful run has no number and says why."""
    chosen = choose_runs(records)
    cells = []
    for backbone in sorted({r.backbone for r in records}):
        mine = [r for r in records if r.backbone == backbone]
        for dataset in datasets or sorted({r.dataset for r in mine}):
            base = chosen.get((backbone, dataset, baseline))
            base_acc = 100 * base.bal_acc if base is not None and base.ok else None
            base_paper = paper_value(backbone, dataset, baseline)
            for probe in probes or _ordered({r.probe for r in mine}, baseline):
                record = chosen.get((backbone, dataset, probe))
                cell = Cell(backbone, dataset, probe, _status(record),
                            run_id=record.run_id if record else None,
                            paper=paper_value(backbone, dataset, probe))
                if cell.status == "ok":
                    cell.bal_acc = 100 * record.bal_acc
                    if base_acc is not None:
                        cell.gain = cell.bal_acc - base_acc
                if cell.paper is not None and base_paper is not None:
                    cell.paper_gain = cell.paper - base_paper
                cells.append(cell)
    return cells


def summarize(cells: list[Cell]) -> list[dict]:
    """Per (backbone, probe): mean gain over the datasets where it has one, the paper's mean
    gain over those same datasets (like for like), and the mean rank among the probes with a
    number on each dataset (1 = best, ties share the average rank)."""
    ranks: dict[tuple[str, str], list[float]] = {}
    by_dataset: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        if c.bal_acc is not None:
            by_dataset.setdefault((c.backbone, c.dataset), []).append(c)
    for group in by_dataset.values():
        for c, rank in zip(group, rankdata([-c.bal_acc for c in group]), strict=True):
            ranks.setdefault((c.backbone, c.probe), []).append(float(rank))
    out = []
    for backbone, probe in dict.fromkeys((c.backbone, c.probe) for c in cells):
        mine = [c for c in cells if c.backbone == backbone and c.probe == probe]
        gains = [c.gain for c in mine if c.gain is not None]
        paired = [c.paper_gain for c in mine if c.gain is not None and c.paper_gain is not None]
        out.append(dict(
            backbone=backbone, probe=probe,
            datasets=sum(c.bal_acc is not None for c in mine),
            missing=sum(c.bal_acc is None for c in mine),
            mean_gain=float(np.mean(gains)) if gains else None,
            paper_mean_gain=float(np.mean(paired)) if paired else None,
            mean_rank=float(np.mean(ranks[backbone, probe])) if (backbone, probe) in ranks
            else None))
    return out
