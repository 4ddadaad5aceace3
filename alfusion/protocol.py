"""The paper's training recipe, each rule defined once (docs/protocol.md, training).

Everything that trains a probe (the engine, for grids, refits, end-to-end and fine-tuning fits,
and the per-layer analysis) takes its rules from here: the configuration (``HParams``), the
batch and step plan, class weights, the AdamW constants, the per-step cosine schedule, gradient
clipping, and what a non-finite loss means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alfusion.native import GradParts, clipped_adamw

BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, as the paper uses them
ADAM_EPS = 1e-8
MIN_LR = 1e-6  # the cosine schedule's floor, reached at the last step (no warm-up)
CLIP_NORM = 5.0  # gradient-norm clipping, per probe
MIN_BATCH = 2  # BatchNorm needs two samples; the paper's rule can give a batch of 1


@dataclass(frozen=True)
class HParams:
    """One configuration of the search grid."""

    lr: float
    wd: float
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},wd={self.wd:g},dropout={self.dropout:g}"


class NonFiniteLoss(FloatingPointError):
    """Training diverged; the message names the configuration."""


def batch_size_for(n: int, max_batch: int = 2048, min_batches: int = 5) -> int:
    """The largest batch <= max_batch giving at least ``min_batches`` batches per epoch
    whose last batch is at least half full (or exactly full); never below MIN_BATCH.

    For fewer than 2 * min_batches samples the rule alone would give a batch of 1, on which
    BatchNorm cannot train: such fits take the smallest batch >= 2 that leaves no batch of one
    sample (docs/protocol.md, deviations)."""
    if n < MIN_BATCH:
        raise ValueError(f"a fit needs at least {MIN_BATCH} samples, got {n}: use more data "
                         "or a larger fewshot_k")
    bs = max(1, min(max_batch, n // min_batches))
    while bs > 1 and 0 < n % bs < bs / 2:
        bs -= 1
    bs = max(bs, MIN_BATCH)
    while n % bs == 1:  # no step may see a single sample
        bs += 1
    return bs


@dataclass(frozen=True)
class BatchPlan:
    """How a fit walks its data: ``batch`` samples per step (global over ranks),
    ``per_epoch`` steps per epoch, ``steps`` in all."""

    batch: int
    per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.per_epoch * self.epochs


def batch_plan(n: int, max_batch: int, min_batches: int, epochs: int, min_steps: int,
               world: int = 1) -> BatchPlan:
    """The protocol's plan for n samples: the batch rule, then ``epochs`` raised so that the
    fit takes at least ``min_steps`` optimiser steps. With ``world`` ranks sharing a batch,
    the batch is a multiple of world and each rank drops its n // world remainder."""
    batch = batch_size_for(n, max_batch, min_batches)
    if world > 1:
        batch = max(world * MIN_BATCH, batch - batch % world)
    per_rank = n // world
    per_epoch = math.ceil(per_rank / (batch // world))
    return BatchPlan(batch, per_epoch, max(epochs, math.ceil(min_steps / per_epoch)))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order (n,) of epoch ``epoch`` of a fit: the same seed, the same batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c), K the number of classes present; absent classes weigh 0."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), 0.0)
    return w.float()


def cosine_lrs(base_lrs: Sequence[float], total_steps: int, eta_min: float = MIN_LR
               ) -> torch.Tensor:
    """(total_steps, G) float64: the lr used at each step, by torch's CosineAnnealingLR
    recursion (T_max = total_steps) stepped once per optimiser step, so a bank's schedule is,
    number for number, the one torch.optim gives a probe trained alone."""
    lrs = torch.empty(total_steps, len(base_lrs), dtype=torch.float64)
    T = total_steps
    for g, base in enumerate(base_lrs):
        lr = float(base)
        for s in range(total_steps):
            if s > 0:
                if (s - 1 - T) % (2 * T) == 0:
                    lr = lr + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
                else:
                    lr = ((1 + math.cos(math.pi * s / T)) / (1 + math.cos(math.pi * (s - 1) / T))
                          * (lr - eta_min) + eta_min)
            lrs[s, g] = lr
    return lrs


def _per_probe(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def probe_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The total gradient norm of each probe, as clip_grad_norm_ computes it for that probe
    alone: grads (G, ...) tensors -> (G,)."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)
    return torch.linalg.vector_norm(norms, dim=1)


@torch.no_grad()
def clip_per_probe(grads: Sequence[torch.Tensor], max_norm: float = CLIP_NORM) -> torch.Tensor:
    """Scale each probe's gradients as torch.nn.utils.clip_grad_norm_ would for that probe
    alone. grads: (G, ...) tensors -> the per-probe total norms (G,) before clipping."""
    total = probe_norms(grads)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_probe(coef, g))
    return total


@torch.no_grad()
def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], step: int,
               decay: torch.Tensor, step_size: torch.Tensor) -> None:
    """torch.optim.AdamW's update (single-tensor path) on stacked (G, ...) tensors.

    step: the step number after increment (1, 2, ...); decay = 1 - lr * wd and
    step_size = lr / (1 - beta1^step), both (G,), computed in float64 like torch's Python
    scalars and then cast to the parameters' dtype.
    """
    beta1, beta2 = BETAS
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p.mul_(_per_probe(decay, p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        p.add_(m.div(denom).mul_(_per_probe(-step_size, p)))


def clip_divisors(grads: Sequence[torch.Tensor], max_norm: float = CLIP_NORM) -> torch.Tensor:
    """Per probe, what its gradients are divided by to clip them at ``max_norm``
    (clip_grad_norm_'s rule): (total norm + 1e-6) / max_norm where that exceeds 1, else 1.
    grads: (G, ...) tensors -> (G,) float32. ``fused_adamw`` divides by it as it reads them."""
    return ((probe_norms(grads) + 1e-6) / max_norm).clamp(min=1.0).float()


@torch.no_grad()
def fused_adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                step: torch.Tensor, lr: float, wd: float,
                clip: torch.Tensor | None = None) -> None:
    """One AdamW update of ONE probe's tensors, torch.optim.AdamW(fused=True)'s kernel: every
    tensor read and written once (clipping, decay, both moments and the step in one pass).

    step: a float32 tensor holding the step number after increment (1, 2, ...); lr, wd: the
    probe's lr at this step and its weight decay (Python floats: the kernel forms 1 - lr * wd
    and lr / (1 - beta1^step) in float64, as ``adamw_step`` does); clip: a one-element
    float32 tensor, the gradients' divisor (``clip_divisors``), or None. Grads are
    overwritten by their clipped values. Tensors must be contiguous."""
    if not params:
        return
    torch._fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [],
                        [step] * len(params), lr=lr, beta1=BETAS[0], beta2=BETAS[1],
                        weight_decay=wd, eps=ADAM_EPS, amsgrad=False, maximize=False,
                        grad_scale=clip, found_inf=None)


def native_adamw(params: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor | GradParts],
                 exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                 step: int, lr: float, wd: float) -> float:
    """``clip_divisors`` and ``fused_adamw`` of ONE probe in one native call on the CPU
    (native/adamw.c, when ``native.adamw_ready``): the clipping norm, betas and eps of the
    protocol; gradients are only read, and may come in parts (native.GradParts). step: the
    step number after increment. Returns the clipping divisor."""
    return clipped_adamw(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                         step, lr, wd, BETAS, ADAM_EPS, CLIP_NORM)


def non_finite(step: int, hp: HParams) -> NonFiniteLoss:
    """What a configuration whose loss became NaN/inf at ``step`` reports."""
    return NonFiniteLoss(f"loss became non-finite at step {step} of configuration {hp.name}: "
                         "lower the learning rate or check the features for NaN/inf")
