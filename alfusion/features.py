"""A run's cached token data: a split's features from the cache (extracted first when
missing), held in memory on the device or streamed from the memory-mapped entry, as
``train.stream`` and the memory the splits would take decide."""

from __future__ import annotations

import torch
from omegaconf import open_dict

from alfusion.data.extract import load_or_extract
from alfusion.distributed import is_global_zero
from alfusion.engine import TokenData
from alfusion.engine.stream import StreamedTokens, in_memory_bytes, storage_for
from alfusion.tokens import build_token_set


def split_tokens(cfg, split: str, device: torch.device):
    """(tokens (N, T, D) or (N, F), labels (N,), token set, entry) of a cached split."""
    entry = load_or_extract(cfg, split, device)
    data, token_set = cached_split(cfg, entry, "memory", device)
    return data.x, data.y, token_set, entry


def cached_split(cfg, entry, storage: str, device: torch.device):
    """(TokenData on ``device`` (storage ``memory``) or StreamedTokens from the memory-mapped
    entry (``disk``), token set) of a cached split."""
    if cfg.dataset.get("num_classes") is None and entry.meta.get("num_classes"):
        with open_dict(cfg):  # dataset=wds|folder: classnames.txt or the class folders decide
            cfg.dataset.num_classes = entry.meta["num_classes"]
    token_set = build_token_set(cfg.probe, num_layers=len(entry.dims))
    if storage == "disk":
        parallel = cfg.train.get("parallel", "auto")
        return StreamedTokens.from_entry(entry, token_set, "data" if parallel in (
            "auto", "data") else "grid"), token_set
    # fp16 onto the device first: selection, normalisation and fp32 happen there.
    names = ("cls", "ap", "tokens", "regions", "pool")
    arrays = {n: entry.tensor(n, device) for n in names if entry.has(n)}
    x = token_set.from_arrays(arrays, entry.dims)
    parallel = "data" if cfg.train.get("parallel", "auto") == "data" else "grid"
    return TokenData(x, entry.tensor("labels", device).long(), parallel=parallel), token_set


def cached_inputs(cfg, device: torch.device) -> tuple:
    """(train, test, token set, entry, storage) of cached mode: in memory or streamed, as
    ``train.stream`` and the memory the splits would take decide (printed)."""
    entries = [load_or_extract(cfg, split, device) for split in ("train", "test")]
    token_set = build_token_set(cfg.probe, num_layers=len(entries[0].dims))
    storage, why = storage_for(cfg.train.get("stream", "auto"),
                               sum(in_memory_bytes(e, token_set) for e in entries), device,
                               cfg.train.get("stream_budget_gb"))
    if is_global_zero():
        where = "in memory" if storage == "memory" else "streamed from the memory-mapped cache"
        print(f"[alfusion] cached features {where}: {why}", flush=True)
    (train, token_set), (test, _) = (cached_split(cfg, e, storage, device) for e in entries)
    return train, test, token_set, entries[0], storage
