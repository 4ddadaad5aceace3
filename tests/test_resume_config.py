"""A checkpoint belongs to one configuration: ``ckpt_path=`` and ``resume=true`` with a changed
setting are refused in one line naming the key (the killed run closed, KILLED with the
reason); the unchanged command continues to the uninterrupted run's result."""

from __future__ import annotations

import json

from conftest import kill_at_first_checkpoint, mlflow_runs, run_cli, tiny_overrides

GRID = ["search.lr=[0.001]", "train.min_steps=40", "train.checkpoint_every=5"]


def test_a_changed_setting_is_refused_and_the_unchanged_command_resumes(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*tiny_overrides(full, *GRID), f"hydra.run.dir={full}/run")
    uninterrupted = json.loads((full / "run/results.json").read_text())

    run_dir = cut / "run"
    ckpt = kill_at_first_checkpoint(run_dir, *tiny_overrides(cut, *GRID),
                                    f"hydra.run.dir={run_dir}", stage="grid")
    [killed] = mlflow_runs(cut)
    assert killed.info.status == "RUNNING"

    changed = [o if not o.startswith("search.lr") else "search.lr=0.1" for o in GRID]
    for how in (f"ckpt_path={ckpt}", "resume=true"):
        proc = run_cli(*tiny_overrides(cut, *changed, how), check=False, full_error=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = proc.stderr.strip()
        assert line.splitlines() == [line], line
        assert "search.lr=[0.1] (the run: [0.001])" in line, line
        assert "train" not in line.split("changes ")[1].split(";")[0]  # only the changed key
        runs = cut / "runs"
        assert not runs.exists() or not any(runs.iterdir())  # no run folder left behind
    [closed] = mlflow_runs(cut)
    assert closed.info.status == "KILLED"
    assert "search.lr" in closed.data.tags["alfusion.killed_reason"]

    run_cli(*tiny_overrides(cut, *GRID, f"ckpt_path={ckpt}"))
    [run] = mlflow_runs(cut)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["grid"] == uninterrupted["grid"]
    assert resumed["test"] == uninterrupted["test"]
