"""probe.pt: save a trained probe, find the file ``probe_path`` names (a path, a run folder,
an MLflow model folder or an MLflow URI: ``runs:/<run id>``, ``models:/<name>/<version>``), read
it without executing anything, and rebuild the probe. Shared by task=train (save),
task=evaluate, task=predict and the Python API's ``Probe.load`` (load)."""

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
                mlflow_run_id=summary["mlflow_run_id"],
                metrics=dict(val=dict(summary.get("val") or {}), test=dict(summary["test"])))
    if backbone is not None:
        data["backbone_state_dict"] = backbone.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


EVALUATE_FIX = ("pass probe_path=<run folder>/probe.pt of a finished alfusion run, "
                "probe_path=runs:/<MLflow run id>/probe.pt, or probe_path=models:/<registered "
                "model>/<version>")
MODEL_PROBE = Path("artifacts") / "probe.pt"  # probe.pt inside an MLflow model's folder


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
    """The local probe.pt that ``probe_path`` names, downloaded through the run's tracking store
    (``logger.tracking_uri``) into ``<run_dir>/downloaded/`` when it is an MLflow URI."""
    if not cfg.get("probe_path"):
        raise ConfigError(f"task={cfg.task} needs probe_path: {EVALUATE_FIX}")
    return resolve_probe_file(str(cfg.probe_path), OmegaConf.select(cfg, "logger.tracking_uri"),
                              run_dir / "downloaded")


def resolve_probe_file(location: str, tracking_uri: str | None, download_dir: Path,
                       key: str = "probe_path") -> Path:
    """The local probe.pt of ``location``: a file; a run folder or an MLflow model folder
    (probe.pt in it, or in its artifacts/); or a URI MLflow resolves, downloaded under
    ``download_dir``: ``runs:/<run_id>/probe.pt``, ``runs:/<run_id>`` (that run's probe),
    ``models:/<name>/<version>`` (a registered alfusion model), ``mlflow-artifacts:/...``."""
    if location.startswith("runs:/") and "/" not in location.removeprefix("runs:/").strip("/"):
        location = location.rstrip("/") + "/probe.pt"  # runs:/<run id>: that run's probe
    if tracking.is_artifact_uri(location):
        path = tracking.download_artifact(location, tracking_uri, download_dir, key,
                                          EVALUATE_FIX)
    else:
        path = Path(location).expanduser()
    if path.is_dir():  # a run folder, the run's artifact folder, or an MLflow model
        path = next((p for p in (path / "probe.pt", path / MODEL_PROBE) if p.is_file()),
                    path / "probe.pt")
    if not path.is_file():
        raise MissingFile(f"{key}={location}: no such file; {EVALUATE_FIX}")
    return path


def read_probe(path: Path, key: str = "probe_path") -> dict:
    """probe.pt's saved data, read as tensors and plain containers (nothing in it runs)."""
    saved = load_tensors(path, key, EVALUATE_FIX)
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ConfigError(f"{key}={path} is not an alfusion probe.pt: {EVALUATE_FIX}")
    return saved


def load_probe(cfg, run_dir: Path) -> tuple[Path, dict, object]:
    """(probe.pt's local path, its saved data, its config with the command's ``paths``) for
    ``probe_path``; it is read as tensors and plain containers, nothing in it is executed."""
    path = probe_file(cfg, run_dir)
    saved = read_probe(path)
    saved_cfg = OmegaConf.create(saved["config"])
    saved_cfg.paths = cfg.paths
    return path, saved, saved_cfg


def saved_module(saved: dict, saved_cfg, token_set) -> torch.nn.Module:
    """The saved probe as a plain module (eval mode), rebuilt for ``token_set``."""
    hp = HParams(**saved["chosen"])
    probe = build_probe(saved_cfg.probe, token_set, saved["dims"], saved["num_classes"],
                        saved["num_tokens"], attn_drop=hp.dropout)
    probe.load_state_dict(saved["state_dict"])
    return probe.eval()


def saved_probe(saved: dict, saved_cfg, token_set, device: torch.device) -> ProbeBank:
    """The saved probe, rebuilt for ``token_set`` with its trained weights: a bank of one."""
    return ProbeBank.from_probes([saved_module(saved, saved_cfg, token_set).to(device)])
