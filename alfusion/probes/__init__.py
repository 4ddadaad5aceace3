"""Probes and their construction from a ``conf/probe`` config."""

from __future__ import annotations

from torch import nn

from alfusion.probes.attentive import AttentiveProbe
from alfusion.probes.bank import ProbeBank
from alfusion.probes.linear import LinearProbe
from alfusion.tokens import TokenSet, build_token_set

__all__ = ["AttentiveProbe", "LinearProbe", "ProbeBank", "build_probe", "build_token_set"]


# Heads of an attentive probe whose config leaves num_heads null and whose tokens are spatial
# (all tokens or regions: hundreds to thousands of tokens): AAT's 8. One head per token, the
# paper's rule for ALF's 2L tokens, would give heads of 2 * (D // T) dimensions or fewer (none at
# all once T > D), and the probe's size A = H * 2 * (D // H) stays about 2D either way.
SPATIAL_HEADS = 8


def attentive_heads(probe_cfg, token_set: TokenSet, num_tokens: int) -> int:
    """probe.num_heads where given; else one head per token for CLS/AP token sets (the paper's
    ALF: up to 2L tokens) and SPATIAL_HEADS for all-token and region token sets."""
    if probe_cfg.get("num_heads"):
        return int(probe_cfg.num_heads)
    return SPATIAL_HEADS if token_set.is_spatial else num_tokens


def build_probe(probe_cfg, token_set: TokenSet, dims: list[int], num_classes: int,
                num_tokens: int, attn_drop: float = 0.0) -> nn.Module:
    """A fresh probe for inputs of ``num_tokens`` tokens (attentive) or a flat vector (linear).

    Attentive probes: heads from ``attentive_heads`` (ALF: one per token); head_dim doubles
    D // H.
    """
    if probe_cfg.kind == "linear":
        return LinearProbe(token_set.width(dims, num_tokens), num_classes)
    if probe_cfg.kind == "attentive":
        heads = attentive_heads(probe_cfg, token_set, num_tokens)
        return AttentiveProbe(max(dims), num_classes, num_heads=heads,
                              head_dim=probe_cfg.get("head_dim"), attn_drop=attn_drop)
    raise ValueError(f"unknown probe kind {probe_cfg.kind!r}: use linear or attentive")
