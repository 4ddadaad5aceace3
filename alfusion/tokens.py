"""TokenSet: which layers and token kinds a probe sees, and how they are stacked.

Layers are numbered 1..L (L = the final output). Every vector is L2-normalised in its own
dimension and zero-padded to the widest layer (normalising after padding is the same, since
zeros add nothing to the norm). Token order: CLS tokens (in layer order), then AP tokens, then
the pool token, then region tokens layer by layer (k x k per layer, row-major); or, for
``all``, every token of the first requested layer, then of the next.

CLS is the class token and exists only where the model has one; ``pool`` is one token, the
output of the model's pooling head (MAP / attention pool) on the final layer, where it has one
(docs/backbones.md: a model without a class token, such as SigLIP, probes AP + pool).

``backbone_arrays`` is the one place where a backbone's output becomes the arrays a TokenSet
reads, so that cached features (extraction) and live ones (mode=end2end) are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOKEN_KINDS = ("cls", "ap", "cls+ap", "all",
               "regions", "cls+regions", "ap+regions", "cls+ap+regions",
               "pool", "ap+pool", "cls+ap+pool")


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

    layers: layer numbers 1..L; tokens: one of TOKEN_KINDS (``all``: every token of each layer;
    ``regions``: k x k average-pooled patch regions per layer; ``pool``: one token, the pooling
    head's output of the final layer, whatever the layers); regions: k for region kinds;
    flat: concatenate into one vector per sample (linear probes), dropping padding.
    """

    layers: tuple[int, ...]
    tokens: str = "cls+ap"
    flat: bool = False
    regions: int | None = None

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {self.tokens!r}: use one of {TOKEN_KINDS}")
        if self.has_regions and not (isinstance(self.regions, int) and self.regions >= 1):
            raise ValueError(f"probe.tokens={self.tokens} needs probe.regions=k (regions per "
                             f"side, e.g. 2 or 4), not {self.regions!r}")
        if self.regions and not self.has_regions:
            raise ValueError(f"probe.regions={self.regions} is set but probe.tokens="
                             f"{self.tokens} has no regions: use probe.tokens="
                             f"{'regions' if self.tokens == 'all' else self.tokens + '+regions'}"
                             " or probe.regions=null")

    @property
    def kinds(self) -> list[str]:
        """The token kinds in stacking order: a subset of cls, ap, pool, regions; or [all]."""
        return self.tokens.split("+")

    @property
    def has_regions(self) -> bool:
        return "regions" in self.kinds

    @property
    def is_spatial(self) -> bool:
        """True when the probe sees patch-level tokens (all tokens or regions), not only CLS/AP."""
        return self.tokens == "all" or self.has_regions

    @property
    def token_layers(self) -> list[int] | None:
        """The layers whose every token is needed (tokens=all), else None."""
        return list(self.layers) if self.tokens == "all" else None

    def num_tokens(self, tokens_per_layer: int | None = None) -> int:
        """T: the number of stacked tokens; ``all`` needs the tokens per layer (1 + prefix +
        patches)."""
        if self.tokens == "all":
            return len(self.layers) * tokens_per_layer
        return sum(self._count(kind) for kind in self.kinds)

    def _per_layer(self, kind: str) -> int:
        return self.regions ** 2 if kind == "regions" else 1

    def _count(self, kind: str) -> int:
        """Tokens of one kind: one per layer (k*k for regions); the pool token once."""
        return 1 if kind == "pool" else len(self.layers) * self._per_layer(kind)

    def token_widths(self, dims: list[int], tokens_per_layer: int | None = None) -> list[int]:
        """The true width of each of the T stacked tokens, in stacking order."""
        layer_dims = [dims[i - 1] for i in self.layers]
        if self.tokens == "all":
            return [d for d in layer_dims for _ in range(tokens_per_layer)]
        return [d for kind in self.kinds
                for d in ([dims[-1]] if kind == "pool" else layer_dims)
                for _ in range(self._per_layer(kind))]

    def __call__(self, cls: torch.Tensor | None, ap: torch.Tensor | None,
                 tokens: torch.Tensor | None = None, dims: list[int] | None = None,
                 regions: torch.Tensor | None = None, pool: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """cls, ap: (N, L, D) per-layer vectors; tokens: (N, len(layers), T, D) all tokens of the
        token set's layers (or (N, T, D) of the last layer); regions: (N, L, k*k, D); pool:
        (N, 1, D) the pooling head's output.

        Returns (N, T', D) float32, or (N, sum of true widths) when flat.
        """
        if self.tokens == "all":
            if tokens is None:
                raise ValueError("probe.tokens=all needs the all-token array: extract the cache "
                                 "(or run the backbone) with this probe's settings")
            per_layer = tokens.shape[-2]
            x = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).float()
        else:
            per_layer = None
            idx = [i - 1 for i in self.layers]
            arrays = dict(cls=cls, ap=ap, regions=regions, pool=pool)
            missing = [k for k in self.kinds if arrays[k] is None]
            if missing:
                raise ValueError(f"probe.tokens={self.tokens} needs the {missing} arrays: the "
                                 "features were extracted without them (or the backbone has "
                                 "no such token)")
            parts = [arrays[kind] if kind == "pool" else arrays[kind][:, idx].flatten(1, -2)
                     for kind in self.kinds]
            x = torch.cat(parts, dim=1).float()
        x = F.normalize(x, dim=-1)
        if not self.flat:
            return x
        widths = self.token_widths(dims or [x.shape[-1]] * max(self.layers), per_layer)
        if all(w == x.shape[-1] for w in widths):
            return x.flatten(1)
        return torch.cat([x[:, t, :w] for t, w in enumerate(widths)], dim=1)

    def from_arrays(self, arrays: dict[str, torch.Tensor], dims: list[int]) -> torch.Tensor:
        """The stacked tokens from a dict of arrays named as in the cache (cls, ap, tokens,
        regions, pool): see ``__call__``."""
        return self(arrays.get("cls"), arrays.get("ap"), arrays.get("tokens"), dims,
                    regions=arrays.get("regions"), pool=arrays.get("pool"))

    def width(self, dims: list[int], num_patch_tokens: int | None = None) -> int:
        """The input width a probe sees: D, or the flat length (``all``: tokens per layer)."""
        if not self.flat:
            return max(dims)
        return sum(self.token_widths(dims, num_patch_tokens))


def build_token_set(probe_cfg, num_layers: int) -> TokenSet:
    """The TokenSet of a ``conf/probe`` config for a backbone of ``num_layers`` layers."""
    layers = resolve_layers(probe_cfg.layers, num_layers)
    return TokenSet(tuple(layers), probe_cfg.tokens, flat=probe_cfg.kind == "linear",
                    regions=probe_cfg.get("regions"))


def backbone_arrays(backbone, images: torch.Tensor, token_set: TokenSet
                    ) -> dict[str, torch.Tensor]:
    """One forward of a TappedBackbone -> the arrays ``token_set`` reads, named as in the cache.

    cls, ap: (B, L, D) of every layer (cls only where the model has a class token); pool:
    (B, 1, D) where it has a pooling head; tokens: (B, len(layers), T, D) all tokens of the
    token set's layers (tokens=all only); regions: (B, L, k*k, D) of every layer (region kinds
    only).
    Extraction stores these; mode=end2end stacks them with ``token_set.from_arrays``.
    """
    out = backbone(images, token_layers=token_set.token_layers,
                   regions=token_set.regions if token_set.has_regions else None)
    arrays = dict(ap=out.ap) if out.cls is None else dict(cls=out.cls, ap=out.ap)
    if out.pool is not None:
        arrays["pool"] = out.pool
    if out.tokens is not None:
        arrays["tokens"] = out.tokens
    if out.regions is not None:
        arrays["regions"] = out.regions
    return arrays
