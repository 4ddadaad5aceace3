"""Resume: a run SIGKILLed mid-training and resumed ends as the uninterrupted run, in the same
MLflow run."""

from __future__ import annotations

import json

import torch
from conftest import kill_at_first_checkpoint, mlflow_runs, run_cli, tiny_overrides

# 12 epochs of 5 steps, a checkpoint every 5 steps; jitter on (its streams are checkpointed).
RESUME_TINY = ["mode=end2end", "search.validate=false", "train.min_steps=60",
               "end2end.num_workers=0", "train.checkpoint_every=5"]



def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*tiny_overrides(full, *RESUME_TINY, f"hydra.run.dir={full}/run"))

    ckpt = kill_at_first_checkpoint(
        cut / "run", *tiny_overrides(cut, *RESUME_TINY, f"hydra.run.dir={cut}/run"))
    state = json.loads((cut / "run/resume.json").read_text())
    assert not state["finished"] and not (cut / "run/results.json").exists()
    step = torch.load(ckpt, weights_only=True)["step"]["step_count"]
    assert 0 < step < 60, step  # the kill came after a checkpoint, before the end
    killed = mlflow_runs(cut)
    assert [r.info.status for r in killed] == ["RUNNING"]

    run_cli(*tiny_overrides(cut, *RESUME_TINY, "resume=true", f"hydra.run.dir={cut}/run2"))
    runs = mlflow_runs(cut)
    assert len(runs) == 1 and runs[0].info.run_id == killed[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("resumed_in") == str(cut / "run2")

    resumed = json.loads((cut / "run/results.json").read_text())  # the continued run's folder
    uninterrupted = json.loads((full / "run/results.json").read_text())
    assert resumed["fit"]["steps"] == uninterrupted["fit"]["steps"] == 60
    assert resumed["test"] == uninterrupted["test"]
    assert runs[0].data.metrics["test/bal_acc"] == uninterrupted["test"]["bal_acc"]
    a = torch.load(full / "run/probe.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "run/probe.pt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


# A grid of 3 configurations (search=quick), 40 steps, a checkpoint every 5 steps, cached features.
GRID = ["search=quick", "train.min_steps=40", "train.checkpoint_every=5"]


def test_a_grid_killed_midway_in_a_folder_outside_paths_root_resumes_to_the_uninterrupted_result(
        tmp_path):
    full, run_dir, root = tmp_path / "full", tmp_path / "run", tmp_path / "outputs"
    run_cli(*tiny_overrides(full, *GRID, f"hydra.run.dir={full}/run"))
    args = [*tiny_overrides(root, *GRID), f"hydra.run.dir={run_dir}"]
    ckpt = kill_at_first_checkpoint(run_dir, *args, stage="grid")
    step = torch.load(ckpt, weights_only=True)["step"]["step_count"]
    assert 0 < step < 40, step  # killed inside the grid
    [killed] = mlflow_runs(root)
    assert killed.info.status == "RUNNING"

    proc = run_cli(*args, "resume=true")
    assert (f"resume=true: continuing the unfinished run in {run_dir} (MLflow run "
            f"{killed.info.run_id}; finished fits: none; grid from step {step})") in proc.stdout
    [run] = mlflow_runs(root)  # the same MLflow run, not a second one
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert not (root / "runs").exists()  # no new run folder under paths.root
    resumed = json.loads((run_dir / "results.json").read_text())
    uninterrupted = json.loads((full / "run/results.json").read_text())
    assert len(resumed["grid"]) == 3 and resumed["fit"]["steps"] == 40
    assert resumed["grid"] == uninterrupted["grid"]  # the same validation scores
    assert resumed["chosen"] == uninterrupted["chosen"]
    assert resumed["test"] == uninterrupted["test"]
    assert run.data.metrics["test/bal_acc"] == uninterrupted["test"]["bal_acc"]
    assert not (run_dir / "checkpoints/grid").exists()  # a finished stage leaves no checkpoint


def test_a_plain_rerun_closes_the_killed_run_and_resume_leaves_no_stray_folder(tmp_path):
    killed_dir = tmp_path / "runs/killed"
    args = tiny_overrides(tmp_path, "search.validate=false", "train.min_steps=60",
                          "train.checkpoint_every=5")
    kill_at_first_checkpoint(killed_dir, *args, f"hydra.run.dir={killed_dir}")
    [killed] = mlflow_runs(tmp_path)
    assert killed.info.status == "RUNNING"

    proc = run_cli(*args)  # the same config again, without resume=true, in a new folder
    assert f"MLflow run {killed.info.run_id} of a killed run of this config" in proc.stdout
    status = {r.info.run_id: r.info.status for r in mlflow_runs(tmp_path)}
    assert status.pop(killed.info.run_id) == "KILLED"
    assert list(status.values()) == ["FINISHED"]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and "killed" in folders

    run_cli(*args, "resume=true")  # continues runs/killed; its own new folder is removed
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == folders
    assert {r.info.status for r in mlflow_runs(tmp_path)} == {"FINISHED"}
    assert (killed_dir / "results.json").exists()
    assert not (killed_dir / "checkpoints").exists()  # a finished run keeps no checkpoints
