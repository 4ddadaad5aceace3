"""The paper's formulation of the attentive probe, every token projected: the tests' oracle
for the reassociated math of alfusion/probes/functional.py."""

from __future__ import annotations

import torch

from alfusion.probes import AttentiveProbe


def attention_reference(probe: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, H, T) of ``probe`` on tokens x (B, T, D)."""
    B, T, _ = x.shape
    q = probe.q(probe.norm_q(probe.query)).view(1, probe.num_heads, 1, probe.head_dim)
    k = probe.k(probe.norm_k(x)).view(B, T, probe.num_heads, probe.head_dim).transpose(1, 2)
    return ((q @ k.transpose(-2, -1)) * probe.scale).softmax(dim=-1).squeeze(2)


def forward_reference(probe: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, C): q/k/v projections of every token, attention, projection, BN, head."""
    B, T, _ = x.shape
    v = probe.v(probe.norm_v(x)).view(B, T, probe.num_heads, probe.head_dim).transpose(1, 2)
    attn = probe.attn_drop(attention_reference(probe, x)).unsqueeze(2)  # (B, H, 1, T)
    out = (attn @ v).transpose(1, 2).reshape(B, -1)
    return probe.head(probe.bn(probe.proj(out)))
