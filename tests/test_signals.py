"""SIGTERM and SIGUSR1, as a scheduler sends them, stop a run as Ctrl-C does: mid-fit and
mid-extraction the process ends with 128 + the signal, prints the command that continues it,
leaves its MLflow run KILLED, and that command finishes it to the uninterrupted run's result.

The signal is sent at a point the process reports (its first fit checkpoint, its first
extraction chunk) of a fit and an extraction far longer than that point, and the exit status
proves the signal, not the end of the work, ended the process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, mlflow_runs, run_cli, signal_at_first_checkpoint, tiny_overrides

# 400 train images in 100 chunks of 4; a linear probe fit of 300 steps, a checkpoint every 20.
LONG = ["probe=linear", "dataset.limit=400", "search.validate=false", "train.min_steps=300",
        "train.checkpoint_every=20", "extract.batch_size=4", "extract.chunk_rows=4"]


def resume_args(output: str) -> list[str]:
    """The overrides of the printed command that continues the run."""
    line = next(x for x in output.splitlines() if "continue it" in x)
    command = line.split("with: ", 1)[1]
    assert command.startswith("python -m alfusion ") and "resume=true" in command, line
    import shlex

    return shlex.split(command)[3:]


def signal_at_first_chunk(cache: Path, args: list[str], sig: int) -> tuple[int, str]:
    """Start the CLI, send ``sig`` once the first chunk of a feature extraction is written."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.Popen([sys.executable, "-m", "alfusion", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(cache.glob(".*.partial/chunk-*.npz")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.wait(120), proc.stdout.read()


def test_sigterm_mid_fit_and_mid_extraction_resume_to_the_uninterrupted_result(tmp_path):
    shared_cache = tmp_path / "cache"
    full = tmp_path / "full"
    run_cli(*tiny_overrides(full, *LONG, f"paths.cache={shared_cache}"),
            f"hydra.run.dir={full}/run")
    uninterrupted = json.loads((full / "run/results.json").read_text())
    assert uninterrupted["fit"]["steps"] == 300

    # Mid-fit: the features are cached already, the signal comes at the first checkpoint.
    cut = tmp_path / "cut_fit"
    start = time.monotonic()
    ckpt, code, output = signal_at_first_checkpoint(
        cut / "run", *tiny_overrides(cut, *LONG, f"paths.cache={shared_cache}"),
        f"hydra.run.dir={cut}/run", sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received" in output and "Traceback" not in output, output[-3000:]
    [killed] = mlflow_runs(cut)
    assert killed.info.status == "KILLED"
    assert f"MLflow run {killed.info.run_id} marked KILLED" in output
    assert time.monotonic() - start < 240
    import torch

    step = torch.load(cut / "run/checkpoints/final/last.rank0.pt",
                      weights_only=True)["step"]["step_count"]
    assert 20 <= step < 300  # checkpointed where it stopped

    run_cli(*resume_args(output))
    [run] = mlflow_runs(cut)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    resumed = json.loads((cut / "run/results.json").read_text())
    assert resumed["test"] == uninterrupted["test"]

    # Mid-extraction: its own cache, the signal at the first chunk.
    cut = tmp_path / "cut_extract"
    code, output = signal_at_first_chunk(
        cut / "cache", [*tiny_overrides(cut, *LONG), f"hydra.run.dir={cut}/run"],
        signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted (SIGTERM received)" in output, output[-3000:]
    [killed] = mlflow_runs(cut)
    assert killed.info.status == "KILLED"
    chunks = list((cut / "cache").glob(".*.partial/chunk-*.npz"))
    assert 1 <= len(chunks) < 100  # the chunks done are kept

    proc = run_cli(*resume_args(output))
    assert re.search(r"continuing the unfinished run in .*cut_extract/run", proc.stdout)
    [run] = mlflow_runs(cut)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    resumed = json.loads((cut / "run/results.json").read_text())
    assert resumed["test"] == uninterrupted["test"]


def test_sigusr1_mid_fit_stops_as_sigterm_does(tmp_path):
    ckpt, code, output = signal_at_first_checkpoint(
        tmp_path / "run", *tiny_overrides(tmp_path, *LONG, "dataset.limit=60"),
        f"hydra.run.dir={tmp_path}/run", sig=signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, output[-3000:]
    assert "interrupted (SIGUSR1 received)" in output and "resume=true" in output
    assert [r.info.status for r in mlflow_runs(tmp_path)] == ["KILLED"]
    assert not (tmp_path / "run/results.json").exists()
