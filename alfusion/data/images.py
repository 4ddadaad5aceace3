"""PIL images to 8-bit RGB, including 16-bit and 32-bit greyscale ones."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose values do not fit 0..255: PIL's convert("RGB") clips them instead of scaling,
# so a 16-bit PNG comes out almost white.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit greyscale (PIL modes I;16*, and mode I with values up to
    65535, as PIL opens 16-bit PNGs) keeps its top 8 bits (value >> 8); mode I with larger
    values and float images (F) are scaled by their maximum."""
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        values = values.astype(np.uint32)
    if image.mode == "F" or values.max(initial=0) > 65535:
        top = float(values.max(initial=0)) or 1.0
        gray = np.clip(values.astype(np.float64) / top * 255.0 + 0.5, 0, 255)
    else:
        gray = np.clip(values, 0, 65535).astype(np.uint32) >> 8
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
