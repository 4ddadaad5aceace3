"""The step's fused parts: AdamW with the clipping folded in, and the jitter added in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alfusion import native
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
    native_adamw,
)


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_fused_adamw_with_clipping_matches_torch_optim_and_clip_grad_norm(kernel):
    """Per probe: gradients above and below the clipping norm, decay, cosine lr over 8 steps,
    against torch.optim.AdamW (the default, unfused path) + clip_grad_norm_; torch's fused
    kernel with ``clip_divisors``, and the native one (native/adamw.c: the norm too)."""
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
            if kernel == "native":
                assert native.adamw_ready(*params, *grads, *m, *v), "adamw.c did not build"
                kept = [grad.clone() for grad in grads]
                divisor = native_adamw(params, grads, m, v, s + 1, float(table[s, 0]), wd)
                assert (divisor > 1) == (scale > 1)
                assert all(torch.equal(a, b) for a, b in zip(grads, kept, strict=True))
                continue
            divisor = clip_divisors([grad.unsqueeze(0) for grad in grads])
            assert divisor.shape == (1,) and (divisor[0] > 1) == (scale > 1)
            step.fill_(s + 1)
            fused_adamw(params, grads, m, v, step, float(table[s, 0]), wd, divisor[0])
        for p, r, p0 in zip(params, ref, start, strict=True):
            torch.testing.assert_close(p, r.detach(), atol=1e-6, rtol=1e-6)
            assert not torch.allclose(p, p0)  # and they moved


def test_native_adamw_does_not_depend_on_the_thread_count():
    """Bit for bit with 1, 2 and 3 threads (a grid split over DDP ranks runs a thread each):
    the clipping norm is summed in fixed blocks, tensors of several blocks and of none full."""
    g = torch.Generator().manual_seed(2)
    shapes = [(300, 50), (7,), (4100,)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    start = [torch.randn(s, generator=g) for s in shapes]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params, m = [t.clone() for t in start], [t.clone() for t in start]
            v = [t * t for t in start]  # second moments are not negative
            for s in range(3):
                native_adamw(params, grads, m, v, s + 1, 0.1, 1e-2)
            results.append(params + m + v)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


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
