"""The search (docs/protocol.md, search), one for every mode: split -> grid -> score on
validation -> select -> refit -> test.

The grid is one engine fit of all configurations (end to end: one backbone forward per batch
for all of them; fine-tuning: one fit per configuration, each with its own backbone copy); the
chosen configuration is refit as a bank of one through the same engine, so the reported model
is trained by the arithmetic that selected it. Every fit is a resumable stage of the run.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from alfusion import tracking
from alfusion.engine import fit_bank
from alfusion.metrics import classification_metrics
from alfusion.protocol import HParams, NonFiniteLoss
from alfusion.resume import RunState

log = logging.getLogger(__name__)


def as_list(value) -> list:
    """A grid axis: a list as given, a single value as a one-value list."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) \
        else [value]


def expand_grid(search_cfg, attentive: bool) -> list[HParams]:
    """lr x wd x dropout in the config's order; dropout only for attentive probes."""
    dropouts = as_list(search_cfg.dropout) if attentive else [0.0]
    return [HParams(float(lr), float(wd), float(d)) for lr, wd, d in
            itertools.product(as_list(search_cfg.lr), as_list(search_cfg.wd), dropouts)]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): ``fraction`` of every class held out."""
    index = np.arange(len(labels))
    fit, val = train_test_split(index, test_size=fraction, random_state=seed,
                                stratify=labels.cpu().numpy())
    return np.sort(fit), np.sort(val)


def few_shot(labels: torch.Tensor, index: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K samples per class drawn (with ``seed``) from ``index`` only."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()[index]
    chosen = []
    for c in np.unique(y):
        members = index[y == c]
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def split_indices(labels: torch.Tensor, search_cfg, fewshot_k: int | None, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation, final-fit) indices into the train split: the stratified validation
    split of ``search_cfg``; with ``fewshot_k``, K per class of the fit part for both fits (the
    final fit never sees a validation sample), else all of train for the final fit."""
    fit_idx, val_idx = stratified_split(labels, search_cfg.val_fraction, search_cfg.val_seed)
    final_idx = np.arange(len(labels))
    if fewshot_k:
        fit_idx = few_shot(labels, fit_idx, fewshot_k, seed)
        final_idx = fit_idx
    return fit_idx, val_idx, final_idx


def select(scores: list[float]) -> int:
    """The index of the best validation score; the first of equals (grid order breaks ties)."""
    return int(np.argmax(scores))


@dataclass
class SearchResult:
    best: HParams
    model: torch.nn.Module  # the refit probe, eval mode
    val: dict  # metrics of the chosen configuration on the validation split
    test: dict
    grid: list[dict] = field(default_factory=list)  # every configuration with its val metrics
    fit_samples: int = 0
    steps: int = 0
    batch_size: int = 0
    world: int = 1
    search_seconds: float = 0.0
    fit_seconds: float = 0.0


def score_grid(fit, val_data, num_classes: int) -> list[dict]:
    """Validation metrics of every configuration of a fit, or its failure (never chosen)."""
    logits, y = val_data.logits(fit.bank)
    rows = []
    for g, hp in enumerate(fit.configs):
        if g in fit.failures:
            log.warning("configuration %s failed: %s", hp.name, fit.failures[g])
            rows.append(dict(hp.__dict__, failed=str(fit.failures[g])))
        else:
            rows.append(dict(hp.__dict__, **classification_metrics(logits[g], y, num_classes)))
    return rows


def train_grid(make_probe: Callable, configs: list[HParams], fit_data, val_data,
               num_classes: int, cfg, state: RunState, resuming: bool, logger
               ) -> tuple[list[dict], list[list[float]]]:
    """Train every configuration on ``fit_data`` and score it on ``val_data``; each fit is a
    resumable stage. Returns (a row per configuration, its training loss at every step)."""
    trainable = cfg.mode.name == "finetune"
    # Fine-tuning trains a backbone copy per configuration: one fit each. Otherwise one fit.
    groups = [[hp] for hp in configs] if trainable else [configs]
    rows: list[dict] = []
    curves: list[list[float]] = []
    for i, group in enumerate(groups):
        stage = "grid" if len(groups) == 1 else f"grid{i:03d}"
        saved = state.stage(stage)
        if saved is None:
            fit = fit_bank(group, make_probe, fit_data, num_classes, cfg,
                           checkpoints=state.checkpoint_dir(stage), resume=resuming,
                           logger=logger if len(groups) == 1 else False, label="grid")
            saved = dict(grid=score_grid(fit, val_data, num_classes),
                         losses=fit.losses.T.tolist())
            state.finish_stage(stage, saved)
            shutil.rmtree(state.checkpoint_dir(stage), ignore_errors=True)
        rows += saved["grid"]
        curves += saved["losses"]
    return rows, curves


def run_search(make_probe: Callable[[HParams], torch.nn.Module], configs: list[HParams],
               train, test, num_classes: int, cfg, state: RunState, resuming: bool = False,
               logger=None) -> SearchResult:
    """Select among ``configs`` on a validation split of ``train``, refit, evaluate on test.

    With one configuration and ``search.validate`` false, selection is skipped. ``logger``
    receives the grid's and the refit's training curves and the chosen configuration's grid
    curve in full (``grid/chosen_loss``).
    """
    fit_idx, val_idx, final_idx = split_indices(train.labels, cfg.search, cfg.get("fewshot_k"),
                                                cfg.seed)
    t0 = time.perf_counter()
    grid, val, best = [], {}, configs[0]
    if len(configs) > 1 or cfg.search.validate:
        grid, curves = train_grid(make_probe, configs, train.subset(fit_idx),
                                  train.subset(val_idx), num_classes, cfg, state, resuming,
                                  logger)
        scores = [row.get("bal_acc", float("-inf")) for row in grid]
        if all(s == float("-inf") for s in scores):
            failures = [row["failed"] for row in grid]
            more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
            raise NonFiniteLoss(f"all {len(failures)} configurations of the grid diverged: "
                                f"{'; '.join(failures[:3])}{more}. Check the features for "
                                "NaN/inf or lower the learning rates")
        chosen = select(scores)
        best, val = configs[chosen], grid[chosen]
        tracking.log_curve(logger, "grid/chosen_loss", curves[chosen])
    search_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = fit_bank([best], make_probe, train.subset(final_idx), num_classes, cfg,
                   checkpoints=state.checkpoint_dir("final"), resume=resuming, logger=logger,
                   label="train", trainable=cfg.mode.name == "finetune")
    model = fit.model(0)  # raises the refit's NonFiniteLoss
    fit_seconds = time.perf_counter() - t0
    logits, y = test.logits(fit.bank)
    return SearchResult(best, model, val, classification_metrics(logits[0], y, num_classes),
                        [{k: v for k, v in row.items() if k != "per_class_recall"}
                         for row in grid],
                        fit_samples=len(final_idx), steps=fit.plan.steps,
                        batch_size=fit.plan.batch, world=fit.world,
                        search_seconds=search_seconds, fit_seconds=fit_seconds)

