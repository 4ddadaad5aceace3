"""Images as the Python API takes them, and the tokens a backbone makes of them.

``images`` may be a folder (every image under it, sorted by path, as task=predict reads a plain
folder), an image file, a PIL image, encoded image bytes, or a list of any of these.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from alfusion.data.folder import plain_images
from alfusion.data.images import to_rgb
from alfusion.tokens import TokenSet, backbone_arrays


def read_images(images) -> tuple[list[Image.Image], list[str]]:
    """(RGB PIL images, a name for each: its path, or its index in the list) of ``images``."""
    if isinstance(images, (str, Path, Image.Image, bytes, bytearray)):
        images = [images]
    if not isinstance(images, Iterable):
        raise TypeError(f"images: a folder, an image file, a PIL image, image bytes or a list "
                        f"of them, not {type(images).__name__}")
    out, names = [], []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            if path.is_dir():
                for file in plain_images(path):
                    out.append(open_image(file))
                    names.append(str(file))
                continue
            if not path.is_file():
                raise FileNotFoundError(f"images: {path} is neither an image file nor a folder")
            out.append(open_image(path))
            names.append(str(path))
        elif isinstance(item, Image.Image):
            out.append(to_rgb(item))
            names.append(str(i))
        elif isinstance(item, (bytes, bytearray)):
            out.append(open_image(io.BytesIO(item)))
            names.append(str(i))
        else:
            raise TypeError(f"images[{i}]: a PIL image, an image path or image bytes, not "
                            f"{type(item).__name__}")
    if not out:
        raise ValueError("images: no image given")
    return out, names


def open_image(source) -> Image.Image:
    with Image.open(source) as image:
        return to_rgb(image)


@torch.no_grad()
def image_tokens(backbone, transform, token_set: TokenSet, images: list[Image.Image],
                 device: torch.device, batch_size: int = 64, as_cached: bool = True
                 ) -> torch.Tensor:
    """The probe's tokens (N, T, D), or (N, F) for a flat token set, of PIL ``images``: the
    backbone's eval ``transform``, one forward per batch, ``token_set`` stacking.
    ``as_cached``: the per-layer arrays pass through fp16 as the feature cache stores them, so
    a cached probe sees exactly the numbers the CLI's cache would give it."""
    backbone.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[i:i + batch_size]]).to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        with autocast:
            arrays = backbone_arrays(backbone, batch, token_set)
        if as_cached:
            arrays = {k: v.to(torch.float16) for k, v in arrays.items()}
        out.append(token_set.from_arrays(arrays, backbone.dims))
    return torch.cat(out)
