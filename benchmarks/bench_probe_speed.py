"""One ALF fit: the paper's straightforward training loop vs ours, per optimiser step.

Both train one ALF probe (24 tokens x 384, 24 heads, C = 10) on the same 2,000 cached
samples with batch 400 (what the shrink rule gives for N = 2,000), AdamW, per-step cosine
over 1,000 steps, clipping at 5, class-weighted cross-entropy, jitter p = 0.5, sigma = 0.05.

- paper: a per-sample Dataset that adds jitter in ``__getitem__``, DataLoader batching
  (shuffle, no workers: these CPUs have 2 cores), ``paper_forward`` (the paper's
  formulation: every token through the k and v projections), fp32, torch.optim.AdamW +
  CosineAnnealingLR.
- ours: the engine's ``BankStep`` with one probe (G = 1), as ``fit_bank`` runs it: batches
  indexed from one feature tensor (``TensorSteps``), jitter on the whole batch, the
  reassociated attention, functional AdamW.

Short rounds alternate between the two (contention on a shared machine hits both alike);
the per-step time of each is the median over rounds, in wall and in process-CPU time, and
the median of the per-round ratios is printed beside the ratio of the medians. Only the
optimiser steps are timed here; bench_refit_speed.py times whole fits as a user runs them.
``python -m benchmarks probe_speed``.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from alfusion.engine import BankStep, TensorSteps
from alfusion.probes import AttentiveProbe
from alfusion.probes.bank import ProbeBank, fresh_probe
from alfusion.protocol import MIN_LR, HParams, batch_plan, class_weights

N, T, D, C, BATCH, TOTAL_STEPS = 2000, 24, 384, 10, 400, 1000
HP = HParams(lr=1e-3, wd=1e-4)


class JitterDataset(Dataset):
    """The paper's data path: one sample at a time, jitter decided per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, p: float = 0.5, sigma: float = 0.05):
        self.x, self.y, self.p, self.sigma = x, y, p, sigma

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if torch.rand(()) < self.p:
            x = x + torch.randn_like(x) * self.sigma
        return x, self.y[i]


def paper_forward(probe: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """The paper's formulation of the ALF probe on tokens x (B, T, D) -> logits (B, C): q, k
    and v projections of every token, softmax attention, output projection, BN, head."""
    B, T, _ = x.shape
    H, hd = probe.num_heads, probe.head_dim
    q = probe.q(probe.norm_q(probe.query)).view(1, H, 1, hd)
    k = probe.k(probe.norm_k(x)).view(B, T, H, hd).transpose(1, 2)
    v = probe.v(probe.norm_v(x)).view(B, T, H, hd).transpose(1, 2)
    attn = probe.attn_drop(((q @ k.transpose(-2, -1)) * probe.scale).softmax(dim=-1))
    out = (attn @ v).transpose(1, 2).reshape(B, -1)
    return probe.head(probe.bn(probe.proj(out)))


def epochs(batches):
    """The batches of one epoch after another, for as long as steps are asked for."""
    while True:
        yield from batches


class PaperLoop:
    def __init__(self, make, x, y, weights, total_steps: int = TOTAL_STEPS):
        self.probe = fresh_probe(make, HP, 0).train()
        self.opt = torch.optim.AdamW(self.probe.parameters(), lr=HP.lr, weight_decay=HP.wd)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, total_steps, MIN_LR)
        self.loader = DataLoader(JitterDataset(x, y), batch_size=BATCH, shuffle=True)
        self.weights, self.it = weights, epochs(self.loader)

    def step(self) -> None:
        xb, yb = next(self.it)
        loss = F.cross_entropy(paper_forward(self.probe, xb), yb, weight=self.weights)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.probe.parameters(), 5.0)
        self.opt.step()
        self.sched.step()


class OurLoop:
    def __init__(self, make, x, y, weights):
        bank = ProbeBank.from_probes([fresh_probe(make, HP, 0)])
        self.core = BankStep(bank, [HP], TOTAL_STEPS, weights, seed=0)
        plan = batch_plan(len(y), BATCH, 5, 1, TOTAL_STEPS)
        self.it = iter(TensorSteps(x, y, plan, seed=0, gather=False))

    def step(self) -> None:
        xb, yb = next(self.it)
        self.core.step(xb, yb)  # as fit_bank runs it: the batch as Rows, gathered by the jitter


def per_step(loop, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step over ``steps`` steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loop.step()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The speed benchmarks' features x (N, T, D), L2-normalised, labels y (N,) and class
    weights (C,)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(N, T, D, generator=g), dim=-1)
    y = torch.arange(N) % C
    return x, y, class_weights(y, C)


def main(rounds: int = 12, steps: int = 5, warmup: int = 3) -> dict:
    x, y, weights = features()
    make = lambda hp: AttentiveProbe(D, C, num_heads=T, attn_drop=hp.dropout)
    loops = dict(paper=PaperLoop(make, x, y, weights), ours=OurLoop(make, x, y, weights))
    for loop in loops.values():
        per_step(loop, warmup)
    times = {k: [] for k in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            times[name].append(per_step(loop, steps))
    med = {k: [statistics.median(t[i] for t in v) for i in range(2)] for k, v in times.items()}
    ratio = [med["paper"][i] / med["ours"][i] for i in range(2)]
    paired = statistics.median(p[0] / o[0] for p, o in zip(times["paper"], times["ours"],
                                                            strict=True))
    print(f"ALF fit, N={N}, {T}x{D} tokens, C={C}, batch {BATCH}, threads "
          f"{torch.get_num_threads()}: {rounds} rounds x {steps} steps each")
    for k, v in times.items():
        print(f"  {k:5s} per step: median {med[k][0] * 1e3:7.1f} ms wall, "
              f"{med[k][1] * 1e3:7.1f} ms CPU  (rounds, wall: "
              f"{', '.join(f'{t[0] * 1e3:.1f}' for t in v)} ms)")
    print(f"  speed-up (paper / ours): wall {ratio[0]:.1f}x, CPU {ratio[1]:.1f}x, median of "
          f"per-round wall ratios {paired:.1f}x   [target >= 5x]")
    print(f"  a 1000-step fit: paper {med['paper'][0] * 1000:.0f} s, "
          f"ours {med['ours'][0] * 1000:.0f} s (wall)")
    return dict(per_step=med, ratio=ratio, paired=paired)


if __name__ == "__main__":
    main()
