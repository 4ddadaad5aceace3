"""A run logged to a real MLflow tracking server keeps its probe there: after the local run
folder is gone, ``task=evaluate probe_path=runs:/<run id>/probe.pt`` reproduces it."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from conftest import compose_config, run_cli, tiny_overrides

from alfusion.probe_files import probe_file
from alfusion.tracking import TrackingServerUnreachable


@pytest.fixture(scope="module")
def server(mlflow_server) -> str:
    """The URI of the module's ``mlflow server`` on 127.0.0.1 (tests/conftest.py)."""
    return mlflow_server[0]


def test_a_probe_logged_to_a_server_evaluates_from_its_run_uri(server, tmp_path):
    run_dir = tmp_path / "train"
    run_cli(*tiny_overrides(tmp_path, f"logger.tracking_uri={server}", "train.min_steps=5",
                            "search.validate=false", f"hydra.run.dir={run_dir}"))
    results = json.loads((run_dir / "results.json").read_text())
    run_id = results["mlflow_run_id"]
    client = mlflow.MlflowClient(server)
    assert "probe.pt" in {a.path for a in client.list_artifacts(run_id)}
    shutil.rmtree(run_dir)  # the run folder is gone; the features cache stays

    out = tmp_path / "evaluate"
    proc = run_cli("task=evaluate", f"probe_path=runs:/{run_id}/probe.pt",
                   f"logger.tracking_uri={server}", f"paths.root={tmp_path}",
                   f"hydra.run.dir={out}")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"] == pytest.approx(results["test"], abs=1e-9)
    assert evaluation["probe_path"] == f"runs:/{run_id}/probe.pt"
    assert "Trainer.fit" not in proc.stdout + proc.stderr  # nothing was trained

    def resolve(probe_path, uri=server):
        cfg = compose_config(*tiny_overrides(tmp_path), "task=evaluate",
                             f"probe_path={probe_path}", f"logger.tracking_uri={uri}")
        return probe_file(cfg, tmp_path / "resolve")

    assert resolve(f"runs:/{run_id}").name == "probe.pt"  # the run's artifact folder
    with pytest.raises(FileNotFoundError, match="not found.*Check the run id"):
        resolve("runs:/0123456789abcdef0123456789abcdef/probe.pt")
    with pytest.raises(FileNotFoundError, match="'nope.pt'.*artifact's path"):
        resolve(f"runs:/{run_id}/nope.pt")
    with pytest.raises(TrackingServerUnreachable, match="does not answer"):
        resolve(f"runs:/{run_id}/probe.pt", uri="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="no MLflow store at"):
        resolve(f"runs:/{run_id}/probe.pt", uri=f"sqlite:///{tmp_path}/none.db")
