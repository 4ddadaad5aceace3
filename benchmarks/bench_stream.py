"""Cached features streamed from disk: memory and speed against the in-memory path.

Both parts run the real CLI on real cache entries (written with EntryWriter, checksummed) of
clustered synthetic features under the fingerprint of ``backbone=offline_vit_s14
dataset=digits`` (ALF's 24 tokens: CLS + AP of 12 layers, D = 384, fp16), in a temporary
folder deleted at the end.

1. speed, on a cache that fits in memory (``SMALL`` rows): one configuration
   (search=none, validate=false) with ``train.stream=memory`` and with ``train.stream=disk``;
   steps/s of each fit (results.json: fit.steps / seconds.fit) and their ratio
   (target: disk >= 0.9 x memory).
2. memory, on a cache of ``BIG`` rows (default 330,000: 6.1 GB): an ALF grid (search=quick)
   with ``train.stream=auto`` (held in memory it would take about 30 GB, so it streams); the
   peak RssAnon of the process, sampled from /proc/<pid>/status every 50 ms (the page cache of
   a memory-mapped file is not in it; target <= 2 GB), and its growth over the same command on
   the small cache (target: < 1/4 of the cache's growth). On 2 CPU cores the fits are capped to
   keep this in minutes: K = 205 samples per class for the fits (``fewshot_k``, drawn from the
   whole split), 5 % of train for validation; every split is opened (its checksum pass reads
   all of it) and validation and test are scored streamed.

``python -m benchmarks stream`` (``BENCH_STREAM_ROWS=N`` for another BIG;
``BENCH_STREAM_PARTS=memory`` for part 2 only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alfusion.data.cache import EntryWriter, FeatureCache
from alfusion.data.extract import feature_fingerprint

ROOT = Path(__file__).resolve().parents[1]
BASE = ["backbone=offline_vit_s14", "dataset=digits", "probe=alf", "logger=none",
        "trainer.progress_bar=false"]
SMALL, TEST_ROWS, CHUNK = 20_480, 10_000, 8192
BIG = int(os.environ.get("BENCH_STREAM_ROWS", 330_000))
LAYERS, DIM, CLASSES = 12, 384, 10
GB = 1e9
PARTS = os.environ.get("BENCH_STREAM_PARTS", "speed,memory").split(",")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def write_split(root: Path, split: str, rows: int, seed: int) -> int:
    """A real entry of ``rows`` clustered samples for ``split``; returns its bytes on disk."""
    cfg = compose(*BASE, f"paths.root={root}")
    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, split))
    means = torch.randn(CLASSES, 2, LAYERS, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    for start in range(0, rows, CHUNK):
        y = torch.arange(start, min(rows, start + CHUNK)) % CLASSES
        x = F.normalize(means[y] + 2.0 * torch.randn(len(y), 2, LAYERS, DIM, generator=g),
                        dim=-1).half().numpy()
        writer.write_chunk(dict(cls=x[:, 0], ap=x[:, 1], labels=y.numpy()))
    entry = writer.finish(dict(dims=[DIM] * LAYERS, num_classes=CLASSES,
                               transform="synthetic (benchmarks/bench_stream.py)"))
    return sum(f.stat().st_size for f in entry.path.iterdir())


def rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(root: Path, name: str, *overrides: str) -> dict:
    """``python -m alfusion`` with the peak RssAnon of the process, the wall time, the
    storage line it printed and its results.json."""
    run_dir = root / "runs" / name
    args = [*BASE, f"paths.root={root}", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALFUSION_NO_PROGRESS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "alfusion", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"alfusion {' '.join(args)} failed:\n{output[-4000:]}")
    line = next((s for s in output.splitlines() if "cached features" in s), "")
    results = json.loads((run_dir / "results.json").read_text())
    return dict(peak=peak[0], wall=time.perf_counter() - t0, line=line, results=results)


def steps_per_second(out: dict) -> float:
    return out["results"]["fit"]["steps"] / out["results"]["seconds"]["fit"]


def speed_ratio(small: Path) -> float:
    """Part 1: steps/s of a streamed fit over the in-memory fit's, on the small cache."""
    one = ["search=none", "search.validate=false", "train.epochs=1", "train.min_steps=1"]
    speed = {s: run(small, f"speed_{s}", *one, f"train.stream={s}") for s in ("memory", "disk")}
    ratio = steps_per_second(speed["disk"]) / steps_per_second(speed["memory"])
    for s, out in speed.items():
        print(f"speed {s:6s}: {steps_per_second(out):.3f} steps/s "
              f"({out['results']['fit']['steps']} steps), peak RssAnon "
              f"{out['peak'] / GB:.2f} GB | {out['line']}", flush=True)
    print(f"streamed / in-memory steps/s: {ratio:.3f} (target >= 0.9)", flush=True)
    return ratio


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_stream-", dir=os.environ.get("BENCH_TMP")))
    need = (BIG + SMALL + 2 * TEST_ROWS) * 2 * LAYERS * DIM * 2 * 2.1  # entries + chunks
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work)
        raise SystemExit(f"bench_stream needs {need / GB:.1f} GB free in {work.parent} "
                         f"({free / GB:.1f} GB there): set BENCH_TMP or BENCH_STREAM_ROWS")
    small, big = work / "small", work / "big"
    try:
        t0 = time.perf_counter()
        size_small = write_split(small, "train", SMALL, 1) + write_split(small, "test",
                                                                         TEST_ROWS, 2)
        size_big = write_split(big, "train", BIG, 1) + write_split(big, "test", TEST_ROWS, 2)
        print(f"entries written: {size_small / GB:.2f} GB and {size_big / GB:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        ratio = speed_ratio(small) if "speed" in PARTS else None

        grid = ["search=quick", "fewshot_k=205", "search.val_fraction=0.05", "train.epochs=1",
                "train.min_steps=1"]
        mem = {name: run(root, f"grid_{name}", *grid, "train.stream=" + stream)
               for name, root, stream in (("small", small, "disk"), ("big", big, "auto"))}
        for name, out in mem.items():
            print(f"grid on the {name} cache: peak RssAnon {out['peak'] / GB:.2f} GB, wall "
                  f"{out['wall']:.0f} s, test bal_acc {out['results']['test']['bal_acc']:.3f}"
                  f" | {out['line']}", flush=True)
        growth = (mem["big"]["peak"] - mem["small"]["peak"]) / (size_big - size_small)
        print(f"big cache {size_big / GB:.2f} GB streamed: peak RssAnon "
              f"{mem['big']['peak'] / GB:.2f} GB (target <= 2); its growth over the small "
              f"cache's run / the cache's growth: {growth:.4f} (target < 0.25)", flush=True)
        return dict(ratio=ratio, peak_big=mem["big"]["peak"], growth=growth,
                    size_big=size_big, threads=torch.get_num_threads(),
                    cpus=os.cpu_count(), rows=BIG, np=np.__version__)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
