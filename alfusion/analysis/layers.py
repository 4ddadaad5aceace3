"""Per-layer linear probes (the paper's per-layer curves): a Linear(D, C) head on each layer's
CLS and on each layer's AP token, all trained in one pass as a head bank.

With a grid of several configurations, every (token, configuration) head trains on the fit part
of train, each token keeps the configuration with the best validation balanced accuracy, and the
chosen heads are retrained on all of train; the test split is scored once.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from alfusion.analysis.plots import new_figure, save
from alfusion.data.cache import CacheEntry
from alfusion.engine import TokenData, fit_bank
from alfusion.metrics import classification_metrics
from alfusion.probes.linear import LinearProbe
from alfusion.protocol import HParams
from alfusion.search import select, stratified_split
from alfusion.tokens import TokenSet


def layer_tokens(entry: CacheEntry, rows: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, list[str], list[tuple[str, int]]]:
    """Every tapped layer's CLS then AP vector of a cache entry (``rows`` of it), stacked and
    L2-normalised as ALF sees them (TokenSet): (tokens (N, 2L, D) float32,
    labels ['CLS@1', ..., 'AP@L'], positions [('CLS', 1), ..., ('AP', L)])."""
    cls, ap = (np.array(entry.array(n) if rows is None else entry.array(n)[rows])
               for n in ("cls", "ap"))
    num_layers = cls.shape[1]
    token_set = TokenSet(tuple(range(1, num_layers + 1)), "cls+ap")
    x = token_set(torch.from_numpy(cls), torch.from_numpy(ap), dims=entry.dims)
    positions = [(k, i) for k in ("CLS", "AP") for i in range(1, num_layers + 1)]
    return x, [f"{k}@{i}" for k, i in positions], positions


def per_layer_probes(train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                     configs: list[HParams], cfg) -> list[dict]:
    """Test metrics of one linear head per token position of x (N, P, D), all heads trained
    together as one linear bank by the engine (each head reads its own token).

    Returns one dict per position: position index, val_bal_acc (NaN without a search), the
    chosen lr/wd, test bal_acc and acc1.
    """
    x, y = train
    num_positions, dim = x.shape[1], x.shape[-1]

    def make_head(hp: HParams) -> LinearProbe:
        return LinearProbe(dim, num_classes)

    def train_heads(heads: list[tuple[HParams, int]], data: TokenData):
        return fit_bank([hp for hp, _ in heads], make_head, data, num_classes, cfg,
                        label="layers", positions=[p for _, p in heads])

    chosen = {p: configs[0] for p in range(num_positions)}
    val_scores = {p: float("nan") for p in range(num_positions)}
    if len(configs) > 1:
        fit, val = stratified_split(y, cfg.search.val_fraction, cfg.search.val_seed)
        heads = [(hp, p) for hp in configs for p in range(num_positions)]
        logits, y_val = TokenData(x, y).subset(val).logits(
            train_heads(heads, TokenData(x, y).subset(fit)).bank)
        for p in range(num_positions):
            scores = [classification_metrics(logits[heads.index((hp, p))], y_val,
                                             num_classes)["bal_acc"] for hp in configs]
            best = select(scores)
            chosen[p], val_scores[p] = configs[best], scores[best]
    heads = [(chosen[p], p) for p in range(num_positions)]
    logits, y_test = TokenData(*test).logits(train_heads(heads, TokenData(x, y)).bank)
    out = []
    for p in range(num_positions):
        metrics = classification_metrics(logits[p], y_test, num_classes)
        out.append(dict(position=p, val_bal_acc=val_scores[p], lr=chosen[p].lr,
                        wd=chosen[p].wd, bal_acc=metrics["bal_acc"], acc1=metrics["acc1"]))
    return out


def write_layer_scores(scores: list[dict], positions: list[tuple[str, int]], path: Path) -> Path:
    """CSV: kind, layer, test bal_acc, acc1, val_bal_acc, chosen lr and wd."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "layer", "bal_acc", "acc1", "val_bal_acc", "lr", "wd"])
        for s in scores:
            kind, layer = positions[s["position"]]
            writer.writerow([kind, layer, f"{s['bal_acc']:.6g}", f"{s['acc1']:.6g}",
                             f"{s['val_bal_acc']:.6g}", s["lr"], s["wd"]])
    return path


def curves(scores: list[dict], positions: list[tuple[str, int]]) -> dict[str, dict[int, float]]:
    """{'CLS': {layer: bal_acc}, 'AP': {...}}."""
    out: dict[str, dict[int, float]] = {}
    for s in scores:
        kind, layer = positions[s["position"]]
        out.setdefault(kind, {})[layer] = s["bal_acc"]
    return out


def plot_layer_curves(path: Path, accuracy: dict[str, dict[int, float]] | None = None,
                      reference: tuple[str, float] | None = None,
                      cka: dict[str, dict[int, float]] | None = None, title: str = "") -> Path:
    """Panels side by side: test balanced accuracy per layer (``accuracy``: {kind: {layer:
    value}}, the run's own probe as a horizontal ``reference`` line) and CKA of the last-layer
    CLS with each layer's CLS (``cka``: {kernel: {layer: value}})."""
    panels = [p for p in (accuracy, cka) if p]
    fig = new_figure(1 + 5 * len(panels), 4)
    axes = list(fig.subplots(1, len(panels), squeeze=False)[0])
    if accuracy:
        ax = axes.pop(0)
        for kind, curve in accuracy.items():
            ax.plot(list(curve), list(curve.values()), marker="o", label=f"linear on {kind}")
        if reference is not None:
            ax.axhline(reference[1], color="black", linestyle="--", label=reference[0])
        ax.set_ylabel("test balanced accuracy")
        ax.set_title(f"per-layer linear probes {title}".strip(), fontsize=10)
    if cka:
        ax = axes.pop(0)
        for kernel, curve in cka.items():
            ax.plot(list(curve), list(curve.values()), marker="o", label=f"{kernel} kernel")
        ax.set_ylabel("CKA(last-layer CLS, CLS@layer)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"CKA with the last layer {title}".strip(), fontsize=10)
    for ax in fig.axes[:len(panels)]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)
