"""Image sources: clip_benchmark webdatasets (local, HTTP), image folders, dataset configs, and
the clear errors that bad input must give before any work. Real tar shards in tmp folders."""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from alfusion.data import build_dataset, dataset_identity, split_signature
from alfusion.data.digits import digits_split, render
from alfusion.data.folder import ImageFolderSource
from alfusion.data.shards import BadShard
from alfusion.data.wds import HF_URL, DatasetUnavailable, dataset_base, read_text
from alfusion.data.wds_writer import write_digits_wds, write_wds_split

# docs/protocol.md, models and datasets: config name -> (clip-benchmark/wds_<name>, classes)
PAPER_DATASETS = {
    "fer2013": ("fer2013", 7), "voc2007": ("voc2007", 20), "cars": ("cars", 196),
    "fgvc_aircraft": ("fgvc_aircraft", 100), "stl10": ("stl10", 10), "gtsrb": ("gtsrb", 43),
    "country211": ("country211", 211), "caltech101": ("vtab-caltech101", 102),
    "cifar10": ("vtab-cifar10", 10), "cifar100": ("vtab-cifar100", 100),
    "diabetic_retinopathy": ("vtab-diabetic_retinopathy", 5), "dmlab": ("vtab-dmlab", 6),
    "dtd": ("vtab-dtd", 47), "eurosat": ("vtab-eurosat", 10), "flowers": ("vtab-flowers", 102),
    "pets": ("vtab-pets", 37), "pcam": ("vtab-pcam", 2), "resisc45": ("vtab-resisc45", 45),
    "svhn": ("vtab-svhn", 10), "imagenet1k": ("imagenet1k", 1000),
}


def wds_cfg(root, **extra):
    return OmegaConf.create({**dict(name="t", source="wds", root=str(root), hf_name=None,
                                    num_classes=None, limit=None), **extra})


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "webp", "jpg"])
def test_wds_reads_every_sample_in_file_order(tmp_path, ext):
    root = write_digits_wds(tmp_path / "d", train=37, test=5, shard_size=10, ext=ext)
    source = build_dataset(wds_cfg(root), "train")
    images, labels = digits_split("train", limit=37)
    got = list(source)
    assert source.counts == (10, 10, 10, 7) and len(source) == 37
    assert [label for _, label in got] == [int(y) for y in labels]
    if ext != "jpg":  # lossless formats round-trip exactly
        for (image, _), x in zip(got, images, strict=True):
            assert np.array_equal(as_array(image), as_array(render(x)))


def test_wds_window_and_limit(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=40, test=5, shard_size=8)
    source = build_dataset(wds_cfg(root, limit=30), "train")
    labels = [y for _, y in source]
    assert len(labels) == len(source) == 30
    # A window that starts in the third shard skips the first two unopened: same rows.
    assert [y for _, y in source.with_window(19, 23)] == labels[19:23]


def test_wds_dataloader_workers_keep_file_order(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=45, test=5, shard_size=7)
    source = build_dataset(wds_cfg(root), "train").with_transform(
        lambda im: torch.from_numpy(as_array(im).copy()))
    serial = [(x, y) for x, y in DataLoader(source.with_block(4), batch_size=4)]
    parallel = [(x, y) for x, y in DataLoader(source.with_block(4), batch_size=4,
                                              num_workers=2)]
    assert len(serial) == len(parallel) == 12
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A real local HTTP server over tmp_path (no network needed)."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wds_streams_over_http_in_order(http_root):
    folder, url = http_root
    write_digits_wds(folder / "d", train=21, test=5, shard_size=8)
    local = [y for _, y in build_dataset(wds_cfg(folder / "d"), "train")]
    streamed = build_dataset(wds_cfg(f"{url}/d/"), "train")
    assert streamed.counts is None  # a stream is not scanned ahead
    assert [y for _, y in streamed] == local
    assert [y for _, y in streamed.with_window(10, None)] == local[10:]
    assert split_signature(wds_cfg(f"{url}/d"), "train") is None


def test_paper_dataset_configs_name_the_hf_webdatasets():
    names = {p.stem for p in (CONF / "dataset").glob("*.yaml")}
    assert set(PAPER_DATASETS) <= names and {"digits", "wds", "folder"} <= names
    for name, (hf_name, classes) in PAPER_DATASETS.items():
        cfg = compose_config(f"dataset={name}").dataset
        assert (cfg.source, cfg.hf_name, cfg.num_classes) == ("wds", hf_name, classes)
        assert dataset_base(cfg) == HF_URL.format(name=hf_name)
    assert HF_URL.format(name="vtab-eurosat") == (
        "https://huggingface.co/datasets/clip-benchmark/wds_vtab-eurosat/resolve/main")


def test_hf_source_fails_fast_offline_naming_dataset_root(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config("dataset=eurosat").dataset
    with pytest.raises(DatasetUnavailable, match="HF_HUB_OFFLINE.*dataset.root=") as err:
        build_dataset(cfg, "train")
    assert "wds_vtab-eurosat/resolve/main/classnames.txt" in str(err.value)


def test_unresolvable_host_fails_fast_naming_dataset_root(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # .invalid never resolves (RFC 2606): the DNS failure is immediate, no hang.
    with pytest.raises(DatasetUnavailable, match="unreachable.*dataset.root="):
        read_text("https://hf.invalid/datasets/clip-benchmark/wds_x/resolve/main", "a.txt")


def test_wds_layout_errors_before_any_work(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=8, test=4, shard_size=4)
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(DatasetUnavailable, match=r"test/nshards.txt does not exist"):
        build_dataset(wds_cfg(root), "test")
    (root / "classnames.txt").unlink()
    with pytest.raises(DatasetUnavailable, match="classnames.txt does not exist"):
        build_dataset(wds_cfg(root), "train")
    with pytest.raises(DatasetUnavailable, match="dataset.root=PATH"):
        build_dataset(OmegaConf.create(dict(name="x", source="wds")), "train")


def test_wds_class_count_must_match_the_config(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=8, test=4, shard_size=4)
    with pytest.raises(DatasetUnavailable, match="lists 10 classes but .* num_classes=7"):
        build_dataset(wds_cfg(root, num_classes=7), "train")


def test_wds_empty_split_is_refused(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=8, test=4, shard_size=4)
    (root / "test" / "nshards.txt").write_text("0\n")
    with pytest.raises(DatasetUnavailable, match="empty"):
        build_dataset(wds_cfg(root), "test")
    write_wds_split(root, "test", [], [str(i) for i in range(10)])  # no samples at all
    (root / "test" / "nshards.txt").write_text("1\n")
    tarfile.open(root / "test" / "0.tar", "w").close()
    with pytest.raises(DatasetUnavailable, match="empty"):
        build_dataset(wds_cfg(root), "test")


def test_wds_label_outside_class_range_names_the_shard(tmp_path):
    root = tmp_path / "d"
    samples = [(render(np.eye(8) * 16), 3), (render(np.eye(8) * 8), 12)]
    write_wds_split(root, "train", samples, ["a", "b", "c", "d", "e"], shard_size=1)
    with pytest.raises(BadShard, match=r"train/1.tar: sample .* label 12, outside 0..4"):
        build_dataset(wds_cfg(root), "train")


def test_missing_label_or_image_names_the_shard(tmp_path):
    root = write_digits_wds(tmp_path / "d", train=4, test=4, shard_size=4)
    shard = root / "train" / "0.tar"
    with tarfile.open(shard, "w") as tar:  # an image without its cls
        data = io.BytesIO(b"not needed")
        info = tarfile.TarInfo("s0000000.png")
        info.size = len(data.getvalue())
        tar.addfile(info, data)
    with pytest.raises(BadShard, match=r"0.tar: sample 's0000000' has keys \['png'\]"):
        build_dataset(wds_cfg(root), "train")


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_is_named_before_any_work(tmp_path, cut):
    root = write_digits_wds(tmp_path / "d", train=12, test=4, shard_size=6)
    shard = root / "train" / "1.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    if cut == "mid_member":
        size = len(data) // 2 + 100
    else:  # exactly after the 4th sample's members: only the end-of-archive marker is missing
        last = members[7]
        size = last.offset_data + -(-last.size // 512) * 512
    shard.write_bytes(data[:size])
    with pytest.raises(BadShard, match=r"train/1.tar is truncated"):
        build_dataset(wds_cfg(root), "train")


def test_corrupt_image_is_named_when_read(tmp_path):
    root = tmp_path / "d"
    good = render(np.eye(8) * 16)
    write_wds_split(root, "train", [(good, 0), (good, 1), (good, 2)], ["a", "b", "c"],
                    shard_size=3)
    shard = root / "train" / "0.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = tar.getmember("s0000001.png")
    data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    shard.write_bytes(bytes(data))
    source = build_dataset(wds_cfg(root), "train")  # the scan reads no image data
    with pytest.raises(BadShard, match=r"0.tar: the image of sample 's0000001' cannot be"):
        list(source)


def make_folder(root: Path, per_class: dict[str, dict[str, int]]) -> None:
    for split, classes in per_class.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                render(np.eye(8) * (i + 1)).save(root / split / name / f"{i:03d}.png")


def test_image_folder_source(tmp_path):
    make_folder(tmp_path, {"train": {"cat": 2, "dog": 3}, "test": {"dog": 1, "emu": 2}})
    train = ImageFolderSource(tmp_path, "train")
    test = build_dataset(OmegaConf.create(dict(name="f", source="folder", root=str(tmp_path),
                                               num_classes=3, limit=None)), "test")
    assert train.classnames == test.classnames == ["cat", "dog", "emu"]
    assert [y for _, y in train] == [0, 0, 1, 1, 1]
    assert [y for _, y in test] == [1, 2, 2]
    assert isinstance(train[0][0], Image.Image)
    cfg = OmegaConf.create(dict(name="f", source="folder", root=str(tmp_path)))
    assert split_signature(cfg, "train") != split_signature(cfg, "test")
    assert dataset_identity(cfg)["root"] == str(tmp_path.resolve())


def test_image_folder_errors(tmp_path):
    make_folder(tmp_path, {"train": {"cat": 1}})
    with pytest.raises(DatasetUnavailable, match="no test/ folder"):
        ImageFolderSource(tmp_path, "test")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetUnavailable, match="'test' of image folder .* is empty"):
        ImageFolderSource(tmp_path, "test")
    with pytest.raises(DatasetUnavailable, match="dataset.root=PATH"):
        build_dataset(compose_config("dataset=folder").dataset, "train")
    with pytest.raises(DatasetUnavailable, match="1 class folders but dataset.num_classes=4"):
        build_dataset(OmegaConf.create(dict(name="f", source="folder", root=str(tmp_path),
                                            num_classes=4)), "train")


def test_identity_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = dataset_identity(OmegaConf.create(dict(source="wds", root="data")))
    assert relative["root"] == os.path.join(str(tmp_path.resolve()), "data")
