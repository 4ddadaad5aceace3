"""Run folders: names checked to stay under ``paths.root``, and never shared by two runs.

Three OmegaConf resolvers, used by ``hydra.run.dir`` and ``hydra.sweep.subdir`` in
conf/config.yaml:

- ``${run_name:}``: dataset_backbone_probe (each checked as below), or for task=evaluate
  (predict) ``evaluate_`` (``predict_``) + the probe's run folder name (MLflow run id).
- ``${path_name:dataset.name}``: the value of that key, refused unless it is a single safe path
  component (``dataset.name=x/../../ESCAPED`` would otherwise put the run folder outside
  ``paths.root``).
- ``${unique_dir:PATH}``: creates PATH exclusively and returns it; when another run already
  holds PATH (two runs started in the same second), PATH_2, PATH_3, ... instead.

An explicit ``hydra.run.dir=DIR`` uses neither: DIR is used as given, existing or not (resume
and the DDP ranks rely on that).
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from alfusion.config_check import check_path_name

# Within one process a folder asked for again (Hydra and Lightning read hydra.run.dir more
# than once) is the folder created the first time, not a new one.
_created: dict[str, str] = {}


def path_name(key: str, *, _root_) -> str:
    return check_path_name(key, OmegaConf.select(_root_, key))


def run_name(*, _root_) -> str:
    """What a run folder is named after: dataset_backbone_probe; for task=evaluate (predict),
    the probe used: ``evaluate_`` (``predict_``) and the name of the probe's own run folder,
    or its MLflow run id for ``runs:/<run id>/...`` (the backbone and probe of the command
    line play no part in it)."""
    task = OmegaConf.select(_root_, "task")
    if task in ("evaluate", "predict") and OmegaConf.select(_root_, "probe_path"):
        path = str(_root_.probe_path)
        folder = (path.removeprefix("runs:/").strip("/").split("/")[0] if path.startswith("runs:/")
                  else os.path.basename(os.path.dirname(os.path.abspath(path))))
        return f"{task}_" + check_path_name("probe_path (its folder)", folder or "probe")
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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("path_name"):
        OmegaConf.register_new_resolver("path_name", path_name)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
