"""The ALF probe: one cross-attention block with a learned query (CAE style).

Parameters are the paper's: query (1, 1, D); LayerNorms on q, k, v; q/k/v projections
D -> A = H * head_dim without bias (head_dim = 2 * (D // H)); output projection A -> D with
bias; BatchNorm1d(D) then Linear(D, C). 4*D*A + 10*D + C*(D+1) parameters.

``forward`` computes the same function with reassociated single-query attention. For head h
with k_t = W_k^h LN_k(x_t), the score q_h . k_t equals (W_k^h^T q_h) . LN_k(x_t): the query is
projected back into token space once per step, and, because LN_k(x_t) = xhat_t * g + b, the
bias term q_h . W_k^h b is the same for every t and cancels in the softmax. Likewise
sum_t a_t W_v^h LN_v(x_t) = W_v^h (g * sum_t a_t xhat_t + b * sum_t a_t): tokens are weighted
first and projected once per head. Per sample this costs O(H*T*D + D*A) instead of O(T*D*A).
``forward_reference`` is the straightforward formulation, kept for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def _heads(self, w: torch.Tensor) -> torch.Tensor:
        """A projection weight (A, D) -> (H, head_dim, D)."""
        return w.view(self.num_heads, self.head_dim, self.dim)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> (softmax attention (B, H, T), normalised tokens xhat (B, T, D))."""
        eps = self.norm_k.eps
        xhat = F.layer_norm(x, (self.dim,), eps=eps)  # LN statistics shared by k and v
        q = self.q(self.norm_q(self.query)).view(self.num_heads, self.head_dim)  # (H, hd)
        # Query mapped back into token space and scaled by LN_k's gain: (H, D).
        u = torch.einsum("he,hed->hd", q, self._heads(self.k.weight)) * self.norm_k.weight
        scores = torch.einsum("btd,hd->bht", xhat, u) * self.scale
        return scores.softmax(dim=-1), xhat

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> attention-pooled vector after the output projection (B, D)."""
        attn, xhat = self.attention(x)
        attn = self.attn_drop(attn)
        z = torch.einsum("bht,btd->bhd", attn, xhat)  # weighted normalised tokens
        z = z * self.norm_v.weight + attn.sum(-1, keepdim=True) * self.norm_v.bias
        out = torch.einsum("bhd,hed->bhe", z, self._heads(self.v.weight))  # (B, H, hd)
        return self.proj(out.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.pool(x)))

    def attention_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formulation of the attention weights: (B, T, D) -> (B, H, T)."""
        B, T, _ = x.shape
        q = self.q(self.norm_q(self.query)).view(1, self.num_heads, 1, self.head_dim)
        k = self.k(self.norm_k(x)).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1).squeeze(2)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formulation, projecting every token: (B, T, D) -> (B, C)."""
        B, T, _ = x.shape
        v = self.v(self.norm_v(x)).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        attn = self.attn_drop(self.attention_reference(x)).unsqueeze(2)  # (B, H, 1, T)
        out = (attn @ v).transpose(1, 2).reshape(B, -1)
        return self.head(self.bn(self.proj(out)))
