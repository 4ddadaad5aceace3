"""What a training run does after its final fit: the layer-attention heatmap (attentive probes)
and the analyses asked for by the run-level ``analysis`` key (conf/config.yaml):

    analysis=layers            per-layer linear probes on every layer's CLS and AP
    analysis=cka               CKA between all layers' CLS and AP (linear and RBF kernels)
    analysis=[layers,cka]      both, plus CKA(last CLS, CLS@layer) beside per-layer accuracy

Files go into the run folder (attention/, layers/, cka/) and into the MLflow run's artifacts.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from alfusion import tracking
from alfusion.analysis.attention import (
    layer_attention,
    spatial_attention,
    write_attention,
    write_spatial_attention,
)
from alfusion.analysis.cka import cka_matrix
from alfusion.analysis.layers import (
    curves,
    layer_tokens,
    per_layer_probes,
    plot_layer_curves,
    write_layer_scores,
)
from alfusion.analysis.plots import heatmap
from alfusion.data import build_dataset
from alfusion.data.extract import load_or_extract
from alfusion.metrics import num_classes_of
from alfusion.search import expand_grid

ANALYSES = ("layers", "cka")
SPATIAL_IMAGES = 4  # test images with a spatial attention map (region and all-token probes)


def requested(cfg) -> list[str]:
    """The analyses named by ``analysis`` (a name or a list); checked before any training."""
    value = cfg.get("analysis") or []
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analysis {unknown}: use {' and/or '.join(ANALYSES)}, "
                         f"e.g. analysis=layers or analysis=[layers,cka]")
    return names


def analyse_run(cfg, run_dir: Path, logger, probe: torch.nn.Module, token_set,
                x_test: torch.Tensor, summary: dict, device: torch.device) -> dict:
    """Write (and log) the run's analyses; returns their headline numbers for results.json."""
    title = f"{cfg.dataset.name} | {cfg.backbone.key} | {cfg.probe.name}"
    out: dict = {}
    files: list[tuple[Path, str]] = []
    if cfg.probe.kind == "attentive" and x_test is not None:
        layout = token_layout(cfg, token_set, device)
        att = layer_attention(probe, x_test, token_set, layout)
        files += [(f, "attention") for f in write_attention(att, run_dir / "attention", title)]
        out["attention_layer_mass"] = att.layer_mass()
        if token_set.is_spatial:
            mean, maps = spatial_attention(probe, x_test, token_set, layout, SPATIAL_IMAGES)
            path = write_spatial_attention(mean, maps, list(token_set.layers),
                                           run_dir / "attention" / "spatial_attention.png",
                                           first_test_images(cfg, len(maps)), title)
            files.append((path, "attention"))
    names = requested(cfg)
    accuracy = None
    if "layers" in names:
        accuracy, layer_files, best = layer_analysis(cfg, run_dir / "layers", device, logger)
        files += [(f, "layers") for f in layer_files]
        out["layers_best"] = best
    if "cka" in names:
        cka_curves, cka_files = cka_analysis(cfg, run_dir / "cka", device, logger, title)
        files += [(f, "cka") for f in cka_files]
        out["cka_last_cls"] = cka_curves
    reference = (f"{cfg.probe.name} (this run)", summary["test"]["bal_acc"])
    if accuracy:
        files.append((plot_layer_curves(run_dir / "layers" / "layer_accuracy.png", accuracy,
                                        reference, title=title), "layers"))
    if "cka" in names:  # the paper's figure: CKA with the last layer beside per-layer accuracy
        name = "cka_vs_accuracy.png" if accuracy else "cka_last_cls.png"
        files.append((plot_layer_curves(run_dir / "cka" / name, accuracy, reference,
                                        out["cka_last_cls"], title), "cka"))
    for path, folder in files:
        tracking.log_artifact(logger, path, folder)
    return out


def token_layout(cfg, token_set, device) -> dict | None:
    """The test entry's token layout (prefix tokens, patch grid) for all-token probes, else
    None; the entry is the one the run trained on, so this reads its meta.json only."""
    if token_set.tokens != "all":
        return None
    return load_or_extract(cfg, "test", device).meta.get("token_layout")


def first_test_images(cfg, n: int) -> list | None:
    """The first n test images (PIL, untransformed) of a map-style dataset (digits, folder),
    drawn beside their spatial maps; None for a streamed one (no random access)."""
    if cfg.dataset.source == "wds":
        return None
    dataset = build_dataset(cfg.dataset, "test")
    return [dataset[i][0] for i in range(min(n, len(dataset)))]


def _cache_tokens(cfg, split: str, device):
    """(tokens (N, 2L, D), labels (N,), token names, positions) of a cached split."""
    entry = load_or_extract(cfg, split, device)
    x, names, positions = layer_tokens(entry)
    y = torch.from_numpy(np.array(entry.array("labels"))).long()
    return x.to(device), y.to(device), names, positions


def layer_analysis(cfg, folder: Path, device, logger):
    """Per-layer linear probes on the cached train/test splits: (curves, files, best token)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y, labels, positions = _cache_tokens(cfg, "train", device)
    x_test, y_test, _, _ = _cache_tokens(cfg, "test", device)
    num_classes = num_classes_of(cfg, y, y_test)
    scores = per_layer_probes((x, y), (x_test, y_test), num_classes,
                              expand_grid(cfg.search, attentive=False), cfg)
    table = write_layer_scores(scores, positions, folder / "layer_accuracy.csv")
    acc = curves(scores, positions)
    for kind, curve in acc.items():
        for layer, value in curve.items():
            tracking.log_metrics(logger, {f"layers/{kind}_bal_acc": value}, step=layer)
    best = max(scores, key=lambda s: s["bal_acc"])
    return acc, [table], dict(token=labels[best["position"]], bal_acc=best["bal_acc"])


def cka_analysis(cfg, folder: Path, device, logger, title: str = ""
                 ) -> tuple[dict[str, dict[int, float]], list[Path]]:
    """CKA matrices of all layers' CLS and AP on a train subset; the last-CLS curves."""
    settings = cfg.get("cka") or {}
    folder.mkdir(parents=True, exist_ok=True)
    entry = load_or_extract(cfg, "train", device)
    samples = min(int(settings.get("samples", 1000)), len(entry))
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(entry), samples, replace=False))
    x, labels, positions = layer_tokens(entry, rows)
    x = x.transpose(0, 1).to(device)  # (2L, n, D): one feature set per token
    num_layers = len(positions) // 2
    files, last_cls = [], {}
    for kernel in settings.get("kernels", ["linear", "rbf"]):
        matrix = cka_matrix(x, kernel, float(settings.get("sigma", 0.2))).cpu().numpy()
        table = folder / f"cka_{kernel}.csv"
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["", *labels])
            writer.writerows([name, *[f"{v:.6g}" for v in row]]
                             for name, row in zip(labels, matrix, strict=True))
        files += [table, heatmap(matrix, labels, labels, folder / f"cka_{kernel}.png",
                                 title=f"{kernel} CKA, {samples} train samples | {title}",
                                 vmin=0, vmax=1,
                                 annotate=False)]
        # row of CLS@L against CLS@1..L
        last_cls[kernel] = {i + 1: float(matrix[num_layers - 1, i]) for i in range(num_layers)}
        for layer, value in last_cls[kernel].items():
            tracking.log_metrics(logger, {f"cka/{kernel}_last_cls": value}, step=layer)
    return last_cls, files
