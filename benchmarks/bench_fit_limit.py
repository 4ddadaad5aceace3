"""One ALF fit against the paper's loop and against the machine's own limit, in one run.

The features and recipe of bench_refit_speed (2,000 x 24 tokens x 384, C = 10, batch 400,
1,000 steps, lr 1e-3, wd 1e-4, jitter), timed back to back:

- ours: the fit as a user runs it (``fit_bank`` through Lightning, Trainer start-up and the
  checkpoints every 100 steps included), before and after the paper's loop; their mean counts.
- paper: bench_probe_speed's imitation of the paper's loop (per-sample Dataset with jitter,
  DataLoader, every token through the k and v projections, torch.optim.AdamW, a cosine
  schedule, clipping), timed from its construction.
- the limit: the machine's fp32 matmul rate (best of several 2,048 x 2,048 products, at the
  same thread count) and the FLOP count of one engine step (forward, backward, every matmul,
  counted by torch's FlopCounterMode). steps x FLOPs / the fit's time is the rate the fit
  reached; printed beside the matmul rate as a fraction of it.

Wall and process-CPU time are printed, and the load average before and after (other jobs on
the machine slow both sides alike only when they last the whole run).
``python -m benchmarks fit_limit``; ``BENCH_THREADS=2`` (the issue's figure); short checks:
``BENCH_REFIT_STEPS=20``; ``BENCH_REFIT_PAPER_STEPS=K`` times the paper's first K steps and
scales them (its steps are uniform).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from alfusion.protocol import class_weights
from benchmarks.bench_probe_speed import C, D, N, OurLoop, T
from benchmarks.bench_refit_speed import PAPER_STEPS, STEPS, make, our_fit, paper_fit, timed


def matmul_rate(size: int = 2048, repeats: int = 7) -> float:
    """The best fp32 FLOP/s of a size x size matmul at torch's current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def step_flops(x, y, weights) -> int:
    """FLOPs of one engine optimiser step (forward and backward matmuls) of the fit's probe."""
    loop = OurLoop(make, x, y, weights)
    loop.step()  # warm: the count is of a step like all the others
    with FlopCounterMode(display=False) as counter:
        loop.step()
    return counter.get_total_flops()


def load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> dict:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(N, T, D, generator=g), dim=-1)
    y = torch.arange(N) % C
    weights = class_weights(y, C)
    threads = torch.get_num_threads()
    print(f"One ALF fit at the machine's limit: N={N}, {T}x{D} tokens, C={C}, {STEPS} steps, "
          f"{threads} threads; load average {load()}", flush=True)
    flops = step_flops(x, y, weights)
    rate_before = matmul_rate()
    print(f"  one step: {flops / 1e9:.3f} GFLOP; fp32 matmul rate {rate_before / 1e9:.1f} "
          "GFLOP/s", flush=True)
    ours_before = timed(lambda: our_fit(x, y))
    print(f"  ours, before: {ours_before[0]:7.1f} s wall, {ours_before[1]:7.1f} s CPU",
          flush=True)
    paper = timed(lambda: paper_fit(x, y, weights))
    if PAPER_STEPS != STEPS:
        print(f"  paper's loop, first {PAPER_STEPS} steps: {paper[0]:7.1f} s wall, "
              f"{paper[1]:7.1f} s CPU; scaled to {STEPS} steps:", flush=True)
        paper = tuple(t * STEPS / PAPER_STEPS for t in paper)
    print(f"  paper's loop: {paper[0]:7.1f} s wall, {paper[1]:7.1f} s CPU", flush=True)
    ours_after = timed(lambda: our_fit(x, y))
    print(f"  ours, after:  {ours_after[0]:7.1f} s wall, {ours_after[1]:7.1f} s CPU",
          flush=True)
    rate = max(rate_before, matmul_rate())
    ours = [(a + b) / 2 for a, b in zip(ours_before, ours_after, strict=True)]
    ratio = [p / o for p, o in zip(paper, ours, strict=True)]
    # The fit's arithmetic rate: all its steps' FLOPs over its whole time (start-up included),
    # on the better of the two runs (load only ever slows a run down).
    best = min(ours_before[0], ours_after[0])
    reached = STEPS * flops / best
    print(f"  speed-up (paper / ours): wall {ratio[0]:.1f}x, CPU {ratio[1]:.1f}x   "
          "[target >= 10x]")
    print(f"  the fit's rate: {reached / 1e9:.1f} GFLOP/s = {100 * reached / rate:.0f} % of the "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s   [aim >= 40 %]; load average {load()}")
    return dict(paper=paper, ours=ours, ratio=ratio, step_flops=flops, matmul_rate=rate,
                fraction=reached / rate)


if __name__ == "__main__":
    main()
