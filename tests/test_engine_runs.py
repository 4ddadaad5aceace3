"""The one engine in real runs: a diverged end-to-end configuration is recorded and the search
goes on, Ctrl-C is reported and marks the run KILLED, and a run folder taken over by a new run
closes its orphaned MLflow run. (A killed grid resumes to the uninterrupted result:
test_resume.py.)"""

from __future__ import annotations

import json
import shutil
import signal

import mlflow
from conftest import (
    kill_at_first_checkpoint,
    mlflow_runs,
    run_cli,
    signal_at_first_checkpoint,
    tiny_overrides,
)


def test_a_diverged_end2end_configuration_is_recorded_and_the_search_goes_on(tmp_path):
    run_cli(*tiny_overrides(tmp_path, "mode=end2end", "end2end.num_workers=0",
                            "search.lr=[1e20,0.01]", "search.wd=[1e-4]",
                            f"hydra.run.dir={tmp_path}/run"))
    results = json.loads((tmp_path / "run/results.json").read_text())
    failed, good = results["grid"]
    assert "lr=1e+20" in failed["failed"] and "bal_acc" not in failed
    assert "bal_acc" in good and results["chosen"]["lr"] == 0.01
    [run] = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    curve = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        run.info.run_id, "grid/chosen_loss")
    steps = [m.step for m in curve]  # every step of the grid fit, on its 80 % split
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20


def test_ctrl_c_says_so_and_marks_the_run_killed_and_a_new_run_closes_the_orphan(tmp_path):
    overrides = tiny_overrides(tmp_path, "search.validate=false", "train.min_steps=40",
                               "train.checkpoint_every=2", f"hydra.run.dir={tmp_path}/run")
    _, code, output = signal_at_first_checkpoint(tmp_path / "run", *overrides,
                                                 sig=signal.SIGINT)
    assert code != 0 and "interrupted" in output and "resume=true" in output, output[-3000:]
    [run] = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"

    # A SIGKILLed run stays RUNNING; a new (not resumed) run in its folder marks it KILLED.
    shutil.rmtree(tmp_path / "run/checkpoints")  # (the new run removes them too, a bit later)
    kill_at_first_checkpoint(tmp_path / "run", *overrides)
    orphan = [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]
    assert len(orphan) == 1
    run_cli(*tiny_overrides(tmp_path, "search.validate=false", f"hydra.run.dir={tmp_path}/run"))
    statuses = {r.info.run_id: r.info.status for r in mlflow_runs(tmp_path)}
    assert statuses[orphan[0].info.run_id] == "KILLED"
    assert sorted(statuses.values()) == ["FINISHED", "KILLED", "KILLED"]
