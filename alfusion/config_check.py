"""One check of the composed config before any work: every bad setting is refused with its
key, its value and what is allowed, so that a typo fails in seconds, not after extraction.

``check_config(cfg)`` also normalises plain intents: a single number for ``search.lr``,
``search.wd`` or ``search.dropout`` means a one-value grid. ``check_labels`` is the part that
can only run once the labels of a split are read (the number of classes present).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

TASKS = ("train", "extract", "evaluate")
MODES = ("cached", "end2end", "finetune")
CONF = Path(__file__).resolve().parents[1] / "conf"
# A value that becomes one file or folder name: no separators, no "..", no shell surprises.
SAFE_NAME = re.compile(r"[A-Za-z0-9._+=-]+")
SAFE_NAME_RULE = "one path component of letters, digits and . _ - + = (no '/', no '..')"
# Config keys whose values become file or folder names (run folders, sweep subfolders,
# report files).
PATH_NAME_KEYS = ("dataset.name", "backbone.key", "probe.name")
FINGERPRINT_MODES = ("stat", "content")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key, the value and what is allowed."""


def refuse(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_path_name(key: str, value) -> str:
    """``value`` if it is a safe single path component, else ConfigError naming ``key``."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text) or text in (".", "..") or ".." in text:
        refuse(key, value, f"it becomes a file or folder name, so it must be {SAFE_NAME_RULE}")
    return text


def select(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(cfg, key: str, minimum: int, allowed: str | None = None) -> None:
    value = select(cfg, key)
    if value is not None and (not is_int(value) or value < minimum):
        refuse(key, value, allowed or f"an integer >= {minimum}")


def check_grid(cfg, key: str, ok, allowed: str) -> None:
    """``search.<key>``: a list of numbers each passing ``ok``; a single number becomes a
    one-value list (``search.lr=0.01`` means that one learning rate)."""
    value = select(cfg, key)
    if value is None:
        return
    if is_number(value):
        value = [value]
        parent, leaf = key.rsplit(".", 1)
        with open_dict(cfg):
            select(cfg, parent)[leaf] = value
    if not isinstance(value, (list, ListConfig)) or len(value) == 0:
        refuse(key, value, f"a number or a non-empty list of numbers, each {allowed}")
    for v in value:
        if not is_number(v) or not math.isfinite(v) or not ok(v):
            refuse(key, value, f"each value must be a finite number {allowed} ({v!r} is not)")


def check_fraction(cfg, key: str, low_open: bool, high_open: bool) -> None:
    value = select(cfg, key)
    if value is None:
        return
    low = (lambda v: v > 0) if low_open else (lambda v: v >= 0)
    high = (lambda v: v < 1) if high_open else (lambda v: v <= 1)
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    if not is_number(value) or not low(value) or not high(value):
        refuse(key, value, f"a number in {interval}")


def check_config(cfg: DictConfig) -> DictConfig:
    """Refuse every setting that cannot work (ConfigError: key, value, what is allowed) and
    normalise single numbers in the search grid to lists, in place. Returns ``cfg``."""
    if cfg.get("task") not in TASKS:
        refuse("task", cfg.get("task"), f"one of {', '.join(TASKS)}")
    check_mode(cfg)
    if not is_int(cfg.get("seed")):
        refuse("seed", cfg.get("seed"), "an integer")
    for key in PATH_NAME_KEYS:
        if select(cfg, key) is not None:
            check_path_name(key, select(cfg, key))
    fewshot = cfg.get("fewshot_k")
    if fewshot is not None and (not is_int(fewshot) or fewshot < 1):
        refuse("fewshot_k", fewshot, "null (all samples) or an integer >= 1 (K per class)")
    num_classes = select(cfg, "dataset.num_classes")
    if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
        refuse("dataset.num_classes", num_classes,
               "null (read from the data) or an integer >= 2: a classifier needs two classes")
    fingerprint = select(cfg, "dataset.fingerprint")
    if fingerprint is not None and fingerprint not in FINGERPRINT_MODES:
        refuse("dataset.fingerprint", fingerprint, f"one of {', '.join(FINGERPRINT_MODES)}")

    check_grid(cfg, "search.lr", lambda v: v > 0, "> 0")
    check_grid(cfg, "search.wd", lambda v: v >= 0, ">= 0")
    check_grid(cfg, "search.dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    check_fraction(cfg, "search.val_fraction", low_open=True, high_open=True)

    for key in ("train.epochs", "train.min_steps"):
        check_int(cfg, key, 0, "an integer >= 0")
    epochs, min_steps = select(cfg, "train.epochs"), select(cfg, "train.min_steps")
    if epochs is not None and min_steps is not None and epochs < 1 and min_steps < 1:
        raise ConfigError(f"train.epochs={epochs} with train.min_steps={min_steps} is not "
                          "allowed: a fit needs at least one optimiser step, so set "
                          "train.epochs >= 1 or train.min_steps >= 1")
    for key in ("train.batch_size", "train.min_batches", "end2end.batch_size",
                "end2end.eval_batch_size", "extract.batch_size", "extract.chunk_rows"):
        check_int(cfg, key, 1)
    for key in ("extract.num_workers", "end2end.num_workers"):
        check_int(cfg, key, 0)
    check_fraction(cfg, "train.jitter_p", low_open=False, high_open=False)
    sigma = select(cfg, "train.jitter_sigma")
    if sigma is not None and (not is_number(sigma) or not math.isfinite(sigma) or sigma < 0):
        refuse("train.jitter_sigma", sigma, "a finite number >= 0")
    check_streaming(cfg)
    return cfg


STREAM_SETTINGS = {"train.stream": ("auto", "memory", "disk"),
                   "train.parallel": ("auto", "grid", "data")}


def check_streaming(cfg: DictConfig) -> None:
    """Cached features in memory or streamed (train.stream, its budget), and how DDP splits
    the work (train.parallel)."""
    for key, allowed in STREAM_SETTINGS.items():
        value = select(cfg, key)
        if value is not None and value not in allowed:
            refuse(key, value, f"one of {', '.join(allowed)}")
    limit = select(cfg, "extract.max_cache_gb")
    if limit is not None and (not is_number(limit) or not math.isfinite(limit) or limit <= 0):
        refuse("extract.max_cache_gb", limit,
               "null (as much as the disk of paths.cache holds) or a number of GB > 0")
    budget = select(cfg, "train.stream_budget_gb")
    if budget is not None and (not is_number(budget) or not math.isfinite(budget)
                               or budget < 0):
        refuse("train.stream_budget_gb", budget,
               "null (half the device's free memory) or a number of GB >= 0")


def check_mode(cfg: DictConfig) -> None:
    """``mode`` names an engine; the fine-tuning baseline's head (probe=finetune) trains in
    mode=finetune: with the default mode=cached that is what the command means (a sweep over
    probes, e.g. the paper table, runs it so), and it is set; with mode=end2end it is refused."""
    mode = select(cfg, "mode.name")
    if mode not in MODES:
        refuse("mode", mode, f"one of {', '.join(MODES)}")
    if select(cfg, "probe.name") == "finetune" and mode != "finetune":
        if mode != "cached":
            refuse("mode", mode, "finetune with probe=finetune (the backbone trains)")
        with open_dict(cfg):
            cfg.mode = OmegaConf.load(CONF / "mode" / "finetune.yaml")
        print("[alfusion] probe=finetune: mode=finetune (the backbone trains with the head)")


def check_labels(labels, num_classes: int | None, split: str = "train") -> None:
    """Refuse a split whose labels (N,) hold fewer than two classes, or labels outside
    0..num_classes-1. Call it on the train labels once they are read (before any fit)."""
    import numpy as np

    values = np.unique(np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels))
    if values.size and (values.min() < 0 or (num_classes and values.max() >= num_classes)):
        raise ConfigError(f"the {split} split has labels {values.min()}..{values.max()}, "
                          f"outside 0..{(num_classes or 0) - 1}: check dataset.num_classes")
    if values.size < 2:
        raise ConfigError(f"the {split} split holds {values.size} class(es) "
                          f"({values.tolist()}): a classifier needs at least two; check "
                          "the dataset (dataset.root, dataset.limit, fewshot_k)")
