"""Probes and their construction from a ``conf/probe`` config."""

from __future__ import annotations

from torch import nn

from alfusion.probes.attentive import AttentiveProbe
from alfusion.probes.bank import ProbeBank
from alfusion.probes.linear import LinearProbe
from alfusion.tokens import TokenSet, resolve_layers

__all__ = ["AttentiveProbe", "LinearProbe", "ProbeBank", "build_probe", "build_token_set"]


def build_token_set(probe_cfg, num_layers: int) -> TokenSet:
    layers = resolve_layers(probe_cfg.layers, num_layers)
    if probe_cfg.tokens == "all" and layers != [num_layers]:
        # The cache holds all tokens of the final output only; other layers would be ignored.
        raise ValueError(f"probe.tokens=all uses the final output only, but probe.layers="
                         f"{probe_cfg.layers}: set probe.layers=last")
    return TokenSet(tuple(layers), probe_cfg.tokens, flat=probe_cfg.kind == "linear")


def build_probe(probe_cfg, token_set: TokenSet, dims: list[int], num_classes: int,
                num_tokens: int, attn_drop: float = 0.0) -> nn.Module:
    """A fresh probe for inputs of ``num_tokens`` tokens (attentive) or a flat vector (linear).

    Attentive probes default to one head per token (the paper's ALF); head_dim doubles D // H.
    """
    if probe_cfg.kind == "linear":
        return LinearProbe(token_set.width(dims, num_tokens), num_classes)
    if probe_cfg.kind == "attentive":
        heads = probe_cfg.get("num_heads") or num_tokens
        return AttentiveProbe(max(dims), num_classes, num_heads=heads,
                              head_dim=probe_cfg.get("head_dim"), attn_drop=attn_drop)
    raise ValueError(f"unknown probe kind {probe_cfg.kind!r}: use linear or attentive")
