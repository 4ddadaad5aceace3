"""The TokenEncoder: images -> the probe's tokens, inside the engine's training step.

``TokenEncoder`` maps images to exactly the tokens cached mode stores and stacks (the same
TappedBackbone and TokenSet), so a probe trained end to end is the same model as one trained on
the cache. Frozen (the default), the backbone stays in eval mode and runs without autograd;
``trainable`` makes it the fine-tuning baseline's backbone, with its pretrained weights kept so
every fit starts from them.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from alfusion.backbones import TappedBackbone
from alfusion.tokens import TokenSet, backbone_arrays


class TokenEncoder(nn.Module):
    """images (B, 3, H, W) -> tokens (B, T, D), or (B, F) for a flat token set."""

    def __init__(self, backbone: TappedBackbone, token_set: TokenSet,
                 trainable: bool = False, bf16: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.token_set = token_set
        self.trainable = trainable
        self.bf16 = bf16  # bf16 autocast on CUDA; CPU always runs fp32
        # Only a trainable backbone changes; its pretrained weights are kept (on the host) so that
        # every fit starts from them.
        self.pretrained = ({k: v.detach().clone().cpu() for k, v in backbone.state_dict().items()}
                           if trainable else None)
        self.pretrained_checksum = state_checksum(backbone)
        self.reset()

    def reset(self) -> None:
        """Restore the pretrained weights; freeze them unless the encoder is trainable."""
        if self.pretrained is not None:
            self.backbone.load_state_dict(self.pretrained)
        self.backbone.requires_grad_(self.trainable)
        self.backbone.train(self.trainable and self.training)

    def train(self, mode: bool = True) -> TokenEncoder:
        super().train(mode)
        self.backbone.train(mode and self.trainable)  # a frozen backbone is always in eval mode
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (timm models) to fit larger batches."""
        model = self.backbone.model
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing: "
                             "set probe.grad_checkpointing=false")
        model.set_grad_checkpointing(enable)

    def _autocast(self, images: torch.Tensor):
        if self.bf16 and images.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grad = self.trainable and torch.is_grad_enabled()
        # no_grad rather than inference_mode: the probe saves these tokens for its backward.
        with torch.set_grad_enabled(grad), self._autocast(images):
            arrays = backbone_arrays(self.backbone, images, self.token_set)
        return self.token_set.from_arrays(arrays, self.backbone.dims)


def state_checksum(module: nn.Module) -> str:
    """sha256 over the state dict (names and bytes, in order): equal iff the weights are."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
