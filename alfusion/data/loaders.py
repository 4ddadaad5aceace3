"""Images for end-to-end fits: transforms, labels, and per-rank DataLoaders.

Map-style sources are split over ranks by ``RankSampler`` (Lightning's own distributed sampler
is switched off: ours gives the single-process order); streamed sources by ``RankSlice``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision import transforms as T

from alfusion.distributed import RankSampler, RankSlice, StepBatches


def augment_transform(eval_transform, img_size: int | None = None):
    """Random resized crop + horizontal flip, then the eval transform's tensor conversion and
    normalisation (off by default, as in the paper)."""
    steps = list(getattr(eval_transform, "transforms", []))
    tail = next((i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__), None)
    crop = next((t.size for t in steps if isinstance(t, T.CenterCrop)), None)
    size = img_size or (crop[0] if isinstance(crop, (tuple, list)) else crop)
    if tail is None or size is None:
        raise ValueError(f"cannot derive an augmentation from the transform {eval_transform}: "
                         "set end2end.augment=false")
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *steps[tail:]])


def labels_of(dataset: Dataset, num_workers: int = 0) -> torch.Tensor:
    """All labels (N,) of a dataset, from its ``labels``/``targets`` when it has them, else by
    one pass through it (images are loaded and dropped)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset, num_workers)[torch.as_tensor(dataset.indices)]
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None and not callable(values):
            return torch.as_tensor(np.asarray(values)).long()
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    return torch.cat([torch.as_tensor(y).long() for _, y in loader])


def length_of(dataset: Dataset) -> int:
    try:
        return len(dataset)
    except TypeError as err:
        raise ValueError(f"end-to-end training needs the number of samples of "
                         f"{type(dataset).__name__} (it plans epochs and splits ranks)") from err


def train_loader(dataset: Dataset, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int, total_steps: int, start_step: int = 0,
                 pin_memory: bool = False, shuffle_buffer: int = 1000
                 ) -> tuple[DataLoader, object]:
    """(loader of this rank's batches of batch_size // world images, its batch sampler or
    slice).

    Map-style data: a seeded per-epoch permutation, batches indexed by optimiser step from
    ``start_step`` (a resumed fit continues at its checkpoint's batch). Streamed data: epochs
    of the rank's share, shuffled through a buffer of ``shuffle_buffer`` samples; a resumed fit
    restarts the stream.
    """
    per_rank = batch_size // world
    common = dict(num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    if isinstance(dataset, IterableDataset):
        part = RankSlice(dataset, length_of(dataset), rank, world, per_rank, shuffle_buffer)
        loader = DataLoader(part, batch_size=per_rank, **common)
        return RepeatedLoader(loader, total_steps - start_step), part
    sampler = RankSampler(len(dataset), rank, world, shuffle=True, seed=seed)
    batches = StepBatches(sampler, per_rank, total_steps, start_step)
    return DataLoader(dataset, batch_sampler=batches, **common), batches


class RepeatedLoader:
    """``steps`` batches of a loader, starting it again (a new epoch) when it runs out."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done = 0
        while done < self.steps:
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      pin_memory=pin_memory)
