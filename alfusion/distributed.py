"""Data parallelism helpers: who am I, which samples are mine, and batch statistics over ranks.

Every rank draws the same per-epoch permutation and keeps every world-th index of it, so the
union of the ranks' k-th batches is the k-th batch of a single process with the global batch:
a DDP run trains the same model as one process on the same data. The tail of N % world samples
is dropped each epoch (never padded): ranks see disjoint samples and the same number of batches,
so no rank waits for a batch another rank does not have.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, Sampler, get_worker_info

from alfusion.protocol import epoch_permutation

RANK_VARS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def is_global_zero() -> bool:
    """True in the process that logs and writes results (before or after a Trainer exists).

    A Lightning DDP child has LOCAL_RANK > 0, another node NODE_RANK > 0, a SLURM task
    SLURM_PROCID > 0, torchrun RANK > 0.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in RANK_VARS)


# The rank processes this process started (Lightning's launcher, at the first DDP fit of a run):
# rank 0 waits for them at the end of the run, so that a rank that failed fails the command.
_started_ranks: list[subprocess.Popen] = []


def adopt_ranks(trainer) -> None:
    """Remember the rank processes ``trainer``'s launcher started (none on ranks > 0, none
    when ranks are started externally: SLURM, torchrun)."""
    for proc in getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or ():
        if proc not in _started_ranks:
            _started_ranks.append(proc)


def join_ranks(timeout_s: float = 600) -> None:
    """Wait for the rank processes this process started; raise if any failed (or outlived
    ``timeout_s`` after this rank's work was done, when it is ended)."""
    failed = []
    for local_rank, proc in enumerate(_started_ranks, start=1):
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"still running {timeout_s:.0f} s after rank 0 finished; ended"
        if code != 0:
            failed.append(f"rank {local_rank} (pid {proc.pid}): exit {code}")
    _started_ranks.clear()
    if failed:
        raise RuntimeError(f"DDP: {'; '.join(failed)}; its error is printed above")


def stop_ranks() -> None:
    """End the rank processes this process started (it failed: they would wait in a
    collective until the process group's timeout)."""
    for proc in _started_ranks:
        if proc.poll() is None:
            proc.kill()
    _started_ranks.clear()


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; the flag itself without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class RankSampler(Sampler[int]):
    """Indices 0..n-1 for one rank: every world-th of the epoch's order, starting at ``rank``.

    Lightning calls ``set_epoch`` before each epoch (also after a resume), so the order of an
    epoch does not depend on how many epochs this process has run.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 seed: int = 0) -> None:
        if n < world:
            raise ValueError(f"{n} samples cannot be split over {world} ranks")
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def indices(self) -> list[int]:
        order = (epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle
                 else torch.arange(self.n))
        used = len(self) * self.world
        return order[:used][self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())


class StepBatches:
    """A batch sampler over optimiser steps: step s of a fit takes batch s % E of epoch s // E
    of this rank's RankSampler order (E batches per epoch), for s = start .. total - 1.

    Indexing batches by step rather than by Lightning's epoch counter lets a resumed fit start
    exactly at the checkpoint's step (Lightning replays epoch boundaries differently on a
    restart). Its length is the number of steps it yields.
    """

    def __init__(self, sampler: RankSampler, batch_size: int, total: int, start: int = 0) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.total, self.start = total, start
        self.per_epoch = math.ceil(len(sampler) / batch_size)

    def __len__(self) -> int:
        return self.total - self.start

    def indices(self) -> list[int]:
        """The first epoch's indices of this rank (for audits)."""
        self.sampler.set_epoch(0)
        return self.sampler.indices()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = None, []
        for step in range(self.start, self.total):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                self.sampler.set_epoch(e)
                order = self.sampler.indices()
            yield order[k * self.batch_size:(k + 1) * self.batch_size]


class RankSlice(IterableDataset):
    """A streamed dataset of known length n, split over ranks, shuffled through a buffer.

    Each rank gets exactly n // world samples (equal batch counts on every rank: none waits for
    a batch another rank lacks). A source with ``with_window``/``with_block`` (the webdataset
    source) reads only its rank's contiguous row window and splits it over DataLoader workers
    itself; any other source is read whole, rank r keeping stream positions i % world == r and
    its workers taking turns. ``shuffle_buffer`` > 1 shuffles within a buffer of that many
    samples, seeded from the DataLoader's per-epoch worker seed (drawn from torch's global
    generator, which checkpoints carry, so a resumed run shuffles as the uninterrupted one).
    """

    def __init__(self, dataset, n: int, rank: int, world: int, batch_size: int = 1,
                 shuffle_buffer: int = 0) -> None:
        self.dataset, self.n, self.rank, self.world = dataset, n, rank, world
        self.shuffle_buffer = shuffle_buffer
        if hasattr(dataset, "with_window"):
            m = n // world
            self.source = dataset.with_window(rank * m, (rank + 1) * m).with_block(batch_size)
        else:
            self.source = None

    def __len__(self) -> int:
        return self.n // self.world

    def indices(self) -> list[int]:
        """The stream rows this rank reads each epoch (for audits), in stream order; the
        shuffle buffer reorders them, never adds or drops one."""
        if self.source is not None:
            return list(range(self.source.start, self.source.start + len(self)))
        return list(range(self.rank, self.n, self.world))[:len(self)]

    def _items(self):
        if self.source is not None:
            yield from self.source  # splits over workers by itself
            return
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = 0
        for i, item in enumerate(self.dataset):
            if i % self.world != self.rank:
                continue
            if mine >= len(self):
                return
            if mine % workers == worker:
                yield item
            mine += 1

    def __iter__(self):
        if self.shuffle_buffer <= 1:
            yield from self._items()
            return
        info = get_worker_info()
        seed = info.seed if info else int(torch.randint(2**62, ()))
        g = torch.Generator().manual_seed((seed + 7919 * self.rank) % 2**63)
        buffer = []
        for item in self._items():
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(torch.randint(len(buffer), (), generator=g)))
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (), generator=g)))


# SIGTERM (SLURM, Kubernetes, ``timeout``) and SIGUSR1 (SLURM's warning before a time limit)
# stop a run as Ctrl-C does. In a fit, Lightning's own SIGTERM handler (which this one joins)
# stops every rank at the end of the same step, where the fit checkpoints; elsewhere
# (extraction, set-up) the signal interrupts at once. A second signal interrupts at once.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[int] = []
_forwarding = False


def received_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def _on_stop_signal(signum: int, frame) -> None:
    global _forwarding
    if _forwarding:  # called back by Lightning's handler, to which this one forwarded
        return
    current = signal.getsignal(signal.SIGTERM)
    in_fit = callable(current) and current is not _on_stop_signal  # Lightning's, with us
    repeated = bool(_received)
    _received.append(signum)
    if in_fit and not repeated:
        if signum != signal.SIGTERM:  # Lightning stops a fit on SIGTERM: pass it on
            _forwarding = True
            try:
                current(signal.SIGTERM, frame)
            finally:
                _forwarding = False
        print(f"[alfusion] {signal.Signals(signum).name} received: stopping the fit at the "
              "end of this step (a checkpoint is written there)", flush=True)
        return
    raise KeyboardInterrupt


def install_stop_signals() -> None:
    """SIGTERM and SIGUSR1 stop the run as Ctrl-C does (see above). A signal another handler
    already owns (submitit's SIGUSR1 under ``hydra/launcher=slurm``: requeue) is left to it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, None) or current is _on_stop_signal:
            signal.signal(signum, _on_stop_signal)


def resolve_device(name: str) -> torch.device:
    """``device=auto``: this process's GPU (a DDP rank's own, by LOCAL_RANK), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)
