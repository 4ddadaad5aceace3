"""Extraction: resume after SIGKILL (a real subprocess), resume of a streamed source, DDP
parts merged in order (a real 2-process gloo run), DataLoader workers, and the extract CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, compose_config, run_cli, tiny_overrides, wait_until_stopped
from test_data_sources import http_root  # noqa: F401  (fixture)

from alfusion.backbones import build_backbone
from alfusion.data import build_dataset, with_transform
from alfusion.data.cache import EntryWriter, FeatureCache
from alfusion.data.extract import extract, feature_fingerprint, load_or_extract, rank_part
from alfusion.data.wds_writer import write_digits_wds

ARRAYS = ("cls", "ap", "labels")


def wds_config(root, out, *extra):
    return compose_config(*tiny_overrides(out), "dataset=wds", f"dataset.root={root}",
                          "extract.batch_size=4", "extract.chunk_rows=8", *extra)


def assert_same_entry(a, b) -> None:
    for name in ARRAYS:
        assert np.array_equal(a.array(name), b.array(name)), name


# The killed process: the real extraction path (source, backbone, writer, extract) with a
# transform that stops the process (SIGSTOP) once 3 chunks are written: the kill lands mid-way
# however loaded the machine is.
KILLED_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["ALFUSION_NO_PROGRESS"] = "1"
    sys.path.insert(0, sys.argv[1])
    from conftest import compose_config
    from alfusion.backbones import build_backbone
    from alfusion.data import build_dataset, with_transform
    from alfusion.data.cache import EntryWriter, FeatureCache
    from alfusion.data.extract import extract, feature_fingerprint

    cfg = compose_config(*json.loads(sys.argv[2]))
    backbone, transform = build_backbone(cfg.backbone)

    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train"))

    def stop_after_three_chunks(image):
        if len(writer.chunks()) >= 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        return transform(image)

    dataset = with_transform(build_dataset(cfg.dataset, "train"), stop_after_three_chunks)
    extract(backbone, dataset, writer, batch_size=4, chunk_rows=8)
    print("finished")
""")


def test_sigkill_mid_extraction_then_rerun_resumes_to_identical_arrays(tmp_path):
    root = write_digits_wds(tmp_path / "wds", train=96, test=8, shard_size=20)
    overrides = [*tiny_overrides(tmp_path / "out"), "dataset=wds", f"dataset.root={root}",
                 "dataset.limit=null", "extract.batch_size=4", "extract.chunk_rows=8"]
    cfg = compose_config(*overrides)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:  # a file, not a pipe: output never blocks the process
        proc = subprocess.Popen([sys.executable, str(script), str(ROOT / "tests"),
                                 json.dumps(overrides)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        assert wait_until_stopped(proc), log.read_text()[-2000:]
        proc.kill()
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert "finished" not in log.read_text()
    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train"))

    done = writer.done_rows()
    assert 24 <= done < 96 and done % 8 == 0
    assert FeatureCache(cfg.paths.cache).load(feature_fingerprint(cfg, "train")) is None
    # Rerun: only the rows after the last complete chunk reach the backbone.
    backbone, transform = build_backbone(cfg.backbone)
    dataset = with_transform(build_dataset(cfg.dataset, "train"), transform)
    assert extract(backbone, dataset, writer, batch_size=4, chunk_rows=8) == 96 - done
    resumed = writer.finish(dict(dims=backbone.dims))
    fresh = load_or_extract(wds_config(root, tmp_path / "fresh", "dataset.limit=null"), "train")
    assert len(resumed) == len(fresh) == 96
    assert_same_entry(resumed, fresh)


def test_streamed_source_resumes_without_rereading_extracted_rows(http_root):  # noqa: F811
    folder, url = http_root
    write_digits_wds(folder / "wds", train=30, test=4, shard_size=8)
    cfg = wds_config(f"{url}/wds", folder / "out")
    backbone, transform = build_backbone(cfg.backbone)
    source = with_transform(build_dataset(cfg.dataset, "train"), transform)
    assert source.counts is None  # streamed: rows are only known as they come
    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train"))
    # An interrupted first run: its first two chunks (16 rows) were written.
    assert extract(backbone, source.with_window(0, 16), writer, batch_size=4,
                   chunk_rows=8) == 16
    assert writer.done_rows() == 16
    assert extract(backbone, source, writer, batch_size=4, chunk_rows=8) == 30 - 16
    resumed = writer.finish(dict(dims=backbone.dims))
    fresh = load_or_extract(wds_config(folder / "wds", folder / "fresh"), "train")
    assert_same_entry(resumed, fresh)


def test_rank_parts_cover_the_split_in_order(tmp_path):
    root = write_digits_wds(tmp_path / "wds", train=29, test=4, shard_size=6)
    cfg = wds_config(root, tmp_path / "out")
    local = build_dataset(cfg.dataset, "train")
    streamed = dataclasses.replace(local, counts=None)  # split by whole shards instead
    labels = [y for _, y in local]
    for source in (local, streamed):
        for world in (2, 3, 7):
            parts = [[y for _, y in rank_part(source, r, world)] for r in range(world)]
            assert sum(parts, []) == labels, (source.counts, world)
    digits = build_dataset(compose_config("dataset.limit=11").dataset, "train")
    parts = [[y for _, y in rank_part(digits, r, 3)] for r in range(3)]
    assert sum(parts, []) == [y for _, y in digits]


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["ALFUSION_NO_PROGRESS"] = "1"
    sys.path.insert(0, sys.argv[1])
    import alfusion
    import torch.distributed as dist
    from conftest import compose_config
    from alfusion.data.extract import load_or_extract

    dist.init_process_group("gloo")
    cfg = compose_config(*json.loads(sys.argv[2]))
    for split in ("train", "test"):
        entry = load_or_extract(cfg, split)
        print(f"rank {dist.get_rank()} {split} {len(entry)} {entry.path.name}")
    dist.destroy_process_group()
""")


def test_ddp_ranks_extract_disjoint_parts_merged_in_order(tmp_path):
    root = write_digits_wds(tmp_path / "wds", train=24, test=10, shard_size=7)
    overrides = [*tiny_overrides(tmp_path / "ddp"), "dataset=wds", f"dataset.root={root}",
                 "extract.batch_size=4", "extract.chunk_rows=8"]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(ROOT / "tests"),
                           json.dumps(overrides)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} train 24 features-" in proc.stdout
        assert f"rank {rank} test 10 features-" in proc.stdout
    cache = FeatureCache(tmp_path / "ddp" / "cache")
    assert not list(cache.root.glob(".part-*.partial"))  # the parts are gone once merged
    for split in ("train", "test"):
        cfg = compose_config(*overrides)
        merged = cache.load(feature_fingerprint(cfg, split))
        assert merged.meta["ddp_world_size"] == 2
        single = load_or_extract(wds_config(root, tmp_path / "single"), split)
        assert np.array_equal(merged.array("labels"), single.array("labels"))
        for name in ("cls", "ap"):  # batches differ at the part seam: equal to fp16 rounding
            np.testing.assert_allclose(merged.array(name), single.array(name), atol=2e-3)


def test_dataloader_workers_give_the_same_entry(tmp_path):
    root = write_digits_wds(tmp_path / "wds", train=30, test=4, shard_size=7)
    serial = load_or_extract(wds_config(root, tmp_path / "a"), "train")
    workers = load_or_extract(wds_config(root, tmp_path / "b", "extract.num_workers=2"),
                              "train")
    assert_same_entry(serial, workers)


def test_extract_cli_on_a_webdataset(tmp_path):
    root = write_digits_wds(tmp_path / "wds", train=20, test=12, shard_size=8)
    proc = run_cli("task=extract", *tiny_overrides(tmp_path / "out"), "dataset=wds",
                   f"dataset.root={root}")
    assert "train: 20 rows" in proc.stdout and "test: 12 rows" in proc.stdout
    entries = sorted((tmp_path / "out" / "cache").glob("features-*"))
    assert len(entries) == 2
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["fingerprint"]["dataset"]["root"] == str(root)


def test_image_folder_extracts_in_sorted_order(tmp_path):
    from PIL import Image

    for split, n in (("train", 5), ("test", 3)):
        for c in ("b", "a"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(
                    tmp_path / "img" / split / c / f"{i}.jpg")
    cfg = compose_config(*tiny_overrides(tmp_path / "out"), "dataset=folder",
                         f"dataset.root={tmp_path / 'img'}")
    entry = load_or_extract(cfg, "train")
    assert entry.array("labels").tolist() == [0] * 5 + [1] * 5
    assert entry.meta["num_classes"] == 2
    with pytest.raises(Exception, match="no test/ folder"):
        load_or_extract(compose_config(*tiny_overrides(tmp_path / "out"), "dataset=folder",
                                       f"dataset.root={tmp_path / 'img' / 'train'}"), "test")
