"""``python -m benchmarks``: run every benchmarks/bench_*.py ``main()``, or only the named ones
(``python -m benchmarks grid`` or ``bench_grid``). ``BENCH_THREADS=N`` sets torch's CPU
threads first."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ALFUSION_NO_PROGRESS", "1")

import alfusion  # noqa: E402,F401  (torchvision fix before anything imports it)


def available() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    import torch
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines
    if os.environ.get("BENCH_THREADS"):  # e.g. 1 on a machine shared with other jobs
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    names = available()
    wanted = [a if a.startswith("bench_") else f"bench_{a}" for a in argv] or names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown benchmark(s) {unknown}: choose from {names}", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
