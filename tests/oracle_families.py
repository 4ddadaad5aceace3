"""Independent per-layer tokens of today's ViT families, from the model's own code: timm builds
the model and loads the weights file by its own loader (``pretrained_cfg_overlay=file``, which
applies timm's own conversion of official layouts), forward hooks of this module record the
MLP input of blocks 1..L-1, ``forward_intermediates`` gives the final layer, and the model's own
``forward_head`` its pooled output. Nothing here uses alfusion's backbone code."""

from __future__ import annotations

import timm
import torch
from timm.data import create_transform, resolve_model_data_config

# Few blocks, narrow: a family's architecture at test size (every key is a timm model argument).
SMALL = dict(depth=2, embed_dim=64, num_heads=2)


def build(name: str, seed: int, **kwargs) -> torch.nn.Module:
    """A timm model at test size with seeded random weights (every parameter, so that norms and
    layer scales are not at their constant initial values)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **SMALL, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def load_own(name: str, path, **kwargs) -> torch.nn.Module:
    """The model as timm itself loads the file ``path`` (its own filter of official layouts)."""
    model = timm.create_model(name, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL, **kwargs)
    return model.eval()


def own_transform(model: torch.nn.Module, img_size: int | None = None):
    data_cfg = resolve_model_data_config(model)
    if img_size:
        data_cfg["input_size"] = (3, img_size, img_size)
    return create_transform(**data_cfg, is_training=False)


@torch.no_grad()
def own_tokens(model: torch.nn.Module, images: torch.Tensor, prefix: int, has_cls: bool,
               fc_norm: bool = False) -> dict[str, torch.Tensor]:
    """images (N, 3, H, W) -> cls (N, L, D) where there is a class token, ap (N, L, D) over the
    patch tokens only (``prefix`` tokens skipped), pool (N, 1, D) where there is an attention
    pool, and ap_with_prefix (N, L, D) (the wrong rule, for the test to tell apart)."""
    captured = []
    hooks = [blk.norm2.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for blk in list(model.blocks)[1:]]
    try:
        final, blocks = model.forward_intermediates(images, output_fmt="NLC",
                                                    return_prefix_tokens=True)
    finally:
        for hook in hooks:
            hook.remove()
    if fc_norm:  # the model's final norm after pooling: here on every token of the last block
        patches, prefix_tokens = blocks[-1]
        last = torch.cat([prefix_tokens, patches], dim=1) if prefix else patches
        final = model.fc_norm(last)
    layers = captured[: len(model.blocks) - 1] + [final]
    out = dict(ap=torch.stack([t[:, prefix:].mean(1) for t in layers], 1),
               ap_with_prefix=torch.stack([t.mean(1) for t in layers], 1))
    if has_cls:
        out["cls"] = torch.stack([t[:, 0] for t in layers], 1)
    if getattr(model, "attn_pool", None) is not None:
        out["pool"] = model.forward_head(model.forward_features(images), pre_logits=True)[:, None]
    return out


def meta_dinov3_layout(state: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict (``_qkvb`` variant) in the key layout of Meta's
    ``dinov3_vit*16_pretrain_lvd1689m-*.pth`` (facebookresearch/dinov3: ``storage_tokens``,
    ``blocks.i.ls1.gamma``, one ``attn.qkv.bias`` with a zero key part and its ``bias_mask``,
    ``rope_embed.periods``, the pretraining ``mask_token``)."""
    out = {}
    width = state["cls_token"].shape[-1]
    for k, v in state.items():
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            out[base + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), state[base + "v_bias"]])
            out[base + "qkv.bias_mask"] = torch.cat([torch.ones_like(v), torch.zeros_like(v),
                                                     torch.ones_like(v)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v
    out["mask_token"] = torch.zeros(1, width)
    out["rope_embed.periods"] = torch.ones(width // heads // 4)
    return out
