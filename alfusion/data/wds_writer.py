"""Write (image, label) pairs as a clip_benchmark webdataset split (the layout ``wds.py`` reads).

Useful to convert a local dataset once (``dataset=wds dataset.root=...`` then streams it in
order) and to build small real datasets for tests.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image


def encode_image(image: Image.Image, ext: str) -> bytes:
    """PIL image -> bytes of format ``ext`` (jpg | jpeg | png | webp; webp is lossless)."""
    buffer = io.BytesIO()
    options = {"lossless": True} if ext == "webp" else {}
    image.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper()), **options)
    return buffer.getvalue()


def write_wds_split(root: str | Path, split: str, samples: Iterable[tuple[Image.Image, int]],
                    classnames: Sequence[str], shard_size: int = 1000,
                    ext: str = "png") -> list[int]:
    """Write ``samples`` to ``root/split/{0..S-1}.tar`` (``shard_size`` samples per shard), with
    ``root/split/nshards.txt`` and ``root/classnames.txt``. Returns the per-shard counts."""
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
    counts: list[int] = []
    writer = None
    for index, (image, label) in enumerate(samples):
        if index % shard_size == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(folder / f"{len(counts)}.tar"))
            counts.append(0)
        writer.write({"__key__": f"s{index:07d}", ext: encode_image(image, ext),
                      "cls": str(int(label)).encode()})
        counts[-1] += 1
    if writer is not None:
        writer.close()
    (folder / "nshards.txt").write_text(f"{len(counts)}\n")
    return counts


def write_digits_wds(root: str | Path, train: int = 64, test: int = 32, shard_size: int = 16,
                     ext: str = "png") -> Path:
    """A small real webdataset of the bundled digits (first ``train``/``test`` images of each
    split): an offline example of the clip_benchmark layout, for demos and tests."""
    from alfusion.data.digits import digits_split, render

    for split, n in (("train", train), ("test", test)):
        images, labels = digits_split(split, limit=n)
        pairs = ((render(x), int(y)) for x, y in zip(images, labels, strict=True))
        write_wds_split(root, split, pairs, [str(i) for i in range(10)],
                        shard_size=shard_size, ext=ext)
    return Path(root)
