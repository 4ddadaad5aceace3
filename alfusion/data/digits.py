"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes): the offline default dataset."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset


def digits_split(split: str, test_fraction: float = 0.25, seed: int = 0,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split: images (N, 8, 8) in 0..16 and labels (N,)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=seed,
        stratify=digits.target)
    images, labels = {"train": (x_train, y_train), "test": (x_test, y_test)}[split]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def render(image: np.ndarray) -> Image.Image:
    """(8, 8) ink values 0..16 -> an 8x8 RGB image, white digit on black; the backbone's
    transform resizes it to the input size."""
    gray = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


class DigitsDataset(Dataset):
    """(transformed image, label) pairs of one split of the bundled digits."""

    def __init__(self, split: str, transform=None, test_fraction: float = 0.25, seed: int = 0,
                 limit: int | None = None) -> None:
        self.images, self.labels = digits_split(split, test_fraction, seed, limit)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = render(self.images[i])
        return (self.transform(image) if self.transform else image), int(self.labels[i])
