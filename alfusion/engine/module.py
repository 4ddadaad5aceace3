"""BankModule: the one LightningModule that trains every probe fit (a bank of G >= 1 probes).

Manual optimisation: each training step is a ``BankStep`` (per-probe AdamW, cosine schedule,
clipping, BatchNorm, weighted loss). Lightning brings the loop, device placement, the precision
plugin (bf16 autocast on GPUs), the progress bar, the MLflow logger and DDP process launching.
In end-to-end mode the frozen TokenEncoder runs once per batch inside the step and its tokens
feed every probe of the bank.

Parallelism: ``grid`` (cached features) gives each rank its share of the probes and all the
data; ``data`` (images) gives each rank its share of every batch and sums gradients over ranks.
Either way nothing wraps the module in DistributedDataParallel (``BankDDPStrategy``): probes
of different configurations never average their gradients. A rank whose share of the grid is
empty (fewer configurations than ranks: a refit is a bank of one) takes its steps with nothing
to train: Lightning syncs every training batch over ranks, so every rank takes every step.

The MLflow logger is the module's ``tracker``, not the Trainer's: a Trainer marks its logger's
run FINISHED at the end of each fit, and a run holds several fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from alfusion.checkpoints import save_checkpoint
from alfusion.distributed import all_ranks_agree
from alfusion.engine.progress import progress_callback
from alfusion.engine.step import BankStep
from alfusion.probes.bank import ProbeBank

# Lightning warns that a module without optimisers trains nothing (the BankStep updates the
# probes itself), that a frozen backbone sits in eval mode (on purpose), and about its own
# pytree helper.
for _message in (".*returned `None`, this fit will run with no optimizer",
                 ".*configure_optimizers.*must be implemented",
                 ".*module\\(s\\) in eval mode.*", r".*isinstance\(treespec, LeafSpec\)",
                 ".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_message)


def world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def grid_slice(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of n probes: sizes differ by at most one, the first
    ``n % world`` ranks take one more."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def checkpoint_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"last.rank{rank}.pt"


class BankModule(L.LightningModule):
    """Trains ``bank`` with the BankStep that ``make_step(bank, share)`` builds once the
    device and the rank are known (``share``: the slice of the configurations this rank
    trains). ``resume_from``: a checkpoint folder to continue from when it holds this rank's
    file. ``label``: the metric prefix (grid | train). ``tracker``: the MLflow logger (rank
    0) that receives the training curve, or None."""

    def __init__(self, bank: ProbeBank, make_step: Callable[[ProbeBank, slice], BankStep],
                 encoder: torch.nn.Module | None = None, parallel: str = "grid",
                 resume_from: Path | None = None, label: str = "train", log_every: int = 25,
                 tracker=None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = encoder
        self.bank, self.make_step, self.parallel = bank, make_step, parallel
        self.resume_from, self.label, self.log_every = resume_from, label, log_every
        self.tracker = tracker
        self.core: BankStep | None = None
        self.share = slice(0, len(bank))
        self.split = False  # the grid is split over ranks: gather the parts after the fit

    def configure_optimizers(self):
        return None  # the BankStep is the optimiser

    def on_fit_start(self) -> None:
        # Here, not in setup: the module is on its device and the process group exists.
        world, rank = world_and_rank()
        bank = self.bank
        if self.parallel == "grid" and world > 1:
            self.split = True
            self.share = grid_slice(len(bank), world, rank)
            bank = bank.part(self.share.start, self.share.stop)
        self.core = self.make_step(bank.to(self.device), self.share)
        if self.resume_from is not None:
            path = checkpoint_file(self.resume_from, rank)
            if path.exists():
                self.load_checkpoint(torch.load(path, map_location=self.device,
                                                weights_only=True))

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        if self.encoder is not None:
            x = self.encoder(x)
        losses = self.core.step(x, y, owned=True)  # batches are fresh copies or Rows
        s = self.core.step_count
        if s % self.log_every and not self.core.finished:
            return  # reading the losses waits for the device: every log_every steps only
        finite = losses[torch.isfinite(losses)]
        mean = float(finite.mean()) if finite.numel() else float("nan")
        self.log("loss", mean, prog_bar=True, logger=False)
        if self.tracker is not None:
            metrics = {f"{self.label}/loss": mean}
            if len(losses) > 1:
                metrics[f"{self.label}/loss_min"] = float(finite.min()) if finite.numel() \
                    else float("nan")
            self.tracker.log_metrics(metrics, step=s)
        # Nothing left to train; a split grid stops only when every rank's share has failed
        # (ranks reach this line at the same steps: one all-reduce).
        failed = self.core.all_failed()
        if all_ranks_agree(failed, self.device) if self.split else failed:
            self.trainer.should_stop = True

    def checkpoint(self) -> dict:
        state = dict(step=self.core.state_dict())
        if self.encoder is not None and getattr(self.encoder, "trainable", False):
            state["backbone"] = self.encoder.backbone.state_dict()
        return state

    def load_checkpoint(self, state: dict) -> None:
        self.core.load_state_dict(state["step"])
        if "backbone" in state:
            self.encoder.backbone.load_state_dict(state["backbone"])


class StepCheckpoint(Callback):
    """Every ``every`` optimiser steps, this rank's engine state to ``folder``/last.rank{r}.pt,
    checksummed, keeping the one before (alfusion/checkpoints.py: a partial or damaged file never
    passes as intact)."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = Path(folder), every

    def on_train_batch_end(self, trainer, module: BankModule, outputs, batch, batch_idx) -> None:
        s = module.core.step_count
        if s % self.every or module.core.finished:
            return
        save_checkpoint(module.checkpoint(), checkpoint_file(self.folder, world_and_rank()[1]))

    def on_exception(self, trainer, module: BankModule, exception: BaseException) -> None:
        """A stop signal ends the fit at the end of a step, on every rank the same one
        (Lightning's SIGTERMException): checkpoint it there, so the resume loses nothing."""
        core = getattr(module, "core", None)
        if isinstance(exception, SIGTERMException) and core is not None \
                and not core.finished and core.step_count % self.every:
            save_checkpoint(module.checkpoint(),
                            checkpoint_file(self.folder, world_and_rank()[1]))


class BankDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, device per rank) without the
    DistributedDataParallel wrapper: the BankStep decides what is summed over ranks."""

    def configure_ddp(self) -> None:
        pass


def resolve_precision(trainer_cfg) -> str:
    """``precision: auto``: bf16-mixed where the trainer runs on CUDA, else 32-true."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def make_trainer(trainer_cfg, logger=False, callbacks=()) -> L.Trainer:
    """A Lightning Trainer for one engine fit: one pass over a step-indexed loader."""
    strategy = trainer_cfg.get("strategy", "auto")
    if str(strategy).startswith("ddp"):
        strategy = BankDDPStrategy()
    progress = progress_callback(trainer_cfg.get("progress_bar", "auto"))
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.get("num_nodes", 1),
        strategy=strategy,
        precision=resolve_precision(trainer_cfg),
        max_epochs=1,  # the loader yields exactly the fit's remaining steps
        logger=logger or False,  # None would make Lightning write lightning_logs/ here
        callbacks=[*callbacks, *([progress] if progress else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress is not None,  # bars on a terminal, else lines
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,  # the module logs its own curve; this is the progress bar's
        use_distributed_sampler=False,  # the loaders split data over ranks themselves
        deterministic=trainer_cfg.get("deterministic", False),
    )
