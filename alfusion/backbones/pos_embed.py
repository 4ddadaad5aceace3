"""Positional embeddings of a DINOv2 model at another input size, as the torch-hub model makes them.

The hub DINOv2 models are built at 518 px (a 37 x 37 patch grid) and interpolate their patch
positional embeddings at every forward pass to the input's grid: bicubic, no antialiasing, with
a *scale factor* of ``(grid + 0.1) / 37`` per side rather than a target size (the hub's
``interpolate_offset=0.1``). A scale factor also sets the sampling positions, so the numbers
differ from a resize to ``size=grid`` (timm's ``resample_abs_pos_embed``, which in addition
antialiases). At a fixed input size the result is a constant, so it is computed once here, when
the model is loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HUB_INTERPOLATE_OFFSET = 0.1


def hub_interpolated_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                               num_prefix_tokens: int = 1,
                               offset: float = HUB_INTERPOLATE_OFFSET) -> torch.Tensor:
    """(1, P + M*M, D) embeddings of an M x M grid -> (1, P + rows*cols, D) for ``grid``.

    The P prefix (class) embeddings are kept; the patch part is interpolated in float32 and
    returned in the input's dtype. The model's own grid is returned unchanged, as the hub does.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch position embeddings are not a square grid")
    rows, cols = grid
    if (rows, cols) == (side, side):
        return pos_embed
    dim = patches.shape[-1]
    image = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, mode="bicubic", antialias=False,
                          scale_factor=((rows + offset) / side, (cols + offset) / side))
    if tuple(image.shape[-2:]) != (rows, cols):
        raise ValueError(f"interpolating a {side} x {side} grid gave {tuple(image.shape[-2:])}, "
                         f"not {(rows, cols)}")
    patches = image.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([prefix.float(), patches], dim=1).to(pos_embed.dtype)


def set_hub_input_size(model: nn.Module, img_size: int) -> None:
    """Make a timm DINOv2 ViT take ``img_size`` px inputs with the hub's positional embeddings.

    timm's ``set_input_size`` updates the patch embedding's size checks and the model's data
    config; its own resampled embeddings are then replaced by the hub's numbers.
    """
    patch = model.patch_embed.patch_size
    grid = (img_size // patch[0], img_size // patch[1])
    # With register tokens timm keeps no position embedding for the prefix tokens.
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    hub = hub_interpolated_pos_embed(model.pos_embed.detach(), grid, prefix)
    model.set_input_size(img_size=(img_size, img_size))
    with torch.no_grad():
        model.pos_embed.copy_(hub)
