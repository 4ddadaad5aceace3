"""Files that carry code never run, settings the engine cannot honour fail before any work,
and fits too small for the batch rule still train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides

from alfusion.engine import TokenData, fit_bank
from alfusion.probes import AttentiveProbe
from alfusion.protocol import HParams


class Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted probe.pt or checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_probe_or_checkpoint_never_runs_its_code(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "probe.pt"
    torch.save({"state_dict": {}, "config": Payload(marker)}, crafted)
    proc = run_cli("task=evaluate", f"probe_path={crafted}", f"paths.root={tmp_path}",
                   check=False, full_error=False)
    assert proc.returncode == 2 and not marker.exists()
    assert "never run" in proc.stderr and "probe_path" in proc.stderr
    assert "posix.system" in proc.stderr  # what it asked to run
    assert "weights_only" not in proc.stderr  # never the advice to load it unsafely

    run_dir = tmp_path / "run"  # a run folder whose checkpoint was replaced by a crafted one
    run_cli(*tiny_overrides(tmp_path, "search.validate=false", f"hydra.run.dir={run_dir}"))
    stage = run_dir / "checkpoints/final"
    stage.mkdir(parents=True)
    torch.save({"step": Payload(marker)}, stage / "last.rank0.pt")
    proc = run_cli(*tiny_overrides(tmp_path, f"ckpt_path={stage / 'last.rank0.pt'}"),
                   check=False, full_error=False)
    assert proc.returncode == 2 and not marker.exists()
    assert "never run" in proc.stderr and "ckpt_path" in proc.stderr
    assert "weights_only" not in proc.stderr


def test_a_missing_ckpt_path_is_refused_in_cached_mode(tmp_path):
    proc = run_cli(*tiny_overrides(tmp_path, "ckpt_path=/nonexistent/last.rank0.pt"),
                   check=False)
    assert proc.returncode != 0 and "no such file" in proc.stderr
    assert not (tmp_path / "cache").exists()  # before any extraction


def test_evaluate_refuses_backbone_and_dataset_choices(tmp_path):
    probe = tmp_path / "probe.pt"
    torch.save({"state_dict": {}, "config": {}}, probe)
    proc = run_cli("task=evaluate", f"probe_path={probe}", "dataset=wds", "backbone=vit_b",
                   f"paths.root={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "uses the probe's own backbone" in proc.stderr and "dataset=wds" in proc.stderr


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_fits_of_fewer_than_ten_samples_train_with_batchnorm(tmp_path, n, one_thread):
    """The paper's batch rule gives batches of one sample below 10; BatchNorm cannot train on
    those. Every step here takes at least two samples and the fit ends finite."""
    cfg = compose_config("train.min_steps=6", "train.epochs=1", "trainer.progress_bar=false",
                         f"paths.root={tmp_path}")
    x = torch.nn.functional.normalize(torch.randn(n, 4, 8), dim=-1)
    y = torch.arange(n) % 2
    fit = fit_bank([HParams(0.01, 1e-4)], lambda hp: AttentiveProbe(8, 2, num_heads=4),
                   TokenData(x, y), 2, cfg)
    assert fit.plan.batch >= 2 and n % fit.plan.batch != 1
    assert fit.failures == {} and bool(torch.isfinite(fit.losses).all())
