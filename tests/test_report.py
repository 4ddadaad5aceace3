"""The results report against a real MLflow server: a tiny CLI run logs to it, the report reads
it back, artifacts download through the server's REST API; failed and absent runs show as
missing. Plus the table arithmetic and the paper's numbers on hand-made records."""

from __future__ import annotations

import contextlib
import io
import subprocess
import urllib.request

import pytest
from conftest import run_cli, tiny_overrides
from PIL import Image

from alfusion.analysis.paper_results import paper_value
from alfusion.analysis.runs import RunRecord
from alfusion.analysis.table import build_cells, summarize


def run_report(*args: str) -> subprocess.CompletedProcess:
    """``python -m alfusion.report ARGS``, its main function in this process."""
    from alfusion.report import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()[-3000:]
    return subprocess.CompletedProcess(["alfusion.report", *args], code, out.getvalue(), "")


def test_cli_run_logs_to_a_server_and_the_report_reads_it_back(mlflow_server, tmp_path,
                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: a second thread only waits
    url, server_root = mlflow_server
    common = [*tiny_overrides(tmp_path), f"logger.tracking_uri={url}", "+logger.tags.suite=report"]
    run_cli(*common, "probe=alf", "analysis=[layers,cka]", "cka.samples=40")
    # a run that fails after logging its config: more classes in the data than configured
    failed = run_cli(*common, "probe=linear", "dataset.num_classes=2", check=False)
    assert failed.returncode != 0 and "dataset.num_classes" in failed.stderr

    client = MlflowClient(url)
    runs = {r.data.params["probe/name"]: r for r in client.search_runs(
        [client.get_experiment_by_name("alfusion").experiment_id], "tags.suite = 'report'")}
    assert runs["linear"].info.status == "FAILED"
    alf = runs["alf"]
    assert alf.info.status == "FINISHED"
    # artifacts went to the server's artifact folder, not to a local one of the run
    assert alf.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (tmp_path / "mlartifacts").exists()
    assert any((server_root / "artifacts").rglob("layer_attention.png"))

    # PNGs come back through the server's REST API and decode as images
    for path in ("attention/layer_attention.png", "layers/layer_accuracy.png",
                 "cka/cka_vs_accuracy.png"):
        with urllib.request.urlopen(f"{url}/get-artifact?path={path}&run_uuid="
                                    f"{alf.info.run_id}") as response:
            Image.open(io.BytesIO(response.read())).verify()
    local = client.download_artifacts(alf.info.run_id, "cka/cka_linear.png", str(tmp_path))
    with Image.open(local) as image:
        assert image.format == "PNG"

    out = tmp_path / "report"
    proc = run_report("--tracking-uri", url, "--experiment", "alfusion", "--tag", "suite=report",
                      "--datasets", "digits,eurosat", "--out", str(out))
    expected = f"{100 * alf.data.metrics['test/bal_acc']:.2f}"
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| digits |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["digits", "missing (failed)", expected], row
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| eurosat |"))
    assert row.count("missing") == 2  # no run at all for that dataset
    assert "mean rank" in proc.stdout
    for name in ("report.md", "cells.csv", "summary.csv"):
        assert (out / name).stat().st_size > 0
    for name in ("gains.png", "attention_tiny_vit_alf.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def rec(dataset: str, probe: str, acc: float | None, status: str = "FINISHED",
        t: int = 0) -> RunRecord:
    return RunRecord(f"{dataset}-{probe}-{t}", dataset, "vit_b", probe, "", status, acc, t)


def test_table_gains_ranks_and_paper_numbers():
    records = [rec("vtab-eurosat", "linear", 0.95), rec("vtab-eurosat", "alf", 0.98),
               rec("vtab-svhn", "linear", 0.60), rec("vtab-svhn", "alf", 0.80),
               rec("vtab-svhn", "alf", None, status="FAILED", t=5),  # a newer failed retry
               rec("vtab-svhn", "linear_concat", 0.85)]
    cells = {(c.dataset, c.probe): c for c in build_cells(records)}
    assert cells["vtab-svhn", "alf"].gain == pytest.approx(20.0)  # the older success counts
    assert cells["vtab-eurosat", "linear_concat"].status == "missing"
    # the paper's ViT-B/16 numbers (perf_table_vit_base_patch16_224_v2.csv)
    assert cells["vtab-eurosat", "alf"].paper == pytest.approx(98.5539, abs=1e-3)
    assert cells["vtab-eurosat", "alf"].paper_gain == pytest.approx(98.5539 - 95.0909, abs=1e-3)
    assert paper_value("dinov2_l", "GTSRB", "aat") is not None
    assert paper_value("vit_b", "digits", "alf") is None
    summary = {s["probe"]: s for s in summarize(list(cells.values()))}
    assert summary["alf"]["mean_gain"] == pytest.approx((3.0 + 20.0) / 2)
    assert summary["alf"]["mean_rank"] == pytest.approx((1 + 2) / 2)  # svhn: concat first
    assert summary["linear_concat"]["missing"] == 1
    assert summary["linear"]["mean_rank"] == pytest.approx((2 + 3) / 2)
