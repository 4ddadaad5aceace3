"""Cached tokens streamed from the memory-mapped cache entry, batch by batch.

``StreamedTokens`` is TokenData's twin for caches that do not fit in memory: the entry's fp16
arrays stay memory-mapped (the page cache holds what was read; the process's own memory holds
the labels, the row numbers and the batches in flight), and each step's rows are gathered,
selected, normalised and stacked by the TokenSet as the in-memory path does for the whole
split, in a background thread, one or two batches ahead. On a GPU the fp16 rows are pinned and
copied on a side stream, and the TokenSet runs there, so the copy and the next batch's gather
overlap the step. The batches are those of TensorSteps (the same per-epoch permutation), so a
streamed fit equals the in-memory fit bit for bit on the CPU.

``storage_for`` decides between the two (``train.stream``: auto | memory | disk).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from alfusion.distributed import RankSampler, StepBatches
from alfusion.engine.data import scoring_rows, write_audit
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import BatchPlan
from alfusion.tokens import TokenSet

STORAGES = ("auto", "memory", "disk")


class Prefetched:
    """An iterable of ``len(source)`` items computed by ``make(item)`` in a background thread,
    at most ``depth`` ahead of the consumer. An error in the thread is raised in the consumer;
    a consumer that stops early (an early stop of the fit) ends the thread."""

    def __init__(self, source: Sequence | Iterable, make: Callable, depth: int = 2,
                 length: int | None = None) -> None:
        self.source, self.make, self.depth = source, make, depth
        self.length = len(source) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        items: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def put(out) -> bool:
            """Hand ``out`` over unless the consumer has gone (then False)."""
            while not stop.is_set():
                try:
                    items.put(out, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.source:
                    if not put(self.make(item)):
                        return
                put(done)
            except BaseException as err:  # handed to the consumer
                put(err)

        thread = threading.Thread(target=produce, daemon=True, name="alfusion-prefetch")
        thread.start()
        try:
            while True:
                out = items.get()
                if out is done:
                    return
                if isinstance(out, BaseException):
                    raise out
                yield out
        finally:
            stop.set()
            thread.join(timeout=5)


class StreamedTokens:
    """Cached tokens read from the entry's memory-mapped arrays, batch by batch.

    arrays: the entry's arrays that ``token_set`` reads (cls, ap (N0, L, D); tokens
    (N0, L', T, D); regions (N0, L, k*k, D); fp16 memory maps); rows: this split's rows of them
    (sorted); y: their labels (N,). ``parallel``: under DDP, ``grid`` (each rank trains its share
    of the configurations on all the data) or ``data`` (each rank reads its share of every
    batch).
    """

    encoder = None

    def __init__(self, arrays: dict[str, np.ndarray], y: torch.Tensor, token_set: TokenSet,
                 dims: list[int], rows: np.ndarray | None = None, parallel: str = "grid"
                 ) -> None:
        self.arrays, self.y, self.token_set, self.dims = arrays, y, token_set, dims
        self.rows = np.arange(len(y)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.parallel = parallel
        self._shape: tuple[int, ...] | None = None
        self._side_streams: dict = {}  # device -> the CUDA stream batches are made on

    @classmethod
    def from_entry(cls, entry, token_set: TokenSet, parallel: str = "grid") -> StreamedTokens:
        """The entry's arrays that ``token_set`` reads, memory-mapped; labels in memory."""
        names = ["tokens"] if token_set.tokens == "all" else token_set.kinds
        arrays = {n: entry.array(n) for n in names if entry.has(n)}
        return cls(arrays, torch.from_numpy(np.array(entry.array("labels"))).long(), token_set,
                   entry.dims, parallel=parallel)

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What a probe reads of one sample: (T, D) or (F,)."""
        if self._shape is None:
            self._shape = tuple(self.tokens(self.rows[:1], torch.device("cpu")).shape[1:])
        return self._shape

    def subset(self, idx: np.ndarray) -> StreamedTokens:
        if len(idx) == len(self.y):
            return self
        idx = np.asarray(idx)
        return StreamedTokens(self.arrays, self.y[torch.as_tensor(idx)], self.token_set,
                              self.dims, self.rows[idx], self.parallel)

    def gather(self, rows: np.ndarray, pin: bool = False) -> dict[str, torch.Tensor]:
        """The fp16 arrays of entry rows ``rows`` (in that order), read in file order."""
        order = np.argsort(rows, kind="stable")
        out = {}
        for name, array in self.arrays.items():
            part = array[rows[order]]  # ascending rows: the disk reads forward
            inverse = np.empty_like(part)
            inverse[order] = part
            t = torch.from_numpy(inverse)
            out[name] = t.pin_memory() if pin else t
        return out

    def tokens(self, rows: np.ndarray, device: torch.device, pin: bool = False) -> torch.Tensor:
        """The stacked tokens (B, T, D) or (B, F), fp32 on ``device``, of entry rows ``rows``:
        the fp16 rows go to the device first, selection and normalisation happen there."""
        arrays = {k: v.to(device, non_blocking=pin) for k, v in self.gather(rows, pin).items()}
        return self.token_set.from_arrays(arrays, self.dims)

    def _batch(self, positions: Sequence[int], device: torch.device):
        """(tokens, labels) of the split's samples ``positions``, on ``device``; on a GPU made
        on a side stream (the caller waits for its event)."""
        pos = np.asarray(positions, dtype=np.int64)
        rows = self.rows[pos]
        if device.type != "cuda":
            return self.tokens(rows, device), self.y[torch.from_numpy(pos)]
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        stream = self._side_streams[device]
        with torch.cuda.stream(stream):
            x = self.tokens(rows, device, pin=True)
            y = self.y[torch.from_numpy(pos)].pin_memory().to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return x, y, ready

    @staticmethod
    def _ready(batch):
        if len(batch) == 2:
            return batch
        x, y, ready = batch
        current = torch.cuda.current_stream(x.device)
        current.wait_event(ready)
        x.record_stream(current)  # made on the side stream, used on this one
        y.record_stream(current)
        return x, y

    def steps(self, plan: BatchPlan, seed: int, start: int, world: int, rank: int,
              pin_memory: bool = False, audit: Path | None = None,
              device: torch.device | None = None) -> Iterable:
        """Batches of steps start .. plan.steps - 1 on ``device``: step s takes batch s % E of
        epoch s // E's permutation (TensorSteps' batches); with ``world`` > 1 this rank's
        every world-th sample of it (the data-parallel split of distributed.RankSampler)."""
        device = torch.device(device or "cpu")
        sampler = RankSampler(len(self), rank, world, shuffle=True, seed=seed)
        batches = StepBatches(sampler, plan.batch // world, plan.steps, start)
        if audit is not None:
            write_audit(audit, rank, world, plan.batch, batches.indices())
        made = Prefetched(batches, lambda pos: self._batch(pos, device))
        return _Mapped(made, self._ready)

    @torch.no_grad()
    def logits(self, bank: ProbeBank, batch_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eval logits (G, N, C) on the host, labels (N,)), in TokenData's batches."""
        batch_size = batch_size or scoring_rows(bank)
        starts = range(0, len(self), batch_size)
        made = Prefetched(starts, lambda i: self._batch(range(i, min(i + batch_size,
                                                                      len(self))), bank.device))
        out = [bank.logits(x).cpu() for x, _ in _Mapped(made, self._ready)]
        return torch.cat(out, dim=1), self.y.clone()


class _Mapped:
    """``fn`` applied to each item of ``source`` as it is consumed (with its length)."""

    def __init__(self, source: Prefetched, fn: Callable) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator:
        return (self.fn(item) for item in self.source)


# ------------------------------------------------------------------------------ the choice


def in_memory_bytes(entry, token_set: TokenSet) -> int:
    """What holding a split in memory takes: its fp16 arrays, read whole, and the fp32 stacked
    tokens (N, T, D) with the one copy that normalisation makes beside them."""
    arrays = ("cls", "ap", "tokens", "regions", "labels")
    stored = sum(math.prod(entry.meta["arrays"][n]) * (8 if n == "labels" else 2)
                 for n in arrays if entry.has(n))
    sample = StreamedTokens.from_entry(entry, token_set).sample_shape
    return stored + 2 * 4 * len(entry) * math.prod(sample)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def storage_for(setting: str, needed: int, device: torch.device,
                budget_gb: float | None = None) -> tuple[str, str]:
    """(``memory`` | ``disk``, why) for cached splits that take ``needed`` bytes in memory.

    ``auto``: in memory when they fit ``budget_gb`` (default: half the device's free memory,
    leaving the rest to the bank's activations), else streamed from disk."""
    if setting not in STORAGES:
        raise ValueError(f"train.stream={setting!r}: use one of {STORAGES}")
    size = f"{needed / 1e9:.3g} GB in memory"
    if setting != "auto":
        return setting, f"train.stream={setting} ({size})"
    budget = budget_gb * 1e9 if budget_gb is not None else free_memory_bytes(device) / 2
    where = "train.stream_budget_gb" if budget_gb is not None else \
        f"half the free memory of {device.type}"
    if needed <= budget:
        return "memory", f"{size} fits {budget / 1e9:.3g} GB ({where})"
    return "disk", f"{size} is over {budget / 1e9:.3g} GB ({where})"
