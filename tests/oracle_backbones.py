"""An independent statement of the paper's feature pipeline, written from its facts for the tests.

Nothing here calls alfusion, timm or torchvision: the preprocessing is PIL + numpy, the ViT a
plain forward over a state dict, the DINOv2 position embeddings the hub's interpolation rule.

* thingsvision's default for torch-hub models (DINOv2, MAE): resize the shorter side to 256
  (PIL bilinear), center-crop 224, scale to [0, 1], normalise with ImageNet's mean and std;
* timm's eval transform of the paper's supervised ViTs: shorter side to 248 (PIL bicubic,
  crop_pct 0.9), center-crop 224, normalise with mean = std = 0.5;
* DINOv2's hub model is built at 518 px (37 x 37 patches) and, for another input, interpolates
  the patch position embeddings bicubically with scale factor (grid + 0.1) / 37, no antialias;
* taps: the second LayerNorm of blocks 1..L-1 and the final LayerNorm; CLS = token 0,
  AP = mean of the patch tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def pil_transform(image: Image.Image, resize: int, crop: int, resample: int, norm
                  ) -> torch.Tensor:
    """Shorter side to ``resize`` (aspect kept), center crop ``crop``: (3, crop, crop)."""
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    image = image.convert("RGB").resize(size, resample)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    array = np.asarray(image, dtype=np.float32)[top:top + crop, left:left + crop] / 255.0
    mean, std = (np.asarray(v, dtype=np.float32) for v in norm)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def hub_transform(image: Image.Image) -> torch.Tensor:
    return pil_transform(image, 256, 224, Image.BILINEAR, IMAGENET)


def timm_vit_transform(image: Image.Image) -> torch.Tensor:
    return pil_transform(image, 248, 224, Image.BICUBIC, INCEPTION)


def hub_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) by the DINOv2 hub model's rule."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    if grid == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic",
                            antialias=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)


def random_vit_state(width: int, depth: int, patch: int, grid: int, layer_scale: bool,
                     seed: int) -> dict[str, torch.Tensor]:
    """A seeded random ViT state dict in the layout of DINOv2's and MAE's checkpoints
    (and timm's): patch_embed.proj, cls_token, pos_embed (1, 1 + grid^2, D), blocks.{i}.*
    (norm1, attn.qkv, attn.proj, [ls1.gamma], norm2, mlp.fc1, mlp.fc2, [ls2.gamma]), norm."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    d, h = width, 4 * width
    state = {"cls_token": rand(1, 1, d, scale=0.5),
             "pos_embed": rand(1, 1 + grid * grid, d, scale=0.5),
             "patch_embed.proj.weight": rand(d, 3, patch, patch, scale=0.05),
             "patch_embed.proj.bias": rand(d)}
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": rand(d, scale=0.1, offset=1.0), b + "norm1.bias": rand(d),
                  b + "attn.qkv.weight": rand(3 * d, d, scale=0.1),
                  b + "attn.qkv.bias": rand(3 * d),
                  b + "attn.proj.weight": rand(d, d, scale=0.1), b + "attn.proj.bias": rand(d),
                  b + "norm2.weight": rand(d, scale=0.1, offset=1.0), b + "norm2.bias": rand(d),
                  b + "mlp.fc1.weight": rand(h, d, scale=0.1), b + "mlp.fc1.bias": rand(h),
                  b + "mlp.fc2.weight": rand(d, h, scale=0.1), b + "mlp.fc2.bias": rand(d)}
        if layer_scale:
            state |= {b + "ls1.gamma": rand(d, scale=0.2, offset=0.5),
                      b + "ls2.gamma": rand(d, scale=0.2, offset=0.5)}
    state |= {"norm.weight": rand(d, scale=0.1, offset=1.0), "norm.bias": rand(d)}
    return state


def dinov2_checkpoint(width: int, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """DINOv2's ``dinov2_vit*14_pretrain.pth`` layout: built at 518 px, with mask_token."""
    state = random_vit_state(width, depth, patch=14, grid=37, layer_scale=True, seed=seed)
    state["mask_token"] = torch.zeros(1, width)
    return state


def mae_checkpoint(width: int, depth: int, seed: int = 0) -> dict:
    """MAE's ``mae_pretrain_vit_*.pth`` layout: {"model": encoder + final norm}, here with the
    decoder tensors a full pretraining state dict also holds."""
    state = random_vit_state(width, depth, patch=16, grid=14, layer_scale=False, seed=seed)
    state |= {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.ones(16, width),
              "decoder_pred.weight": torch.ones(3 * 16 * 16, 16)}
    return {"model": state}


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], 1e-6)


def _linear(x, state, name):
    return x @ state[name + ".weight"].T + state[name + ".bias"]


@torch.no_grad()
def plain_vit_taps(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int,
                   pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm ViT written out: images (B, 3, H, W) -> CLS, AP (B, L, D) of the paper's
    taps, blocks.{1..L-1}.norm2 and the final norm. ``pos_embed`` fits the input's grid."""
    w = state["patch_embed.proj.weight"]
    x = F.conv2d(images, w, state["patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + pos_embed
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    taps = []
    for i in range(depth):
        b = f"blocks.{i}."
        ls1 = state.get(b + "ls1.gamma", 1.0)
        ls2 = state.get(b + "ls2.gamma", 1.0)
        y = _layer_norm(x, state, b + "norm1")
        n, t, d = y.shape
        q, k, v = _linear(y, state, b + "attn.qkv").reshape(n, t, 3, heads, d // heads
                                                            ).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, t, d)
        x = x + ls1 * _linear(y, state, b + "attn.proj")
        y = _layer_norm(x, state, b + "norm2")
        if i >= 1:
            taps.append(y)
        y = _linear(F.gelu(_linear(y, state, b + "mlp.fc1")), state, b + "mlp.fc2")
        x = x + ls2 * y
    taps.append(_layer_norm(x, state, "norm"))
    cls = torch.stack([t[:, 0] for t in taps], dim=1)
    ap = torch.stack([t[:, 1:].mean(dim=1) for t in taps], dim=1)
    return cls, ap
