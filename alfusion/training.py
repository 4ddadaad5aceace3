"""ProbeModule: the LightningModule that trains one probe on token tensors (PROTOCOL.md 3).

AdamW on all parameters, per-step cosine from lr to 1e-6 without warm-up, class-weighted
cross-entropy, feature jitter; gradient-norm clipping (5) is set on the Trainer. Jitter and
attention dropout draw from the configuration's seeded streams (random_draws.py), so a fit
here sees the draws the same configuration gets inside a ProbeBank.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from alfusion.random_draws import ProbeStream, StreamDropout, probe_seed

MIN_LR = 1e-6

# Lightning notices that short epochs log less often than every 25 steps (intended here: the
# curve is logged across epochs), and its own pytree helper trips a torch deprecation.
warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@dataclass(frozen=True)
class HParams:
    """One configuration of the search grid."""

    lr: float
    wd: float
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},wd={self.wd:g},dropout={self.dropout:g}"


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c), K the number of classes present; absent classes weigh 0."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), 0.0)
    return w.float()


def batch_size_for(n: int, max_batch: int = 2048, min_batches: int = 5) -> int:
    """The largest batch <= max_batch giving at least ``min_batches`` batches per epoch
    whose last batch is at least half full (or exactly full)."""
    bs = max(1, min(max_batch, n // min_batches))
    while bs > 1 and 0 < n % bs < bs / 2:
        bs -= 1
    return bs


def epochs_for(n: int, batch_size: int, epochs: int = 40, min_steps: int = 1000) -> int:
    """``epochs``, raised so that training takes at least ``min_steps`` optimiser steps."""
    return max(epochs, math.ceil(min_steps / math.ceil(n / batch_size)))


def jitter(x: torch.Tensor, p: float, sigma: float) -> torch.Tensor:
    """With probability p per sample, add N(0, sigma^2) noise to the whole (T, D) input."""
    if p <= 0 or sigma <= 0:
        return x
    keep = (torch.rand(x.shape[0], device=x.device) < p).to(x.dtype)
    return x + keep.view(-1, *([1] * (x.dim() - 1))) * sigma * torch.randn_like(x)


class NonFiniteLoss(FloatingPointError):
    """Training diverged; the message names the configuration."""


class ProbeModule(L.LightningModule):
    """Trains ``probe`` on (tokens, label) batches. ``encoder`` (optional) maps a raw batch
    input to tokens first (end-to-end mode); in cached mode batches are tokens already.

    Cached fits draw jitter from the ``jitter_draws`` stream of ``seed`` (shared | per_probe,
    as ``train.jitter_draws`` for the bank) and attention dropout from the configuration's
    own stream; end-to-end fits (End2EndModule) use the global generator, reseeded per step.
    """

    def __init__(self, probe: nn.Module, hp: HParams, total_steps: int,
                 weights: torch.Tensor, jitter_p: float = 0.5, jitter_sigma: float = 0.05,
                 encoder: nn.Module | None = None, seed: int = 0,
                 jitter_draws: str = "shared") -> None:
        super().__init__()
        self.probe = probe
        self.encoder = encoder
        self.hp = hp
        self.total_steps = total_steps
        self.jitter_p, self.jitter_sigma = jitter_p, jitter_sigma
        self.seed, self.jitter_draws = seed, jitter_draws
        self.jitter_stream: ProbeStream | None = None
        self.register_buffer("class_weights", weights)

    def on_fit_start(self) -> None:
        if self.encoder is not None:
            return
        own = ProbeStream(probe_seed(self.seed, self.hp), self.device)
        self.jitter_stream = own if self.jitter_draws == "per_probe" else \
            ProbeStream(probe_seed(self.seed, None), self.device)
        drop = getattr(self.probe, "attn_drop", None)
        if isinstance(drop, nn.Dropout):  # same masks, drawn in the bank's order
            self.probe.attn_drop = StreamDropout(own, drop.p)

    def on_fit_end(self) -> None:
        drop = getattr(self.probe, "attn_drop", None)
        if isinstance(drop, StreamDropout):  # the probe leaves as the paper's module
            self.probe.attn_drop = nn.Dropout(drop.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            x = self.encoder(x)
        return self.probe(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.encoder is not None:
            x = self.encoder(x)
        if self.jitter_stream is not None:
            x = self.jitter_stream.jitter(x, self.jitter_p, self.jitter_sigma)
        else:
            x = jitter(x, self.jitter_p, self.jitter_sigma)
        loss = F.cross_entropy(self.probe(x), y, weight=self.class_weights)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {self.global_step} "
                                f"of configuration {self.hp.name}: lower the learning rate "
                                "or check the features for NaN/inf")
        self.log("train/loss", loss, on_step=True, prog_bar=True)  # sent every 25 steps
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.probe.parameters(), lr=self.hp.lr,
                                weight_decay=self.hp.wd, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps,
                                                           eta_min=MIN_LR)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))


class FeatureBatches:
    """Batches drawn by index from tensors that stay where they are (device or host).

    x: (N, ...) features, y: (N,) labels. Each epoch is a fresh permutation from a generator
    seeded with (seed, epoch) when shuffling: the same seed gives the same batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.y.device)
        else:
            order = torch.arange(n, device=self.y.device)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


def resolve_precision(trainer_cfg) -> str:
    """``precision: auto``: bf16-mixed where the trainer runs on CUDA, else 32-true."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def make_trainer(trainer_cfg, max_steps: int, logger=False, **overrides) -> L.Trainer:
    """A Lightning Trainer for one probe fit, from a ``conf/trainer`` config."""
    kwargs = dict(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.get("num_nodes", 1),
        strategy=trainer_cfg.get("strategy", "auto"),
        precision=resolve_precision(trainer_cfg),
        max_steps=max_steps,
        max_epochs=-1,
        gradient_clip_val=5.0,
        gradient_clip_algorithm="norm",
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=trainer_cfg.get("progress_bar", True)
        and os.environ.get("ALFUSION_NO_PROGRESS") != "1",  # CI and logs: no bars
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=25,
        deterministic=trainer_cfg.get("deterministic", False),
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def fit_probe(probe: nn.Module, hp: HParams, x: torch.Tensor, y: torch.Tensor,
              num_classes: int, train_cfg, trainer_cfg, seed: int, logger=False
              ) -> ProbeModule:
    """Train ``probe`` on tokens x (N, ...) and labels y (N,) with PROTOCOL.md's schedule."""
    L.seed_everything(seed, workers=True, verbose=False)
    batch = batch_size_for(len(y), train_cfg.batch_size, train_cfg.min_batches)
    batches = FeatureBatches(x, y, batch, shuffle=True, seed=seed)
    steps = len(batches) * epochs_for(len(y), batch, train_cfg.epochs, train_cfg.min_steps)
    module = ProbeModule(probe, hp, steps, class_weights(y, num_classes),
                         train_cfg.jitter_p, train_cfg.jitter_sigma, seed=seed,
                         jitter_draws=train_cfg.get("jitter_draws", "shared"))
    trainer = make_trainer(trainer_cfg, steps, logger=logger)
    trainer.fit(module, train_dataloaders=batches)
    module.fit_info = dict(steps=trainer.global_step, batch_size=batch, samples=len(y))
    return module


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits (N, C) of ``model`` in eval mode for tokens x (N, ...)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out
