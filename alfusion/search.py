"""The hyper-parameter search of PROTOCOL.md 3: grid -> select on validation -> refit -> test.

How a grid is trained is behind ``train_grid``: the search only needs, for each configuration,
a trained model to score. Validation is a stratified 20 % of the train split with a fixed seed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from alfusion.metrics import classification_metrics
from alfusion.probes.bank import fit_bank, fit_grid, fresh_probe
from alfusion.training import HParams, NonFiniteLoss, fit_probe, predict

log = logging.getLogger(__name__)


def expand_grid(search_cfg, attentive: bool) -> list[HParams]:
    """lr x wd x dropout in the config's order; dropout only for attentive probes."""
    dropouts = list(search_cfg.dropout) if attentive else [0.0]
    return [HParams(float(lr), float(wd), float(d))
            for lr, wd, d in itertools.product(search_cfg.lr, search_cfg.wd, dropouts)]


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
    model: torch.nn.Module  # the refit ProbeModule
    val: dict  # metrics of the chosen configuration on the validation split
    test: dict
    grid: list[dict] = field(default_factory=list)  # every configuration with its val metrics
    fit_samples: int = 0
    steps: int = 0
    search_seconds: float = 0.0
    fit_seconds: float = 0.0


def train_grid(configs: list[HParams], make_probe: Callable, x, y, num_classes, train_cfg,
               trainer_cfg, seed, bank: bool = True) -> list[torch.nn.Module | NonFiniteLoss]:
    """Train every configuration on (x, y): all at once as a ProbeBank (``bank``, split
    across ranks when torch.distributed is initialised), or one after another, each alone.

    Alone, a configuration is a bank of one: the same single-probe training, bit for bit,
    as inside the bank (tests/test_bank.py), so both ways score and select alike. (Lightning's
    ``fit_probe`` agrees to float rounding only, and at lr 0.1 the paper's training turns
    rounding into different probes within a few steps: docs/benchmarks.md.)

    Returns one entry per configuration, in order: the trained model, or the NonFiniteLoss
    of a configuration whose loss became NaN/inf; the others are unaffected. Every probe
    starts from the weights ``seed`` gives.
    """
    if bank:
        return fit_grid(configs, make_probe, x, y, num_classes, train_cfg, seed,
                        precision=trainer_cfg.precision)
    return [fit_bank([hp], make_probe, x, y, num_classes, train_cfg, seed,
                     precision=trainer_cfg.precision)[0] for hp in configs]


def run_search(make_probe: Callable[[HParams], torch.nn.Module], configs: list[HParams],
               train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               num_classes: int, cfg, logger=False) -> SearchResult:
    """Select among ``configs`` on a validation split of ``train``, refit, evaluate on test.

    With one configuration and ``search.validate`` false, selection is skipped. ``logger``
    receives the final fit's training curve.
    """
    x, y = train
    search_cfg = cfg.search
    fit_idx, val_idx, final_idx = split_indices(y, search_cfg, cfg.get("fewshot_k"), cfg.seed)
    t0 = time.perf_counter()
    grid, val = [], {}
    best = configs[0]
    if len(configs) > 1 or search_cfg.validate:
        models = train_grid(configs, make_probe, x[fit_idx], y[fit_idx], num_classes,
                            cfg.train, cfg.trainer, cfg.seed, bank=search_cfg.get("bank", True))
        scores = []
        for hp, model in zip(configs, models, strict=True):
            if isinstance(model, NonFiniteLoss):  # diverged: recorded, never chosen
                log.warning("configuration %s failed: %s", hp.name, model)
                grid.append(dict(hp.__dict__, failed=str(model)))
                scores.append(float("-inf"))
                continue
            metrics = classification_metrics(predict(model, x[val_idx]), y[val_idx], num_classes)
            grid.append(dict(hp.__dict__, **{k: v for k, v in metrics.items()
                                              if k != "per_class_recall"}))
            scores.append(metrics["bal_acc"])
        if all(s == float("-inf") for s in scores):
            failures = [g["failed"] for g in grid]
            more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
            raise NonFiniteLoss(f"all {len(failures)} configurations of the grid diverged: "
                                f"{'; '.join(failures[:3])}{more}. Check the features for "
                                "NaN/inf or lower the learning rates")
        chosen = select(scores)
        best = configs[chosen]
        val = classification_metrics(predict(models[chosen], x[val_idx]), y[val_idx],
                                     num_classes)
    search_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = fit_probe(fresh_probe(make_probe, best, cfg.seed), best, x[final_idx],
                      y[final_idx], num_classes, cfg.train, cfg.trainer, cfg.seed, logger=logger)
    fit_seconds = time.perf_counter() - t0
    test_metrics = classification_metrics(predict(model, test[0]), test[1], num_classes)
    return SearchResult(best, model, val, test_metrics, grid, fit_samples=len(final_idx),
                        steps=model.fit_info["steps"], search_seconds=search_seconds,
                        fit_seconds=fit_seconds)
