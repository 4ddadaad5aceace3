"""Classification metrics: balanced accuracy (the headline), top-1, top-5, per-class recall."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
)

from alfusion.config_check import check_labels


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           num_classes: int) -> dict:
    """logits (N, C), targets (N,) -> bal_acc, acc1, acc5 (if C >= 5), per_class_recall.

    Balanced accuracy is the mean recall over the classes present in ``targets``; absent
    classes are left out rather than counted as zero (a class with no test sample has no
    recall). per_class_recall is a list of C values, None for absent classes (JSON-safe).
    top-1 / top-5 are the plain (micro) accuracies.
    """
    logits, targets = logits.float().cpu(), targets.long().cpu()
    confusion = multiclass_confusion_matrix(logits, targets, num_classes).double()
    support = confusion.sum(dim=1)  # (C,) samples of each true class
    present = support > 0
    recall = confusion.diagonal() / support.clamp(min=1)
    out = dict(
        bal_acc=float(recall[present].mean()),
        acc1=float(multiclass_accuracy(logits, targets, num_classes, average="micro")),
        per_class_recall=[float(r) if p else None for r, p in zip(recall, present, strict=True)],
    )
    if num_classes >= 5:
        out["acc5"] = float(multiclass_accuracy(logits, targets, num_classes, top_k=5,
                                                average="micro"))
    return out


def num_classes_of(cfg, train_labels: torch.Tensor, *more: torch.Tensor) -> int:
    """The dataset's number of classes (its config, else the largest label + 1), checked
    against every label; the train split needs two classes present (config_check)."""
    labels = (train_labels, *more)
    n = cfg.dataset.get("num_classes") or int(max(int(y.max()) for y in labels) + 1)
    check_labels(train_labels, n, "train")
    bad = [int(y.max()) for y in more if int(y.max()) >= n]
    if bad:
        raise ValueError(f"label {max(bad)} outside the {n} classes of dataset "
                         f"{cfg.dataset.name}: check dataset.num_classes")
    return n
