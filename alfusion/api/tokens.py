"""``extract_tokens``: a backbone's per-layer tokens with the paper's taps and preprocessing.

    x = alfusion.extract_tokens("dinov2_s", images="photos/")             # (N, T, D)
    x, y = alfusion.extract_tokens("dinov2_s", dataset="eurosat", split="train")

A folder of images and a dataset go through the feature cache exactly as the CLI's do (the
same entries: a later run or a second call reuses them); images given in memory (PIL images,
files, bytes) are computed, not cached.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def layer_override(layers) -> str:
    """``probe.layers`` as a Hydra override value: a name, one layer, or a list of them."""
    if isinstance(layers, str):
        return layers
    if isinstance(layers, int):
        return f"[{layers}]"
    return "[" + ",".join(str(int(i)) for i in layers) + "]"


def tokens_config(backbone: str, layers, tokens: str, overrides: Sequence[str],
                  root: str | os.PathLike | None, dataset: str | None = None):
    """The checked config of an ALF probe over ``tokens`` of ``layers`` of ``backbone``."""
    from alfusion.app import compose
    from alfusion.config_check import check_config

    given = [f"backbone={backbone}", "probe=alf", f"probe.layers={layer_override(layers)}",
             f"probe.tokens={tokens}", "logger=none"]
    if dataset is not None:
        given.append(f"dataset={dataset}")
    if root is not None:
        given.append(f"paths.root={root}")
    return check_config(compose([*given, *overrides]))


def extract_tokens(backbone: str = "dinov2_s", images=None, *, dataset: str | None = None,
                   split: str = "train", layers: str | int | Sequence[int] = "all",
                   tokens: str = "cls+ap", overrides: Sequence[str] = (),
                   root: str | os.PathLike | None = None, device: str = "auto",
                   batch_size: int = 64):
    """The tokens (N, T, D) a probe over ``tokens`` of ``layers`` sees: L2-normalised per
    token, stacked as the CLI stacks them (CLS of each layer, then AP of each layer, ...).

    ``backbone``: a conf/backbone name (dinov2_s, vit_b, clip_b16, offline_vit_s14, ...);
    ``images``: a folder, an image file, a PIL image, image bytes or a list of them; or
    ``dataset`` (a conf/dataset name) with ``split``: then returns (tokens, labels (N,)).
    ``overrides``: more CLI settings (``backbone.weights=...``, ``dataset.root=...``);
    ``root``: ``paths.root`` (default outputs/, the cache under it)."""
    from alfusion.distributed import resolve_device

    if (images is None) == (dataset is None):
        raise ValueError("extract_tokens needs images=... (a folder, files, PIL images) or "
                         "dataset=<name> with split=train|test, not both")
    target = resolve_device(device)
    if dataset is not None:
        from alfusion.features import split_tokens

        cfg = tokens_config(backbone, layers, tokens, overrides, root, dataset)
        x, y, _, _ = split_tokens(cfg, split, target)
        return x, y
    if isinstance(images, (str, Path)) and Path(images).expanduser().is_dir():
        from alfusion.data.folder import PLAIN
        from alfusion.features import split_tokens

        folder = str(Path(images).expanduser().resolve())
        cfg = tokens_config(backbone, layers, tokens,
                            ["dataset=folder", f"dataset.root={folder}", *overrides], root)
        cfg.task = "predict"  # a plain folder: only its images (the entry task=predict makes)
        return split_tokens(cfg, PLAIN, target)[0]
    from alfusion.api.images import image_tokens, read_images
    from alfusion.backbones import build_backbone
    from alfusion.tokens import build_token_set

    cfg = tokens_config(backbone, layers, tokens, overrides, root)
    model, transform = build_backbone(cfg.backbone)
    token_set = build_token_set(cfg.probe, num_layers=len(model.dims))
    with torch.no_grad():
        return image_tokens(model, transform, token_set, read_images(images)[0], target,
                            batch_size)
