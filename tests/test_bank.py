"""ProbeBank: probe for probe, the grid trained as one model equals each probe trained alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from oracle import attention_reference
from torch import nn

from alfusion.engine import BankStep, TensorSteps, TokenData, fit_bank
from alfusion.engine.module import grid_slice
from alfusion.probes import AttentiveProbe, LinearProbe
from alfusion.probes.bank import ProbeBank, fresh_probe
from alfusion.probes.functional import probe_logits, weighted_loss
from alfusion.protocol import (
    MIN_LR,
    BatchPlan,
    HParams,
    adamw_step,
    class_weights,
    clip_per_probe,
    cosine_lrs,
)
from alfusion.random_draws import ProbeStream, StreamDropout, probe_seed
from alfusion.resume import RunState
from alfusion.search import run_search

TRAIN = OmegaConf.create(dict(batch_size=2048, min_batches=5, epochs=2, min_steps=20,
                              jitter_p=0.5, jitter_sigma=0.05))


def engine_cfg(tmp_path, *overrides: str):
    """The composed config of a tiny cached run (20-step fits, no progress bars)."""
    return compose_config("train.min_steps=20", "train.epochs=2", "trainer.progress_bar=false",
                          f"paths.root={tmp_path}", *overrides)


def steps_of(x, y, batch: int, steps: int, seed: int) -> TensorSteps:
    per_epoch = -(-len(y) // batch)
    return TensorSteps(x, y, BatchPlan(batch, per_epoch, -(-steps // per_epoch)), seed)


def clustered(n: int, shape: tuple[int, ...], classes: int, seed: int = 0):
    """Learnable random data: class means plus noise, L2-normalised per token."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.randn(classes, *shape, generator=g)
    x = means[y] + 1.5 * torch.randn(n, *shape, generator=g)
    return F.normalize(x, dim=-1), y


def train_alone(make_probe, hp: HParams, x, y, weights, batch: int, steps: int, seed: int,
                jitter_draws: str = "per_probe"):
    """The reference: one probe, torch.optim.AdamW + CosineAnnealingLR + clip_grad_norm_,
    the same batches, and jitter/dropout drawn from the probe's own ProbeStream (jitter
    from the seed's shared stream with ``jitter_draws="shared"``)."""
    probe = fresh_probe(make_probe, hp, seed).train()
    stream = ProbeStream(probe_seed(seed, hp))
    jitter_stream = stream if jitter_draws == "per_probe" else ProbeStream(probe_seed(seed, None))
    if isinstance(probe, AttentiveProbe):
        probe.attn_drop = StreamDropout(stream, hp.dropout)
    opt = torch.optim.AdamW(probe.parameters(), lr=hp.lr, weight_decay=hp.wd, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=MIN_LR)
    for _, (xb, yb) in zip(range(steps), steps_of(x, y, batch, steps, seed), strict=False):
        xj = jitter_stream.jitter(xb, TRAIN.jitter_p, TRAIN.jitter_sigma)
        loss = F.cross_entropy(probe(xj), yb, weight=weights)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 5.0)
        opt.step()
        sched.step()
    return probe


def train_bank(make_probe, configs, x, y, weights, batch, steps, seed, chunk=None,
               jitter_draws="per_probe"):
    bank = ProbeBank.fresh(make_probe, configs, seed)
    step = BankStep(bank, configs, steps, weights, seed, TRAIN.jitter_p, TRAIN.jitter_sigma,
                    jitter_draws=jitter_draws, chunk=chunk)
    for _, (xb, yb) in zip(range(steps), steps_of(x, y, batch, steps, seed), strict=False):
        step.step(xb, yb)
    return bank


# BatchNorm (batch statistics) removes any constant shift of its input, so these entries get
# gradients that are zero up to float rounding; AdamW's m / sqrt(v) turns that rounding noise
# into O(lr) moves that no two implementations share (norm_v.bias only without dropout: with
# attention weights summing to 1 its contribution is constant). bn.running_mean records the
# resulting shift. They are checked through the function instead: see batch_stat_logits.
BN_CANCELLED = {"proj.bias", "bn.running_mean"}


def batch_stat_logits(probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits with BatchNorm on the batch's own statistics and dropout off: the function
    that training sees, blind to the BN-cancelled directions."""
    if not isinstance(probe, AttentiveProbe):
        return probe(x)
    probe.eval()
    h = pooled(probe, x)
    bn = probe.bn
    return probe.head(F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))


def pooled(probe: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """The attention-pooled vector before BatchNorm (B, D), by the oracle's formulation."""
    v = probe.v(probe.norm_v(x)).view(*x.shape[:2], probe.num_heads, probe.head_dim)
    out = torch.einsum("bht,bthe->bhe", attention_reference(probe, x), v)
    return probe.proj(out.flatten(1))


def assert_same_probe(a: nn.Module, b: nn.Module, x: torch.Tensor, dropout: float,
                      atol=2e-5, rtol=1e-4, what=""):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    skip = BN_CANCELLED | ({"norm_v.bias"} if dropout == 0 else set())
    for k in sa:
        if k not in skip:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=rtol,
                                       msg=lambda m, k=k: f"{what} {k}: {m}")
    with torch.no_grad():
        la, lb = batch_stat_logits(a, x), batch_stat_logits(b, x)
    # Logits pass through BatchNorm's 1/std and a dozen lr-0.1 AdamW steps amplify fp32
    # rounding: a looser, magnitude-scaled tolerance (wrong lr/decay/clip moves them by >1e-2).
    torch.testing.assert_close(la, lb, atol=5e-4 * max(1.0, float(lb.abs().max())), rtol=1e-3,
                               msg=lambda m: f"{what} logits: {m}")


@pytest.mark.parametrize("kind,jitter_draws", [("linear", "per_probe"),
                                                ("attentive", "per_probe"),
                                                ("attentive", "shared")])
def test_bank_equals_each_probe_trained_alone(kind, jitter_draws):
    """G configurations (3 lr, several wd, dropout 0 / 0.1 / 0.3 for attentive), 12 steps with
    jitter on: every probe's weights and BatchNorm variance equal the lone AdamW run's, and
    so do its logits (BN on batch statistics; see BN_CANCELLED for the rest).

    Dropout > 0 runs in training mode here: the lone run draws its masks from the same
    per-probe ProbeStream as the bank (torch's own nn.Dropout stream would differ). Chunks
    of 3 probes cover both the per-probe-input pass and the one-probe pass."""
    seed, classes, batch, steps = 3, 5, 16, 12
    if kind == "linear":
        x, y = clustered(56, (24,), classes)
        make = lambda hp: LinearProbe(24, classes)
        configs = [HParams(lr, wd) for lr, wd in [(0.1, 1e-6), (0.01, 1.0), (0.001, 1e-2)]]
    else:
        x, y = clustered(56, (6, 16), classes)
        make = lambda hp: AttentiveProbe(16, classes, num_heads=4, attn_drop=hp.dropout)
        configs = [HParams(0.1, 1e-6, 0.0), HParams(0.01, 1.0, 0.1),
                   HParams(0.001, 1e-2, 0.3), HParams(0.01, 1e-4, 0.0)]
    weights = class_weights(y, classes)
    bank = train_bank(make, configs, x, y, weights, batch, steps, seed, 3, jitter_draws)
    for g, hp in enumerate(configs):
        alone = train_alone(make, hp, x, y, weights, batch, steps, seed, jitter_draws)
        exported = bank.export(g)
        assert type(exported) is type(alone)
        if kind == "attentive":
            assert exported.attn_drop.p == hp.dropout
        assert_same_probe(exported, alone, x, hp.dropout, what=hp.name)
        # and they moved: not a comparison of two untouched initialisations
        assert not torch.allclose(exported.head.weight, fresh_probe(make, hp, seed).head.weight)


def test_refit_through_lightning_equals_the_bank_member_bit_for_bit(tmp_path, one_thread):
    """The refit of a configuration (fit_bank with one configuration, through Lightning) is,
    bit for bit, that configuration's member of a grid trained on the same samples and seed:
    the reported model is trained by the arithmetic that selected it."""
    x, y = clustered(100, (6, 16), 4, seed=1)
    make = lambda hp: AttentiveProbe(16, 4, num_heads=4, attn_drop=hp.dropout)
    configs = [HParams(0.1, 1e-3, 0.3), HParams(0.01, 1e-3, 0.0), HParams(0.1, 1.0, 0.1)]
    cfg = engine_cfg(tmp_path)
    grid = fit_bank(configs, make, TokenData(x, y), 4, cfg)
    assert grid.plan.steps == 20 and grid.losses.shape == (20, 3)
    for g, hp in enumerate(configs):
        refit = fit_bank([hp], make, TokenData(x, y), 4, cfg)
        for name, value in {**grid.bank.params, **grid.bank.buffers}.items():
            assert torch.equal(value[g], {**refit.bank.params, **refit.bank.buffers}[name][0]), \
                f"{hp.name} {name}"
    # the draws matter: the other jitter mode gives other weights
    other = fit_bank(configs[:1], make, TokenData(x, y), 4,
                     engine_cfg(tmp_path, "train.jitter_draws=per_probe"))
    assert not torch.equal(other.bank.params["head.weight"][0], grid.bank.params["head.weight"][0])


def test_a_probe_trains_bit_for_bit_alike_in_any_bank():
    """A configuration's trained weights do not depend on the other probes of its bank: a
    bank of 6 in passes of one probe (the CPU default) equals, bit for bit, each
    configuration as a bank of one, whatever the thread count. (At lr 0.1 the paper's
    training amplifies a 1e-8 difference to 0.1 within a few steps, so anything less than
    bitwise would let the selection differ.)"""
    x, y = clustered(60, (6, 16), 5, seed=2)
    make = lambda hp: AttentiveProbe(16, 5, num_heads=6, attn_drop=hp.dropout)
    configs = [HParams(lr, wd, d) for lr, wd, d in [(0.1, 1e-6, 0.0), (0.1, 1e-5, 0.1),
               (0.01, 1e-3, 0.3), (0.1, 1.0, 0.0), (0.001, 1e-2, 0.1), (0.01, 1e-6, 0.0)]]
    weights = class_weights(y, 5)
    bank = train_bank(make, configs, x, y, weights, 12, 15, 0, 1, "shared")
    for g, hp in enumerate(configs):
        alone = train_bank(make, [hp], x, y, weights, 12, 15, 0, 1, "shared")
        for name, value in {**bank.params, **bank.buffers}.items():
            assert torch.equal(value[g], {**alone.params, **alone.buffers}[name][0]), \
                f"{hp.name} {name}"


def test_adamw_and_clip_match_torch_on_large_gradients():
    """The functional AdamW and per-probe clipping against torch, with norms above 5."""
    g = torch.Generator().manual_seed(0)
    lrs, wds = [0.1, 0.003], [1e-2, 0.5]
    shapes = [(3, 7), (5,)]
    params = [torch.randn(2, *s, generator=g) for s in shapes]
    singles = [[nn.Parameter(p[i].clone()) for p in params] for i in range(2)]
    opts = [torch.optim.AdamW(singles[i], lr=lrs[i], weight_decay=wds[i]) for i in range(2)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    table = cosine_lrs(lrs, 6)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 6, MIN_LR) for o in opts]
    for step in range(6):
        grads = [10 * torch.randn(p.shape, generator=g) for p in params]
        for i in range(2):
            for sp, gr in zip(singles[i], grads, strict=True):
                sp.grad = gr[i].clone()
            ref_norm = torch.nn.utils.clip_grad_norm_(singles[i], 5.0)
            assert ref_norm > 5
            assert table[step, i] == pytest.approx(opts[i].param_groups[0]["lr"], rel=1e-12)
            opts[i].step()
            scheds[i].step()
        norms = clip_per_probe(grads)
        decay = (1 - table[step] * torch.tensor(wds, dtype=torch.float64)).float()
        adamw_step(params, grads, m, v, step + 1, decay,
                   (table[step] / (1 - 0.9 ** (step + 1))).float())
        assert norms.shape == (2,)
    for i in range(2):
        for p, sp in zip(params, singles[i], strict=True):
            torch.testing.assert_close(p[i], sp.detach(), atol=1e-6, rtol=1e-6)


def test_bank_loss_separates_probes():
    """Probe g's gradient does not depend on any other probe's parameters."""
    x, y = clustered(20, (4, 8), 3)
    make = lambda hp: AttentiveProbe(8, 3, num_heads=2)
    configs = [HParams(0.01, 0.0), HParams(0.01, 0.0)]
    bank = ProbeBank.from_probes([fresh_probe(make, hp, s) for s, hp in enumerate(configs)])
    w = class_weights(y, 3)

    def grad_of_first(other_scale):
        params = {k: v.clone() for k, v in bank.params.items()}
        params["head.weight"][1] *= other_scale
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        buffers = {k: v.clone() for k, v in bank.buffers.items()}
        loss = weighted_loss(probe_logits("attentive", bank.spec, leaves, buffers, x, True), y, w)
        return torch.autograd.grad(loss.sum(), leaves["q.weight"])[0][0]

    torch.testing.assert_close(grad_of_first(1.0), grad_of_first(7.0))


def test_grid_slice_covers_every_configuration_once():
    for n in (1, 5, 21, 63):
        for world in (1, 2, 3, 8):
            parts = [list(range(n))[grid_slice(n, world, r)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        grid_slice(5, 2, 2)


def _sharded_worker(rank: int, world: int, store: str, out: str, root: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, y = clustered(40, (12,), 3, seed=2)
        configs = [HParams(lr, wd) for lr in (0.1, 0.01) for wd in (1e-6, 1e-2, 1.0)][:5]
        fit = fit_bank(configs, lambda hp: LinearProbe(12, 3), TokenData(x, y), 3,
                       engine_cfg(root, "seed=1"))
        torch.save([fit.bank.state(g) for g in range(5)], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_grid_split_across_two_gloo_ranks_equals_one_bank(tmp_path):
    """Two CPU ranks (gloo) each train their slice of 5 configurations through the engine;
    after the gather, both hold all 5 probes, equal to the single-process bank."""
    out = str(tmp_path / "probes")
    # fork: the ranks inherit the imported modules (spawn re-imports torch and Lightning).
    mp.start_processes(_sharded_worker, args=(2, str(tmp_path / "store"), out, str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    x, y = clustered(40, (12,), 3, seed=2)
    configs = [HParams(lr, wd) for lr in (0.1, 0.01) for wd in (1e-6, 1e-2, 1.0)][:5]
    whole = fit_bank(configs, lambda hp: LinearProbe(12, 3), TokenData(x, y), 3,
                     engine_cfg(tmp_path, "seed=1"))
    for rank in range(2):
        states = torch.load(f"{out}.{rank}", weights_only=True)
        assert len(states) == 5
        for g, state in enumerate(states):
            for k, v in whole.bank.state(g).items():
                torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)


def test_search_refits_the_chosen_configuration_as_its_bank_member(tmp_path, one_thread):
    """A paper-style grid (3 lr x 2 wd x 2 dropout, attentive probe, jitter on) through
    run_search: the grid is not a tie, and the reported model is bit for bit the chosen
    configuration's member of a bank trained on the refit's samples (all of train)."""
    x, y = clustered(150, (6, 16), 5, seed=4)
    xt, yt = clustered(60, (6, 16), 5, seed=4)
    make = lambda hp: AttentiveProbe(16, 5, num_heads=6, attn_drop=hp.dropout)
    configs = [HParams(lr, wd, d) for lr in (0.1, 0.01, 0.001) for wd in (1e-4, 1.0)
               for d in (0.0, 0.3)]
    cfg = engine_cfg(tmp_path, "search=paper", "train.min_steps=30", "train.epochs=1")
    state = RunState(tmp_path, dict(stages={}, finished=False))
    result = run_search(make, configs, TokenData(x, y), TokenData(xt, yt), 5, cfg, state)
    scores = np.array([g["bal_acc"] for g in result.grid])
    assert scores.max() - scores.min() > 0.05  # the grid is not a tie
    assert result.best == configs[int(np.argmax(scores))]
    assert state.stage("grid") is not None  # the grid's scores are a finished stage
    whole = fit_bank(configs, make, TokenData(x, y), 5, cfg)
    g = configs.index(result.best)
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, whole.bank.state(g)[name]), name
