"""Reading webdataset tar shards: samples in file order, from a local file or an HTTP stream.

A sample is the run of consecutive tar members that share a key (the member path up to the
first dot of its file name, as webdataset groups them): ``0001.jpg`` + ``0001.cls``.
Every failure names the shard, so a damaged download is found at once.
"""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from alfusion.data.images import to_rgb
from alfusion.errors import ConfigError

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # the clip_benchmark image keys, in priority order
HTTP_TIMEOUT_S = 30


class BadShard(ConfigError, RuntimeError):
    """A shard is truncated, not a tar file, or holds a sample that cannot be used: a refusal
    (one line, exit 2) naming the shard and the sample."""


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def split_key(member_name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``); the extension is lower-cased."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def open_stream(location: str):
    """A binary stream over a local shard or a URL (read sequentially, never seeked)."""
    if is_remote(location):
        try:
            return urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S)
        except (urllib.error.URLError, OSError) as err:
            raise BadShard(f"shard {location} could not be opened: {err}") from err
    return open(location, "rb")


def iter_samples(location: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for every sample of one shard, in file order."""
    key, files = None, {}
    try:
        with open_stream(location) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_key(member.name)
                if member_key != key and key is not None:
                    yield key, files
                    files = {}
                key = member_key
                files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadShard(f"shard {location} is truncated or not a tar file ({err}): "
                       "download it again") from err
    if key is not None:
        yield key, files


def image_and_label(location: str, key: str, files: dict[str, bytes]) -> tuple[bytes, int]:
    """The image bytes (first of webp/png/jpg/jpeg) and the integer ``cls`` label of a sample."""
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None or "cls" not in files:
        raise BadShard(f"shard {location}: sample {key!r} has keys {sorted(files)}, needs an "
                       f"image ({'/'.join(IMAGE_EXTS)}) and 'cls'")
    try:
        label = int(files["cls"].decode().strip())
    except ValueError as err:
        raise BadShard(f"shard {location}: sample {key!r} has a non-integer cls "
                       f"{files['cls'][:20]!r}") from err
    return image, label


def decode_image(data: bytes, location: str, key: str) -> Image.Image:
    """PIL-decode image bytes to RGB; a corrupt image names its shard and key."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)
    except Exception as err:  # PIL raises many types for damaged data
        raise BadShard(f"shard {location}: the image of sample {key!r} cannot be decoded "
                       f"({err}): the shard is damaged, download it again") from err


def scan_local_shard(path: str | Path, num_classes: int) -> int:
    """Check a local shard without decoding images; return its sample count.

    Reads only tar headers and the ``cls`` members (seeking over image data), so a whole split
    is checked in seconds before any backbone work: truncation (also at a member boundary,
    found by the missing end-of-archive blocks), samples without image or label, and labels
    outside 0..num_classes-1 all raise BadShard naming the shard.
    """
    path = str(path)
    count, key, files = 0, None, {}

    def close_sample() -> None:
        nonlocal count
        _, label = image_and_label(path, key, files)
        if not 0 <= label < num_classes:
            raise BadShard(f"shard {path}: sample {key!r} has label {label}, outside "
                           f"0..{num_classes - 1} (classnames.txt lists {num_classes} classes)")
        count += 1

    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_key(member.name)
                if member_key != key and key is not None:
                    close_sample()
                    files = {}
                key = member_key
                # Image bytes are not read; an empty placeholder marks that the image exists.
                files[ext] = tar.extractfile(member).read() if ext == "cls" else b""
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadShard(f"shard {path} is truncated or not a tar file ({err}): "
                       "download it again") from err
    if key is not None:
        close_sample()
    if os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
        raise BadShard(f"shard {path} is truncated (no end-of-archive marker after "
                       f"{count} samples): download it again")
    return count
