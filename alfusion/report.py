"""``python -m alfusion.report``: the paper-style results table of runs in an MLflow store.

    python -m alfusion.report                               # outputs/mlflow.db, experiment alfusion
    python -m alfusion.report --sweep 2026-01-31_12-00-00       # one Hydra multirun
    python -m alfusion.report --tracking-uri http://127.0.0.1:5000 --tag owner=me

Prints datasets x probes per backbone (test balanced accuracy x 100, gain over the last-layer
linear probe, mean gain, mean rank, the paper's numbers beside ours) and writes report.md,
cells.csv, summary.csv, gains.png and, for attentive probes, one layer-attention heatmap with a
row per dataset (attention_<backbone>_<probe>.png) into --out. A failed or absent run shows as
missing. See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from alfusion.analysis.attention import plot_attention_rows
from alfusion.analysis.report_files import cell_rows, markdown, plot_gains, write_csv
from alfusion.analysis.runs import RunRecord, client_for, fetch_runs
from alfusion.analysis.table import build_cells, choose_runs, summarize
from alfusion.config_check import check_path_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alfusion.report", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db",
                   help="MLflow store: sqlite:///PATH or http://HOST:PORT (default: %(default)s)")
    p.add_argument("--experiment", default="alfusion", help="MLflow experiment name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag (repeatable)")
    p.add_argument("--sweep", help="only the runs of one Hydra multirun (its folder name)")
    p.add_argument("--baseline", default="linear", help="probe the gains are measured against")
    p.add_argument("--datasets", help="comma-separated datasets to expect (default: those run)")
    p.add_argument("--probes", help="comma-separated probes to expect, in column order")
    p.add_argument("--out", type=Path, default=Path("outputs/report"), help="output folder")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the per-dataset layer-attention heatmaps (artifact downloads)")
    return p.parse_args(argv)


def parse_tags(items: list[str], sweep: str | None) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    if sweep:
        tags["sweep"] = sweep
    return tags


def attention_heatmaps(client, records: list[RunRecord], out: Path) -> list[Path]:
    """Per (backbone, attentive probe): the runs' layer_attention.json artifacts as one heatmap
    with a row per dataset. Runs without the artifact are left out."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in choose_runs(records).values():
            if not r.ok or r.kind != "attentive":
                continue
            try:
                local = client.download_artifacts(r.run_id, "attention/layer_attention.json",
                                                  tmp)
            except Exception as err:  # MLflow raises several types for an absent artifact
                print(f"[report] no layer attention for {r.dataset}/{r.backbone}/{r.probe}: "
                      f"{type(err).__name__}", file=sys.stderr)
                continue
            data = json.loads(Path(local).read_text())
            groups.setdefault((r.backbone, r.probe), {})[r.dataset] = data
    # Names from the tracking store become file names: refuse any that would leave --out.
    return [plot_attention_rows(dict(sorted(rows.items())),
                                out / f"attention_{check_path_name('backbone.key', backbone)}_"
                                      f"{check_path_name('probe.name', probe)}.png",
                                title=f"layer attention | {backbone} | {probe}")
            for (backbone, probe), rows in sorted(groups.items())]


SQLITE_HEADER = b"SQLite format 3\x00"


def check_store(tracking_uri: str, where: str = "--tracking-uri") -> None:
    """Refuse, in one line (SystemExit, status 1), a SQLite store that is missing, a folder or
    not an MLflow store, or a server that does not answer; ``make ui`` runs it (``where``:
    how the store was named) before the MLflow UI, which would create an empty store or fail
    with a traceback."""
    fix = (f"point {where} at the store the runs logged to (sqlite:///PATH or "
           "http://HOST:PORT)" if where.startswith("--") else
           f"run {where} in the folder whose outputs/ the runs logged to")
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise SystemExit(f"[alfusion] no MLflow store at {path} ({where}): run an "
                             f"experiment first (python -m alfusion), or {fix}")
        header = b""
        if path.is_file():
            with open(path, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            what = ("a folder" if path.is_dir() else "an empty file" if not header
                    else "not a SQLite database")
            raise SystemExit(f"[alfusion] {path} is {what}, not an MLflow store ({where}); it "
                             f"is left as it is: {fix}")
    elif tracking_uri.startswith(("http://", "https://")):
        from alfusion.tracking import check_server

        try:
            check_server(tracking_uri)
        except ValueError as err:
            raise SystemExit(f"[alfusion] {' '.join(str(err).split())}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tags = parse_tags(args.tag, args.sweep)
    check_store(args.tracking_uri)  # one line for a missing or broken store
    client = client_for(args.tracking_uri)
    try:
        records = fetch_runs(client, args.experiment, tags)
    except Exception as err:  # MLflow's errors for a store it cannot read
        raise SystemExit(f"[report] --tracking-uri {args.tracking_uri}: cannot read the "
                         f"store ({' '.join(str(err).split())[:300]})") from None
    where = f"experiment {args.experiment!r} at {args.tracking_uri}" + (f", tags {tags}"
                                                                       if tags else "")
    if not records:
        print(f"no runs in {where}", file=sys.stderr)
        return 1
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
    cells = build_cells(records, args.baseline, split(args.datasets), split(args.probes))
    summary = summarize(cells)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(cells, summary, args.baseline, title=f"alfusion results: {where}")
    files = [args.out / "report.md"]
    files[0].write_text(text + "\n")
    files += [write_csv(cell_rows(cells), args.out / "cells.csv"),
              write_csv(summary, args.out / "summary.csv"),
              plot_gains(cells, summary, args.baseline, args.out / "gains.png")]
    if not args.no_attention:
        files += attention_heatmaps(client, records, args.out)
    print(text)
    print(f"[report] {len(records)} runs; wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
