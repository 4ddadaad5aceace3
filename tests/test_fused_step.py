"""The step's fused parts: AdamW with the clipping folded in, and the jitter added in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alfusion.engine import BankStep, TensorSteps
from alfusion.probes import AttentiveProbe
from alfusion.probes.bank import ProbeBank, fresh_probe
from alfusion.protocol import (
    MIN_LR,
    BatchPlan,
    HParams,
    class_weights,
    clip_divisors,
    cosine_lrs,
    fused_adamw,
)


def test_fused_adamw_with_clipping_matches_torch_optim_and_clip_grad_norm():
    """Per probe: gradients above and below the clipping norm, decay, cosine lr over 8 steps,
    against torch.optim.AdamW (the default, unfused path) + clip_grad_norm_."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (6,), (2, 3, 5)]
    for lr, wd, scale in [(0.1, 1e-2, 10.0), (0.003, 0.5, 0.01)]:
        params = [torch.randn(*s, generator=g) for s in shapes]
        start = [p.clone() for p in params]
        ref = [nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(ref, lr=lr, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 8, MIN_LR)
        table = cosine_lrs([lr], 8)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        step = torch.zeros(())
        for s in range(8):
            grads = [scale * torch.randn(p.shape, generator=g) for p in params]
            for r, grad in zip(ref, grads, strict=True):
                r.grad = grad.clone()
            norm = torch.nn.utils.clip_grad_norm_(ref, 5.0)
            assert (norm > 5) == (scale > 1)
            opt.step()
            sched.step()
            divisor = clip_divisors([grad.unsqueeze(0) for grad in grads])
            assert divisor.shape == (1,) and (divisor[0] > 1) == (scale > 1)
            step.fill_(s + 1)
            fused_adamw(params, grads, m, v, step, float(table[s, 0]), wd, divisor[0])
        for p, r, p0 in zip(params, ref, start, strict=True):
            torch.testing.assert_close(p, r.detach(), atol=1e-6, rtol=1e-6)
            assert not torch.allclose(p, p0)  # and they moved


def test_jitter_added_in_place_to_an_owned_batch_trains_the_same_bits():
    """step(xb, owned=True) jitters the loader's batch in place; the weights equal, bit for
    bit, those of steps that jitter a copy, and a batch that is not owned is left as it was."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 5, 16, generator=g), dim=-1)
    y = torch.arange(40) % 4
    make = lambda hp: AttentiveProbe(16, 4, num_heads=5)
    configs = [HParams(0.01, 1e-4), HParams(0.1, 1e-3)]
    weights = class_weights(y, 4)
    plan = BatchPlan(10, 4, 2)
    banks = []
    for owned in (False, True):
        bank = ProbeBank.from_probes([fresh_probe(make, hp, 0) for hp in configs])
        core = BankStep(bank, configs, plan.steps, weights, seed=0, chunk=1)
        for xb, yb in TensorSteps(x, y, plan, seed=0):
            kept = xb.clone()
            core.step(xb, yb, owned=owned)
            assert torch.equal(xb, kept) != owned  # in place exactly when owned (p = 0.5)
        banks.append(bank)
    for name, value in banks[0].params.items():
        assert torch.equal(value, banks[1].params[name]), name


def test_tensor_steps_gather_the_permuted_rows():
    x = torch.randn(12, 3, 4)
    y = torch.arange(12)
    batches = list(TensorSteps(x, y, BatchPlan(4, 3, 2), seed=5))
    assert len(batches) == 6
    for xb, yb in batches:
        assert torch.equal(xb, x[yb])  # y is the row number: each batch is x of its rows
    assert sorted(torch.cat([yb for _, yb in batches[:3]]).tolist()) == list(range(12))
