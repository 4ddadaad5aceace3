"""The ALF probe: one cross-attention block with a learned query (CAE style).

Parameters are the paper's: query (1, 1, D); LayerNorms on q, k, v; q/k/v projections
D -> A = H * head_dim without bias (head_dim = 2 * (D // H)); output projection A -> D with
bias; BatchNorm1d(D) then Linear(D, C). 4*D*A + 10*D + C*(D+1) parameters.

``forward`` computes the same function with reassociated single-query attention
(probes/functional.py, the math every probe fit uses). For head h with k_t = W_k^h LN_k(x_t),
the score q_h . k_t equals (W_k^h^T q_h) . LN_k(x_t): the query is projected back into token
space once per step, and, because LN_k(x_t) = xhat_t * g + b, the bias term q_h . W_k^h b is
the same for every t and cancels in the softmax. Likewise
sum_t a_t W_v^h LN_v(x_t) = W_v^h (g * sum_t a_t xhat_t + b * sum_t a_t): tokens are weighted
first and projected once per head. Per sample this costs O(H*T*D + D*A) instead of O(T*D*A).
The straightforward formulation is kept in tests/oracle.py as the tests' oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from alfusion.probes.functional import (
    AttentiveSpec,
    attention_weights,
    attentive_logits,
    normalise_tokens,
)


class AttentiveProbe(nn.Module):
    """x: (B, T, D) tokens -> logits (B, C)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, head_dim: int | None = None,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or 2 * (dim // num_heads)
        inner = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.query, std=0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.bn = nn.BatchNorm1d(dim, affine=True)
        self.head = nn.Linear(dim, num_classes)

    @property
    def spec(self) -> AttentiveSpec:
        return AttentiveSpec(self.dim, self.num_heads, self.head_dim, self.scale,
                             self.norm_q.eps, self.norm_k.eps, self.bn.eps, self.bn.momentum)

    def _stacked(self) -> tuple[dict, dict]:
        """(parameters, buffers) as the functional math takes them: (1, *shape) views."""
        params = {n: p.unsqueeze(0) for n, p in self.named_parameters()}
        buffers = {n: b.unsqueeze(0) for n, b in self.named_buffers()}
        return params, buffers

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> (softmax attention (B, H, T), normalised tokens xhat (B, T, D))."""
        params, _ = self._stacked()
        xhat = normalise_tokens(self.spec, x)
        return attention_weights(self.spec, params, xhat)[0], xhat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> logits (B, C): the bank's forward with G = 1, so a probe computes
        what it computed while it was trained (in training mode BatchNorm's running
        statistics update in place, and dropout draws from torch's generator)."""
        params, buffers = self._stacked()
        drop = None
        if self.training and self.attn_drop.p > 0:  # the dropout module draws the multipliers
            drop = self.attn_drop(torch.ones((1, x.shape[0], self.num_heads, x.shape[1]),
                                             device=x.device))
        return attentive_logits(self.spec, params, buffers, normalise_tokens(self.spec, x),
                                self.training, drop)[0]
