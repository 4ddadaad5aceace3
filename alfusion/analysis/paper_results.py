"""The paper's own numbers, shipped as data (paper_results.csv; see its header for the source)."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

from alfusion.analysis.paper_names import dataset_key

CSV = Path(__file__).with_name("paper_results.csv")


@cache
def paper_results() -> dict[tuple[str, str, str], float]:
    """(backbone key, canonical dataset, probe name) -> test balanced accuracy x 100."""
    with CSV.open(newline="") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return {(r["backbone"], r["dataset"], r["probe"]): float(r["bal_acc"]) for r in rows}


def paper_value(backbone: str, dataset: str, probe: str) -> float | None:
    """The paper's number for our (backbone key, dataset name, probe name), None if none."""
    key = dataset_key(dataset)
    return paper_results().get((backbone, key, probe)) if key else None
