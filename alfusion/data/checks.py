"""The data a run will read, checked before any model, cache entry or MLflow run exists.

``check_data(cfg)`` lists what can be listed: a bundled or image-folder dataset's splits (a
missing or empty ``dataset.root``, a missing split, a zero-byte image file) and the train
labels, which must allow the stratified validation split of the search and few-shot
sampling. Each failure is a DatasetUnavailable (a ConfigError: one line naming the file or
the split and the fix, exit status 2). What only decoding reveals (an undecodable,
truncated, oversized or non-image file) is refused when the file is read, naming it; the
chunks extracted before it are kept.

Webdataset sources are checked when they are opened (their layout and shard headers, before
the backbone; docs/reliability.md): their labels are inside the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alfusion.data import build_dataset
from alfusion.data.digits import digits_split
from alfusion.data.wds import DatasetUnavailable


def check_data(cfg, splits=("train", "test")) -> None:
    """Refuse (DatasetUnavailable) data that cannot make a run: see the module."""
    ds = cfg.dataset
    labels = None
    if ds.source == "digits":
        try:
            labels = digits_split("train", ds.test_fraction, ds.split_seed, ds.get("limit"))[1]
        except ValueError as err:
            raise DatasetUnavailable(
                f"dataset.test_fraction={ds.test_fraction} cannot split the digits' 10 classes "
                f"into train and test ({err}): use a value such as 0.25") from None
    elif ds.source == "folder":
        if not ds.get("root"):
            raise DatasetUnavailable("dataset=folder needs dataset.root=PATH "
                                     "(PATH/{train,test}/<class>/<image>)")
        root = Path(str(ds.root)).expanduser()
        if not root.is_dir():
            raise DatasetUnavailable(f"dataset.root={ds.root}: no such folder (the layout is "
                                     "PATH/{train,test}/<class>/<image>): check the path")
        for split in splits:
            source = build_dataset(ds, split)  # its layout, classes and files (not decoded)
            if split == "train":
                labels = np.asarray(source.labels)
    if labels is not None and "train" in splits and cfg.get("task") == "train":
        check_train_split(labels, cfg)


def check_train_split(labels: np.ndarray, cfg) -> None:
    """The train split's labels (N,) allow the search's stratified validation split (when it
    validates) and ``fewshot_k`` samples of every class in the fit part."""
    from sklearn.model_selection import train_test_split

    search = cfg.search
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DatasetUnavailable(
            f"the train split holds {len(classes)} class(es): a classifier needs at least two; "
            "check the dataset (dataset.root, dataset.limit)")
    grid = len(as_list(search.lr)) * len(as_list(search.wd)) * (
        len(as_list(search.dropout)) if cfg.probe.kind == "attentive" else 1)
    if not (grid > 1 or search.validate):
        return
    index = np.arange(len(labels))
    try:
        fit, _ = train_test_split(index, test_size=search.val_fraction,
                                  random_state=search.val_seed, stratify=labels)
    except ValueError as err:
        smallest = classes[np.argmin(counts)]
        raise DatasetUnavailable(
            f"the train split ({len(labels)} images, {len(classes)} classes, class {smallest} "
            f"with {counts.min()}) is too small for the stratified validation split "
            f"(search.val_fraction={search.val_fraction}: {err.args[0].split('.')[0]}): use "
            "more images (dataset.limit), another search.val_fraction, or "
            "search.validate=false with one configuration") from None
    k = cfg.get("fewshot_k")
    if k:
        fit_classes, fit_counts = np.unique(labels[fit], return_counts=True)
        short = fit_classes[fit_counts < k]
        if len(short) or len(fit_classes) < len(classes):
            c = short[0] if len(short) else next(c for c in classes if c not in fit_classes)
            have = int(fit_counts[fit_classes == c][0]) if c in fit_classes else 0
            raise DatasetUnavailable(
                f"fewshot_k={k} needs {k} train images of every class outside the validation "
                f"split; class {c} has {have}: lower fewshot_k or use more images "
                "(dataset.limit)")


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and \
        not isinstance(value, str) else [value]
