"""task=predict: a trained probe's classes for new images, as a CSV logged to MLflow.

    python -m alfusion task=predict probe_path=runs:/<run id>/probe.pt \\
        dataset=folder dataset.root=DIR

DIR is a plain folder of images (no class folders, no splits: every image under it, in sorted
order of its path). ``predict.split=train|test`` takes that split of a dataset that has splits
instead (an image folder with class folders, a clip_benchmark webdataset, digits).

The images go through the probe's own backbone, token set and mode: for a cached probe their
features are extracted into the feature cache exactly as for training (predicting the same
images again reuses them); an end-to-end or fine-tuned probe runs its backbone (fine-tuned
weights from probe.pt) on each batch. ``predictions.csv`` (docs/predict.md) has one row per
image: sample, label (the source's class, when it has labels), predicted, and the top
``predict.top_k`` classes with their softmax probabilities.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from alfusion import tracking
from alfusion.data import build_dataset, class_names, sample_keys, with_transform
from alfusion.data.folder import PLAIN
from alfusion.data.loaders import labels_of
from alfusion.distributed import resolve_device
from alfusion.end2end.run import build_encoder
from alfusion.engine import ImageData, TokenData
from alfusion.features import split_tokens
from alfusion.probe_files import load_probe, refuse_overrides, saved_probe


def prediction_split(cfg) -> str:
    """The split to predict: ``predict.split``, or (null) every image under a folder's root
    (config_check has refused null for other sources)."""
    return str(cfg.predict.split) if cfg.predict.get("split") else PLAIN


def predict_config(cfg, saved_cfg):
    """The probe's config with the command's task, dataset and its settings for reading
    images."""
    out = saved_cfg.copy()
    with open_dict(out):
        for key in ("task", "dataset", "paths", "extract", "end2end"):
            out[key] = cfg[key]
    return out


def image_logits(pcfg, saved: dict, source, split: str, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), labels (N,): -1 where unknown) of the probe on ``split`` (``source``:
    its checked dataset), through the cache (cached probes) or the backbone (end-to-end and
    fine-tuned probes)."""
    if pcfg.mode.name == "cached":
        x, y, token_set, _ = split_tokens(pcfg, split, device)
        data = TokenData(x, y)
    else:
        encoder, eval_tf = build_encoder(pcfg, saved.get("backbone_state_dict"))
        images = with_transform(source, eval_tf)
        token_set = encoder.token_set
        data = ImageData(images, images, labels_of(images, pcfg.end2end.num_workers),
                         encoder.to(device), pcfg.end2end)
    logits, labels = data.logits(saved_probe(saved, pcfg, token_set, device))
    return logits[0], labels


def write_predictions(path: Path, keys: list[str], logits: torch.Tensor, labels: torch.Tensor,
                      names: list[str], label_names: list[str], top_k: int) -> Path:
    """predictions.csv from logits (N, C): sample, label, predicted, class_j / prob_j for the
    top min(top_k, C) classes. Written under a temporary name, renamed when complete."""
    probs = logits.float().softmax(dim=1)
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    predicted = logits.argmax(dim=1)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "label", "predicted",
                         *[f"{kind}_{j + 1}" for j in range(k) for kind in ("class", "prob")]])
        for i, key in enumerate(keys):
            label = int(labels[i])
            top = [v for j in range(k) for v in (names[int(top_i[i, j])],
                                                 f"{float(top_p[i, j]):.6f}")]
            writer.writerow([key, label_names[label] if 0 <= label < len(label_names) else "",
                             names[int(predicted[i])], *top])
    tmp.replace(path)
    return path


def run_predict(cfg, run_dir: Path) -> dict:
    """Predict the classes of ``dataset``'s images with the probe at ``probe_path`` (a file or
    an MLflow URI); write predictions.csv and log it to a new MLflow run."""
    refuse_overrides("predict")
    split = prediction_split(cfg)
    path, saved, saved_cfg = load_probe(cfg, run_dir)
    pcfg = predict_config(cfg, saved_cfg)
    names = saved.get("class_names") or class_names(saved_cfg.dataset, saved["num_classes"])
    source = build_dataset(pcfg.dataset, split)  # bad input fails here, before any work
    if OmegaConf.is_interpolation(cfg.logger, "run_name"):  # the default names the training
        with open_dict(cfg):
            cfg.logger.run_name = (f"predict/{cfg.dataset.name}/{saved_cfg.backbone.key}/"
                                   f"{saved_cfg.probe.name}")
    logger = tracking.make_logger(cfg)
    status = "FAILED"
    try:
        logits, labels = image_logits(pcfg, saved, source, split, resolve_device(cfg.device))
        keys = sample_keys(source, split)
        if len(keys) != len(logits):
            raise RuntimeError(f"{len(keys)} sample names for {len(logits)} predictions")
        label_names = [] if split == PLAIN else class_names(pcfg.dataset, source.num_classes)
        out = write_predictions(run_dir / "predictions.csv", keys, logits, labels, names,
                                label_names, cfg.predict.top_k)
        tracking.log_params(logger, {
            "task": "predict", "probe_path": cfg.probe_path, "probe_run_id":
            saved.get("mlflow_run_id"), "dataset/name": cfg.dataset.name, "dataset/root":
            cfg.dataset.get("root"), "predict/split": split, "backbone/key":
            saved_cfg.backbone.key, "probe/name": saved_cfg.probe.name,
            "mode/name": saved_cfg.mode.name})
        tracking.log_metrics(logger, {"predict/images": len(keys)})
        tracking.log_artifact(logger, out)
        status = "FINISHED"
        print(f"[alfusion] predict {len(keys)} images of {cfg.dataset.name} ({split}) with "
              f"{cfg.probe_path} ({saved_cfg.mode.name} | {saved_cfg.backbone.name} | "
              f"{saved_cfg.probe.name}): {out}")
        return dict(rows=len(keys), csv=str(out), probe_file=str(path))
    finally:
        tracking.finish(logger, status)
