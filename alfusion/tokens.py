"""TokenSet: which layers and token kinds a probe sees, and how they are stacked.

Layers are numbered 1..L (L = the final output). Every vector is L2-normalised in its own
dimension and zero-padded to the widest layer (normalising after padding is the same, since
zeros add nothing to the norm), then CLS tokens (in layer order) are followed by AP tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOKEN_KINDS = ("cls", "ap", "cls+ap", "all")


def resolve_layers(spec, num_layers: int) -> list[int]:
    """A layer-set name (all | last | middle_last | quarterly) or an explicit list -> numbers.

    For L = 12: all = 1..12, last = [12], middle_last = [6, 12], quarterly = [3, 6, 9, 12].
    """
    L = num_layers
    if isinstance(spec, str):
        named = {
            "all": list(range(1, L + 1)),
            "last": [L],
            "middle_last": [L // 2, L],
            "quarterly": [L // 4, L // 2, 3 * L // 4, L],
        }
        if spec not in named:
            raise ValueError(f"unknown layer set {spec!r}: use one of {sorted(named)} or a list")
        return named[spec]
    layers = [int(i) for i in spec]
    bad = [i for i in layers if not 1 <= i <= L]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} outside 1..{L} (layer {L} is the final output)")
    return layers


@dataclass(frozen=True)
class TokenSet:
    """Selects, normalises and stacks tokens.

    layers: layer numbers 1..L; tokens: cls | ap | cls+ap | all (all tokens of the last layer);
    flat: concatenate into one vector per sample (linear probes), dropping padding.
    """

    layers: tuple[int, ...]
    tokens: str = "cls+ap"
    flat: bool = False

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {self.tokens!r}: use one of {TOKEN_KINDS}")

    def num_tokens(self, num_patch_tokens: int | None = None) -> int:
        if self.tokens == "all":
            return num_patch_tokens
        return len(self.layers) * (2 if self.tokens == "cls+ap" else 1)

    def __call__(self, cls: torch.Tensor | None, ap: torch.Tensor | None,
                 tokens: torch.Tensor | None = None, dims: list[int] | None = None
                 ) -> torch.Tensor:
        """cls, ap: (N, L, D) per-layer vectors; tokens: (N, T, D) all last-layer tokens.

        Returns (N, T', D) float32, or (N, sum of true widths) when flat.
        """
        if self.tokens == "all":
            x = tokens.float()
            widths = [x.shape[-1]] * x.shape[1]
        else:
            idx = [i - 1 for i in self.layers]
            parts = []
            if self.tokens in ("cls", "cls+ap"):
                parts.append(cls[:, idx])
            if self.tokens in ("ap", "cls+ap"):
                parts.append(ap[:, idx])
            x = torch.cat(parts, dim=1).float()
            layer_dims = [dims[i] for i in idx] if dims else [x.shape[-1]] * len(idx)
            widths = layer_dims * len(parts)
        x = F.normalize(x, dim=-1)
        if not self.flat:
            return x
        if all(w == x.shape[-1] for w in widths):
            return x.flatten(1)
        return torch.cat([x[:, t, :w] for t, w in enumerate(widths)], dim=1)

    def width(self, dims: list[int], num_patch_tokens: int | None = None) -> int:
        """The input width a probe sees: D, or the flat length."""
        if not self.flat:
            return max(dims)
        if self.tokens == "all":
            return dims[-1] * num_patch_tokens
        per_layer = [dims[i - 1] for i in self.layers]
        return sum(per_layer) * (2 if self.tokens == "cls+ap" else 1)
