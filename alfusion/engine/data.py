"""What a fit trains on: cached token tensors or images through a TokenEncoder.

Both walk their samples by optimiser step with the protocol's per-epoch permutation, so a
resumed fit continues at its checkpoint's batch, and a cached and an end-to-end fit on the
same samples see the same batches. Both score a whole bank at once (``logits``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from alfusion.data.loaders import eval_loader, train_loader
from alfusion.distributed import RankSampler, StepBatches
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import BatchPlan, epoch_permutation

STREAM_SPLIT_REFUSED = ("a streamed dataset cannot be split for validation, a search grid or "
                        "few-shot in end-to-end mode: set search=none search.validate=false "
                        "fewshot_k=null (or cache its features: mode=cached)")


class Rows(NamedTuple):
    """A batch not yet gathered: rows ``index`` (B,) of ``source`` (N, ...). The step's jitter
    reads them straight from the source (one pass over the batch fewer); ``gather`` makes
    the batch where nothing does."""

    source: torch.Tensor
    index: torch.Tensor

    def gather(self) -> torch.Tensor:
        return self.source.index_select(0, self.index)


class TensorSteps:
    """Batches (x[idx], y[idx]) of steps start .. plan.steps - 1: step s takes batch
    s % E of epoch s // E's permutation (E = plan.per_epoch). Tensors stay where they are;
    ``gather=False``: x's batches as Rows(x, idx) (what the engine's fits take)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, seed: int,
                 start: int = 0, gather: bool = True) -> None:
        self.x, self.y, self.plan, self.seed, self.start = x, y, plan, seed, start
        self.gather = gather

    def __len__(self) -> int:
        return self.plan.steps - self.start

    def __iter__(self):
        n, b, epoch, order = len(self.y), self.plan.batch, None, None
        for step in range(self.start, self.plan.steps):
            e, k = divmod(step, self.plan.per_epoch)
            if e != epoch:
                epoch, order = e, epoch_permutation(n, self.seed, e).to(self.y.device)
            idx = order[k * b:(k + 1) * b]
            xb = self.x.index_select(0, idx) if self.gather else Rows(self.x, idx)
            yield xb, self.y.index_select(0, idx)


def scoring_rows(bank: ProbeBank) -> int:
    """Samples per scoring batch: 4,096 on a GPU; on the CPU 4,096 / G (at least 256), so that
    the activations of scoring a grid stay those of one probe on 4,096 samples."""
    if bank.device.type == "cuda":
        return 4096
    return max(256, 4096 // max(len(bank), 1))


class RankSteps:
    """Batches (x[idx], y[idx]) of a StepBatches' index lists (a data-parallel rank's share)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batches: StepBatches) -> None:
        self.x, self.y, self.batches = x, y, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for idx in self.batches:
            i = torch.as_tensor(idx, device=self.y.device)
            yield self.x.index_select(0, i), self.y.index_select(0, i)


def write_audit(path: Path, rank: int, world: int, batch: int, indices: list[int]) -> None:
    """Record the samples a rank trains on in the first epoch of a fit (checks, tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(rank=rank, world=world, batch=batch, indices=indices)))


@dataclass
class TokenData:
    """Cached tokens x (N, T, D) or (N, F) and labels y (N,), on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    # Under DDP: grid (each rank trains its share of the probes on all the data) or data
    # (each rank takes its share of every batch).
    parallel: str = field(default="grid", kw_only=True)
    encoder = None

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What a probe reads of one sample: (T, D) or (F,)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> TokenData:
        if len(idx) == len(self.y):
            return self
        idx_t = torch.as_tensor(idx, device=self.y.device)
        return TokenData(self.x[idx_t], self.y[idx_t], parallel=self.parallel)

    def steps(self, plan: BatchPlan, seed: int, start: int, world: int, rank: int,
              pin_memory: bool = False, audit: Path | None = None, device=None):
        """The fit's batches, x's as Rows; with ``world`` > 1 (data-parallel) this rank's
        every world-th sample of each (distributed.RankSampler), gathered."""
        if world == 1:
            return TensorSteps(self.x, self.y, plan, seed, start, gather=False)
        batches = StepBatches(RankSampler(len(self), rank, world, seed=seed),
                              plan.batch // world, plan.steps, start)
        if audit is not None:
            write_audit(audit, rank, world, plan.batch, batches.indices())
        return RankSteps(self.x, self.y, batches)

    @torch.no_grad()
    def logits(self, bank: ProbeBank, batch_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eval logits (G, N, C) on the host, labels (N,)), ``scoring_rows`` at a time."""
        batch_size = batch_size or scoring_rows(bank)
        out = [bank.logits(self.x[i:i + batch_size].float()).cpu()
               for i in range(0, len(self.x), batch_size)]
        return torch.cat(out, dim=1), self.y.cpu()


@dataclass
class ImageData:
    """Images (train transform ``train``, eval transform ``plain``) with labels (N,), fed to
    the probes through ``encoder`` inside the training step. ``settings``: the run's
    ``end2end`` config (batch sizes, workers, shuffle buffer)."""

    train: Dataset
    plain: Dataset
    y: torch.Tensor
    encoder: torch.nn.Module
    settings: object
    sample_shape: tuple[int, ...] = (1,)  # the encoder's tokens of one image: (T, D) or (F,)
    parallel: str = field(default="data")  # under DDP each rank takes its share of a batch

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ImageData:
        if len(idx) == len(self.y):
            return self
        if isinstance(self.train, IterableDataset):
            raise ValueError(STREAM_SPLIT_REFUSED)
        idx_list = [int(i) for i in idx]
        return ImageData(Subset(self.train, idx_list), Subset(self.plain, idx_list),
                         self.y[torch.as_tensor(idx)], self.encoder, self.settings,
                         self.sample_shape)

    def steps(self, plan: BatchPlan, seed: int, start: int, world: int, rank: int,
              pin_memory: bool = False, audit: Path | None = None, device=None):
        """This rank's loader of plan.batch // world images per step; ``audit``: a file for
        the samples this rank trains on in the first epoch (a record for checks)."""
        loader, part = train_loader(self.train, plan.batch, rank, world, seed,
                                    self.settings.num_workers, total_steps=plan.steps,
                                    start_step=start, pin_memory=pin_memory,
                                    shuffle_buffer=self.settings.shuffle_buffer)
        if audit is not None:
            write_audit(audit, rank, world, plan.batch, part.indices())
        return loader

    @torch.no_grad()
    def logits(self, bank: ProbeBank) -> tuple[torch.Tensor, torch.Tensor]:
        """(eval logits (G, N, C) on the host, labels (N,)): one encoder pass per batch."""
        was_training = self.encoder.training
        self.encoder.eval()
        loader = eval_loader(self.plain, self.settings.eval_batch_size,
                             self.settings.num_workers)
        logits, labels = [], []
        for images, y in loader:
            tokens = self.encoder(images.to(bank.device, non_blocking=True))
            logits.append(bank.logits(tokens.float()).cpu())
            labels.append(torch.as_tensor(y).long())
        self.encoder.train(was_training)
        return torch.cat(logits, dim=1), torch.cat(labels)
