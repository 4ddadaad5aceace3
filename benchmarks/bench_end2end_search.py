"""End-to-end search cost: a grid trained end to end vs one configuration, through the CLI.

    time(mode=end2end search=S) / time(mode=end2end search=none), S = quick (3 configurations,
    target <= 1.3) and paper (63, target <= 2.0)

Both with the validation fit (``search.validate=true``, the default): search=none trains one
configuration on 80 % of train, scores it, then refits on all of train; a grid trains all its
configurations in that first fit (one backbone forward per batch feeds every probe) and
refits the chosen one. Each is a real ``python -m alfusion`` subprocess with a fresh
``paths.root`` under /tmp, on the offline ViT-S/14 (the default backbone) at a small input
size, timed by wall clock including interpreter and model start-up; the CPU time of the
subprocess (user + system, from its rusage) is printed beside it, the steadier figure on
shared cores.

One untimed run first converts the weights for this input size (``BENCH_E2E_WARMUP=0``
skips it when they are converted). Each command runs ``BENCH_E2E_REPEATS`` times (default 2),
alternating; the fastest run of each counts. ``BENCH_E2E_PARALLEL=1`` starts the commands of
a round at the same time (a busy machine: each then sees the same load; compare CPU times).

Defaults: 56 px, 300 digits (``dataset.limit=300``), 40 steps, no loader workers; the other
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
WARMUP = os.environ.get("BENCH_E2E_WARMUP", "1") == "1"
PARALLEL = os.environ.get("BENCH_E2E_PARALLEL", "0") == "1"
SEARCHES = os.environ.get("BENCH_E2E_SEARCHES", "none,quick,paper").split(",")
TARGETS = dict(quick=1.3, paper=2.0)


def args(search: str, root: str) -> list[str]:
    return ["mode=end2end", f"search={search}", "backbone=offline_vit_s14",
            f"backbone.img_size={IMG}", f"dataset.limit={LIMIT}", f"train.min_steps={STEPS}",
            "train.epochs=1", f"end2end.num_workers={WORKERS}", f"paths.root={root}",
            "trainer.progress_bar=false"]


def run(searches: list[str]) -> dict[str, tuple[float, float]]:
    """search -> (wall, CPU) seconds of its ``python -m alfusion`` run, each in a fresh
    paths.root; all at once with PARALLEL, else one after another."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALFUSION_NO_PROGRESS="1")
    out = {}
    with tempfile.TemporaryDirectory(prefix="e2e_search_") as tmp:
        batches = [searches] if PARALLEL else [[s] for s in searches]
        for batch in batches:
            procs = {}
            for search in batch:
                log = open(Path(tmp) / f"{search}.log", "w+")  # noqa: SIM115
                procs[search] = (subprocess.Popen(
                    [sys.executable, "-m", "alfusion", *args(search, f"{tmp}/{search}")],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                    time.perf_counter(), log)
            for search, (proc, t0, log) in procs.items():
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                log.seek(0)
                if proc.returncode != 0:
                    raise RuntimeError(f"alfusion {' '.join(args(search, '<tmp>'))} failed:\n"
                                       f"{log.read()[-5000:]}")
                log.close()
                out[search] = (wall, usage.ru_utime + usage.ru_stime)
    return out


def main() -> dict:
    print(f"End-to-end search through the CLI: offline ViT-S/14 at {IMG} px, {LIMIT} digits, "
          f"{STEPS} steps, {WORKERS} loader workers, validation fit on; fastest of {REPEATS}"
          f"{', each round in parallel' if PARALLEL else ''}", flush=True)
    if WARMUP:
        print(f"  untimed first run (weights for {IMG} px): {run(['none'])['none'][0]:.1f} s",
              flush=True)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SEARCHES}
    for _ in range(REPEATS):
        for search, t in run(SEARCHES).items():
            times[search].append(t)
            print(f"  search={search:6s} {t[0]:7.1f} s wall, {t[1]:7.1f} s CPU", flush=True)
    best = {s: (min(w for w, _ in t), min(c for _, c in t)) for s, t in times.items()}
    ratios = {}
    for search in SEARCHES:
        if search != "none" and "none" in best:
            ratios[search] = [best[search][i] / best["none"][i] for i in range(2)]
            target = f"   [target <= {TARGETS[search]}]" if search in TARGETS else ""
            print(f"  ratio search={search} / search=none: wall {ratios[search][0]:.2f} "
                  f"({best[search][0]:.1f} s / {best['none'][0]:.1f} s), CPU "
                  f"{ratios[search][1]:.2f}{target}", flush=True)
    return dict(seconds=times, ratios=ratios)


if __name__ == "__main__":
    main()
