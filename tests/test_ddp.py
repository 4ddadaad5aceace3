"""DDP on CPU: a real 2-process trainer=ddp run (gloo) trains the single-process model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    compose_config,
    mlflow_runs,
    run_cli,
    run_cli_process,
    tiny_overrides,
)
from test_bank import clustered

from alfusion import distributed
from alfusion.data import build_dataset
from alfusion.data.wds_writer import write_digits_wds
from alfusion.distributed import RankSlice
from alfusion.engine import BankStep
from alfusion.probes import AttentiveProbe
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import HParams, class_weights

# 64 images, global batch 16 (8 per rank), 8 steps; jitter draws differ per rank, so off.
DDP_TINY = ["mode=end2end", "search.validate=false", "dataset.limit=64", "train.min_batches=4",
            "end2end.batch_size=16", "train.min_steps=8", "end2end.num_workers=0",
            "end2end.jitter=off", "end2end.record_samples=true"]



def test_two_process_ddp_run_equals_one_process(tmp_path):
    ddp_root, one_root = tmp_path / "ddp", tmp_path / "one"
    run_cli_process(*tiny_overrides(ddp_root, *DDP_TINY, "trainer=ddp",
                                    "trainer.accelerator=cpu", "trainer.devices=2",
                                    "trainer.progress_bar=false", f"hydra.run.dir={ddp_root}/run"))
    run_cli(*tiny_overrides(one_root, *DDP_TINY, f"hydra.run.dir={one_root}/run"))

    ranks = [json.loads((ddp_root / f"run/samples/final_rank{r}.json").read_text())
             for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    first, second = (set(r["indices"]) for r in ranks)
    assert len(first) == len(second) == 32 and not first & second
    assert first | second == set(range(64))
    single = json.loads((one_root / "run/samples/final_rank0.json").read_text())
    assert sorted(single["indices"]) == list(range(64))

    ddp = json.loads((ddp_root / "run/results.json").read_text())
    one = json.loads((one_root / "run/results.json").read_text())
    assert ddp["fit"]["world"] == 2 and one["fit"]["world"] == 1
    assert ddp["fit"]["steps"] == one["fit"]["steps"] == 8
    for key, value in one["test"].items():
        assert abs(ddp["test"][key] - value) < 1e-6, key

    runs = mlflow_runs(ddp_root)
    assert len(runs) == 1  # rank 1 logged nothing
    assert runs[0].info.status == "FINISHED"
    assert abs(runs[0].data.metrics["test/bal_acc"] - one["test"]["bal_acc"]) < 1e-6


def test_streamed_webdataset_splits_into_equal_disjoint_rank_windows(tmp_path):
    """Real tar shards: each of 3 ranks reads n // 3 samples of its own row window."""
    root = write_digits_wds(tmp_path / "wds", train=40, test=8, shard_size=8)
    source = build_dataset(compose_config("dataset=wds", f"dataset.root={root}").dataset,
                           "train", None)
    assert len(source) == 40

    def digest(item) -> str:
        return hashlib.sha1(item[0].tobytes()).hexdigest()

    everything = [digest(item) for item in source]
    parts = [[digest(item) for item in RankSlice(source, 40, rank, 3, batch_size=4)]
             for rank in range(3)]
    assert [len(p) for p in parts] == [13, 13, 13]  # equal batch counts: no rank waits
    assert parts == [everything[0:13], everything[13:26], everything[26:39]]
    shuffled = list(RankSlice(source, 40, 1, 3, batch_size=4, shuffle_buffer=8))
    assert sorted(digest(i) for i in shuffled) == sorted(parts[1])


# Cached mode: 60 digits, 10 steps; the grid (search=quick: 3 configurations, 2 + 1) and the
# refit (a bank of one: 1 + 0) split over 2 ranks, so a rank has no probe of its own.
CACHED_TINY = ["train.min_steps=10", "train.epochs=1"]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.progress_bar=false"]


def test_cached_ddp_through_the_cli_finishes_and_equals_one_process(tmp_path):
    """The real CLI, 2 gloo processes, cached features: the run ends (no collective left
    unmatched when a rank has no configuration), MLflow says FINISHED only at the end, and the
    test metric is the single process's."""
    cache = f"paths.cache={tmp_path}/cache"  # extracted once, by the single-process run
    run_cli(*tiny_overrides(tmp_path / "one", *CACHED_TINY, "search=quick", cache,
            f"hydra.run.dir={tmp_path}/one/run"))
    ddp = run_cli_process(*tiny_overrides(tmp_path / "ddp", *CACHED_TINY, "search=quick", cache,
                                          *DDP_CPU, f"hydra.run.dir={tmp_path}/ddp/run"),
                          timeout=240)
    assert "Traceback" not in ddp.stderr, ddp.stderr[-3000:]
    one_res = json.loads((tmp_path / "one/run/results.json").read_text())
    ddp_res = json.loads((tmp_path / "ddp/run/results.json").read_text())
    assert ddp_res["fit"]["world"] == 2 and one_res["fit"]["world"] == 1
    assert ddp_res["chosen"] == one_res["chosen"]
    assert [row["bal_acc"] for row in ddp_res["grid"]] == [row["bal_acc"]
                                                           for row in one_res["grid"]]
    assert ddp_res["test"] == one_res["test"]
    runs = mlflow_runs(tmp_path / "ddp")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 logged nothing
    assert runs[0].data.metrics["test/bal_acc"] == one_res["test"]["bal_acc"]
    assert "train/loss" in runs[0].data.metrics and "grid/loss" in runs[0].data.metrics


def test_rank_zero_fails_when_a_rank_it_started_failed():
    """join_ranks: rank 0's wait for the rank processes it started raises for one that
    exited non-zero, and returns for ranks that finished."""
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    bad = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    distributed._started_ranks.extend([ok, bad])
    with pytest.raises(RuntimeError, match=f"rank 2 \\(pid {bad.pid}\\): exit 3"):
        distributed.join_ranks(timeout_s=60)
    distributed._started_ranks.append(subprocess.Popen([sys.executable, "-c", "pass"]))
    distributed.join_ranks(timeout_s=60)
    assert distributed._started_ranks == []


def test_streamed_cached_ddp_splits_every_batch_and_equals_one_process(tmp_path):
    """train.stream=disk under DDP trains data-parallel: each of 2 gloo ranks reads half of
    every batch from the memory map (disjoint halves of the split), gradients, BatchNorm
    statistics and the loss normaliser are summed over ranks, and jitter is drawn for the
    global batch: the validation and test metrics are the single process's (search=none: at
    lr 0.1 the rounding noise of the BatchNorm-cancelled biases below can flip a sample)."""
    cache = f"paths.cache={tmp_path}/cache"
    common = [*CACHED_TINY, "search=none", "train.stream=disk", "end2end.record_samples=true",
              cache]
    run_cli(*tiny_overrides(tmp_path / "one", *common, f"hydra.run.dir={tmp_path}/one/run"))
    ddp = run_cli_process(*tiny_overrides(tmp_path / "ddp", *common, *DDP_CPU,
                                  f"hydra.run.dir={tmp_path}/ddp/run"), timeout=240)
    assert "streamed from the memory-mapped cache" in ddp.stdout
    ranks = [json.loads((tmp_path / f"ddp/run/samples/final_rank{r}.json").read_text())
             for r in (0, 1)]
    first, second = (set(r["indices"]) for r in ranks)
    assert len(first) == len(second) == 30 and not first & second
    assert first | second == set(range(60))
    one_res = json.loads((tmp_path / "one/run/results.json").read_text())
    ddp_res = json.loads((tmp_path / "ddp/run/results.json").read_text())
    assert ddp_res["fit"]["world"] == 2 and ddp_res["fit"]["steps"] == one_res["fit"]["steps"]
    assert ddp_res["chosen"] == one_res["chosen"]
    for mine, single in zip(ddp_res["grid"], one_res["grid"], strict=True):
        assert abs(mine["bal_acc"] - single["bal_acc"]) < 1e-6
    for key, value in one_res["test"].items():
        assert abs(ddp_res["test"][key] - value) < 1e-6, key


def _data_parallel_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(_train_steps(sync=True, part=(rank, world)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _train_steps(sync: bool = False, part: tuple[int, int] = (0, 1)) -> dict:
    """6 steps of a bank of 2 ALF-like probes (attention dropout, BatchNorm, per-sample
    jitter drawn per probe) on global batches of 16; a rank takes rows rank::world."""
    x, y = clustered(16 * 6, (6, 8), 3, seed=5)
    configs = [HParams(0.01, 1e-4, 0.3), HParams(0.001, 1e-2, 0.0)]
    bank = ProbeBank.fresh(lambda hp: AttentiveProbe(8, 3, num_heads=2, attn_drop=hp.dropout),
                           configs, seed=0)
    step = BankStep(bank, configs, 6, class_weights(y, 3), seed=0, jitter_draws="per_probe",
                    sync=sync, part=part)
    rank, world = part
    for s in range(6):
        xb, yb = x[16 * s:16 * (s + 1)], y[16 * s:16 * (s + 1)]
        step.step(xb[rank::world], yb[rank::world])
    return dict(bank.params, losses=step.losses, **{"bn.running_mean":
                                                     bank.buffers["bn.running_mean"]})


def test_data_parallel_bank_step_on_two_gloo_ranks_equals_one_process(tmp_path):
    """BankStep's sync path: 2 ranks with half of every batch each take the steps one process
    takes on the whole batch (jitter and dropout drawn for the global batch)."""
    out = str(tmp_path / "params")
    mp.start_processes(_data_parallel_worker, args=(2, str(tmp_path / "store"), out), nprocs=2,
                       join=True, start_method="fork")
    whole = _train_steps()
    for rank in range(2):
        mine = torch.load(f"{out}.{rank}", weights_only=True)
        for name, value in whole.items():
            if name in BN_CANCELLED:
                continue
            torch.testing.assert_close(mine[name], value, atol=1e-6, rtol=1e-5)


# Biases added just before the BatchNorm cancel in it: their true gradient is 0, the computed
# one rounding noise (different for a sum split over ranks), which AdamW's normalisation turns
# into lr-sized steps, in one process as in DDP; BatchNorm's running mean follows them. The
# probe's function does not depend on them in training; they are left out of the comparison.
BN_CANCELLED = ("proj.bias", "norm_v.bias", "bn.running_mean")
