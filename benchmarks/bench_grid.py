"""Grid efficiency: time(bank of G) / (G x time(one probe)), per optimiser step.

ALF on ViT-B-sized features (24 tokens x 768, 24 heads, head_dim 64), N = 20,000 cached
samples (fp16, as in the cache), C = 10, batch 2048 (the shrink rule's batch for N = 20k),
the paper's grid values (lr x wd x dropout, G = 21: dropout 0 only, G = 63: all three).
Two single fits are the baselines: the engine's refit (``fit_bank([hp], ...)``, a bank of one
through Lightning, what the search's final refit runs; per step: the difference between a
3-step fit and a longer one, so Trainer start-up cancels) and a bank of one (``BankStep`` with
G = 1, no Lightning). A ratio below 1 means the bank is cheaper than training the
configurations one by one.

On a CPU the arithmetic per probe cannot be shared (every probe has its own weights and,
with ``jitter_draws=per_probe``, its own jittered input), so the bank saves the batch
gather, the dispatch overhead and, with ``shared`` draws, the LayerNorm and jitter noise;
on a GPU the bank mostly fills an otherwise idle device. Every timing follows one untimed
step (allocation and first touch of the optimiser state) and runs for at least 5 s. Wall
and process-CPU time are both reported: on a shared machine the CPU time is the steadier
(``python -m benchmarks grid``; ``BENCH_GRID_SHAPE=default`` for the default experiment's
size).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from alfusion.engine import BankStep, TensorSteps, TokenData, fit_bank
from alfusion.engine.fit import auto_chunk
from alfusion.probes import AttentiveProbe
from alfusion.probes.bank import ProbeBank, fresh_probe
from alfusion.protocol import HParams, batch_plan, batch_size_for, class_weights

# BENCH_GRID_SHAPE=default measures at the default experiment's size instead (digits on the
# offline ViT-S/14: the 1,077-sample fit split of 24 x 384 tokens, batch 195).
SHAPES = dict(vit_b=(20_000, 24, 768, 10), default=(1_077, 24, 384, 10))
N, T, D, C = SHAPES[os.environ.get("BENCH_GRID_SHAPE", "vit_b")]
CONF = Path(__file__).resolve().parents[1] / "conf"
LRS, WDS, DROPS = (0.1, 0.01, 0.001), tuple(10.0 ** -k for k in range(6, -1, -1)), (0, .1, .3)


def grid(size: int) -> list[HParams]:
    drops = DROPS if size == 63 else (0.0,)
    return [HParams(lr, wd, d) for lr in LRS for wd in WDS for d in drops][:size]


def make(hp: HParams) -> AttentiveProbe:
    return AttentiveProbe(D, C, num_heads=T, attn_drop=hp.dropout)


def refit_config(batch: int, steps: int, jitter_draws: str, cuda: bool):
    """The project's config for a refit of ``steps`` steps at ``batch`` on 2 x batch samples."""
    overrides = [f"train.batch_size={batch}", "train.min_batches=1", "train.epochs=1",
                 f"train.min_steps={steps}", f"train.jitter_draws={jitter_draws}",
                 "train.checkpoint_every=0", "trainer.progress_bar=false"]
    if cuda:
        overrides.append("trainer=gpu")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def refit_step_times(x, y, batch, steps, jitter_draws) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of the engine's refit (``fit_bank`` with one
    configuration, through Lightning) on 2 x batch samples: the difference between a 3-step
    and a (3 + steps)-step fit."""
    cuda = x.device.type == "cuda"
    data = TokenData(x[:2 * batch], y[:2 * batch])
    times = []
    for n in (3, 3 + steps):
        cfg = refit_config(batch, n, jitter_draws, cuda)
        t0, c0 = time.perf_counter(), time.process_time()
        fit_bank(grid(1), make, data, C, cfg)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return tuple((times[1][i] - times[0][i]) / steps for i in range(2))


def step_times(configs, x, y, weights, batch, min_steps, warmup, jitter_draws,
               min_seconds: float = 5.0, total_steps: int = 10_000) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of a training step of a bank of ``configs``
    (``BankStep``, no Lightning), over at least ``min_steps`` timed steps and ``min_seconds``
    after ``warmup`` untimed ones."""
    bank = ProbeBank.from_probes([fresh_probe(make, hp, 0) for hp in configs]).to(x.device)
    chunk = auto_chunk(bank, batch, (T, D), jitter_draws == "per_probe")
    cuda = x.device.type == "cuda"
    core = BankStep(bank, configs, total_steps, weights, seed=0, jitter_draws=jitter_draws,
                    chunk=chunk)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    plan = batch_plan(len(y), batch, 1, 1, total_steps)
    walls, cpus = [], []
    for i, (xb, yb) in enumerate(TensorSteps(x, y, plan, seed=0, gather=False)):
        t0, c0 = time.perf_counter(), time.process_time()
        with amp:
            core.step(xb, yb)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if len(walls) >= min_steps and sum(walls) >= min_seconds:
                break
    return statistics.median(walls), statistics.median(cpus)


def main(sizes=(21, 63), single_steps: int = 4, bank_steps: int = 1,
         modes=("shared", "per_probe")) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, T, D, dtype=torch.float16)
    for i in range(0, N, 2000):  # generated in slices: fp32 for all of N would be 1.5 GB
        x[i:i + 2000] = F.normalize(torch.randn(min(2000, N - i), T, D, generator=g), dim=-1)
    y = torch.arange(N) % C
    weights = class_weights(y, C)
    batch = batch_size_for(N)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y, weights = x.to(device), y.to(device), weights.to(device)
    where = (f"bf16 autocast on {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"fp32 on {torch.get_num_threads()} CPU threads")
    print(f"ALF bank, N={N}, {T}x{D} tokens (fp16 cache), C={C}, batch {batch}, {where}")
    out = {}
    for mode in modes:
        # The single fits measured before and after the banks (8 steps each in all): the
        # machine's load drifts over the minutes a bank step takes.
        before = step_times(grid(1), x, y, weights, batch, single_steps, 1, mode)
        # The refit: enough extra steps that they outweigh the noise of Trainer start-up.
        refit_steps = max(3 * single_steps, math.ceil(10.0 / before[0]))
        refit_before = refit_step_times(x, y, batch, refit_steps, mode)
        banks = {G: step_times(grid(G), x, y, weights, batch, bank_steps, 1, mode)
                 for G in sizes}
        after = step_times(grid(1), x, y, weights, batch, single_steps, 1, mode)
        refit_after = refit_step_times(x, y, batch, refit_steps, mode)
        singles = {"engine refit": (refit_before, refit_after), "bank of one": (before, after)}
        print(f"  jitter_draws={mode}: one probe, s/step wall / CPU (before the banks, after):")
        for name, (b, a) in singles.items():
            print(f"    {name:13s} {(b[0] + a[0]) / 2:.3f} / {(b[1] + a[1]) / 2:.3f} "
                  f"({b[0]:.3f} / {b[1]:.3f}, {a[0]:.3f} / {a[1]:.3f})", flush=True)
        for G, t in banks.items():
            print(f"    G={G:3d}: bank {t[0]:7.2f} s/step wall, {t[1]:7.2f} s CPU; ratio "
                  "bank / (G x one probe), wall / CPU:", flush=True)
            for name, (b, a) in singles.items():
                ratio = [t[i] / (G * (b[i] + a[i]) / 2) for i in range(2)]
                out[(mode, G, name)] = ratio
                print(f"      vs {name:13s} {ratio[0]:.3f} / {ratio[1]:.3f}   "
                      "[CPU: must be < 1; GPU target <= 0.1]", flush=True)
    return out


if __name__ == "__main__":
    main()
