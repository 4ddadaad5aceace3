"""``fit_bank``: train G configurations on one dataset through the engine, with checkpoints.

Every probe fit of a run goes through here: the search grid (G configurations at once, one
backbone forward per batch end to end), the refit of the chosen configuration (a bank of one:
the same arithmetic that selected it), fine-tuning (a bank of one with a trainable backbone)
and the per-layer analysis's heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from alfusion.distributed import adopt_ranks
from alfusion.engine.host_memory import keep_freed_buffers
from alfusion.engine.module import (
    BankModule,
    StepCheckpoint,
    checkpoint_file,
    make_trainer,
)
from alfusion.engine.step import BankStep
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import (
    BatchPlan,
    HParams,
    NonFiniteLoss,
    batch_plan,
    class_weights,
    non_finite,
)


@dataclass
class FitResult:
    """A trained bank (every configuration, gathered over ranks), in ``configs`` order."""

    bank: ProbeBank
    configs: list[HParams]
    failures: dict[int, NonFiniteLoss]  # configuration index -> why it diverged
    losses: torch.Tensor  # (steps, G) training loss of every probe at every step, host
    plan: BatchPlan
    world: int = 1

    def model(self, g: int) -> nn.Module:
        """Configuration g as a plain probe (eval mode); raises its NonFiniteLoss."""
        if g in self.failures:
            raise self.failures[g]
        return self.bank.export(g)


def activation_bytes_per_probe(bank: ProbeBank, batch: int, sample_shape: Sequence[int],
                               per_probe_inputs: bool) -> int:
    """A generous estimate of the activation memory one probe adds to a training step.

    Counts fp32 tensors kept for backward or alive at the peak: per-probe jittered input,
    noise and normalised tokens (B, T, D) when jitter draws are per probe; scores, attention
    and dropout masks (B, H, T); weighted tokens (B, H, D); and the pooled path (B, A + 4D).
    """
    n_in = math.prod(sample_shape)
    inputs = 3 * n_in if per_probe_inputs else 0
    if bank.kind == "linear":
        return 4 * batch * (inputs + 4 * bank.params["head.weight"].shape[1])
    s = bank.spec
    T = sample_shape[0]
    per_sample = inputs + 5 * s.heads * T + 3 * s.heads * s.dim \
        + 3 * s.heads * s.head_dim + 6 * s.dim
    return 4 * batch * per_sample


def auto_chunk(bank: ProbeBank, batch: int, sample_shape: Sequence[int], per_probe_inputs: bool,
               budget_bytes: int | None = None) -> int:
    """How many probes go through one pass: all whose activations fit in ``budget_bytes``
    (default: half the free GPU memory).

    On the CPU one probe per pass (unless a budget is given): a pass then has exactly the
    shapes of a probe trained alone, so torch splits its work over threads alike and every
    probe's result equals, bit for bit, what a bank of one gives it (the refit of the chosen
    configuration). That matters because the paper's lr 0.1 turns any rounding difference
    into another trained probe (docs/benchmarks.md); it costs little on the CPU."""
    if budget_bytes is None:
        if bank.device.type != "cuda":
            return 1
        budget_bytes = torch.cuda.mem_get_info(bank.device)[0] // 2
    # The bank's shared fp32 batch (input, jitter noise, normalised tokens) comes first: for
    # all-token sets it is large (batch 2048 x 1,000 tokens x 768 = 6.3 GB each).
    budget_bytes -= 3 * 4 * batch * math.prod(sample_shape)
    per = activation_bytes_per_probe(bank, batch, sample_shape, per_probe_inputs)
    return max(1, min(len(bank), budget_bytes // max(per, 1)))


def jitter_mode(cfg, images: bool, trainable: bool) -> str:
    """Cached fits jitter each sample; end to end the paper flips one coin per batch
    (``end2end.jitter``); fine-tuning does not jitter."""
    if trainable:
        return "off"
    return cfg.end2end.jitter if images else "per_sample"


def fit_bank(configs: Sequence[HParams], make_probe: Callable[[HParams], nn.Module], data,
             num_classes: int, cfg, *, checkpoints: Path | None = None, resume: bool = False,
             logger=False, label: str = "train", trainable: bool = False,
             positions: Sequence[int] | None = None) -> FitResult:
    """Train every configuration on ``data`` (TokenData, StreamedTokens or ImageData) as one
    bank.

    ``checkpoints``: a folder for this fit's checkpoints (every ``train.checkpoint_every``
    steps); with ``resume`` the fit continues from the checkpoint there. ``trainable``: the
    data's encoder is fine-tuned with the probe (a bank of one). ``logger`` receives the
    training curve under ``label``/. ``positions``: linear heads on single tokens (the
    per-layer analysis; ProbeBank.positions), trained in one pass.
    """
    configs = list(configs)
    keep_freed_buffers()  # every step's large tensors reuse the last step's pages
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    images = data.encoder is not None  # end to end: images through the encoder
    data_parallel = data.parallel == "data"  # each rank reads its share of every batch
    every = cfg.train.get("checkpoint_every") or 0
    interrupted = Interrupted()
    callbacks = [interrupted]
    if checkpoints is not None and every:
        callbacks.append(StepCheckpoint(checkpoints, every))
    trainer = make_trainer(cfg.trainer, callbacks=callbacks)  # the module logs (tracker)
    world, rank = trainer.world_size, trainer.global_rank
    data_world = world if data_parallel else 1
    max_batch = cfg.end2end.batch_size if images else cfg.train.batch_size
    plan = batch_plan(len(data), max_batch, cfg.train.min_batches, cfg.train.epochs,
                      cfg.train.min_steps, data_world)
    saved = checkpoint_file(checkpoints, rank) if resume and checkpoints is not None else None
    resume_from = checkpoints if saved is not None and saved.exists() else None
    start = torch.load(saved, map_location="cpu", weights_only=True, mmap=True
                       )["step"]["step_count"] if resume_from else 0
    encoder = data.encoder
    if encoder is not None:
        encoder.reset()  # a fine-tuning fit starts from the pretrained weights
    bank = ProbeBank.fresh(make_probe, configs, cfg.seed)
    bank.positions = list(positions) if positions is not None else None
    weights = class_weights(data.labels, num_classes)
    train = cfg.train
    draws = "shared" if positions is not None else train.get("jitter_draws", "shared")

    def make_step(part: ProbeBank, share: slice) -> BankStep:
        # Per-layer heads (positions) are tiny: one pass. Otherwise passes sized by memory.
        chunk = None if positions is not None else auto_chunk(
            part, plan.batch // data_world, data.sample_shape, draws == "per_probe")
        return BankStep(part, configs[share], plan.steps, weights, cfg.seed, train.jitter_p,
                        train.jitter_sigma, jitter_mode(cfg, images, trainable), draws,
                        chunk=chunk,
                        extra=list(encoder.backbone.parameters()) if trainable else (),
                        extra_lr_scale=cfg.mode.get("backbone_lr_scale", 1.0),
                        sync=data_parallel and world > 1,
                        part=(rank, world) if data_parallel else (0, 1))

    module = BankModule(bank, make_step, encoder, data.parallel, resume_from, label,
                        tracker=logger or None)
    audit = None
    if data_parallel and checkpoints is not None and cfg.end2end.get("record_samples"):
        audit = checkpoints.parent.parent / "samples" / f"{checkpoints.name}_rank{rank}.json"
    device = trainer.strategy.root_device
    loader = data.steps(plan, cfg.seed, start, data_world, rank,
                        pin_memory=device.type == "cuda", audit=audit, device=device)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except SystemExit:
        if interrupted.seen:  # Lightning turns Ctrl-C into exit(1): say it was Ctrl-C
            raise KeyboardInterrupt from None
        raise
    adopt_ranks(trainer)  # rank 0 waits for the ranks it started at the end of the run
    core = module.core
    if not module.split:
        return FitResult(core.bank, configs, core.failures(), core.losses.cpu(), plan, world)
    return gather(core, module.share, configs, plan)  # every rank, even with an empty share


class Interrupted(Callback):
    """Remembers whether the fit ended by Ctrl-C or a stop signal (SIGTERM, SIGUSR1)."""

    seen = False

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        # SIGTERM/SIGUSR1 stop a fit through Lightning's SIGTERMException (a SystemExit)
        self.seen = self.seen or isinstance(exception, (KeyboardInterrupt, SIGTERMException))


def gather(core: BankStep, share: slice, configs: list[HParams], plan: BatchPlan) -> FitResult:
    """Every rank's share of a grid-split fit, all-gathered, so that every rank goes on
    with all the configurations (and selects alike)."""
    part = dict(params={k: v.cpu() for k, v in core.bank.params.items()},
                buffers={k: v.cpu() for k, v in core.bank.buffers.items()},
                bad=core.first_bad_step.cpu(), losses=core.losses.cpu(), start=share.start)
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    parts.sort(key=lambda p: p["start"])
    device = core.bank.device
    bank = ProbeBank(core.bank.template,
                     {k: torch.cat([p["params"][k] for p in parts]).to(device)
                      for k in part["params"]},
                     {k: torch.cat([p["buffers"][k] for p in parts]).to(device)
                      for k in part["buffers"]},
                     [hp.dropout for hp in configs])
    bad = torch.cat([p["bad"] for p in parts]).tolist()
    failures = {g: non_finite(step, configs[g]) for g, step in enumerate(bad) if step >= 0}
    losses = torch.cat([p["losses"] for p in parts], dim=1)
    return FitResult(bank, configs, failures, losses, plan, world)
