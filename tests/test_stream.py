"""Cached features streamed from the memory-mapped entry train and score exactly as in memory."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import compose_config, mlflow_runs, run_cli, tiny_overrides

from alfusion.data.cache import EntryWriter, FeatureCache
from alfusion.engine import StreamedTokens, TensorSteps, TokenData
from alfusion.engine.data import Rows
from alfusion.engine.stream import Prefetched, in_memory_bytes, storage_for
from alfusion.experiment import probe_factory
from alfusion.features import cached_split
from alfusion.protocol import BatchPlan
from alfusion.resume import RunState
from alfusion.search import expand_grid, run_search

LAYERS, DIM, CLASSES = 3, 16, 4


def write_entry(root, split: str, n: int, seed: int):
    """A real cache entry (EntryWriter, two chunks) of clustered fp16 CLS/AP features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    means = torch.randn(CLASSES, 2, LAYERS, DIM, generator=torch.Generator().manual_seed(7))
    x = (means[y] + 1.5 * torch.randn(n, 2, LAYERS, DIM, generator=g)).half().numpy()
    writer = EntryWriter(FeatureCache(root), dict(split=split, test="stream"))
    for part in np.array_split(np.arange(n), 2):
        writer.write_chunk(dict(cls=x[part, 0], ap=x[part, 1], labels=y.numpy()[part]))
    return writer.finish(dict(dims=[DIM] * LAYERS, num_classes=CLASSES))


@pytest.mark.parametrize("probe", ["alf", "linear"])
def test_streamed_search_equals_in_memory_bit_for_bit(tmp_path, one_thread, probe):
    """The whole search (grid with jitter and attention dropout, scores, selection, refit,
    test) on StreamedTokens gives exactly what TokenData gives."""
    cfg = compose_config(f"probe={probe}", "search=quick", "search.dropout=[0.0,0.3]",
                         "train.min_steps=12", "train.epochs=1", "train.batch_size=32",
                         "trainer.progress_bar=false", f"paths.root={tmp_path}")
    train_entry, test_entry = write_entry(tmp_path, "train", 150, 1), write_entry(tmp_path,
                                                                                  "test", 50, 2)
    cpu = torch.device("cpu")
    results = {}
    for storage in ("memory", "disk"):
        (train, token_set), (test, _) = (cached_split(cfg, e, storage, cpu)
                                         for e in (train_entry, test_entry))
        assert isinstance(train, TokenData if storage == "memory" else StreamedTokens)
        shape = train.sample_shape
        make = probe_factory(cfg, token_set, train_entry.dims, CLASSES,
                             shape[0] if len(shape) == 2 else token_set.num_tokens())
        configs = expand_grid(cfg.search, attentive=cfg.probe.kind == "attentive")
        state = RunState(tmp_path / storage, dict(stages={}, finished=False))
        (tmp_path / storage).mkdir()
        results[storage] = run_search(make, configs, train, test, CLASSES, cfg, state)
    memory, disk = results["memory"], results["disk"]
    assert len(memory.grid) == (6 if probe == "alf" else 3)
    assert disk.grid == memory.grid and disk.best == memory.best
    assert disk.val == memory.val and disk.test == memory.test
    for name, value in memory.model.state_dict().items():
        assert torch.equal(disk.model.state_dict()[name], value), name


def test_streamed_data_holds_memory_maps_not_tensors(tmp_path):
    """What streaming keeps: the entry's fp16 memory maps (only the arrays the token set
    reads), the labels and the row numbers; a subset is rows of the same maps."""
    cfg = compose_config("probe=alf", "probe.tokens=cls", f"paths.root={tmp_path}")
    entry = write_entry(tmp_path, "train", 40, 3)
    data, token_set = cached_split(cfg, entry, "disk", torch.device("cpu"))
    assert list(data.arrays) == ["cls"]  # ap is not read at all
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in data.arrays.values())
    part = data.subset(np.array([3, 5, 39]))
    assert part.arrays["cls"] is data.arrays["cls"] and part.rows.tolist() == [3, 5, 39]
    memory, _ = cached_split(cfg, entry, "memory", torch.device("cpu"))
    plan = BatchPlan(batch=3, per_epoch=1, epochs=1)
    streamed = list(part.steps(plan, 0, 0, 1, 0))
    held = list(TensorSteps(memory.x[[3, 5, 39]], memory.y[[3, 5, 39]], plan, 0))
    assert len(streamed) == 1
    assert all(torch.equal(a, b) for a, b in zip(streamed[0], held[0], strict=True))
    # fp16 arrays + fp32 tokens and one copy: 40 x (2 x 3 x 16 x 2 + 8) + 2 x 40 x 3 x 16 x 4
    assert in_memory_bytes(entry, token_set) == 40 * (2 * LAYERS * DIM * 2 + 8) \
        + 2 * 40 * LAYERS * DIM * 4


def test_storage_follows_the_setting_and_the_budget():
    cpu = torch.device("cpu")
    assert storage_for("auto", 10**9, cpu, budget_gb=2)[0] == "memory"
    storage, why = storage_for("auto", 3 * 10**9, cpu, budget_gb=2)
    assert storage == "disk" and "over 2 GB" in why
    assert storage_for("memory", 10**12, cpu)[0] == "memory"
    assert storage_for("disk", 1, cpu)[0] == "disk"
    with pytest.raises(ValueError, match="train.stream='tape'"):
        storage_for("tape", 1, cpu)


def test_cli_streams_when_told_and_logs_it(tmp_path):
    """Through the CLI: train.stream=disk prints and tags the choice and gives the in-memory
    run's test metric; auto keeps the tiny cache in memory."""
    cache = f"paths.cache={tmp_path}/cache"
    runs = {}
    for storage in ("auto", "disk"):
        proc = run_cli(*tiny_overrides(tmp_path / storage, cache, f"train.stream={storage}",
                                       f"hydra.run.dir={tmp_path}/{storage}/run"))
        expected = "in memory" if storage == "auto" else "streamed from the memory-mapped"
        assert f"[alfusion] cached features {expected}" in proc.stdout
        runs[storage] = json.loads((tmp_path / storage / "run/results.json").read_text())
        run = mlflow_runs(tmp_path / storage)[0]
        taken = "memory" if storage == "auto" else "disk"
        assert run.data.tags["cached_features"] == taken
        assert run.data.params["cached_features"] == taken
    assert runs["disk"]["test"] == runs["auto"]["test"]
    assert runs["disk"]["grid"] == runs["auto"]["grid"]
    assert runs["disk"]["analysis"] == runs["auto"]["analysis"]  # attention of the test split
    assert "attention_layer_mass" in runs["disk"]["analysis"]


def test_data_parallel_ranks_share_out_every_batch(tmp_path):
    """With world = 2 each rank's k-th batch is every other sample of the single process's
    k-th batch, for the memory and the streamed data alike."""
    cfg = compose_config("probe=alf", f"paths.root={tmp_path}")
    entry = write_entry(tmp_path, "train", 40, 3)
    plan = BatchPlan(batch=8, per_epoch=5, epochs=2)
    for storage in ("memory", "disk"):
        data, _ = cached_split(cfg, entry, storage, torch.device("cpu"))
        whole = list(data.steps(plan, 0, 0, 1, 0))
        ranks = [list(data.steps(plan, 0, 0, 2, r)) for r in (0, 1)]
        assert len(whole) == len(ranks[0]) == len(ranks[1]) == 10
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks, strict=True):
            x = x.gather() if isinstance(x, Rows) else x  # the memory's batches as Rows
            assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
            assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_prefetch_hands_on_errors_and_stops_with_its_consumer():
    made = []
    batches = iter(Prefetched(range(100), lambda i: made.append(i) or i, depth=2))
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()  # the fit stopped early
    assert len(made) <= 3 + 2 + 1  # at most the queue and the one in hand beyond what was used
    assert not [t for t in threading.enumerate() if t.name == "alfusion-prefetch"]
    with pytest.raises(ZeroDivisionError):
        list(Prefetched(range(5), lambda i: 1 // (i - 2)))
