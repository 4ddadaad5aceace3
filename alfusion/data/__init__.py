"""Image sources: ``build_dataset(cfg, split, transform)`` -> a Dataset of (image, label).

Sources (``dataset.source``): ``digits`` (bundled, the offline default), ``wds`` (clip_benchmark
webdataset, local folder or Hugging Face), ``folder`` (``root/{train,test}/<class>/<image>``,
or with split ``images`` every image under ``root``, unlabeled: task=predict).
Building a source checks its layout, labels and emptiness, so bad input fails before any work.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch.utils.data import Dataset

from alfusion.data.digits import DigitsDataset
from alfusion.data.folder import PLAIN, ImageFolderSource, folder_classes, plain_images
from alfusion.data.shards import is_remote, iter_samples
from alfusion.data.wds import (
    DatasetUnavailable,
    WebDatasetSource,
    dataset_base,
    read_split,
    wds_source,
)

SOURCES = ("digits", "wds", "folder")


def build_dataset(cfg, split: str, transform=None) -> Dataset:
    """The ``split`` ("train" | "test") of the dataset in a ``conf/dataset`` config."""
    if cfg.source == "digits":
        return DigitsDataset(split, transform, test_fraction=cfg.test_fraction,
                             seed=cfg.split_seed, limit=cfg.get("limit"))
    if cfg.source == "wds":
        return at_least_two_classes(wds_source(cfg, split, transform), cfg)
    if cfg.source == "folder":
        if not cfg.get("root"):
            raise DatasetUnavailable("dataset=folder needs dataset.root=PATH "
                                     "(PATH/{train,test}/<class>/<image>)")
        source = ImageFolderSource(cfg.root, split, transform, limit=cfg.get("limit"))
        if split == PLAIN:
            return source  # new images, no labels: no classes to check
        expected = cfg.get("num_classes")
        if expected is not None and expected != source.num_classes:
            raise DatasetUnavailable(f"image folder {source.root} has {source.num_classes} "
                                     f"class folders but dataset.num_classes={expected}")
        return at_least_two_classes(source, cfg)
    raise ValueError(f"unknown dataset source {cfg.source!r}: use one of {SOURCES}")


def at_least_two_classes(source: Dataset, cfg) -> Dataset:
    """``source`` if its class list (class folders, classnames.txt) has two classes or more:
    a one-class dataset is refused here, before the backbone is loaded."""
    if source.num_classes < 2:
        raise DatasetUnavailable(f"dataset {cfg.name} at {cfg.get('root') or cfg.get('hf_name')} "
                                 f"has {source.num_classes} class: a classifier needs at least "
                                 "two (class folders, or lines of classnames.txt)")
    return source


def with_transform(dataset: Dataset, transform) -> Dataset:
    """The same source with ``transform`` applied to its PIL images."""
    if isinstance(dataset, WebDatasetSource):
        return dataset.with_transform(transform)
    dataset.transform = transform
    return dataset


def dataset_identity(cfg) -> dict:
    """Everything that decides which images (in which order) a split holds: for fingerprints.
    A local root counts by its absolute path, so the working directory does not matter."""
    keys = ("source", "name", "hf_name", "root", "url", "test_fraction", "split_seed", "limit")
    identity = {k: cfg.get(k) for k in keys if cfg.get(k) is not None}
    if identity.get("root") and not is_remote(str(identity["root"])):
        identity["root"] = str(Path(identity["root"]).expanduser().resolve())
    return identity


def split_signature(cfg, split: str) -> str | None:
    """A digest of a local split's files, so that changed data in the same folder makes a new
    cache entry. None for bundled or streamed data.

    ``dataset.fingerprint``: ``stat`` (default) digests each file's relative path, size and
    modification time in nanoseconds, so an image rewritten with other content of the same
    size counts as changed; ``content`` digests the files' bytes instead (slower: every file
    is read; for copies that keep times, or file systems with coarse times).
    """
    root = cfg.get("root")
    if cfg.source not in ("wds", "folder") or not root or is_remote(str(root)):
        return None
    mode = cfg.get("fingerprint") or "stat"
    if mode not in ("stat", "content"):
        raise ValueError(f"dataset.fingerprint={mode!r}: use stat or content")
    root = Path(root).expanduser().resolve()
    if cfg.source == "wds":
        files = [Path(s) for s in read_split(str(root), split).shards] + [root / "classnames.txt"]
    elif split == PLAIN:
        files = plain_images(root)
    else:
        files = sorted(p for p in (root / split).rglob("*") if p.is_file())
    digest = hashlib.sha256(f"{mode}\n".encode())
    for path in files:
        if mode == "content":
            with open(path, "rb") as f:
                stamp = hashlib.file_digest(f, "sha256").hexdigest()
        else:
            stat = os.stat(path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{path.relative_to(root)}:{stamp}\n".encode())
    return digest.hexdigest()[:16]


def class_names(cfg, num_classes: int) -> list[str]:
    """The ``num_classes`` class names of a dataset config (digits: 0..9; wds: classnames.txt;
    folder: the class folders); the label numbers as text where they cannot be read."""
    try:
        if cfg.source == "digits":
            names = [str(i) for i in range(10)]
        elif cfg.source == "wds":
            names = list(read_split(dataset_base(cfg), "train").classnames)
        else:
            names = folder_classes(Path(cfg.root).expanduser().resolve())
    except (DatasetUnavailable, OSError, TypeError):
        names = []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def sample_keys(dataset: Dataset, split: str) -> list[str]:
    """A name for each sample of a source, in order: an image folder's paths relative to its
    root, a webdataset's ``<split>/<shard file>/<key>`` (its shards are read once more for the
    keys), else ``<split>/<index>``."""
    if isinstance(dataset, ImageFolderSource):
        return dataset.keys()
    if isinstance(dataset, WebDatasetSource):
        shards = dataset.split_info.shards
        keys = [f"{split}/{Path(shard).name}/{key}" for shard in shards
                for key, _ in iter_samples(shard)]
        return keys[dataset.start:dataset.stop]
    return [f"{split}/{i}" for i in range(len(dataset))]
