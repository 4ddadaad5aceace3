"""Many linear heads trained together: one head per (token position, configuration).

Heads are grouped by hyper-parameters; group g holds a weight (P_g, D, C) and a bias (P_g, C)
for the token positions ``heads`` it owns, and one AdamW param group with its lr and weight
decay. Every step all heads see the same batch; each head's logits are its own token times its
own weight (a batched matmul), the loss is the sum of the heads' class-weighted cross-entropies
(so each head gets exactly the gradient it would get alone), and gradients are clipped per head.
The schedule is PROTOCOL.md 3 (the helpers of alfusion.training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alfusion.training import (
    MIN_LR,
    FeatureBatches,
    HParams,
    batch_size_for,
    class_weights,
    epochs_for,
    jitter,
)

CLIP_NORM = 5.0


@dataclass
class HeadGroup:
    """Heads at token positions ``heads`` trained with ``hp``: weight (P_g, D, C), bias (P_g, C)."""

    hp: HParams
    heads: list[int]
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, D) tokens of all positions -> (P_g, B, C) logits of this group's heads."""
        return torch.einsum("bpd,pdc->pbc", x[:, self.heads], self.weight) + self.bias[:, None]


def new_group(hp: HParams, heads: list[int], dim: int, num_classes: int,
              device: torch.device) -> HeadGroup:
    """nn.Linear's initialisation: U(-1/sqrt(D), 1/sqrt(D)) for weight and bias."""
    bound = 1 / math.sqrt(dim)
    w = torch.empty(len(heads), dim, num_classes, device=device).uniform_(-bound, bound)
    b = torch.empty(len(heads), num_classes, device=device).uniform_(-bound, bound)
    return HeadGroup(hp, list(heads), w.requires_grad_(), b.requires_grad_())


def clip_per_head(groups: list[HeadGroup], max_norm: float = CLIP_NORM) -> None:
    """Scale each head's gradient (its weight and bias slices) to norm <= max_norm, as
    clip_grad_norm_ would for that head alone."""
    for g in groups:
        norm = (g.weight.grad.pow(2).sum(dim=(1, 2)) + g.bias.grad.pow(2).sum(dim=1)).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        g.weight.grad.mul_(coef[:, None, None])
        g.bias.grad.mul_(coef[:, None])


def train_heads(plan: list[tuple[HParams, list[int]]], x: torch.Tensor, y: torch.Tensor,
                num_classes: int, train_cfg, seed: int) -> list[HeadGroup]:
    """Train fresh heads for ``plan`` ([(hp, token positions)]) on x (N, P, D), y (N,)."""
    torch.manual_seed(seed)
    groups = [new_group(hp, heads, x.shape[-1], num_classes, x.device) for hp, heads in plan]
    return train_groups(groups, x, y, num_classes, train_cfg, seed)


def train_groups(groups: list[HeadGroup], x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 train_cfg, seed: int) -> list[HeadGroup]:
    """Train ``groups`` in place on x (N, P, D), y (N,); batches drawn as fit_probe draws them."""
    for g in groups:
        g.weight.requires_grad_(True)
        g.bias.requires_grad_(True)
    opt = torch.optim.AdamW(
        [dict(params=[g.weight, g.bias], lr=g.hp.lr, weight_decay=g.hp.wd) for g in groups],
        betas=(0.9, 0.999))
    batch = batch_size_for(len(y), train_cfg.batch_size, train_cfg.min_batches)
    batches = FeatureBatches(x, y, batch, shuffle=True, seed=seed)
    steps = len(batches) * epochs_for(len(y), batch, train_cfg.epochs, train_cfg.min_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=MIN_LR)
    weights = class_weights(y, num_classes).to(x.device)
    step = 0
    while step < steps:
        for xb, yb in batches:
            xb = jitter(xb, train_cfg.jitter_p, train_cfg.jitter_sigma)
            norm = weights[yb].sum()  # weighted mean, as F.cross_entropy(weight=...) takes it
            loss = 0.0
            for g in groups:
                logits = g.logits(xb).flatten(0, 1)  # (P_g * B, C), head-major
                loss = loss + F.cross_entropy(logits, yb.repeat(len(g.heads)), weight=weights,
                                              reduction="sum") / norm
            opt.zero_grad(set_to_none=False)
            loss.backward()
            clip_per_head(groups)
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    for g in groups:
        g.weight.requires_grad_(False)
        g.bias.requires_grad_(False)
    return groups


@torch.no_grad()
def head_logits(groups: list[HeadGroup], x: torch.Tensor, batch_size: int = 4096
                ) -> dict[tuple[HParams, int], torch.Tensor]:
    """(hp, token position) -> logits (N, C) of that head on x (N, P, D)."""
    out: dict[tuple[HParams, int], list[torch.Tensor]] = {}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        for g in groups:
            for head, logits in zip(g.heads, g.logits(xb), strict=True):
                out.setdefault((g.hp, head), []).append(logits)
    return {k: torch.cat(v) for k, v in out.items()}
