"""Fit checkpoints are verified like cache arrays: a damaged or truncated checkpoint is never
resumed silently; the intact one before it is used, or the run is refused naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    compose_config,
    kill_at_first_checkpoint,
    mlflow_runs,
    run_cli,
    tiny_overrides,
)

from alfusion.checkpoints import CheckpointDamaged, verify_checkpoints
from alfusion.engine import TokenData, fit_bank
from alfusion.probes import AttentiveProbe
from alfusion.protocol import HParams

CONFIGS = [HParams(0.01, 1e-4), HParams(0.001, 1e-4)]


def flip_inside_tensor(path, tensor: torch.Tensor, count: int = 64) -> None:
    """Flip ``count`` bytes of ``tensor``'s stored data inside the checkpoint file ``path``."""
    data = bytearray(path.read_bytes())
    offset = data.find(tensor.contiguous().numpy().tobytes())
    assert offset > 0
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tiny_fit(cfg, folder, resume: bool = False):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 4, 8), dim=-1)
    y = torch.arange(40) % 2
    return fit_bank(CONFIGS, lambda hp: AttentiveProbe(8, 2, num_heads=4), TokenData(x, y), 2,
                    cfg, checkpoints=folder, resume=resume)


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, one_thread):
    cfg = compose_config("train.min_steps=20", "train.epochs=1", "train.checkpoint_every=4",
                         "trainer.progress_bar=false", f"paths.root={tmp_path}")
    folder = tmp_path / "run/checkpoints/grid"
    full = tiny_fit(cfg, folder)
    last, previous = folder / "last.rank0.pt", folder / "previous.rank0.pt"
    assert json.loads((folder / "checksums.rank0.json").read_text())["sha256"]
    steps = [torch.load(p, weights_only=True)["step"]["step_count"] for p in (last, previous)]
    assert steps == [16, 12]

    weights = torch.load(last, weights_only=True)["step"]["params"]
    name = max(weights, key=lambda k: weights[k].numel())
    flip_inside_tensor(last, weights[name])
    damaged = torch.load(last, weights_only=True)["step"]["params"][name]
    assert not torch.equal(damaged, weights[name])  # torch alone reads it without complaint

    verify_checkpoints(tmp_path / "run")
    out = capsys.readouterr().out
    assert f"checkpoint {last} is damaged" in out and "previous.rank0.pt (step 12)" in out
    resumed = tiny_fit(cfg, folder, resume=True)  # from step 12, to the uninterrupted result
    for key, value in full.bank.params.items():
        torch.testing.assert_close(resumed.bank.params[key], value, rtol=0, atol=0)
    verify_checkpoints(tmp_path / "run")  # the resumed fit's own saves verify (step 16, 12)
    assert "damaged" not in capsys.readouterr().out

    # both damaged (or truncated): refused, naming the file and the fix
    for path in (last, previous):
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointDamaged, match=rf"checkpoint {last} is truncated or damaged.*"
                                                rf"delete the folder {folder}"):
        verify_checkpoints(tmp_path / "run")


def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tmp_path, "search=quick", "train.min_steps=40",
                          "train.checkpoint_every=5", f"hydra.run.dir={run_dir}")
    ckpt = kill_at_first_checkpoint(run_dir, *args, stage="grid")
    weights = torch.load(ckpt, weights_only=True)["step"]["params"]
    flip_inside_tensor(ckpt, max(weights.values(), key=torch.Tensor.numel))

    proc = run_cli(*args, "resume=true", check=False, full_error=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert f"checkpoint {ckpt} is truncated or damaged" in proc.stderr
    assert f"delete the folder {ckpt.parent}" in proc.stderr
    assert not json.loads((run_dir / "resume.json").read_text()).get("stages")
    [run] = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"  # not reopened; closed, with the reason
    assert "is truncated or damaged" in run.data.tags["alfusion.killed_reason"]
