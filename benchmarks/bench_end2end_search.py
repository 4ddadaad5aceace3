"""End-to-end search cost: a grid trained end to end vs one configuration, through the CLI.

    time(mode=end2end search=S) / time(mode=end2end search=none), S = quick (4 configurations,
    target <= 1.3) and paper (63, target <= 2.0)

Both with the validation fit (``search.validate=true``, the default): search=none trains one
configuration on 80 % of train, scores it, then refits on all of train; a grid trains all its
configurations in that first fit (one backbone forward per batch feeds every probe) and
refits the chosen one. Each is a real ``python -m alfusion`` subprocess, timed by wall clock
including interpreter and model start-up, with a fresh ``paths.root`` under /tmp, on the
offline ViT-S/14 (the default backbone) at a small input size. One untimed run first
(converts the weights for this input size once). Each command runs ``BENCH_E2E_REPEATS``
times (default 2), alternating; the fastest run of each counts.

Defaults: 56 px, 300 digits (``dataset.limit=300``), 40 steps, no loader workers; the
``BENCH_E2E_*`` variables change them. ``python -m benchmarks end2end_search``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = int(os.environ.get("BENCH_E2E_IMG", 56))
LIMIT = int(os.environ.get("BENCH_E2E_LIMIT", 300))
STEPS = int(os.environ.get("BENCH_E2E_STEPS", 40))
WORKERS = int(os.environ.get("BENCH_E2E_WORKERS", 0))
REPEATS = int(os.environ.get("BENCH_E2E_REPEATS", 2))
SEARCHES = os.environ.get("BENCH_E2E_SEARCHES", "none,quick,paper").split(",")
TARGETS = dict(quick=1.3, paper=2.0)


def args(search: str, root: str) -> list[str]:
    return ["mode=end2end", f"search={search}", "backbone=offline_vit_s14",
            f"backbone.img_size={IMG}", f"dataset.limit={LIMIT}", f"train.min_steps={STEPS}",
            "train.epochs=1", f"end2end.num_workers={WORKERS}", f"paths.root={root}",
            "trainer.progress_bar=false"]


def run(search: str) -> float:
    """Wall seconds of one ``python -m alfusion`` run, in a fresh paths.root."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALFUSION_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory(prefix=f"e2e_{search}_") as root:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "alfusion", *args(search, root)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"alfusion {' '.join(args(search, '<tmp>'))} failed:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def main() -> dict:
    print(f"End-to-end search through the CLI: offline ViT-S/14 at {IMG} px, {LIMIT} digits, "
          f"{STEPS} steps, {WORKERS} loader workers, validation fit on; fastest of {REPEATS}",
          flush=True)
    print(f"  untimed first run (weights for {IMG} px): {run('none'):.1f} s", flush=True)
    times: dict[str, list[float]] = {s: [] for s in SEARCHES}
    for _ in range(REPEATS):
        for search in SEARCHES:
            times[search].append(run(search))
            print(f"  search={search:6s} {times[search][-1]:7.1f} s", flush=True)
    best = {s: min(t) for s, t in times.items()}
    ratios = {}
    for search in SEARCHES:
        if search != "none" and "none" in best:
            ratios[search] = best[search] / best["none"]
            target = f"   [target <= {TARGETS[search]}]" if search in TARGETS else ""
            print(f"  ratio search={search} / search=none: {ratios[search]:.2f} "
                  f"({best[search]:.1f} s / {best['none']:.1f} s){target}", flush=True)
    return dict(seconds=times, ratios=ratios)


if __name__ == "__main__":
    main()
