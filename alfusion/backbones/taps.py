"""Layer taps: one forward pass of a ViT yields the tokens of every tapped layer.

A tap is a forward hook on a named module. The paper taps the MLP input of each block
(``blocks.{i}.norm2`` in timm, ``resblocks.{i}.ln_2`` in OpenCLIP) plus the model's final
output; the residual stream (block output) is the other option. Layers are numbered 1..L as in
the paper: layers 1..L-1 are blocks 1..L-1 (block 0 is never used), layer L is the final output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerOutputs:
    """Per-layer pooled tokens of one batch.

    cls: (B, L, D) token 0 of every tapped layer, zero-padded on the right to the widest layer.
    ap: (B, L, D) mean of the patch tokens (all prefix tokens excluded), padded likewise.
    tokens: (B, L, N_tok, D) all tokens of every tapped layer (padded), when requested, else None.
    dims: true width of every layer (only OpenCLIP's projected output is narrower).
    """

    cls: torch.Tensor
    ap: torch.Tensor
    tokens: torch.Tensor | None
    dims: list[int]


class TappedBackbone(nn.Module):
    """A frozen ViT with forward hooks on the modules named in ``tap_names``.

    ``tap_names`` lists one module per layer, in layer order ("" is the model itself). ``run``
    calls the model's feature forward (no classification head); the hooks record what each
    tapped module returned, (B, N_tok, D) in every supported family.
    """

    def __init__(
        self,
        model: nn.Module,
        run,
        tap_names: list[str],
        num_prefix_tokens: int,
        dims: list[int],
    ) -> None:
        super().__init__()
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

    def forward(self, images: torch.Tensor, all_tokens: bool = False) -> LayerOutputs:
        """images: (B, 3, H, W) -> LayerOutputs for every tapped layer."""
        self._captured.clear()
        self._recording = True
        try:
            self._run(images)
            layers = [self._captured[name] for name in self.tap_names]
        finally:
            self._recording = False
            self._captured.clear()
        width = self.width
        p = self.num_prefix_tokens
        cls = torch.stack([_pad(t[:, 0], width) for t in layers], dim=1)
        ap = torch.stack([_pad(t[:, p:].mean(dim=1), width) for t in layers], dim=1)
        tokens = torch.stack([_pad(t, width) for t in layers], dim=1) if all_tokens else None
        return LayerOutputs(cls=cls, ap=ap, tokens=tokens, dims=self.dims)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of x to ``width``."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
