"""Caches at scale: assembly and checksums stream, and the size check follows the disk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import compose_config, tiny_overrides

from alfusion.backbones import build_backbone
from alfusion.data.cache import EntryWriter, FeatureCache
from alfusion.data.extract import CacheTooLarge, check_cache_budget
from alfusion.tokens import build_token_set

CHUNK_ROWS, CHUNKS, WIDTH = 256, 24, 1024  # 24 chunks of 0.5 MB (fp16 cls), 12 MB in all


def test_assembly_and_checksum_pass_hold_one_chunk_at_a_time(tmp_path):
    """Assembling 24 chunks into one 12 MB array, and the checksum pass of opening the entry,
    never hold more than a few chunks in memory (tracemalloc sees numpy's buffers)."""
    cache = FeatureCache(tmp_path)
    writer = EntryWriter(cache, dict(test="scale"))
    rng = np.random.default_rng(0)
    for i in range(CHUNKS):
        rows = np.arange(i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS)
        writer.write_chunk(dict(cls=rng.standard_normal((CHUNK_ROWS, 2, WIDTH // 2)
                                                        ).astype(np.float16),
                                labels=rows % 10))
    chunk_bytes = CHUNK_ROWS * WIDTH * 2
    tracemalloc.start()
    entry = writer.finish(dict(dims=[WIDTH // 2] * 2))
    _, assembly_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    assert cache.load(dict(test="scale")) is not None  # verifies every checksum
    _, checksum_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert entry.meta["arrays"]["cls"] == [CHUNK_ROWS * CHUNKS, 2, WIDTH // 2]
    assert assembly_peak < 4 * chunk_bytes < CHUNKS * chunk_bytes / 5, assembly_peak
    assert checksum_peak < chunk_bytes, checksum_peak


def test_a_cache_larger_than_the_free_disk_is_refused_and_says_so(tmp_path, capsys):
    """The size check compares the entries with the free space of paths.cache's disk (with
    max_cache_gb unset) and names both; below it the run goes on and prints the figures."""
    cfg = compose_config(*tiny_overrides(tmp_path))
    assert cfg.extract.max_cache_gb is None  # the disk decides by default
    backbone, _ = build_backbone(cfg.backbone)
    token_set = build_token_set(cfg.probe, len(backbone.dims))
    check_cache_budget(cfg, "train", 60, token_set, None, backbone)  # fits: goes on
    assert "GB free" in capsys.readouterr().out
    with pytest.raises(CacheTooLarge, match="GB free. Free disk space there or point "
                                            "paths.cache at a larger disk"):
        check_cache_budget(cfg, "train", 10**12, token_set, None, backbone)  # petabytes
