"""One check of the composed config before any work: every bad setting is refused with its
key, its value and what is allowed, so that a typo fails in seconds, not after extraction.

``check_config(cfg)`` also normalises plain intents: a single number for ``search.lr``,
``search.wd`` or ``search.dropout`` means a one-value grid. ``check_labels`` is the part that
can only run once the labels of a split are read (the number of classes present).

Every refusal is a ConfigError and ends the same way (``exit_refused``): one line on stderr,
exit status 2, the traceback only when asked for (HYDRA_FULL_ERROR=1 or ALFUSION_DEBUG=1).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from alfusion.errors import ConfigError, MissingFile

__all__ = ["ConfigError", "MissingFile", "check_config", "check_labels", "exit_refused"]

TASKS = ("train", "extract", "evaluate", "predict")
MODES = ("cached", "end2end", "finetune")
CONF = Path(__file__).resolve().parents[1] / "conf"
# A value that becomes one file or folder name: no separators, no "..", no shell surprises.
SAFE_NAME = re.compile(r"[A-Za-z0-9._+=-]+")
SAFE_NAME_RULE = "one path component of letters, digits and . _ - + = (no '/', no '..')"
# Config keys whose values become file or folder names (run folders, sweep subfolders,
# report files).
PATH_NAME_KEYS = ("dataset.name", "backbone.key", "probe.name")




def full_errors() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 or ALFUSION_DEBUG=1)."""
    return "1" in (os.environ.get("HYDRA_FULL_ERROR"), os.environ.get("ALFUSION_DEBUG"))


def refusal_line(err: ConfigError) -> str:
    """``err`` as one line; an error re-raised from a DataLoader worker (whose message carries
    the worker's traceback) as its own message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return "[alfusion] " + " ".join(text.split())


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


def check_schema(cfg) -> None:
    """Every key of ``cfg`` against the typed schema (alfusion/schema.py): an unknown key, a
    wrong type or a value out of range is a ConfigError naming the key."""
    from alfusion.schema import SettingError, check_settings

    try:
        check_settings(cfg)
    except SettingError as err:
        raise ConfigError(str(err)) from None


def check_config(cfg: DictConfig) -> DictConfig:
    """Refuse every setting that cannot work (ConfigError: key, value, what is allowed) and
    normalise single numbers in the search grid to lists, in place. Returns ``cfg``.

    Each key's type and range come from the schema (check_schema); here only what spans
    several keys or depends on the backbone."""
    check_schema(cfg)
    check_mode(cfg)
    check_predict(cfg)
    for key in PATH_NAME_KEYS:
        if select(cfg, key) is not None:
            check_path_name(key, select(cfg, key))
    for key in ("search.lr", "search.wd", "search.dropout"):
        as_grid(cfg, key)
    epochs, min_steps = select(cfg, "train.epochs"), select(cfg, "train.min_steps")
    if epochs is not None and min_steps is not None and epochs < 1 and min_steps < 1:
        raise ConfigError(f"train.epochs={epochs} with train.min_steps={min_steps} is not "
                          "allowed: a fit needs at least one optimiser step, so set "
                          "train.epochs >= 1 or train.min_steps >= 1")
    check_probe(cfg)
    if cfg.get("task") != "evaluate" and select(cfg, "backbone.family"):
        from alfusion.backbones.layout import token_refusal  # a CNN; a CLS the model lacks

        if problem := token_refusal(cfg):
            refuse(*problem)
    return cfg


def as_grid(cfg, key: str) -> None:
    """``search.<key>``: a single number becomes a one-value list (``search.lr=0.01`` means
    that one learning rate)."""
    given = select(cfg, key)
    if is_number(given):
        parent, leaf = key.rsplit(".", 1)
        with open_dict(cfg):
            select(cfg, parent)[leaf] = [given]


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
