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
