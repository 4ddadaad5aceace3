"""Layer taps: one forward pass of a ViT yields the tokens of every tapped layer.

A tap is a forward hook on a named module. The paper taps the MLP input of each block
(``blocks.{i}.norm2`` in timm, ``resblocks.{i}.ln_2`` in OpenCLIP) plus the model's final
output; the residual stream (block output) is the other option. Layers are numbered 1..L as in
the paper: layers 1..L-1 are blocks 1..L-1 (block 0 is never used), layer L is the final output.

Every tapped output is laid out as [prefix tokens (CLS, registers), patch tokens in row-major
grid order]; AP and region tokens pool the patch tokens only. CLS is token 0 only where the
model has a class token: a model without one (SigLIP, AIMv2) has no CLS, and its registers or
storage tokens, like any prefix token, are never pooled. A model with a pooling head (MAP /
attention pool) also yields that head's output on the final layer, the ``pool`` token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerOutputs:
    """Per-layer pooled tokens of one batch.

    cls: (B, L, D) the class token (token 0) of every tapped layer, zero-padded on the right to
        the widest layer; None for a model without a class token.
    ap: (B, L, D) mean of the patch tokens (all prefix tokens excluded), padded likewise.
    tokens: (B, L', N_tok, D) all tokens of the requested layers (padded), else None: every
        layer with ``all_tokens=True``, the layers named by ``token_layers`` in their order.
    regions: (B, L, k*k, D) the patch grid of every layer average-pooled into k x k regions,
        row-major (padded), when ``regions=k`` is asked for, else None.
    dims: true width of every layer (only OpenCLIP's projected output is narrower).
    grid: (rows, columns) of the patch grid of this batch.
    num_prefix_tokens: tokens before the patches (CLS and registers).
    pool: (B, 1, D) the pooling head's output on the final layer, padded; None without one.
    """

    cls: torch.Tensor | None
    ap: torch.Tensor
    tokens: torch.Tensor | None
    dims: list[int]
    regions: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 1
    pool: torch.Tensor | None = None


class TappedBackbone(nn.Module):
    """A frozen ViT with forward hooks on the modules named in ``tap_names``.

    ``tap_names`` lists one module per layer, in layer order ("" is the model itself). ``run``
    calls the model's feature forward (no classification head); the hooks record what each
    tapped module returned, (B, N_tok, D) in every supported family. ``patch_size`` (rows,
    columns of pixels) gives the patch grid of an input; None assumes a square grid.
    ``class_token``: token 0 is a class token (else no CLS is reported); ``pooled``: ``run``
    returns the pooling head's output (B, D) on the final layer, the pool token.
    """

    def __init__(
        self,
        model: nn.Module,
        run,
        tap_names: list[str],
        num_prefix_tokens: int,
        dims: list[int],
        patch_size: tuple[int, int] | None = None,
        class_token: bool = True,
        pooled: bool = False,
    ) -> None:
        super().__init__()
        self.class_token = class_token
        self.pooled = pooled
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.model = model
        self._run = run
        self.tap_names = list(tap_names)
        self.num_prefix_tokens = num_prefix_tokens
        self.dims = list(dims)
        self._captured: dict[str, torch.Tensor] = {}
        self._recording = False
        modules = dict(model.named_modules())
        missing = [n for n in self.tap_names if n not in modules]
        if missing:
            raise KeyError(f"tap modules not found in the model: {missing}")
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in self.tap_names
        ]

    def _make_hook(self, name: str):
        def hook(_module, _inputs, output):
            # Only inside forward(): activation checkpointing re-runs blocks during backward,
            # and keeping those outputs would hold a batch of every tapped layer in memory.
            if self._recording:
                self._captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @property
    def width(self) -> int:
        return max(self.dims)

    def forward(self, images: torch.Tensor, all_tokens: bool = False,
                token_layers: list[int] | None = None, regions: int | None = None
                ) -> LayerOutputs:
        """images: (B, 3, H, W) -> LayerOutputs for every tapped layer.

        all_tokens: keep all tokens of every layer; token_layers: of these layers (1..L) only;
        regions: also pool every layer's patch grid into regions x regions tokens.
        """
        self._captured.clear()
        self._recording = True
        try:
            result = self._run(images)
            layers = [self._captured[name] for name in self.tap_names]
        finally:
            self._recording = False
            self._captured.clear()
        width = self.width
        p = self.num_prefix_tokens
        grid = self.patch_grid(images, layers[0].shape[1] - p)
        cls = (torch.stack([_pad(t[:, 0], width) for t in layers], dim=1)
               if self.class_token else None)
        pool = _pad(result, width)[:, None] if self.pooled else None
        ap = torch.stack([_pad(t[:, p:].mean(dim=1), width) for t in layers], dim=1)
        if all_tokens:
            token_layers = list(range(1, len(layers) + 1))
        tokens = (torch.stack([_pad(layers[i - 1], width) for i in token_layers], dim=1)
                  if token_layers else None)
        pooled = (torch.stack([_pad(region_pool(t[:, p:], grid, regions), width)
                               for t in layers], dim=1) if regions else None)
        return LayerOutputs(cls=cls, ap=ap, tokens=tokens, dims=self.dims, regions=pooled,
                            grid=grid, num_prefix_tokens=p, pool=pool)

    def patch_grid(self, images: torch.Tensor, num_patches: int) -> tuple[int, int] | None:
        """(rows, columns) of patches for images (B, 3, H, W); None where the patch tokens do not
        form that grid (a model that pads or resamples its input)."""
        if self.patch_size is not None:
            grid = (images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1])
        else:
            side = round(num_patches ** 0.5)
            grid = (side, side)
        return grid if grid[0] * grid[1] == num_patches else None


def region_pool(patches: torch.Tensor, grid: tuple[int, int] | None, k: int) -> torch.Tensor:
    """patches (B, rows*cols, D) in row-major grid order -> (B, k*k, D) region means, row-major.

    adaptive_avg_pool2d semantics: region i of k spans rows floor(i*rows/k) .. ceil((i+1)*rows/k)
    (columns likewise), so when k does not divide the grid the regions have unequal sizes (and
    neighbours may share a row or column of patches); when it divides, they tile the grid.
    """
    if grid is None:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form the input's patch grid "
                         "(the model pads or resamples its input): region tokens need one")
    rows, cols = grid
    if k > min(rows, cols):
        raise ValueError(f"probe.regions={k} exceeds the {rows} x {cols} patch grid: use "
                         f"probe.regions<={min(rows, cols)} or a larger input size")
    B, _, D = patches.shape
    image = patches.transpose(1, 2).reshape(B, D, rows, cols)
    return F.adaptive_avg_pool2d(image, k).flatten(2).transpose(1, 2)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of x to ``width``."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
