"""The hand-derived training gradients of one attentive probe equal autograd on its forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_attentive import SHAPES, random_probe

from alfusion import native
from alfusion.engine import BankStep
from alfusion.probes import AttentiveProbe
from alfusion.probes.attentive_grads import attentive_loss_and_grads
from alfusion.probes.bank import ProbeBank
from alfusion.probes.functional import normalise_tokens, probe_logits, weighted_loss
from alfusion.protocol import HParams, class_weights, native_adamw

# Gradients that are rounding noise around an exact zero: BatchNorm removes the output
# projection's bias, and without dropout every head's attention sums to one, so LN_v's shift
# adds a constant that BatchNorm removes too.
ZERO = {"proj.bias"}
ZERO_WITHOUT_DROPOUT = {"norm_v.bias"}


def autograd_loss_and_grads(bank: ProbeBank, buffers: dict, xhat, y, weights, drop):
    leaves = {n: v.detach().clone().requires_grad_() for n, v in bank.params.items()}
    logits = probe_logits("attentive", bank.spec, leaves, buffers, xhat, True,
                          None if drop is None else drop[None], normalised=True)
    loss = weighted_loss(logits, y, weights)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    return loss.detach(), dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}h{}e{}t{}".format(*s))
def test_hand_gradients_equal_autograd(shape, drop, kernels):
    """Loss, every parameter's gradient and BatchNorm's running statistics, with every
    parameter random and tokens off-centre, with and without dropout, with the native kernels
    (native/attention.c, params.c, head.c) and with torch's path."""
    check_hand_gradients(shape, drop, kernels, batch=12)


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_kernel_blocks_and_their_remainders(drop):
    """The kernels' register blocks and what is left beside them: 37 samples (two blocks of
    16 and 5), 7 tokens, 9 heads of width 6, 124 features (two blocks of 48 floats, a vector
    and single floats with 16-float vectors; 24-float blocks and single floats with 8)."""
    check_hand_gradients((124, 9, 6, 7), drop, "native", batch=37)


@pytest.mark.parametrize("from_rows", [False, True], ids=["in_place", "from_rows"])
def test_the_forward_runs_the_jitter_pass_bit_for_bit(from_rows):
    """The shared jitter handed to the step undone (native.JitterPass) and run by the
    attention forward as it reads each sample: the same tokens, loss and gradients as the
    jitter pass run first, bit for bit; 37 samples (blocks and remainders), about half of
    them jittered, read from rows of the features or jittered in place."""
    bank = ProbeBank.from_probes([random_probe(124, 9, 6, classes=5, drop=0.0, seed=8)])
    g = torch.Generator().manual_seed(8)
    features = torch.randn(60, 7, 124, generator=g) * 2 + 0.3
    index = torch.randperm(60, generator=g)[:37]
    rows = torch.where(torch.rand(37, generator=g) < 0.5, torch.arange(37) + 100, -1)
    y = torch.arange(37) % 5
    assert native.attention_ready(features), "the attention kernel did not build"
    results = []
    for in_forward in (False, True):
        if from_rows:
            job = native.jitter_pass(torch.empty(37, 7, 124), rows, 2 ** 63 + 5, 0.05,
                                     bank.spec.eps_kv, source=features, index=index)
        else:
            job = native.jitter_pass(features[index], rows, 2 ** 63 + 5, 0.05, bank.spec.eps_kv)
        buffers = {k: v.clone() for k, v in bank.buffers.items()}
        loss, grads = attentive_loss_and_grads(bank.spec, bank.params, buffers,
                                               job if in_forward else job.run(), y,
                                               torch.ones(5))
        results.append((job.x, loss, grads, buffers))
    (x, loss, grads, buffers), (x2, loss2, grads2, buffers2) = results
    assert not torch.equal(x, features[index]) and torch.equal(x, x2)
    assert torch.equal(loss, loss2)
    for name, value in [*grads.items(), *buffers.items()]:
        assert torch.equal(value, {**grads2, **buffers2}[name]), name


def test_gradients_in_parts_compose_to_the_written_ones():
    """The q, k and v weights' gradients handed to AdamW in parts (native.GradParts, never
    written whole) are those params.c writes: composed by torch, and through one native
    AdamW step (adamw.c composes them block by block as it reads them)."""
    bank = ProbeBank.from_probes([random_probe(124, 9, 6, classes=5, drop=0.0, seed=9)])
    g = torch.Generator().manual_seed(9)
    xhat = normalise_tokens(bank.spec, torch.randn(37, 7, 124, generator=g))
    y = torch.arange(37) % 5
    grads = {}
    for parts in (False, True):
        buffers = {k: v.clone() for k, v in bank.buffers.items()}
        grads[parts] = attentive_loss_and_grads(bank.spec, bank.params, buffers, xhat, y,
                                                torch.ones(5), parts=parts)[1]
    names = [n for n in grads[False] if isinstance(grads[True][n], native.GradParts)]
    assert sorted(names) == ["k.weight", "q.weight", "v.weight"]
    for name in names:
        torch.testing.assert_close(grads[True][name].tensor(), grads[False][name][0],
                                   atol=1e-7, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    stepped = []
    for parts in (False, True):
        p = {n: bank.params[n][0].clone() for n in grads[parts]}
        state = [{n: torch.zeros_like(t) for n, t in p.items()} for _ in range(2)]
        native_adamw(p.values(), [v if isinstance(v, native.GradParts) else v[0]
                                  for v in grads[parts].values()],
                     state[0].values(), state[1].values(), 1, 1e-3, 1e-4)
        stepped.append(p)
    for name in names:
        torch.testing.assert_close(stepped[1][name], stepped[0][name], atol=1e-6, rtol=1e-5)


def check_hand_gradients(shape, drop, kernels, batch):
    dim, heads, head_dim, tokens = shape
    seed = dim * 100 + heads
    bank = ProbeBank.from_probes([random_probe(dim, heads, head_dim, classes=5, drop=drop,
                                               seed=seed)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g) * 2 + 0.3
    xhat = normalise_tokens(bank.spec, x)
    y = torch.arange(batch) % 5
    weights = class_weights(y, 5) * torch.linspace(0.5, 1.5, 5)
    mask = None
    if drop:
        mask = (torch.rand(batch, heads, tokens, generator=g) >= drop).float() / (1 - drop)
    ref_buffers = {k: v.clone() for k, v in bank.buffers.items()}
    ref_loss, ref = autograd_loss_and_grads(bank, ref_buffers, xhat, y, weights, mask)
    buffers = {k: v.clone() for k, v in bank.buffers.items()}
    assert native.attention_ready(xhat), "the attention kernel did not build (cc, -fopenmp)"
    with native.off() if kernels == "torch" else contextlib.nullcontext():
        loss, grads = attentive_loss_and_grads(bank.spec, bank.params, buffers, xhat, y,
                                               weights, mask)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert ref["norm_k.bias"] is None and "norm_k.bias" not in grads  # cancels in the softmax
    zero = ZERO | (set() if drop else ZERO_WITHOUT_DROPOUT)
    for name, expected in ref.items():
        if expected is None:
            continue
        if name in zero:  # both rounding noise: tiny against the other gradients
            assert float(grads[name].abs().max()) < 1e-5, name
            assert float(expected.abs().max()) < 1e-5, name
            continue
        scale = max(1e-3, float(expected.abs().max()))
        torch.testing.assert_close(grads[name], expected, atol=2e-5 * scale, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, expected in ref_buffers.items():
        torch.testing.assert_close(buffers[name], expected, atol=1e-6, rtol=1e-4)


def test_cpu_probes_train_by_hand_and_alike_with_autograd():
    """On the CPU a pass of one probe takes the hand gradients, a pass of several autograd:
    the same two probes trained both ways for 20 steps (jitter, dropout, lr 1e-2) agree
    (AdamW turns the rounding noise of a zero gradient into steps of size lr: those
    parameters, which the output does not depend on, differ)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, 24, generator=g)
    y = torch.arange(64) % 3
    configs = [HParams(lr=1e-2, wd=1e-3, dropout=0.2), HParams(lr=3e-3, wd=1e-4)]
    make = lambda hp: AttentiveProbe(24, 3, num_heads=4, attn_drop=hp.dropout)  # noqa: E731
    trained = {}
    for chunk in (1, 2):
        bank = ProbeBank.fresh(make, configs, seed=0)
        core = BankStep(bank, configs, 20, class_weights(y, 3), seed=0, chunk=chunk)
        assert core._by_hand(x, chunk) == (chunk == 1)
        for s in range(20):
            rows = torch.arange(s % 4 * 16, s % 4 * 16 + 16)
            core.step(x[rows], y[rows])
        trained[chunk] = bank
    for name, value in trained[2].params.items():
        if name in ZERO | ZERO_WITHOUT_DROPOUT:
            continue
        torch.testing.assert_close(trained[1].params[name], value, atol=1e-4, rtol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", [(48, 4, 8, 20), (384, 24, 24, 64)], ids=["tiny", "vit_s"])
def test_hand_gradients_do_not_depend_on_the_thread_count(shape):
    """Bit for bit with 1, 2 and 3 torch threads: DDP ranks on the CPU run a thread each, and a
    grid split over them trains what one process with more threads does."""
    dim, heads, tokens, batch = shape
    bank = ProbeBank.from_probes([random_probe(dim, heads, None, classes=10, drop=0.0, seed=5)])
    x = normalise_tokens(bank.spec, torch.randn(batch, tokens, dim,
                                                generator=torch.Generator().manual_seed(5)))
    y = torch.arange(batch) % 10
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            buffers = {k: v.clone() for k, v in bank.buffers.items()}
            grads.append(attentive_loss_and_grads(bank.spec, bank.params, buffers, x, y,
                                                  torch.ones(10))[1])
    finally:
        torch.set_num_threads(before)
    for name, value in grads[0].items():
        assert torch.equal(value, grads[1][name]), name
