"""clip_benchmark webdatasets, from a local folder or streamed from Hugging Face.

Layout (the clip_benchmark convention)::

    <root>/classnames.txt          one class name per line; label i is line i
    <root>/<split>/nshards.txt     the number of shards S
    <root>/<split>/0.tar ... S-1.tar

Samples carry an image (``webp``, ``png``, ``jpg`` or ``jpeg``) and an integer ``cls``. They
are read in file order, exactly once: no shuffling, no resampling, so row i of a cache entry is
sample i of the split. A local split is checked before any work (labels, truncation, counts);
a streamed one is checked as it is read.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from alfusion.data.shards import (
    BadShard,
    decode_image,
    image_and_label,
    is_remote,
    iter_samples,
    scan_local_shard,
)
from alfusion.errors import ConfigError

HF_URL = "https://huggingface.co/datasets/clip-benchmark/wds_{name}/resolve/main"
TEXT_TIMEOUT_S = 20


class DatasetUnavailable(ConfigError, RuntimeError):
    """A dataset's files cannot be found, reached or decoded: a refusal (one line, exit 2)."""


def dataset_base(cfg) -> str:
    """The local root folder (absolute), the root URL, or the Hugging Face URL of a
    ``source: wds`` config."""
    if cfg.get("root"):
        if is_remote(str(cfg.root)):  # any HTTP(S) mirror of the layout
            return str(cfg.root).rstrip("/")
        return str(Path(cfg.root).expanduser().resolve())
    if cfg.get("hf_name"):
        return HF_URL.format(name=cfg.hf_name)
    raise DatasetUnavailable(f"dataset {cfg.name!r} has neither dataset.root nor "
                             "dataset.hf_name: set dataset.root=PATH to a folder in the "
                             "clip_benchmark layout ({train,test}/nshards.txt, classnames.txt)")


def read_text(base: str, rel: str) -> str:
    """The text file ``base/rel``; a missing or unreachable file raises DatasetUnavailable."""
    location = f"{base}/{rel}"
    if not is_remote(base):
        if not os.path.isfile(location):
            raise DatasetUnavailable(
                f"{location} does not exist: a clip_benchmark webdataset folder needs "
                "classnames.txt and <split>/nshards.txt beside <split>/0.tar ...")
        return Path(location).read_text()
    hugging_face = "huggingface.co/" in base
    fix = ("download the dataset (e.g. `huggingface-cli download --repo-type dataset "
           f"{_hf_repo(base)} --local-dir DIR`) and set dataset.root=DIR" if hugging_face
           else "set dataset.root=DIR to a local copy")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    if hugging_face and offline:
        raise DatasetUnavailable(f"{location} cannot be read: HF_HUB_OFFLINE is set; {fix}")
    try:
        with urllib.request.urlopen(location, timeout=TEXT_TIMEOUT_S) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        raise DatasetUnavailable(f"{location}: HTTP {err.code}; check dataset.hf_name, "
                                 f"or {fix}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DatasetUnavailable(f"{location} is unreachable ({err}); {fix}") from err


def _hf_repo(url: str) -> str:
    return url.split("/datasets/", 1)[-1].split("/resolve/", 1)[0]


@dataclass(frozen=True)
class WdsSplit:
    """Where one split's shards are and what its classes are."""

    base: str
    split: str
    shards: tuple[str, ...]
    classnames: tuple[str, ...]

    @property
    def remote(self) -> bool:
        return is_remote(self.base)


def read_split(base: str, split: str) -> WdsSplit:
    """Read classnames.txt and <split>/nshards.txt; clear errors for a wrong layout."""
    classnames = tuple(line.strip() for line in read_text(base, "classnames.txt").splitlines()
                       if line.strip())
    if not classnames:
        raise DatasetUnavailable(f"{base}/classnames.txt lists no classes")
    text = read_text(base, f"{split}/nshards.txt").strip()
    try:
        nshards = int(text)
    except ValueError as err:
        raise DatasetUnavailable(f"{base}/{split}/nshards.txt holds {text[:40]!r}, "
                                 "not a shard count") from err
    if nshards <= 0:
        raise DatasetUnavailable(f"split {split!r} of {base} is empty (nshards.txt says "
                                 f"{nshards})")
    shards = tuple(f"{base}/{split}/{i}.tar" for i in range(nshards))
    if not is_remote(base):
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DatasetUnavailable(f"{len(missing)} of the {nshards} shards listed by "
                                     f"{base}/{split}/nshards.txt are missing, e.g. {missing[0]}")
    return WdsSplit(base, split, shards, classnames)


@dataclass(frozen=True)
class WebDatasetSource(IterableDataset):
    """(image, label) pairs of one split in file order; an IterableDataset for a DataLoader.

    counts: samples per shard when known (local splits are scanned), else None (streamed).
    start, stop: the row window [start, stop) of the split this source yields (resume, DDP
    parts, ``limit``). block: the DataLoader batch size; with W workers, worker w decodes rows
    whose block number is w mod W, so the DataLoader's round-robin over workers returns the
    batches in file order.
    """

    split_info: WdsSplit
    transform: object = None
    counts: tuple[int, ...] | None = None
    start: int = 0
    stop: int | None = None
    block: int = 1
    shard_range: tuple[int, int] | None = None  # DDP part of a streamed split: shards [a, b)

    @property
    def num_classes(self) -> int:
        return len(self.split_info.classnames)

    def total(self) -> int | None:
        """Rows of the whole split (before the window), when the shard counts are known."""
        return None if self.counts is None else sum(self.counts)

    def __len__(self) -> int:
        total = self.total()
        if total is None:
            raise TypeError("a streamed split has no known length")
        stop = total if self.stop is None else min(self.stop, total)
        return max(stop - self.start, 0)

    def with_window(self, start: int, stop: int | None) -> WebDatasetSource:
        return replace(self, start=start, stop=stop)

    def with_block(self, block: int) -> WebDatasetSource:
        return replace(self, block=block)

    def with_transform(self, transform) -> WebDatasetSource:
        return replace(self, transform=transform)

    def _shards(self):
        """(shard index, location, row index of its first sample or None) to read."""
        first, last = self.shard_range or (0, len(self.split_info.shards))
        row = 0 if self.counts is not None else None
        for i in range(first, last):
            if self.counts is not None and row + self.counts[i] <= self.start:
                row += self.counts[i]  # whole shard before the window: not even opened
                continue
            yield i, self.split_info.shards[i], row
            if self.counts is not None:
                row += self.counts[i]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        row = None
        for _, location, first_row in self._shards():
            row = first_row if first_row is not None else (row or 0)
            for key, files in iter_samples(location):
                if self.stop is not None and row >= self.stop:
                    return
                mine = row >= self.start and ((row - self.start) // self.block) % workers == worker
                row += 1
                if not mine:
                    continue  # skipped rows are neither decoded nor transformed
                data, label = image_and_label(location, key, files)
                if not 0 <= label < self.num_classes:
                    raise BadShard(f"shard {location}: sample {key!r} has label {label}, "
                                   f"outside 0..{self.num_classes - 1}")
                image = decode_image(data, location, key)
                yield (self.transform(image) if self.transform else image), label


def scan_split(split_info: WdsSplit) -> tuple[int, ...]:
    """Per-shard sample counts of a local split, checked (see ``scan_local_shard``)."""
    counts = tuple(scan_local_shard(s, len(split_info.classnames)) for s in split_info.shards)
    if sum(counts) == 0:
        raise DatasetUnavailable(f"split {split_info.split!r} of {split_info.base} is empty: "
                                 "its shards hold no samples")
    return counts


def wds_source(cfg, split: str, transform=None) -> WebDatasetSource:
    """The checked source of ``split`` for a ``source: wds`` dataset config."""
    split_info = read_split(dataset_base(cfg), split)
    expected = cfg.get("num_classes")
    if expected is not None and expected != len(split_info.classnames):
        raise DatasetUnavailable(
            f"{split_info.base}/classnames.txt lists {len(split_info.classnames)} classes but "
            f"dataset {cfg.name} has num_classes={expected}: wrong folder, or fix num_classes")
    counts = None if split_info.remote else scan_split(split_info)
    return WebDatasetSource(split_info, transform, counts=counts, stop=cfg.get("limit"))


def part_of_stream(source: WebDatasetSource, rank: int, world: int) -> WebDatasetSource:
    """A streamed split's DDP part: a contiguous range of shards (row counts are unknown)."""
    n = len(source.split_info.shards)
    if source.stop is not None:  # a global row limit cannot be split without counts
        return source if rank == 0 else replace(source, shard_range=(0, 0))
    return replace(source, shard_range=(rank * n // world, (rank + 1) * n // world))
