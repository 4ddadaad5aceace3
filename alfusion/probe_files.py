"""probe.pt: save a trained probe, find the file ``probe_path`` names (a path or an MLflow
URI), read it without executing anything, and rebuild the probe. Shared by task=train (save),
task=evaluate and task=predict (load)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from alfusion import tracking
from alfusion.config_check import ConfigError, MissingFile
from alfusion.data import class_names
from alfusion.probes import build_probe
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import HParams
from alfusion.resume import load_tensors


def save_probe(path: Path, probe: torch.nn.Module, cfg, summary: dict, dims: list[int],
               backbone: torch.nn.Module | None = None) -> None:
    """probe.pt: tensors and plain containers only (it loads with weights_only=True): the
    probe's state dict, the resolved config, sizes, the chosen configuration, the class names
    (task=predict), and the fine-tuned backbone's state dict when the backbone was trained."""
    data = dict(state_dict=probe.state_dict(), config=OmegaConf.to_container(cfg, resolve=True),
                dims=list(dims), num_classes=summary["num_classes"],
                num_tokens=summary["num_tokens"], chosen=summary["chosen"], mode=summary["mode"],
                class_names=class_names(cfg.dataset, summary["num_classes"]),
                mlflow_run_id=summary["mlflow_run_id"])
    if backbone is not None:
        data["backbone_state_dict"] = backbone.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


EVALUATE_FIX = ("pass probe_path=<run folder>/probe.pt of a finished alfusion run, or "
                "probe_path=runs:/<MLflow run id>/probe.pt")


def refuse_overrides(task: str = "evaluate") -> None:
    """task=evaluate (and predict) use the backbone, probe and mode the probe was trained
    with, evaluate also its dataset: such a choice on the command line would be ignored, so it
    is refused."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    keys = ("backbone", "probe", "mode") + (("dataset",) if task == "evaluate" else ())
    given = [o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~") in keys]
    if given:
        also = "" if task == "predict" else (" (to evaluate on another dataset, train a probe "
                                             "for it, or use task=predict)")
        raise ConfigError(f"task={task} uses the probe's own {', '.join(keys)} (from its "
                         f"probe.pt); remove {' '.join(given)}{also}")


def probe_file(cfg, run_dir: Path) -> Path:
    """The local probe.pt that ``probe_path`` names: a path, or a URI MLflow resolves
    (``runs:/<run_id>/probe.pt``, or just ``runs:/<run_id>``), downloaded through the run's
    tracking store (``logger.tracking_uri``) into ``<run_dir>/downloaded/``."""
    if not cfg.get("probe_path"):
        raise ConfigError(f"task={cfg.task} needs probe_path: {EVALUATE_FIX}")
    location = str(cfg.probe_path)
    if location.startswith("runs:/") and "/" not in location.removeprefix("runs:/").strip("/"):
        location = location.rstrip("/") + "/probe.pt"  # runs:/<run id>: that run's probe
    if tracking.is_artifact_uri(location):
        path = tracking.download_artifact(location, OmegaConf.select(cfg, "logger.tracking_uri"),
                                          run_dir / "downloaded", "probe_path", EVALUATE_FIX)
        if path.is_dir():  # the URI named the run's artifact folder
            path = path / "probe.pt"
    else:
        path = Path(location).expanduser()
    if not path.is_file():
        raise MissingFile(f"probe_path={location}: no such file; {EVALUATE_FIX}")
    return path


def load_probe(cfg, run_dir: Path) -> tuple[Path, dict, object]:
    """(probe.pt's local path, its saved data, its config with the command's ``paths``) for
    ``probe_path``; it is read as tensors and plain containers, nothing in it is executed."""
    path = probe_file(cfg, run_dir)
    saved = load_tensors(path, "probe_path", EVALUATE_FIX)
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ConfigError(f"probe_path={cfg.probe_path} is not an alfusion probe.pt: "
                         f"{EVALUATE_FIX}")
    saved_cfg = OmegaConf.create(saved["config"])
    saved_cfg.paths = cfg.paths
    return path, saved, saved_cfg


def saved_probe(saved: dict, saved_cfg, token_set, device: torch.device) -> ProbeBank:
    """The saved probe, rebuilt for ``token_set`` with its trained weights: a bank of one."""
    hp = HParams(**saved["chosen"])
    probe = build_probe(saved_cfg.probe, token_set, saved["dims"], saved["num_classes"],
                        saved["num_tokens"], attn_drop=hp.dropout)
    probe.load_state_dict(saved["state_dict"])
    return ProbeBank.from_probes([probe.to(device)])
