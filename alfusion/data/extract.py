"""Feature extraction into the FeatureCache: one backbone forward per batch for all layers."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from alfusion.console import tqdm_options
from alfusion.data import build_dataset, dataset_identity, split_signature, with_transform
from alfusion.data.cache import CacheEntry, EntryWriter, FeatureCache, fingerprint_hash
from alfusion.data.wds import WebDatasetSource, part_of_stream
from alfusion.tokens import TokenSet, backbone_arrays, build_token_set

FORMAT_VERSION = 1  # bump when the meaning of stored arrays changes


def weights_identity(path: str | None) -> dict | None:
    """A local weights file (or folder: every file in it) is identified by its absolute path,
    sizes and modification times: cheap, and any rewrite of the weights changes it."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"backbone.weights={path}: no such file or folder")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    stats = [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat()) for f in files]
    return dict(path=str(p), size=sum(s.st_size for _, s in stats),
                mtime_ns=max((s.st_mtime_ns for _, s in stats), default=0),
                files=len(stats))


def feature_fingerprint(cfg, split: str) -> dict:
    """Every input that decides the cached arrays: backbone, weights, tap, transform, dtype,
    dataset identity, split, token kinds (which layers' all tokens, the regions per side)."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone["weights"] = weights_identity(backbone.get("weights"))
    fingerprint = dict(
        format=FORMAT_VERSION,
        backbone=backbone,
        dataset=dataset_identity(cfg.dataset),
        split=split,
        all_tokens=all_token_layers(cfg.probe),
        dtype="float16",
    )
    regions = region_size(cfg.probe)
    if regions:  # only then, so that CLS/AP entries keep their names
        fingerprint["regions"] = regions
    files = split_signature(cfg.dataset, split)
    if files is not None:
        fingerprint["data_files"] = files
    return fingerprint


def all_token_layers(probe_cfg):
    """False, or the probe's layer set (as written: a name or a list) whose all tokens the entry
    stores; the backbone in the fingerprint fixes what a name such as quarterly means."""
    if probe_cfg.tokens != "all":
        return False
    layers = probe_cfg.layers
    return layers if isinstance(layers, str) else [int(i) for i in layers]


def region_size(probe_cfg) -> int | None:
    """k (regions per side) when the probe's tokens include regions, else None."""
    if "regions" not in str(probe_cfg.tokens).split("+"):
        return None
    return probe_cfg.get("regions")


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def extract(backbone, dataset: Dataset, writer: EntryWriter, batch_size: int = 64,
            num_workers: int = 0, token_set: TokenSet | None = None, chunk_rows: int = 1024,
            device: str | torch.device = "cpu", desc: str = "extract",
            progress: bool = True) -> int:
    """Run ``backbone`` over ``dataset`` in order and write chunks of fp16 features.

    Resumes after the rows of the chunks already written: those rows are skipped by the source
    (a streamed one reads past them without decoding) and never reach the backbone. Each chunk
    holds ``chunk_rows`` rows, rounded up to whole batches so that a resumed run sees exactly the
    batches of an uninterrupted one (the last chunk may be shorter): cls/ap (n, L, D), and
    what ``token_set`` asks for beyond them (see ``backbone_arrays``): tokens
    (n, len(layers), T, D), regions (n, L, k*k, D); labels (n,). Returns the number of rows
    extracted now.
    """
    device = torch.device(device)
    backbone.to(device)
    token_set = token_set or TokenSet((1,), "cls+ap")  # CLS and AP of every layer only
    chunk_rows = -(-chunk_rows // batch_size) * batch_size
    dataset = skip_rows(dataset, writer.done_rows())
    if isinstance(dataset, WebDatasetSource):
        dataset = dataset.with_block(batch_size)  # workers take whole batches in turn
    try:
        total = len(dataset)
    except TypeError:
        total = None  # a streamed split: the bar shows images/s without an end
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    pending: dict[str, list[np.ndarray]] = {}
    rows = done = 0
    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not progress
               or os.environ.get("ALFUSION_NO_PROGRESS") == "1", **tqdm_options(total))
    for images, labels in loader:
        with autocast(device):
            arrays = backbone_arrays(backbone, images.to(device, non_blocking=True), token_set)
        arrays["labels"] = labels
        for name, value in arrays.items():
            value = value.cpu()
            pending.setdefault(name, []).append(
                value.numpy() if name == "labels" else value.to(torch.float16).numpy())
        rows += len(labels)
        done += len(labels)
        bar.update(len(labels))
        while rows >= chunk_rows:
            rows = _flush(writer, pending, chunk_rows)
    if rows:
        _flush(writer, pending, rows)
    bar.close()
    return done


def skip_rows(dataset: Dataset, n: int) -> Dataset:
    """``dataset`` without its first n rows (resume)."""
    if n == 0:
        return dataset
    if isinstance(dataset, WebDatasetSource):
        return dataset.with_window(dataset.start + n, dataset.stop)
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"cannot resume {type(dataset).__name__}: it has no row window")
    return Subset(dataset, range(n, len(dataset)))


def rank_part(dataset: Dataset, rank: int, world: int) -> Dataset:
    """The contiguous part of ``dataset`` that DDP rank ``rank`` of ``world`` extracts.

    Parts are in rank order, so concatenating them restores the original order. A streamed split
    (row count unknown) is split by whole shards.
    """
    if isinstance(dataset, WebDatasetSource):
        if dataset.counts is None:
            return part_of_stream(dataset, rank, world)
        n = len(dataset)
        return dataset.with_window(dataset.start + rank * n // world,
                                   dataset.start + (rank + 1) * n // world)
    n = len(dataset)
    return Subset(dataset, range(rank * n // world, (rank + 1) * n // world))


def _flush(writer: EntryWriter, pending: dict[str, list[np.ndarray]], n: int) -> int:
    """Write the first n pending rows as a chunk; keep the rest pending; return their count."""
    joined = {k: np.concatenate(v) for k, v in pending.items()}
    writer.write_chunk({k: v[:n] for k, v in joined.items()})
    for k, v in joined.items():
        pending[k] = [v[n:]]
    return len(joined["labels"]) - n


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_or_extract(cfg, split: str, device: str | torch.device = "cpu") -> CacheEntry:
    """The cache entry of ``split`` for the run's settings, extracting it if missing.

    The source is built (and its layout and labels checked) before the backbone is loaded.
    Under DDP every rank extracts its part and rank 0 merges the parts into the entry.
    """
    cache = FeatureCache(cfg.paths.cache)
    fingerprint = feature_fingerprint(cfg, split)
    entry = cache.load(fingerprint)
    if entry is not None:
        return entry
    from alfusion.backbones import build_backbone

    dataset = build_dataset(cfg.dataset, split)
    backbone, transform = build_backbone(cfg.backbone)
    token_set = build_token_set(cfg.probe, len(backbone.dims))
    layout = token_layout(backbone, transform) if token_set.is_spatial else None
    check_cache_budget(cfg, split, len_or_none(dataset), token_set, layout, backbone)
    dataset = with_transform(dataset, transform)
    rank, world = distributed_rank()
    device = torch.device(device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    settings = dict(batch_size=cfg.extract.batch_size, num_workers=cfg.extract.num_workers,
                    token_set=token_set, chunk_rows=cfg.extract.chunk_rows,
                    device=device, progress=rank == 0,
                    desc=f"extract {cfg.dataset.name}/{split}")
    meta = dict(dims=backbone.dims, transform=str(transform),
                num_classes=getattr(dataset, "num_classes", None)
                or cfg.dataset.get("num_classes"))
    if layout is not None:
        meta["token_layout"] = layout
    t0 = time.perf_counter()
    if world > 1:
        return _extract_ranks(cache, fingerprint, dataset, backbone, settings, meta, rank, world)
    with cache.lock(fingerprint):
        entry = cache.load(fingerprint)  # another process may have built it meanwhile
        if entry is not None:
            return entry
        writer = EntryWriter(cache, fingerprint)
        extract(backbone, dataset, writer, **settings)
        return writer.finish(dict(meta, extract_seconds=round(time.perf_counter() - t0, 2)))


class CacheTooLarge(RuntimeError):
    """The cache entries a run would extract exceed the free disk space of ``paths.cache`` or
    ``extract.max_cache_gb``."""


def len_or_none(dataset) -> int | None:
    """The row count of a split; None for a stream whose length is unknown."""
    try:
        return len(dataset)
    except TypeError:
        return None


@torch.inference_mode()
def token_layout(backbone, transform) -> dict:
    """One blank image through the backbone (before any extraction): the tokens per layer,
    prefix tokens and patch grid that the backbone yields at the transform's input size."""
    from PIL import Image

    image = transform(Image.new("RGB", (256, 256)))[None]
    out = backbone(image, token_layers=[len(backbone.dims)])
    return dict(tokens_per_layer=int(out.tokens.shape[2]),
                num_prefix_tokens=int(out.num_prefix_tokens), class_token=out.cls is not None,
                grid=list(out.grid) if out.grid else None)


def bytes_per_image(token_set: TokenSet, num_layers: int, width: int,
                    tokens_per_layer: int, class_token: bool = True, pooled: bool = False) -> int:
    """fp16 bytes one image takes in the entry: CLS and AP (2 x L x D; AP alone without a class
    token) and the pool token (D, with a pooling head), plus all tokens of the token set's
    layers (layers x T x D) or regions of every layer (L x k*k x D), plus its label."""
    vectors = (2 if class_token else 1) * num_layers + int(pooled)
    if token_set.token_layers:
        vectors += len(token_set.token_layers) * tokens_per_layer
    if token_set.has_regions:
        vectors += num_layers * token_set.regions ** 2
    return 2 * vectors * width + 8


def check_cache_budget(cfg, split: str, rows: int | None, token_set: TokenSet,
                       layout: dict | None, backbone) -> None:
    """Refuse, before anything is written, a run whose entries (every split it extracts)
    would not fit on the disk of ``paths.cache`` (with room to assemble the largest split:
    its chunks and its arrays exist side by side for a moment) or would exceed
    ``extract.max_cache_gb`` (null: the disk decides); say by how much and what to do
    instead. Prints the size and the free space it checked."""
    per_image = bytes_per_image(token_set, len(backbone.dims), backbone.width,
                                layout["tokens_per_layer"] if layout else 0,
                                getattr(backbone, "class_token", True),
                                getattr(backbone, "pooled", False))
    counts = {split: rows}
    for other in splits_to_extract(cfg):
        if other not in counts and not FeatureCache(cfg.paths.cache).paths(
                feature_fingerprint(cfg, other))[0].exists():  # (not verified: only counted)
            counts[other] = len_or_none(build_dataset(cfg.dataset, other))
    known = {s: n for s, n in counts.items() if n is not None}
    if not known:
        return  # streamed splits of unknown length: the chunk writes check the disk
    total = per_image * sum(known.values())
    needed = total + per_image * max(known.values())
    free = shutil.disk_usage(existing_parent(Path(cfg.paths.cache))).free
    images = " + ".join(f"{n} {s}" for s, n in known.items())
    size = f"{total / 1e9:.3g} GB ({images} images x {per_image / 1e3:.3g} kB: " \
        f"{cache_contents(token_set, layout, backbone)}, D={backbone.width}, fp16)"
    budget = cfg.extract.get("max_cache_gb")
    print(f"[alfusion] cache: {split} and the splits beside it take {size}; the disk of "
          f"paths.cache={cfg.paths.cache} has {free / 1e9:.3g} GB free"
          + (f", extract.max_cache_gb={budget}" if budget is not None else ""), flush=True)
    if needed > free:
        raise CacheTooLarge(
            f"probe.tokens={token_set.tokens} would cache {size}, and assembling the largest "
            f"split needs {needed / 1e9:.3g} GB at once; the disk of paths.cache="
            f"{cfg.paths.cache} has {free / 1e9:.3g} GB free. Free disk space there or point "
            f"paths.cache at a larger disk; {ALTERNATIVES}")
    if budget is not None and total > budget * 1e9:
        raise CacheTooLarge(
            f"probe.tokens={token_set.tokens} would cache {size}, over the budget "
            f"extract.max_cache_gb={budget}. Raise it (null: as much as the disk of "
            f"paths.cache holds; training streams caches larger than memory), or: "
            f"{ALTERNATIVES}")


ALTERNATIVES = ("alternatives: mode=end2end (no cache: tokens are computed in each step), fewer "
                "layers (probe.layers=last or middle_last), region tokens (probe.tokens="
                "cls+ap+regions probe.regions=2: k*k tokens per layer)")


def cache_contents(token_set: TokenSet, layout: dict | None, backbone) -> str:
    """What an entry of ``token_set`` holds per image, in words."""
    L = len(backbone.dims)
    vectors = ("CLS/AP" if getattr(backbone, "class_token", True) else "AP") + (
        " + pool" if getattr(backbone, "pooled", False) else "")
    if token_set.token_layers:
        return (f"all tokens of layers {list(token_set.layers)} "
                f"({layout['tokens_per_layer']} per layer) and {vectors} of {L} layers")
    if token_set.has_regions:
        return (f"{token_set.regions}x{token_set.regions} regions and {vectors} of {L} layers")
    return f"{vectors} of {L} layers"


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing parent (the cache folder may not exist yet)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def splits_to_extract(cfg) -> list[str]:
    """The splits a command extracts: extract.splits for task=extract, the images it labels
    for task=predict, else train and test."""
    if cfg.get("task") == "extract":
        return list(cfg.extract.splits)
    if cfg.get("task") == "predict":
        return []  # only the split being extracted: a folder to label has no train or test
    return ["train", "test"]


def _extract_ranks(cache: FeatureCache, fingerprint: dict, dataset: Dataset, backbone,
                   settings: dict, meta: dict, rank: int, world: int) -> CacheEntry:
    """DDP: rank r extracts part r into its own resumable partial entry; after a barrier rank 0
    links the parts' chunks, in rank order, into the entry and promotes it."""

    def part_writer(r: int) -> EntryWriter:
        return EntryWriter(cache, dict(fingerprint, ddp_part=[r, world]), name="part")

    mine = part_writer(rank)
    if not mine.is_complete():
        extract(backbone, rank_part(dataset, rank, world), mine, **settings)
        mine.mark_complete()
    dist.barrier()
    if rank == 0:
        parts = [mine] + [part_writer(r) for r in range(1, world)]
        writer = EntryWriter(cache, fingerprint)
        writer.adopt_chunks(parts)
        writer.finish(dict(meta, ddp_world_size=world))
        for part in parts:
            part.discard()
    dist.barrier()
    entry = cache.load(fingerprint)
    if entry is None:
        raise RuntimeError(f"rank {rank}: the merged cache entry is missing after the merge")
    return entry


def dataset_digest(cfg, split: str) -> str:
    """The split's digest: its feature-cache fingerprint in cached mode (the cache entry's
    name), else (images end to end) a digest of the dataset settings and the split."""
    if cfg.mode.name == "cached":
        return fingerprint_hash(feature_fingerprint(cfg, split))
    return fingerprint_hash(dict(dataset=dataset_identity(cfg.dataset), split=split))
