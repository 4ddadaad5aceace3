"""The MLflow run of a command says RUNNING until the command ends, across its fits."""

from __future__ import annotations

import torch
from conftest import compose_config
from test_bank import clustered

from alfusion import tracking
from alfusion.engine import TokenData, fit_bank
from alfusion.probes import LinearProbe
from alfusion.protocol import HParams


def test_a_fit_leaves_the_run_running(tmp_path, one_thread):
    """A Trainer marks its logger's run FINISHED when its fit ends; the engine's fits log
    through the module instead, so the run (which holds a grid, a refit, ...) stays RUNNING,
    with the fit's curve logged."""
    cfg = compose_config("train.min_steps=25", "train.epochs=1", "trainer.progress_bar=false",
                         f"paths.root={tmp_path}")
    logger = tracking.make_logger(cfg)
    x, y = clustered(40, (12,), 3, seed=2)
    for label in ("grid", "train"):
        fit_bank([HParams(0.01, 1e-4)], lambda hp: LinearProbe(12, 3), TokenData(x, y), 3, cfg,
                 logger=logger, label=label)
    run = logger.experiment.get_run(logger.run_id)
    assert run.info.status == "RUNNING"
    assert {"grid/loss", "train/loss"} <= set(run.data.metrics)
    tracking.finish(logger, "FINISHED")
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"
    assert torch.isfinite(torch.tensor(run.data.metrics["train/loss"]))
