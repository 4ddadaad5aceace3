"""One whole ALF fit as a user runs it vs the paper's training loop, on the same features.

The features of bench_probe_speed (2,000 x 24 tokens x 384, L2-normalised, C = 10), 1,000
steps at batch 400, the same recipe. Timed from start to end of the fit, back to back:

- ours: the refit path of ``search=none`` (``fit_bank([hp], make_probe, TokenData(x, y), C,
  cfg)``: a bank of one through Lightning, with its checkpoints every 100 steps as a run
  writes them), cfg composed from the project's configs (``trainer.progress_bar=false``);
  Trainer start-up included.
- paper: bench_probe_speed's imitation of the paper's loop (per-sample Dataset with jitter,
  DataLoader, every token projected, torch.optim.AdamW + CosineAnnealingLR + clipping).

Ours runs before and after the paper's loop (load on a shared machine drifts over minutes);
the ratio uses their mean. Wall and process-CPU time are printed.
``python -m benchmarks refit_speed``; ``BENCH_REFIT_STEPS=20`` for a short check that it runs.
``BENCH_REFIT_PAPER_STEPS=K`` times only the first K steps of the paper's 1,000-step loop and
scales its time by 1,000 / K (printed as such): on a machine shared with other jobs the whole
paper loop can take an hour.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from alfusion.engine import TokenData, fit_bank
from alfusion.probes import AttentiveProbe
from benchmarks.bench_probe_speed import BATCH, HP, C, D, N, PaperLoop, T, features

CONF = Path(__file__).resolve().parents[1] / "conf"
STEPS = int(os.environ.get("BENCH_REFIT_STEPS", 1000))
PAPER_STEPS = int(os.environ.get("BENCH_REFIT_PAPER_STEPS", STEPS))


def make(hp) -> AttentiveProbe:
    return AttentiveProbe(D, C, num_heads=T, attn_drop=hp.dropout)


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn()."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def our_fit(x, y) -> None:
    """The refit as ``search=none`` runs it (lr 1e-3, wd 1e-4: search/none.yaml)."""
    overrides = [f"train.min_steps={STEPS}", "train.epochs=1", "trainer.progress_bar=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        fit = fit_bank([HP], make, TokenData(x, y), C, cfg, checkpoints=Path(tmp) / "final")
    assert fit.plan.steps == STEPS and fit.plan.batch == BATCH, fit.plan


def paper_fit(x, y, weights) -> None:
    loop = PaperLoop(make, x, y, weights, total_steps=STEPS)
    for _ in range(PAPER_STEPS):
        loop.step()


def main() -> dict:
    x, y, weights = features()
    print(f"One ALF fit, N={N}, {T}x{D} tokens, C={C}, batch {BATCH}, {STEPS} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    ours_before = timed(lambda: our_fit(x, y))
    print(f"  ours (fit_bank refit), before: {ours_before[0]:7.1f} s wall, "
          f"{ours_before[1]:7.1f} s CPU", flush=True)
    paper = timed(lambda: paper_fit(x, y, weights))
    if PAPER_STEPS != STEPS:
        print(f"  paper's loop, first {PAPER_STEPS} steps: {paper[0]:7.1f} s wall, "
              f"{paper[1]:7.1f} s CPU; scaled to {STEPS} steps:", flush=True)
        paper = tuple(t * STEPS / PAPER_STEPS for t in paper)
    print(f"  paper's loop:                  {paper[0]:7.1f} s wall, {paper[1]:7.1f} s CPU",
          flush=True)
    ours_after = timed(lambda: our_fit(x, y))
    print(f"  ours (fit_bank refit), after:  {ours_after[0]:7.1f} s wall, "
          f"{ours_after[1]:7.1f} s CPU", flush=True)
    ours = [(ours_before[i] + ours_after[i]) / 2 for i in range(2)]
    ratio = [paper[i] / ours[i] for i in range(2)]
    print(f"  speed-up (paper / ours): wall {ratio[0]:.1f}x, CPU {ratio[1]:.1f}x   "
          "[target >= 5x]")
    return dict(paper=paper, ours=ours, ratio=ratio)


if __name__ == "__main__":
    main()
