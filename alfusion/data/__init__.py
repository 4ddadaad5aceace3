"""Image sources: ``build_dataset(cfg, split, transform)`` -> a Dataset of (image, label)."""

from __future__ import annotations

from torch.utils.data import Dataset

from alfusion.data.digits import DigitsDataset


def build_dataset(cfg, split: str, transform) -> Dataset:
    """The ``split`` ("train" | "test") of the dataset in a ``conf/dataset`` config."""
    if cfg.source == "digits":
        return DigitsDataset(split, transform, test_fraction=cfg.test_fraction,
                             seed=cfg.split_seed, limit=cfg.get("limit"))
    raise ValueError(f"unknown dataset source {cfg.source!r}")


def dataset_identity(cfg) -> dict:
    """Everything that decides which images (in which order) a split holds: for fingerprints."""
    keys = ("source", "name", "root", "url", "test_fraction", "split_seed", "limit")
    return {k: cfg.get(k) for k in keys if cfg.get(k) is not None}
