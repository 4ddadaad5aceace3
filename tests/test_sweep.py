"""Hydra multirun: one MLflow run per job tagged with the sweep, failures isolated and
summarised, no DDP nested in a local sweep; the SLURM launcher and paper-table configs compose."""

from __future__ import annotations

import json

import mlflow
from conftest import CONF, compose_config, run_cli_process, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

CACHED = ["search.validate=false"]


def runs_of(root) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("alfusion").experiment_id])


def test_sweep_of_four_jobs_two_of_them_failing(tmp_path):
    """2 probes x 2 learning rates; the final fit of both lr=1e20 jobs diverges while it runs:
    the sweep runs to its end, one MLflow run per job tagged with the sweep, the failures
    summarised."""
    sweep = tmp_path / "sweep"
    proc = run_cli_process("-m", *tiny_overrides(tmp_path, *CACHED, "probe=alf,linear",
                                                 "search.lr=0.01,1e20",
                                                 f"hydra.sweep.dir={sweep}"), check=False)
    assert proc.returncode == 1  # the sweep ran to its end and reports the failures
    assert "NonFiniteLoss" in proc.stderr and "lr=1e+20" in proc.stderr
    assert "2 of 4 jobs completed, 2 failed" in proc.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["completed"] == [0, 2]
    assert [f["num"] for f in summary["failed"]] == [1, 3]
    assert all("lr=1e+20" in f["error"] for f in summary["failed"])
    runs = runs_of(tmp_path)
    assert len(runs) == 4
    assert {r.data.tags["sweep"] for r in runs} == {"sweep"}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.params["probe/name"] for r in finished) == ["alf", "linear"]
    assert all("test/bal_acc" in r.data.metrics for r in finished)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]


def test_local_multirun_refuses_nested_ddp(tmp_path):
    proc = run_cli_process("-m", *tiny_overrides(tmp_path, "trainer=ddp",
                                                 "trainer.accelerator=cpu", "trainer.devices=2",
                                                 f"hydra.sweep.dir={tmp_path}/s"), check=False)
    assert proc.returncode == 1
    assert "hydra/launcher=slurm" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or runs_of(tmp_path) == []


def test_slurm_launcher_and_paper_table_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp"],
                      return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == 1
        table = compose("config", overrides=["+experiment=paper_table"],
                        return_hydra_config=True)
    params = table.hydra.sweeper.params
    datasets, probes = params.dataset.split(","), params.probe.split(",")
    assert len(datasets) == 20 and table.hydra.mode == RunMode.MULTIRUN
    assert table.search.name == "paper"
    for name in datasets:
        assert (CONF / "dataset" / f"{name}.yaml").exists(), name
    assert {"alf", "linear", "finetune"} <= set(probes)
    for name in probes:
        compose_config(f"probe={name}", f"dataset={datasets[0]}")  # every job composes


def test_a_refused_job_fails_in_one_line_and_the_sweep_still_summarises(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli_process("-m", *tiny_overrides(tmp_path, *CACHED, "search.lr=-1,0.01",
                                                 f"hydra.sweep.dir={sweep}"),
                           check=False, full_error=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "search.lr=-1) refused: search.lr=-1 is not allowed" in proc.stderr
    assert "1 of 2 jobs completed, 1 failed" in proc.stderr
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["completed"] == [1] and [f["num"] for f in summary["failed"]] == [0]
    assert "search.lr=-1 is not allowed" in summary["failed"][0]["error"]
    [run] = runs_of(tmp_path)  # the refused job opened no MLflow run
    assert run.info.status == "FINISHED"
