"""One check of the composed config before any work: every bad setting is refused with its
key, its value and what is allowed, so that a typo fails in seconds, not after extraction.

``check_config(cfg)`` also normalises plain intents: a single number for ``search.lr``,
``search.wd`` or ``search.dropout`` means a one-value grid. ``check_labels`` is the part that
can only run once the labels of a split are read (the number of classes present).

Every refusal is a ConfigError and ends the same way (``exit_refused``): one line on stderr,
exit status 2, the traceback only when asked for (HYDRA_FULL_ERROR=1 or ALFUSION_DEBUG=1).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

TASKS = ("train", "extract", "evaluate", "predict")
MODES = ("cached", "end2end", "finetune")
CONF = Path(__file__).resolve().parents[1] / "conf"
# A value that becomes one file or folder name: no separators, no "..", no shell surprises.
SAFE_NAME = re.compile(r"[A-Za-z0-9._+=-]+")
SAFE_NAME_RULE = "one path component of letters, digits and . _ - + = (no '/', no '..')"
# Config keys whose values become file or folder names (run folders, sweep subfolders,
# report files).
PATH_NAME_KEYS = ("dataset.name", "backbone.key", "probe.name")
FINGERPRINT_MODES = ("stat", "content")
PROGRESS_MODES = ("auto", "bars", "lines", True, False)  # true: auto


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key, the value and what is allowed."""


class MissingFile(ConfigError, FileNotFoundError):
    """A setting that names a file or folder that does not exist."""


def full_errors() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 or ALFUSION_DEBUG=1)."""
    return "1" in (os.environ.get("HYDRA_FULL_ERROR"), os.environ.get("ALFUSION_DEBUG"))


def refusal_line(err: ConfigError) -> str:
    return "[alfusion] " + " ".join(str(err).split())


def exit_refused(err: ConfigError) -> NoReturn:
    """End the command on a refusal: its one line on stderr and exit status 2 (a SystemExit,
    which Hydra lets through without its traceback), or ``err`` raised when tracebacks are
    asked for."""
    if full_errors():
        raise err
    print(refusal_line(err), file=sys.stderr, flush=True)
    raise SystemExit(2)


def refuse(key: str, value, allowed: str) -> None:
    shown = "null" if value is None else repr(value)
    raise ConfigError(f"{key}={shown} is not allowed: {allowed}")


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
    given = select(cfg, key)
    if given is None:
        return
    value = [given] if is_number(given) else given
    if not isinstance(value, (list, ListConfig)) or len(value) == 0:
        refuse(key, given, f"a number or a non-empty list of numbers, each {allowed}")
    for v in value:
        if not is_number(v) or not math.isfinite(v) or not ok(v):
            refuse(key, given, f"each value must be a finite number {allowed} ({v!r} is not)")
    if value is not given:
        parent, leaf = key.rsplit(".", 1)
        with open_dict(cfg):
            select(cfg, parent)[leaf] = value


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
    check_predict(cfg)
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
    check_preprocess(cfg)
    fingerprint = select(cfg, "dataset.fingerprint")
    if fingerprint is not None and fingerprint not in FINGERPRINT_MODES:
        refuse("dataset.fingerprint", fingerprint, f"one of {', '.join(FINGERPRINT_MODES)}")

    progress = select(cfg, "trainer.progress_bar")
    if progress is not None and not any(progress is m or progress == m for m in PROGRESS_MODES):
        refuse("trainer.progress_bar", progress, "auto, bars, lines, true (auto) or false")

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
    check_jitter(cfg)
    check_probe(cfg)
    if cfg.get("task") != "evaluate" and select(cfg, "backbone.family"):
        from alfusion.backbones.layout import token_refusal  # a CNN; a CLS the model lacks

        if problem := token_refusal(cfg):
            refuse(*problem)
    check_streaming(cfg)
    return cfg


def check_preprocess(cfg: DictConfig) -> None:
    """``backbone.preprocess``: paper (the paper's transform and input size for the backbone's
    family) or model (the backbone's own eval transform)."""
    from alfusion.backbones.preprocess import PREPROCESS_MODES

    value = select(cfg, "backbone.preprocess")
    if value is not None and value not in PREPROCESS_MODES:
        refuse("backbone.preprocess", value, "paper (the paper's preprocessing and input size, "
               "the default) or model (the backbone's own eval transform)")


def check_jitter(cfg: DictConfig) -> None:
    from alfusion.random_draws import JITTER_MODES

    jitter = select(cfg, "end2end.jitter")
    if jitter is not None and jitter not in JITTER_MODES:
        refuse("end2end.jitter", jitter, f"one of {', '.join(JITTER_MODES)} (the paper: "
               "per_batch, one coin per batch)")
    draws = select(cfg, "train.jitter_draws")
    if draws is not None and draws != "shared":  # the engine is imported only for the others
        from alfusion.engine.step import JITTER_DRAWS

        if draws not in JITTER_DRAWS:
            refuse("train.jitter_draws", draws, f"one of {', '.join(JITTER_DRAWS)}")


LAYER_SETS = ("all", "last", "middle_last", "quarterly")


def check_probe(cfg: DictConfig) -> None:
    """probe.kind, tokens, regions and layers, and heads; the layer numbers and the region
    count against the backbone's layers and patch grid, read from its config without loading
    it (alfusion/backbones/layout.py)."""
    from alfusion.tokens import TOKEN_KINDS

    probe = select(cfg, "probe")
    if probe is None:
        return
    if probe.get("kind") not in ("linear", "attentive"):
        refuse("probe.kind", probe.get("kind"), "linear or attentive")
    tokens = probe.get("tokens")
    if tokens not in TOKEN_KINDS:
        refuse("probe.tokens", tokens, f"one of {', '.join(TOKEN_KINDS)}")
    regions = probe.get("regions")
    with_regions = "regions" in tokens.split("+")
    if regions is not None and (not is_int(regions) or regions < 1):
        refuse("probe.regions", regions, "null or k >= 1 (k x k patch regions per layer, e.g. "
               "2 or 4)")
    if with_regions and regions is None:
        refuse("probe.regions", regions, f"probe.tokens={tokens} needs k (k x k patch regions "
               "per layer, e.g. probe.regions=2)")
    if regions is not None and not with_regions:
        kind = "regions" if tokens == "all" else f"{tokens}+regions"
        refuse("probe.regions", regions, f"probe.tokens={tokens} has no region tokens: use "
               f"probe.tokens={kind}, or probe.regions=null")
    for key in ("num_heads", "head_dim"):
        check_int(cfg, f"probe.{key}", 1, "null (the paper's rule) or an integer >= 1")
    layers = probe.get("layers")
    if is_int(layers):  # probe.layers=12 means that one layer
        layers = [layers]
        with open_dict(cfg):
            probe.layers = layers
    explicit = isinstance(layers, (list, ListConfig))
    if not explicit and layers not in LAYER_SETS:
        refuse("probe.layers", layers, f"one of {', '.join(LAYER_SETS)} or a list of layer "
               "numbers [i, j, ...]")
    if explicit and (not layers or not all(is_int(i) for i in layers)):
        refuse("probe.layers", list(layers), "a non-empty list of layer numbers (integers)")
    if cfg.get("task") != "evaluate" and select(cfg, "backbone.family") and (
            explicit or regions is not None or layers in ("middle_last", "quarterly")):
        check_against_backbone(cfg, layers, regions)


def check_against_backbone(cfg: DictConfig, layers, regions: int | None) -> None:
    """The layer numbers (1..L) and the regions per side (<= the patch grid) of the probe."""
    from alfusion.backbones.layout import backbone_layout
    from alfusion.tokens import resolve_layers

    layout = backbone_layout(cfg.backbone)
    name = select(cfg, "backbone.key") or cfg.backbone.name
    L = layout.layers
    given = layers if isinstance(layers, str) else list(layers)
    try:
        if not all(1 <= i <= L for i in resolve_layers(given, L)):  # quarterly of L < 4
            raise ValueError(given)
    except ValueError:
        refuse("probe.layers", given, f"layer numbers 1..{L} (backbone {name} has {L} layers; "
               f"{L} is the final output), or one of {', '.join(LAYER_SETS)}")
    if regions is not None and regions > min(layout.grid):
        rows, cols = layout.grid
        refuse("probe.regions", regions, f"at most {min(layout.grid)}: backbone {name} sees a "
               f"{rows} x {cols} patch grid at {layout.input_size} px (or raise "
               "backbone.img_size)")


def check_predict(cfg: DictConfig) -> None:
    """task=evaluate and task=predict need ``probe_path``; predict also the images to label:
    ``predict.split`` null (every image under a folder's ``dataset.root``), train or test."""
    task = cfg.get("task")
    if task in ("evaluate", "predict") and not cfg.get("probe_path"):
        refuse("probe_path", None, f"task={task} needs the probe: <run folder>/probe.pt of a "
               "finished run, or runs:/<MLflow run id>/probe.pt")
    if task != "predict":
        return
    split = select(cfg, "predict.split")
    if split not in (None, "train", "test"):
        refuse("predict.split", split, "null (every image under dataset.root of dataset=folder), "
               "train or test")
    if split is None and select(cfg, "dataset.source") != "folder":
        refuse("predict.split", None, f"dataset={select(cfg, 'dataset.name')} has splits: set "
               "predict.split=train|test, or use dataset=folder dataset.root=DIR for a folder "
               "of images")
    if select(cfg, "dataset.source") == "folder" and not select(cfg, "dataset.root"):
        refuse("dataset.root", None, "task=predict needs the folder of images: "
               "dataset=folder dataset.root=DIR")
    check_int(cfg, "predict.top_k", 1)


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
