"""OpenCLIP image towers, tapped at ``resblocks.{i}.ln_2`` and the projected output; a tower built
on a timm trunk (SigLIP, SigLIP 2, PE) is tapped as that timm model (alfusion/backbones/timm_vit.py:
its blocks, final norm and pooling head, before open_clip's projection), with open_clip's
preprocess."""

from __future__ import annotations

import open_clip
import torch
from omegaconf import OmegaConf
from torch import nn

from alfusion.backbones.hub import load_from_hub
from alfusion.backbones.taps import TappedBackbone
from alfusion.backbones.weights import check_fits, find_weights_file, read_state_dict


def tap_names(depth: int, tap: str, final: str) -> list[str]:
    """Module names (relative to the image tower) for layers 1..L.

    final "norm": the tower's output with no pooling, after ln_post and the projection (the
    paper's last layer, narrower than the blocks); "block": the last block's raw output.
    """
    suffix = {"norm2": ".ln_2", "block": ""}[tap]
    names = [f"transformer.resblocks.{i}{suffix}" for i in range(1, depth)]
    names.append({"norm": "", "block": f"transformer.resblocks.{depth - 1}"}[final])
    return names


def create(cfg) -> tuple[nn.Module, object]:
    """The OpenCLIP image tower of ``cfg`` and its eval preprocessing (the paper's too).

    cfg.weights: an OpenCLIP checkpoint file (open_clip_pytorch_model.bin, .safetensors, a
    training checkpoint with ``state_dict``), read by open_clip with weights_only=True.
    cfg.model_kwargs: open_clip model config overrides (e.g. a smaller vision_cfg for tests).
    """
    pretrained = None
    if cfg.get("pretrained", True) is not False:
        pretrained = (str(find_weights_file(cfg.weights)) if cfg.get("weights")
                      else cfg.get("tag", "openai"))
    kwargs = OmegaConf.to_container(OmegaConf.create(dict(cfg.get("model_kwargs") or {})))

    def load():
        return open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained, **kwargs)

    if pretrained is None:
        with torch.random.fork_rng():  # random weights: the same in every process
            torch.manual_seed(cfg.get("init_seed", 0))
            model, _, preprocess = load()
    elif cfg.get("weights"):
        model, _, preprocess = _load_file(cfg, load, kwargs)
    else:
        model, _, preprocess = load_from_hub(
            load, what=f"OpenCLIP {cfg.name} ({pretrained})", key="backbone.weights")
    return model.visual, preprocess


def _load_file(cfg, load, kwargs: dict):
    """open_clip's loading of a local checkpoint; a file of another architecture is refused
    with the keys and shapes that differ (open_clip's own error lists every key)."""
    try:
        return load()
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        model = open_clip.create_model(cfg.name, pretrained=None, **kwargs)
        state = read_state_dict(cfg.weights)
        check_fits(state, model, f"OpenCLIP {cfg.name}", cfg.weights)
        raise


def tap_model(visual: nn.Module, preprocess, cfg) -> tuple[TappedBackbone, object]:
    if getattr(visual, "trunk", None) is not None:  # open_clip's TimmModel
        from alfusion.backbones import timm_vit

        return timm_vit.tap_model(visual.trunk, cfg, transform=preprocess)
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"{cfg.name}: attentional-pool image towers are not supported")
    # No pooling: the tower then returns every token, after ln_post and the projection.
    visual.pool_type = "none"
    visual.output_tokens = False
    depth = len(visual.transformer.resblocks)
    width = visual.transformer.width
    final = cfg.get("final", "norm")
    out_dim = visual.proj.shape[1] if (visual.proj is not None and final == "norm") else width
    tapped = TappedBackbone(
        visual,
        run=visual,
        tap_names=tap_names(depth, cfg.get("tap", "norm2"), final),
        num_prefix_tokens=1,
        dims=[width] * (depth - 1) + [out_dim],
        patch_size=visual.patch_size,
    )
    return tapped, preprocess
