"""The search (docs/protocol.md, search) on synthetic per-layer features (no backbone): which
probe can find an intermediate layer's signal, selection on validation, refit on all of train,
few-shot without validation samples, diverged configurations.

Everything goes through ``run_search`` and the engine with the real composed configs; fits are
short (fixed seeds, CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import compose_config
from sklearn.metrics import balanced_accuracy_score

from alfusion.engine import TokenData, fit_bank
from alfusion.engine.data import Rows
from alfusion.probes import build_probe
from alfusion.protocol import HParams, NonFiniteLoss
from alfusion.resume import RunState
from alfusion.search import expand_grid, run_search, stratified_split
from alfusion.tokens import build_token_set

NUM_LAYERS, DIM, CLASSES = 4, 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class RecordingData(TokenData):
    """TokenData that records, for every fit in order, the rows of the full x its training
    batches held (``fits``, shared by its subsets)."""

    fits: list = field(default_factory=list)
    row_of: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.row_of = self.row_of or {self.x[i].numpy().tobytes(): i for i in range(len(self.x))}

    def subset(self, idx):
        part = super().subset(idx)
        return RecordingData(part.x, part.y, self.fits, self.row_of)

    def steps(self, *args, **kwargs):
        rows = set()
        self.fits.append(rows)
        for xb, yb in super().steps(*args, **kwargs):
            batch = xb.gather() if isinstance(xb, Rows) else xb
            rows.update(self.row_of[r.numpy().tobytes()] for r in batch)
            yield xb, yb


def search(make, configs, x, y, cfg, tmp_path, train=None):
    """run_search on (x, y) for train and test, its stages in a fresh RunState."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    state = RunState(tmp_path, dict(stages={}, finished=False))
    return run_search(make, configs, train or TokenData(x, y), TokenData(x, y), CLASSES, cfg,
                      state)


def synthetic_layers(n: int, signal_layer: int, noise: float, seed: int):
    """Per-layer CLS/AP arrays where only the CLS of ``signal_layer`` carries the label.

    That token is the class prototype plus Gaussian noise; every other token is pure noise.
    Returns cls (n, L, D), ap (n, L, D), labels (n,) with classes in turn.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % CLASSES
    cls = torch.randn(n, NUM_LAYERS, DIM, generator=g)
    ap = torch.randn(n, NUM_LAYERS, DIM, generator=g)
    cls[:, signal_layer - 1] = prototypes[labels] + noise * torch.randn(n, DIM, generator=g)
    return cls, ap, labels


def experiment(probe: str, *overrides: str):
    """The composed config of a short fit: 2 epochs raised to ``train.min_steps``."""
    return compose_config(f"probe={probe}", "search=none", "train.epochs=2",
                          "trainer.progress_bar=false", "train.checkpoint_every=0", *overrides)


def tokens_and_factory(cfg, cls, ap, dims=None):
    """Stacked tokens of cfg.probe's token set and a probe factory for them."""
    dims = dims or [DIM] * NUM_LAYERS
    token_set = build_token_set(cfg.probe, NUM_LAYERS)
    x = token_set(cls, ap, None, dims)
    num_tokens = x.shape[1] if x.dim() == 3 else token_set.num_tokens()

    def make(hp: HParams):
        return build_probe(cfg.probe, token_set, dims, CLASSES, num_tokens, attn_drop=hp.dropout)
    return token_set, x, make


@pytest.mark.parametrize(("signal_layer", "probe", "succeeds"), [
    (2, "alf", True), (2, "linear_concat", True), (2, "linear", False),
    (4, "alf", True), (4, "linear_concat", True), (4, "linear", True),
])
def test_which_probe_finds_the_signal(signal_layer, probe, succeeds, tmp_path):
    """Label in layer 2's CLS only: ALF and the concatenation find it, the last-layer CLS
    probe is at chance. Label in the last layer's CLS: all three succeed."""
    cfg = experiment(probe, "search.validate=false", "train.min_steps=200")
    cls, ap, y = synthetic_layers(400, signal_layer, noise=0.5, seed=0)
    cls_test, ap_test, y_test = synthetic_layers(200, signal_layer, noise=0.5, seed=1)
    token_set, x, make = tokens_and_factory(cfg, cls, ap)
    x_test = token_set(cls_test, ap_test, None, [DIM] * NUM_LAYERS)
    state = RunState(tmp_path, dict(stages={}, finished=False))
    result = run_search(make, [HParams(0.01, 1e-4)], TokenData(x, y), TokenData(x_test, y_test),
                        CLASSES, cfg, state)
    bal_acc = result.test["bal_acc"]
    if succeeds:
        assert bal_acc > 0.9
    else:
        assert abs(bal_acc - 1 / CLASSES) < 0.12  # chance is 0.25


def test_selection_picks_the_best_validation_score_and_refits_on_all_of_train(tmp_path):
    cfg = experiment("alf", "train.min_steps=60", "train.jitter_p=0")  # jitter off: exact rows
    cls, ap, y = synthetic_layers(400, 2, noise=1.2, seed=0)
    _, x, make = tokens_and_factory(cfg, cls, ap)
    data = RecordingData(x, y)

    # the best configuration is not the first: ties would not make this pass by accident
    configs = [HParams(1e-5, 1e-4), HParams(1e-2, 1e-4), HParams(1e-4, 1e-2)]
    result = search(make, configs, x, y, cfg, tmp_path / "run", train=data)

    # re-score every configuration independently: its own engine fit on the 80 % part,
    # sklearn's balanced accuracy on the held-out 20 %
    fit_idx, val_idx = stratified_split(y, 0.2, 0)
    assert len(val_idx) == 80 and np.bincount(y[val_idx].numpy()).tolist() == [20] * 4
    rescored = []
    for hp in configs:
        probe = fit_bank([hp], make, TokenData(x[fit_idx], y[fit_idx]), CLASSES, cfg).model(0)
        with torch.no_grad():
            pred = probe(x[val_idx]).argmax(1)
        rescored.append(balanced_accuracy_score(y[val_idx].numpy(), pred.numpy()))
    best = int(np.argmax(rescored))
    assert rescored[best] > sorted(rescored)[-2] + 0.1  # a clear winner (test design)
    assert result.best == configs[best]
    assert [g["bal_acc"] for g in result.grid] == pytest.approx(rescored, abs=1e-12)
    assert result.val["bal_acc"] == pytest.approx(rescored[best], abs=1e-12)

    # the grid saw the fit part only; the refit saw every train sample, validation included
    grid_rows, refit_rows = data.fits
    assert grid_rows == set(fit_idx.tolist())
    assert refit_rows == set(range(len(y)))
    assert result.fit_samples == len(y)


def test_few_shot_fits_never_see_a_validation_sample(tmp_path):
    k = 5
    cfg = experiment("linear_concat", f"fewshot_k={k}", "train.min_steps=20",
                     "train.jitter_p=0", "search.lr=[0.01,0.001]")
    cls, ap, y = synthetic_layers(200, 2, noise=0.5, seed=0)
    _, x, make = tokens_and_factory(cfg, cls, ap)
    data = RecordingData(x, y)

    configs = expand_grid(cfg.search, attentive=False)
    assert len(configs) == 2
    result = search(make, configs, x, y, cfg, tmp_path / "run", train=data)
    _, val_idx = stratified_split(y, cfg.search.val_fraction, cfg.search.val_seed)
    grid_rows, final = data.fits
    assert final.isdisjoint(val_idx.tolist()) and grid_rows.isdisjoint(val_idx.tolist())
    assert np.bincount(y[sorted(final)].numpy()).tolist() == [k] * CLASSES
    assert result.fit_samples == len(final) == k * CLASSES


def test_a_diverged_configuration_is_recorded_and_leaves_the_others_alone(tmp_path):
    cfg = experiment("alf", "train.min_steps=30")
    cls, ap, y = synthetic_layers(200, 2, noise=0.5, seed=0)
    _, x, make = tokens_and_factory(cfg, cls, ap)
    good = [HParams(1e-2, 1e-4), HParams(1e-3, 1e-4)]
    diverging = HParams(1e20, 1e-4)  # AdamW steps of ~1e20: the logits overflow to NaN
    alone = search(make, good, x, y, cfg, tmp_path / "alone")
    mixed = search(make, [good[0], diverging, good[1]], x, y, cfg, tmp_path / "mixed")

    failed = mixed.grid[1]
    assert "bal_acc" not in failed
    assert "lr=1e+20,wd=0.0001,dropout=0" in failed["failed"]
    assert [mixed.grid[0], mixed.grid[2]] == alone.grid  # same metrics, to the last digit
    assert mixed.best == alone.best
    assert mixed.test == alone.test

    with pytest.raises(NonFiniteLoss, match=r"all 1 configurations .*lr=1e\+20"):
        search(make, [diverging], x, y, cfg, tmp_path / "diverged")


def test_paper_grid_is_63_configurations_for_attentive_probes_and_21_for_linear():
    search = compose_config("search=paper").search
    attentive = expand_grid(search, attentive=True)
    assert len(attentive) == 63 and len(expand_grid(search, attentive=False)) == 21
    assert sorted({c.lr for c in attentive}) == [0.001, 0.01, 0.1]
    assert sorted({c.wd for c in attentive}) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert sorted({c.dropout for c in attentive}) == [0.0, 0.1, 0.3]
    assert {c.dropout for c in expand_grid(search, attentive=False)} == {0.0}
    assert (search.val_fraction, search.val_seed, search.validate) == (0.2, 0, True)
