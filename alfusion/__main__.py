"""``python -m alfusion``: the Hydra entry point (configs in conf/)."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    import logging
    from pathlib import Path

    from alfusion.config_check import check_config

    check_config(cfg)  # every bad setting fails here, in seconds, before any work
    from alfusion.experiment import TASKS
    from alfusion.sweep import run_job

    # Lightning has its own console handler; Hydra's root handler would print it all twice.
    logging.getLogger("lightning.pytorch").propagate = False
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}: use one of {sorted(TASKS)}")
    # run_job: in a multirun a failed job is recorded and the sweep goes on (alfusion/sweep.py)
    return run_job(TASKS[cfg.task], cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
