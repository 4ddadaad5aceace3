"""One ALF fit against the paper's loop and against the machine's own limit, in one run.

The features and recipe of bench_refit_speed (2,000 x 24 tokens x 384, C = 10, batch 400,
1,000 steps, lr 1e-3, wd 1e-4, jitter), timed back to back:

- ours: the fit as a user runs it (``fit_bank`` through Lightning, Trainer start-up and the
  checkpoints every 100 steps included), before and after the paper's loop; their mean counts.
- paper: bench_probe_speed's imitation of the paper's loop (per-sample Dataset with jitter,
  DataLoader, every token through the k and v projections, torch.optim.AdamW, a cosine
  schedule, clipping), timed from its construction, in a fresh process of its own (as its
  users run it: a fit of ours tunes the process's malloc, engine/host_memory.py, which
  would speed the paper's loop up too).
- the limit: the machine's fp32 matmul rate (best of several 2,048 x 2,048 products, at the
  same thread count) and the FLOP count of one engine step (forward, backward, every matmul,
  counted by torch's FlopCounterMode on the step's torch path: the native kernels compute the
  same products out of its sight). steps x FLOPs / the fit's time is the rate the fit
  reached; printed beside the matmul rate as a fraction of it.

Wall and process-CPU time are printed, and the load average before and after (other jobs on
the machine slow both sides alike only when they last the whole run).

``BENCH_PROFILE=1``: instead, where one fit's time goes. The fit runs once with timers on its
parts (start-up until the first step, the steps, the checkpoint writes with their checksums,
and the rest between steps: Lightning's loop, the loader, progress and logging), and
torch.profiler records ``BENCH_PROFILE_STEPS`` (default 50) of its steps, whose operator time
is split into the step's parts (matmuls, jitter draws, normalisation, AdamW and clipping, the
data path, the rest of the forward and backward).
``python -m benchmarks fit_limit``; ``BENCH_THREADS=2`` (the issue's figure); short checks:
``BENCH_REFIT_STEPS=20``; ``BENCH_REFIT_PAPER_STEPS=K`` times the paper's first K steps and
scales them (its steps are uniform).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import alfusion.engine.module as engine_module
from alfusion import native
from alfusion.engine import BankStep
from benchmarks.bench_probe_speed import C, D, N, OurLoop, T, features
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
    """FLOPs of one engine optimiser step (forward and backward matmuls) of the fit's probe,
    counted on its torch path: torch's counter does not see the native kernels, which compute
    the same products."""
    loop = OurLoop(make, x, y, weights)
    loop.step()  # warm: the count is of a step like all the others
    with native.off(), FlopCounterMode(display=False) as counter:
        loop.step()
    return counter.get_total_flops()


# The step's parts, by the operators torch.profiler records (self time).
PARTS = {
    "matmuls (forward and backward)": ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm"),
    "token products, softmax (native)": ("alfusion::attend_forward", "alfusion::attend_backward"),
    "query and value parameters (native)": ("alfusion::params_forward",
                                            "alfusion::params_backward"),
    "BatchNorm, head and loss (native)": ("alfusion::batch_norm_head",),
    "jitter draws (coins, noise, adding it)": ("aten::normal_", "aten::uniform_",
                                               "aten::index_add_", "aten::nonzero",
                                               "aten::random_"),
    "jitter and LayerNorm (native, fused)": ("alfusion::jitter_tokens",),
    "token normalisation (LayerNorm)": ("aten::native_layer_norm",),
    "AdamW and clipping": ("alfusion::adamw_step", "aten::_fused_adamw_",
                           "aten::linalg_vector_norm", "aten::clamp", "aten::_foreach_norm"),
    "batch gather": ("aten::index_select", "aten::index", "aten::randperm"),
}


class Timers:
    """Wall seconds spent in wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.first_step: float | None = None

    def wrap(self, name: str, fn):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            if name == "steps" and self.first_step is None:
                self.first_step = t0
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed_fn


def profile_fit(x, y, profiled_steps: int) -> None:
    """One fit with its parts timed, and ``profiled_steps`` of its steps under torch.profiler;
    prints the breakdown."""
    timers = Timers()
    step, save = BankStep.step, engine_module.save_checkpoint
    recorded: list = []
    prof = profile(activities=[ProfilerActivity.CPU])

    def step_with_profile(core, *args, **kwargs):
        if len(recorded) == 5:  # after 5 warm steps
            prof.start()
        out = step(core, *args, **kwargs)
        recorded.append(None)
        if len(recorded) == 5 + profiled_steps:
            prof.stop()
        return out

    BankStep.step = timers.wrap("steps", step_with_profile)
    engine_module.save_checkpoint = timers.wrap("checkpoints", save)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        our_fit(x, y)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        BankStep.step, engine_module.save_checkpoint = step, save
    start = timers.first_step - t0
    steps, saves = timers.seconds["steps"], timers.seconds["checkpoints"]
    print(f"  one fit: {total:.1f} s wall, {cpu:.1f} s CPU, {len(recorded)} steps "
          f"({1e3 * steps / len(recorded):.1f} ms each)")
    rest = total - start - steps - saves
    for name, sec in [("start-up (config, Trainer, bank, until the first step)", start),
                      ("the optimiser steps", steps),
                      ("checkpoint writes and checksums", saves),
                      ("between steps (Lightning's loop, loader, progress, logging)", rest)]:
        print(f"    {name:62s} {sec:7.2f} s  {100 * sec / total:5.1f} %")
    events = prof.key_averages()
    own = {e.key: e.self_cpu_time_total for e in events}
    whole = sum(own.values())
    print(f"  the step, by operator ({profiled_steps} steps under torch.profiler, self time):")
    counted = 0.0
    for name, ops in PARTS.items():
        part = sum(own.get(op, 0.0) for op in ops)
        counted += part
        print(f"    {name:62s} {part / profiled_steps / 1e3:7.2f} ms  {100 * part / whole:5.1f} %")
    other = whole - counted
    print(f"    {'the rest (elementwise, softmax, loss, Python)':62s} "
          f"{other / profiled_steps / 1e3:7.2f} ms  {100 * other / whole:5.1f} %")


def paper_in_fresh_process(threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the paper's loop, timed inside a new interpreter."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_paper_child, (threads,))


def _paper_child(threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    x, y, weights = features()
    return timed(lambda: paper_fit(x, y, weights))


def load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> dict:
    x, y, weights = features()
    threads = torch.get_num_threads()
    print(f"One ALF fit at the machine's limit: N={N}, {T}x{D} tokens, C={C}, {STEPS} steps, "
          f"{threads} threads; load average {load()}", flush=True)
    if os.environ.get("BENCH_PROFILE") == "1":
        profile_fit(x, y, int(os.environ.get("BENCH_PROFILE_STEPS", 50)))
        print(f"  load average {load()}")
        return {}
    flops = step_flops(x, y, weights)
    rate_before = matmul_rate()
    print(f"  one step: {flops / 1e9:.3f} GFLOP; fp32 matmul rate {rate_before / 1e9:.1f} "
          "GFLOP/s", flush=True)
    ours_before = timed(lambda: our_fit(x, y))
    print(f"  ours, before: {ours_before[0]:7.1f} s wall, {ours_before[1]:7.1f} s CPU",
          flush=True)
    paper = paper_in_fresh_process(threads)
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
