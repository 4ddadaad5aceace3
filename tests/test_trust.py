"""Faults a user meets: damaged cache arrays, changed images of the same size, two runs in the
same second, a full disk, a dead tracking server, 16-bit images."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from conftest import ROOT, compose_config, run_cli, tiny_overrides
from PIL import Image

from alfusion.data import split_signature
from alfusion.data.cache import CacheMismatch, EntryWriter, FeatureCache
from alfusion.data.extract import feature_fingerprint, load_or_extract
from alfusion.data.folder import ImageFolderSource
from alfusion.data.images import to_rgb
from alfusion.data.shards import decode_image
from alfusion.experiment import run_train


def flip_byte(path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# --- damaged cache arrays -------------------------------------------------------------------

def test_a_flipped_byte_or_changed_label_in_a_cache_entry_is_refused(tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path), "dataset.limit=12")
    entry = load_or_extract(cfg, "train")
    cache, fingerprint = FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train")
    assert set(entry.meta["checksums"]) == set(entry.meta["arrays"])
    cls = entry.path / "cls.npy"
    good = cls.read_bytes()
    flip_byte(cls)
    with pytest.raises(CacheMismatch, match=rf"{entry.path}: cls.npy is damaged.*delete the "
                                            rf"folder {entry.path} to re-extract"):
        cache.load(fingerprint)
    cls.write_bytes(good)
    assert cache.load(fingerprint) is not None

    labels = np.load(entry.path / "labels.npy")
    labels[3] = (labels[3] + 1) % 10
    np.save(entry.path / "labels.npy", labels)  # same shape and dtype: only the value differs
    with pytest.raises(CacheMismatch, match="labels.npy is damaged"):
        load_or_extract(cfg, "train")  # refused, never silently rebuilt over


def test_an_entry_without_checksums_is_used_with_a_warning(tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path), "dataset.limit=12")
    entry = load_or_extract(cfg, "test")
    meta = json.loads((entry.path / "meta.json").read_text())
    del meta["checksums"]  # as written before checksums existed
    (entry.path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="without checksums.*re-extract"):
        again = FeatureCache(cfg.paths.cache).load(feature_fingerprint(cfg, "test"))
    assert len(again) == 12


# --- image folders: content changes of the same size -----------------------------------------

def write_folder(root, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):  # BMP: the file size depends on the image size only
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.bmp")


def test_images_rewritten_with_the_same_size_make_a_new_cache_entry(tmp_path):
    root = tmp_path / "images"
    write_folder(root, seed=0)
    overrides = [*tiny_overrides(tmp_path / "out"), "dataset=folder", f"dataset.root={root}"]
    stat_cfg = compose_config(*overrides)
    content_cfg = compose_config(*overrides, "dataset.fingerprint=content")
    sizes = sorted(p.stat().st_size for p in root.rglob("*.bmp"))
    before = {m: split_signature(c.dataset, "train") for m, c in
              (("stat", stat_cfg), ("content", content_cfg))}
    entry = load_or_extract(stat_cfg, "train")
    times = {p: p.stat().st_mtime_ns for p in root.rglob("*.bmp")}

    time.sleep(0.01)
    write_folder(root, seed=1)  # other pixels, same sizes
    assert sorted(p.stat().st_size for p in root.rglob("*.bmp")) == sizes
    assert split_signature(stat_cfg.dataset, "train") != before["stat"]
    assert load_or_extract(stat_cfg, "train").path != entry.path  # a new entry, new features
    # content: also a copy that kept the old modification times is a change
    for path, mtime in times.items():
        os.utime(path, ns=(mtime, mtime))
    assert split_signature(stat_cfg.dataset, "train") == before["stat"]
    assert split_signature(content_cfg.dataset, "train") != before["content"]


# --- two runs in the same second --------------------------------------------------------------

def test_two_runs_asking_for_the_same_run_folder_get_two(tmp_path):
    # Both ask for the same folder, as two default runs started in the same second do.
    same = f"hydra.run.dir=${{unique_dir:{tmp_path}/runs/same}}"
    args = [*tiny_overrides(tmp_path), "logger=none", "search.validate=false", same]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    procs = [subprocess.Popen([sys.executable, "-m", "alfusion", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["same", "same_2"]
    for name in runs:
        assert (tmp_path / "runs" / name / "probe.pt").exists()


def test_an_explicit_existing_run_folder_is_used_as_given(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    run_cli(*tiny_overrides(tmp_path), "task=extract", "dataset.limit=8",
            f"hydra.run.dir={run_dir}")
    assert (run_dir / ".hydra").is_dir() and not (tmp_path / "mine_2").exists()


# --- a full disk --------------------------------------------------------------------------

def test_a_full_disk_fails_the_run_with_the_fix_and_the_entry_resumes(tmp_path, monkeypatch):
    cfg = compose_config(*tiny_overrides(tmp_path), "dataset.limit=12", "device=cpu",
                         "search.validate=false")
    real = shutil.disk_usage
    # The disk fills up after the chunks are written (the check before extraction saw room):
    # only the partial entry's folder, where the arrays are assembled, reports 1,000 bytes free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000)
                        if str(p).endswith(".partial") else real(p))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(OSError, match=r"no space left in .*\.partial for assembling cache "
                                      r"entry features-.*: it needs [\d,]+ bytes, 1,000 free"
                                      r".*Free disk space") as err:
        run_train(cfg, run_dir)
    assert err.value.errno == errno.ENOSPC
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["alfusion"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train"))
    assert writer.done_rows() == 12  # every chunk stays: nothing is extracted again
    monkeypatch.undo()
    assert len(load_or_extract(cfg, "train")) == 12


def test_a_write_that_hits_enospc_names_the_folder_and_leaves_the_chunks(tmp_path, monkeypatch):
    cfg = compose_config(*tiny_overrides(tmp_path), "dataset.limit=12")
    real_fsync = os.fsync

    def fsync_full_for_arrays(fd):  # the disk fills up while the .npy arrays are written
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full_for_arrays)
    with pytest.raises(OSError, match=r"no space left in .*\.partial .*needs [\d,]+ bytes"):
        load_or_extract(cfg, "train")
    writer = EntryWriter(FeatureCache(cfg.paths.cache), feature_fingerprint(cfg, "train"))
    assert writer.done_rows() == 12 and not list(writer.partial.glob("*.npy"))
    monkeypatch.undo()
    assert len(load_or_extract(cfg, "train")) == 12


# --- a tracking server that does not answer ---------------------------------------------------

def test_an_unreachable_tracking_server_fails_in_seconds_with_the_fixes(tmp_path):
    start = time.monotonic()
    proc = run_cli(*tiny_overrides(tmp_path), "logger.tracking_uri=http://127.0.0.1:9",
                   check=False, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert seconds < 20, seconds
    assert "http://127.0.0.1:9 does not answer" in proc.stderr
    assert "logger=none" in proc.stderr and "mlflow server" in proc.stderr
    assert not (tmp_path / "cache").exists()  # before any work


# --- 16-bit images -------------------------------------------------------------------------

def gradient_png(path=None) -> bytes:
    """A 16-bit greyscale PNG: a horizontal ramp over the whole 0..65535 range."""
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def assert_full_monotone_ramp(image: Image.Image) -> None:
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb.dtype == np.uint8
    row = rgb[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254  # spans the 8-bit range, not almost white
    assert (np.diff(row) >= 0).all() and len(set(row)) > 200
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    with Image.open(io.BytesIO(gradient_png())) as image:
        assert image.mode.startswith("I")  # PIL opens 16-bit PNGs in a wide mode
    for split in ("train", "test"):
        (tmp_path / split / "ramp").mkdir(parents=True)
        gradient_png(tmp_path / split / "ramp" / "0.png")
    image, label = ImageFolderSource(tmp_path, "train")[0]
    assert_full_monotone_ramp(image)
    assert_full_monotone_ramp(decode_image(gradient_png(), "shard.tar", "0"))  # webdatasets
    wide = Image.fromarray(np.linspace(0, 65535, 256).astype(np.int32)[None].repeat(4, 0),
                           mode="I")  # older Pillow opens 16-bit PNGs as mode I
    assert_full_monotone_ramp(to_rgb(wide))


