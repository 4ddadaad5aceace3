"""Feature extraction into the FeatureCache: one backbone forward per batch for all layers."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from alfusion.data import build_dataset, dataset_identity
from alfusion.data.cache import CacheEntry, EntryWriter, FeatureCache

FORMAT_VERSION = 1  # bump when the meaning of stored arrays changes


def weights_identity(path: str | None) -> dict | None:
    """A local weights file is identified by its absolute path, size and modification time."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"backbone.weights={path}: no such file")
    stat = p.stat()
    return dict(path=str(p), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def feature_fingerprint(cfg, split: str) -> dict:
    """Every input that decides the cached arrays: backbone, weights, tap, transform, dtype,
    dataset identity, split, token kinds."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone["weights"] = weights_identity(backbone.get("weights"))
    return dict(
        format=FORMAT_VERSION,
        backbone=backbone,
        dataset=dataset_identity(cfg.dataset),
        split=split,
        all_tokens=bool(cfg.probe.tokens == "all"),
        dtype="float16",
    )


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def extract(backbone, dataset: Dataset, writer: EntryWriter, batch_size: int = 64,
            num_workers: int = 0, all_tokens: bool = False, chunk_rows: int = 1024,
            device: str | torch.device = "cpu", desc: str = "extract") -> None:
    """Run ``backbone`` over ``dataset`` in order and write chunks of fp16 features.

    Resumes after the rows of the chunks already written. Each chunk holds ``chunk_rows`` rows
    (the last one fewer): cls/ap (n, L, D), tokens (n, T, D) if asked, labels (n,).
    """
    device = torch.device(device)
    backbone.to(device)
    start = writer.done_rows()
    if start:
        if isinstance(dataset, IterableDataset):
            raise NotImplementedError("resuming a streamed source is handled by its reader")
        dataset = Subset(dataset, range(start, len(dataset)))
    total = len(dataset) if hasattr(dataset, "__len__") else None
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    pending: dict[str, list[np.ndarray]] = {}
    rows = 0
    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
               disable=os.environ.get("ALFUSION_NO_PROGRESS") == "1")
    for images, labels in loader:
        with autocast(device):
            out = backbone(images.to(device, non_blocking=True), all_tokens=all_tokens)
        arrays = dict(cls=out.cls, ap=out.ap, labels=labels)
        if all_tokens:
            arrays["tokens"] = out.tokens[:, -1]
        for name, value in arrays.items():
            value = value.cpu()
            pending.setdefault(name, []).append(
                value.numpy() if name == "labels" else value.to(torch.float16).numpy())
        rows += len(labels)
        bar.update(len(labels))
        while rows >= chunk_rows:
            rows = _flush(writer, pending, chunk_rows)
    if rows:
        _flush(writer, pending, rows)
    bar.close()


def _flush(writer: EntryWriter, pending: dict[str, list[np.ndarray]], n: int) -> int:
    """Write the first n pending rows as a chunk; keep the rest pending; return their count."""
    joined = {k: np.concatenate(v) for k, v in pending.items()}
    writer.write_chunk({k: v[:n] for k, v in joined.items()})
    for k, v in joined.items():
        pending[k] = [v[n:]]
    return len(joined["labels"]) - n


def load_or_extract(cfg, split: str, device: str | torch.device = "cpu") -> CacheEntry:
    """The cache entry of ``split`` for the run's settings, extracting it if missing."""
    cache = FeatureCache(cfg.paths.cache)
    fingerprint = feature_fingerprint(cfg, split)
    entry = cache.load(fingerprint)
    if entry is not None:
        return entry
    from alfusion.backbones import build_backbone

    backbone, transform = build_backbone(cfg.backbone)
    dataset = build_dataset(cfg.dataset, split, transform)
    writer = EntryWriter(cache, fingerprint)
    t0 = time.perf_counter()
    extract(backbone, dataset, writer, batch_size=cfg.extract.batch_size,
            num_workers=cfg.extract.num_workers, all_tokens=fingerprint["all_tokens"],
            chunk_rows=cfg.extract.chunk_rows, device=device,
            desc=f"extract {cfg.dataset.name}/{split}")
    return writer.finish(dict(dims=backbone.dims, transform=str(transform),
                              extract_seconds=round(time.perf_counter() - t0, 2)))
