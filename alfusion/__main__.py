"""``python -m alfusion``: the Hydra entry point (configs in conf/)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def run_command(cfg: DictConfig, run_dir: Path):
    """Check the whole config and the data it lists (every bad setting or input fails here, in
    seconds, before any work), then run the task."""
    import logging

    from alfusion.config_check import check_config

    check_config(cfg)
    if cfg.task in ("train", "extract"):  # the data, listed, before any model or MLflow run
        from alfusion.data.checks import check_data

        check_data(cfg, ("train", "test") if cfg.task == "train" else cfg.extract.splits)
    from alfusion.experiment import TASKS

    # Lightning has its own console handler; Hydra's root handler would print it all twice.
    logging.getLogger("lightning.pytorch").propagate = False
    return TASKS[cfg.task](cfg, run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from alfusion.distributed import install_stop_signals
    from alfusion.sweep import run_job

    install_stop_signals()  # SIGTERM and SIGUSR1 stop the run as Ctrl-C does

    # run_job: a refusal is one line (exit status 2); in a multirun a failed or refused job is
    # recorded and the sweep goes on to its summary (alfusion/sweep.py)
    return run_job(run_command, cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
