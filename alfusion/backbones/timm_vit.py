"""timm Vision Transformers: supervised ViT, DINOv2 and MAE weights, and the offline ViT-S/14."""

from __future__ import annotations

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from alfusion.backbones.hub import load_from_hub
from alfusion.backbones.taps import TappedBackbone


def tap_names(depth: int, tap: str, final: str) -> list[str]:
    """Module names for layers 1..L: blocks 1..L-1 at ``tap``, then the final output.

    tap: "norm2" (the paper: the MLP input of each block) or "block" (the residual stream).
    final: "norm" (the final LayerNorm, the paper) or "block" (the last block's raw output).
    """
    suffix = {"norm2": ".norm2", "block": ""}[tap]
    names = [f"blocks.{i}{suffix}" for i in range(1, depth)]
    names.append({"norm": "norm", "block": f"blocks.{depth - 1}"}[final])
    return names


def create(cfg) -> nn.Module:
    """The timm model of ``cfg`` with pretrained weights (hub, or cfg.weights file)."""
    kwargs = dict(num_classes=0, **(cfg.get("model_kwargs") or {}))
    if cfg.get("img_size"):
        kwargs["img_size"] = cfg.img_size
    if cfg.get("pretrained", True) is False:
        # Random weights (tests, smoke runs): seeded, so every process builds the same model.
        with torch.random.fork_rng():
            torch.manual_seed(cfg.get("init_seed", 0))
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.get("weights"):
        overlay = dict(file=str(cfg.weights))
        return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    return load_from_hub(lambda: timm.create_model(cfg.name, pretrained=True, **kwargs),
                         what=f"timm model {cfg.name}", key="backbone.weights")


def tap_model(model: nn.Module, cfg) -> tuple[TappedBackbone, object]:
    """Hook a timm ViT at the configured taps; return it with its own eval transform."""
    depth = len(model.blocks)
    tapped = TappedBackbone(
        model,
        run=model.forward_features,
        tap_names=tap_names(depth, cfg.get("tap", "norm2"), cfg.get("final", "norm")),
        num_prefix_tokens=model.num_prefix_tokens,
        dims=[model.embed_dim] * depth,
        patch_size=model.patch_embed.patch_size,
    )
    return tapped, eval_transform(model, cfg)


def eval_transform(model: nn.Module, cfg):
    """timm's eval preprocessing of ``model``, at cfg.img_size where one is set."""
    data_cfg = resolve_model_data_config(model)
    if cfg.get("img_size"):
        data_cfg["input_size"] = (3, cfg.img_size, cfg.img_size)
    return create_transform(**data_cfg, is_training=False)
