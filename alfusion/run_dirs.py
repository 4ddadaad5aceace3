"""Run folders: names checked to stay under ``paths.root``, and never shared by two runs.

Three OmegaConf resolvers, used by ``hydra.run.dir`` and ``hydra.sweep.subdir`` in
conf/config.yaml:

- ``${run_name:}``: first every setting against the schema (alfusion/schema.py: a refused one
  ends a single run before its folder exists), then dataset_backbone_probe (each checked as
  below), or for task=evaluate (predict) ``evaluate_`` (``predict_``) + the probe's run
  folder name (MLflow run id).
- ``${path_name:dataset.name}``: the value of that key, refused unless it is a single safe path
  component (``dataset.name=x/../../ESCAPED`` would otherwise put the run folder outside
  ``paths.root``).
- ``${unique_dir:PATH}``: creates PATH exclusively and returns it; when another run already
  holds PATH (two runs started in the same second), PATH_2, PATH_3, ... instead.

An explicit ``hydra.run.dir=DIR`` uses neither: DIR is used as given, existing or not (resume
and the DDP ranks rely on that).

A name refused while Hydra names the run folder ends a single run with one line (exit status
2); in a multirun the job's folder gets a placeholder name and the job's own config check
refuses it, so that the sweep goes on to its summary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from alfusion.config_check import ConfigError, check_path_name, exit_refused

REFUSED_NAME = "refused"  # a multirun job's folder name part whose setting is refused


def is_multirun(root) -> bool:
    return str(OmegaConf.select(root, "hydra.mode", default="")).endswith("MULTIRUN")

# Within one process a folder asked for again (Hydra and Lightning read hydra.run.dir more
# than once) is the folder created the first time, not a new one.
_created: dict[str, str] = {}


def path_name(key: str, *, _root_) -> str:
    try:
        return check_path_name(key, OmegaConf.select(_root_, key))
    except ConfigError as err:
        if is_multirun(_root_):
            return REFUSED_NAME
        exit_refused(err)


def run_name(*, _root_) -> str:
    """What a run folder is named after: dataset_backbone_probe; for task=evaluate (predict),
    the probe used: ``evaluate_`` (``predict_``) and the name of the probe's own run folder,
    or its MLflow run id for ``runs:/<run id>/...`` (the backbone and probe of the command
    line play no part in it)."""
    from alfusion.config_check import check_schema

    try:  # every setting is checked before Hydra creates the folder
        check_schema(_root_)
    except ConfigError as err:
        if not is_multirun(_root_):
            exit_refused(err)  # in a multirun the job's own check refuses it
    task = OmegaConf.select(_root_, "task")
    if task in ("evaluate", "predict") and OmegaConf.select(_root_, "probe_path"):
        path = str(_root_.probe_path)
        folder = (path.removeprefix("runs:/").strip("/").split("/")[0] if path.startswith("runs:/")
                  else os.path.basename(os.path.dirname(os.path.abspath(path))))
        try:
            return f"{task}_" + check_path_name("probe_path (its folder)", folder or "probe")
        except ConfigError as err:
            exit_refused(err)
    return "_".join(path_name(key, _root_=_root_)
                    for key in ("dataset.name", "backbone.key", "probe.name"))


def unique_dir(path: str) -> str:
    """Create ``path`` (or ``path_2``, ``path_3``, ... if taken) and return the created one."""
    path = str(path)
    if path in _created:
        return _created[path]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)  # atomic: of two runs asking at once, one gets it
            break
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"
    _created[path] = candidate
    return candidate


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote into it (``.hydra/`` and
    the job's log) and empty folders: a refused command or a resume that continued another
    folder leaves no stray folder. Only in a single run, by rank 0."""
    from hydra.core.hydra_config import HydraConfig

    from alfusion.distributed import is_global_zero

    if not HydraConfig.initialized() or not is_global_zero() or not Path(run_dir).is_dir():
        return
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode).endswith("MULTIRUN"):
        return  # the sweep's summary reads every job's folder
    hydra_files = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if all(p.name in hydra_files or holds_no_file(p) for p in Path(run_dir).iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def holds_no_file(path: Path) -> bool:
    """A folder with no file anywhere under it (e.g. the ``downloaded/`` of a refused
    ``probe_path=runs:/...``)."""
    return path.is_dir() and not any(p.is_file() for p in path.rglob("*"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("path_name"):
        OmegaConf.register_new_resolver("path_name", path_name)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
