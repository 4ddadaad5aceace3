"""scikit-learn estimators on token arrays a user already has: the paper's protocol, through
the same search and engine as the CLI (alfusion/search.py, engine ``fit_bank``).

    clf = alfusion.ALFClassifier(search="quick").fit(x_train, y_train)   # x: (N, T, D)
    clf.score(x_test, y_test)                                            # balanced accuracy
    alfusion.LinearProbeClassifier(search="quick").fit(x_train[:, -1], y_train)

Each fit composes the CLI's config (``probe=alf`` or ``probe=linear``, ``search=...``, the
estimator's settings, then ``overrides``) and runs ``run_search`` on it: the validation split,
the grid as one bank, selection, and the refit of the chosen configuration on all of X.
With the same tokens and settings it trains the probe a CLI run trains, bit for bit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

UNIT_TOLERANCE = 1e-4  # tokens whose norm is within this of 1 (or 0: padding) count as normalised


def as_tokens(X, flat: bool) -> torch.Tensor:
    """X (N, T, D) or (N, D), numpy or torch -> float32 tokens: (N, T, D) (a 2-D X is one token
    per sample), or (N, T * D) when ``flat``. Each token is L2-normalised as the protocol's
    TokenSet does, unless every token already has unit length (tokens from
    ``extract_tokens`` or the cache are taken exactly as they are)."""
    x = X.detach().cpu() if isinstance(X, torch.Tensor) else torch.from_numpy(
        np.asarray(X, dtype=np.float32))
    x = x.float()
    if x.dim() == 2:
        x = x[:, None, :]
    if x.dim() != 3 or len(x) == 0:
        raise ValueError(f"X: tokens (N, T, D) or (N, D) with N >= 1, not shape "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("X holds NaN or inf values")
    norms = x.norm(dim=-1)
    if not (((norms - 1).abs() < UNIT_TOLERANCE) | (norms == 0)).all():
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.flatten(1) if flat else x


class TokenProbeClassifier(ClassifierMixin, BaseEstimator):
    """A probe on tokens, fitted by the CLI's protocol; ``probe_config`` names conf/probe.

    Parameters: ``search`` (conf/search: none | quick | paper); ``lr``, ``wd``, ``dropout``
    (a value or a list: replace that axis of the grid); ``validate`` (None: the search
    config's); ``num_heads`` (attentive probes; None: the paper's one per token); ``seed``;
    ``device`` (auto | cpu | cuda); ``overrides``: more CLI settings (``train.epochs=...``,
    ``trainer=gpu``). Fitted: ``classes_``, ``probe_`` (the refit probe, eval mode),
    ``best_params_`` (the chosen lr, wd, dropout), ``grid_`` (every configuration's validation
    metrics), ``validation_`` (the chosen one's), ``n_features_in_`` (D), ``n_tokens_in_`` (T).
    """

    probe_config = "alf"

    def __init__(self, search: str = "none", lr=None, wd=None, dropout=None,
                 validate: bool | None = None, num_heads: int | None = None, seed: int = 0,
                 device: str = "auto", overrides: Sequence[str] = ()) -> None:
        self.search = search
        self.lr = lr
        self.wd = wd
        self.dropout = dropout
        self.validate = validate
        self.num_heads = num_heads
        self.seed = seed
        self.device = device
        self.overrides = overrides

    def config(self):
        """The checked CLI config this estimator fits with."""
        from alfusion.app import compose
        from alfusion.config_check import check_config

        given = [f"probe={self.probe_config}", f"search={self.search}", f"seed={self.seed}",
                 f"device={self.device}", "logger=none", "trainer.progress_bar=false",
                 "train.checkpoint_every=0"]
        for key in ("lr", "wd", "dropout"):
            value = getattr(self, key)
            if value is not None:
                values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                given.append(f"search.{key}=[{','.join(repr(float(v)) for v in values)}]")
        if self.validate is not None:
            given.append(f"search.validate={str(bool(self.validate)).lower()}")
        if self.num_heads is not None:
            given.append(f"probe.num_heads={int(self.num_heads)}")
        return check_config(compose([*given, *self.overrides]))

    def fit(self, X, y) -> TokenProbeClassifier:
        """Select (on a stratified validation split of X, when the search asks) and fit."""
        from alfusion.distributed import resolve_device
        from alfusion.engine import TokenData
        from alfusion.probes import build_probe
        from alfusion.resume import RunState
        from alfusion.search import expand_grid, run_search
        from alfusion.tokens import TokenSet

        cfg = self.config()
        x = as_tokens(X, flat=cfg.probe.kind == "linear")
        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != len(x):
            raise ValueError(f"y: one label per sample of X ({len(x)}), not shape "
                             f"{labels.shape}")
        classes = np.unique(labels)
        if len(classes) < 2:
            raise ValueError(f"y has {len(classes)} class: a classifier needs at least two")
        device = resolve_device(cfg.device)
        data = TokenData(x.to(device), torch.as_tensor(np.searchsorted(classes, labels),
                                                       device=device).long())
        attentive = cfg.probe.kind == "attentive"
        n_tokens = x.shape[1] if attentive else 1
        width = x.shape[-1]
        # The probe is sized by the tokens given: T tokens of width D (attentive), or one
        # flat vector (linear); a non-spatial token set gives the paper's one head per token.
        token_set = TokenSet(tuple(range(1, n_tokens + 1)), "cls", flat=not attentive)

        def make_probe(hp):
            return build_probe(cfg.probe, token_set, [width] * n_tokens, len(classes),
                               n_tokens, attn_drop=hp.dropout)

        configs = expand_grid(cfg.search, attentive=attentive)
        with tempfile.TemporaryDirectory(prefix="alfusion-fit-") as tmp:
            result = run_search(make_probe, configs, data, data, len(classes), cfg,
                                RunState(tmp, {}))
        self.classes_ = classes
        self.probe_ = result.model
        self.best_params_ = dict(result.best.__dict__)
        self.grid_ = result.grid
        self.validation_ = {k: v for k, v in result.val.items() if k != "per_class_recall"}
        self.n_features_in_ = int(width)
        self.n_tokens_in_ = int(n_tokens)
        self.flat_ = not attentive
        return self

    def _check_shape(self, x: torch.Tensor) -> None:
        shape = (self.n_tokens_in_, self.n_features_in_) if x.dim() == 3 else \
            (self.n_features_in_,)
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"X has samples of shape {tuple(x.shape[1:])}, but the probe was "
                             f"fitted on {shape}")

    @torch.no_grad()
    def decision_function(self, X) -> np.ndarray:
        """(N, C) logits, by the engine's arithmetic (as the CLI scores its test split)."""
        from alfusion.probes.bank import ProbeBank

        check_is_fitted(self, "probe_")
        x = as_tokens(X, flat=self.flat_)
        self._check_shape(x)
        bank = ProbeBank.from_probes([self.probe_])
        x = x.to(bank.device)
        out = [bank.logits(x[i:i + 4096])[0].cpu() for i in range(0, len(x), 4096)]
        return torch.cat(out).numpy()

    def predict_proba(self, X) -> np.ndarray:
        """(N, C) softmax probabilities; column j is class ``classes_[j]``."""
        return torch.from_numpy(self.decision_function(X)).softmax(dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """(N,) the predicted label of each sample."""
        check_is_fitted(self, "probe_")
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Balanced accuracy (mean recall over the classes present in y), as the CLI's
        test/bal_acc."""
        from alfusion.metrics import classification_metrics

        check_is_fitted(self, "probe_")
        if sample_weight is not None:
            raise ValueError("score: sample_weight is not supported (balanced accuracy)")
        labels = np.asarray(y)
        index = np.searchsorted(self.classes_, labels)
        known = (index < len(self.classes_)) & (self.classes_[np.minimum(
            index, len(self.classes_) - 1)] == labels)
        if not known.all():
            raise ValueError(f"y holds labels the probe was not fitted on: "
                             f"{sorted(set(labels[~known].tolist()))}")
        logits = torch.from_numpy(self.decision_function(X))
        return classification_metrics(logits, torch.as_tensor(index),
                                      len(self.classes_))["bal_acc"]


class ALFClassifier(TokenProbeClassifier):
    """Attentive Multi-Layer Fusion on tokens (N, T, D): the paper's ALF probe (conf/probe/
    alf.yaml), one head per token unless ``num_heads``. See ``TokenProbeClassifier``."""

    probe_config = "alf"


class LinearProbeClassifier(TokenProbeClassifier):
    """The linear probe (conf/probe/linear.yaml) on tokens: (N, D) as given, (N, T, D)
    concatenated to (N, T * D). See ``TokenProbeClassifier``."""

    probe_config = "linear"
