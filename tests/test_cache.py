"""FeatureCache: fingerprints that omit nothing, reuse of identical settings, refusal of
mismatching or damaged entries, no promotion after a failed extraction, warm loads."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from conftest import compose_config, tiny_overrides

from alfusion.data.cache import CacheMismatch, EntryWriter, FeatureCache
from alfusion.data.extract import feature_fingerprint, load_or_extract
from alfusion.data.shards import BadShard
from alfusion.data.wds_writer import write_digits_wds


def wds_config(tmp_path, *extra):
    root = tmp_path / "wds"
    if not root.exists():
        write_digits_wds(root, train=24, test=8, shard_size=8)
    return compose_config(*tiny_overrides(tmp_path / "out"), "dataset=wds",
                          f"dataset.root={root}", "extract.batch_size=4",
                          "extract.chunk_rows=8", *extra)


def entries(cfg) -> list[str]:
    return sorted(p.name for p in FeatureCache(cfg.paths.cache).root.glob("features-*"))


def test_every_fingerprint_input_makes_a_new_entry(tmp_path):
    weights_a, weights_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    weights_a.write_bytes(b"a" * 10)
    weights_b.write_bytes(b"b" * 11)
    base = feature_fingerprint(wds_config(tmp_path), "train")
    assert feature_fingerprint(wds_config(tmp_path), "train") == base  # identical -> same
    shutil.copytree(tmp_path / "wds", tmp_path / "elsewhere")
    changed = {
        "tap": ["backbone.tap=block"],
        "final": ["backbone.final=block"],
        "transform size": ["backbone.img_size=48"],
        "depth": ["backbone.model_kwargs.depth=3"],
        "weights file": [f"backbone.weights={weights_a}"],
        "other weights file": [f"backbone.weights={weights_b}"],
        "all tokens": ["probe.tokens=all"],
        "limit": ["dataset.limit=10"],
        "dataset root": [f"dataset.root={tmp_path / 'elsewhere'}"],
    }
    hashes = {FeatureCache(tmp_path).paths(base)[0].name}
    for what, overrides in changed.items():
        fp = feature_fingerprint(wds_config(tmp_path, *overrides), "train")
        name = FeatureCache(tmp_path).paths(fp)[0].name
        assert name not in hashes, f"changing the {what} kept the cache entry"
        hashes.add(name)
    assert feature_fingerprint(wds_config(tmp_path), "test") != base
    # Rewriting the weights file in place (new size and time) is a new entry too.
    before = feature_fingerprint(wds_config(tmp_path, f"backbone.weights={weights_a}"), "train")
    weights_a.write_bytes(b"c" * 12)
    after = feature_fingerprint(wds_config(tmp_path, f"backbone.weights={weights_a}"), "train")
    assert before != after


def test_layer_sets_and_probes_share_one_entry(tmp_path):
    """Every tapped layer is stored, so layer subsets and probes read the same entry."""
    base = feature_fingerprint(wds_config(tmp_path), "train")
    for overrides in (["probe.layers=last"], ["probe.layers=[2,4]"], ["probe=linear"],
                      ["probe.tokens=cls"], ["train.epochs=5"]):
        assert feature_fingerprint(wds_config(tmp_path, *overrides), "train") == base


def test_identical_settings_reuse_the_entry_and_others_do_not(tmp_path):
    cfg = wds_config(tmp_path)
    first = load_or_extract(cfg, "train")
    (first.path / "sentinel").write_text("kept")
    again = load_or_extract(wds_config(tmp_path), "train")
    assert again.path == first.path and (again.path / "sentinel").exists()
    assert again.meta == first.meta and len(entries(cfg)) == 1
    other = load_or_extract(wds_config(tmp_path, "backbone.img_size=48"), "train")
    assert other.path != first.path and len(entries(cfg)) == 2
    assert not np.array_equal(other.array("cls"), first.array("cls"))
    # fp16, 2 bytes per value: N x L x D per array, cls + ap = N x L x 2 x D x 2 bytes.
    cls, ap = first.array("cls"), first.array("ap")
    assert cls.dtype == ap.dtype == np.float16 and cls.shape == (24, 4, 192)
    assert cls.nbytes + ap.nbytes == 24 * 4 * 2 * 192 * 2
    assert isinstance(cls, np.memmap)
    assert np.array_equal(first.array("labels"), [int(x) for x in first.array("labels")])


def test_mismatching_or_damaged_entries_are_refused(tmp_path):
    cfg = wds_config(tmp_path)
    entry = load_or_extract(cfg, "test")
    cache, fingerprint = FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "test")
    meta_file = entry.path / "meta.json"
    good_meta = meta_file.read_text()

    meta = json.loads(good_meta)
    meta["fingerprint"]["backbone"]["tap"] = "block"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CacheMismatch, match="built with other settings; delete"):
        cache.load(fingerprint)

    meta_file.write_text("{not json")
    with pytest.raises(CacheMismatch, match="no readable meta.json"):
        cache.load(fingerprint)

    meta_file.write_text(good_meta)
    ap = entry.path / "ap.npy"
    ap.write_bytes(ap.read_bytes()[:-100])
    with pytest.raises(CacheMismatch, match="ap.npy unreadable"):
        load_or_extract(cfg, "test")  # refused, never silently rebuilt over

    np.save(ap, np.zeros((3, 4, 192), np.float16))
    with pytest.raises(CacheMismatch, match=r"ap.npy has shape \[3, 4, 192\]"):
        cache.load(fingerprint)


def test_partial_entries_refuse_damage_and_drop_unfinished_chunks(tmp_path):
    cache = FeatureCache(tmp_path)
    fingerprint = {"what": "test"}
    writer = EntryWriter(cache, fingerprint)
    rows = dict(cls=np.ones((2, 3, 4), np.float16), ap=np.ones((2, 3, 4), np.float16),
                labels=np.arange(2))
    writer.write_chunk(rows)
    writer.write_chunk(rows)
    (writer.partial / "tmp-chunk-000002.npz").write_bytes(b"half written")
    assert cache.load(fingerprint) is None  # a partial folder is never an entry
    writer = EntryWriter(cache, fingerprint)  # a restart drops the unfinished chunk
    assert writer.done_rows() == 4 and not list(writer.partial.glob("tmp-*"))
    (writer.partial / "chunk-000001.npz").write_bytes(b"damaged")
    with pytest.raises(CacheMismatch, match="chunk-000001.npz is damaged"):
        writer.done_rows()
    (writer.partial / "chunk-000001.npz").rename(writer.partial / "chunk-000003.npz")
    with pytest.raises(CacheMismatch, match="chunk 1 is missing"):
        writer.done_rows()
    with pytest.raises(CacheMismatch, match="started with other settings"):
        (writer.partial / "fingerprint.json").write_text("{}")
        EntryWriter(cache, fingerprint)


def test_corrupt_shard_promotes_nothing_and_a_repaired_shard_resumes(tmp_path):
    cfg = wds_config(tmp_path)
    shard = tmp_path / "wds" / "train" / "2.tar"
    intact = shard.read_bytes()
    data = bytearray(intact)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data[member.offset_data:member.offset_data + member.size] = b"\xff" * member.size
    shard.write_bytes(bytes(data))  # same size: the same fingerprint once repaired
    with pytest.raises(BadShard, match=r"train/2.tar: the image of sample"):
        load_or_extract(cfg, "train")
    cache, fingerprint = FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train")
    assert cache.load(fingerprint) is None and entries(cfg) == []
    writer = EntryWriter(cache, fingerprint)
    assert writer.done_rows() == 16  # shards 0 and 1, in whole chunks
    shard.write_bytes(intact)
    resumed = load_or_extract(cfg, "train")
    fresh = load_or_extract(wds_config(tmp_path / "fresh"), "train")
    for name in ("cls", "ap", "labels"):
        assert np.array_equal(resumed.array(name), fresh.array(name))


def test_warm_entry_loads_without_building_the_backbone(tmp_path, monkeypatch):
    """A paper backbone cannot be loaded offline; with its entry present none is needed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = wds_config(tmp_path, "backbone=vit_s")
    fingerprint = feature_fingerprint(cfg, "test")
    writer = EntryWriter(FeatureCache(cfg.paths.cache), fingerprint)
    cls = np.random.default_rng(0).standard_normal((8, 12, 384)).astype(np.float16)
    writer.write_chunk(dict(cls=cls, ap=cls, labels=np.arange(8)))
    writer.finish(dict(dims=[384] * 12))
    entry = load_or_extract(cfg, "test")
    assert np.array_equal(entry.array("cls"), cls)
