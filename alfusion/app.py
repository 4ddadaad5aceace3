"""The command line's run, in-process: compose the config exactly as ``python -m alfusion``
does (the same conf/, overrides, resolvers and run folder) and run the same entry function.

    from alfusion.app import compose, run
    cfg = compose(["probe=linear", "search=quick"])   # inspect first
    summary = run(["probe=linear", "search=quick"])   # the run's results (as results.json)

A refused setting raises ``ConfigError`` (the CLI prints it as one line, exit status 2) and
leaves no run folder behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), *, with_hydra: bool = False) -> DictConfig:
    """The composed config of ``python -m alfusion OVERRIDES`` (``with_hydra``: with its
    ``hydra`` section, which names the run folder)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                               job_name="alfusion"):
        return hydra_compose("config", overrides=list(overrides),
                             return_hydra_config=with_hydra)


def run(overrides: Sequence[str] = ()) -> dict:
    """Run ``python -m alfusion OVERRIDES`` in this process and return what the task returns
    (task=train: the run's summary, as in results.json)."""
    from alfusion.__main__ import run_command
    from alfusion.config_check import ConfigError, check_schema
    from alfusion.run_dirs import remove_if_unused

    cfg = compose(overrides, with_hydra=True)
    check_schema(cfg)  # as the CLI: a refused setting before the run folder exists
    run_dir = Path(cfg.hydra.run.dir)  # created by the unique_dir resolver, as in the CLI
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(task_cfg))
    try:
        return run_command(task_cfg, run_dir)
    except ConfigError:
        remove_if_unused(run_dir)
        raise
