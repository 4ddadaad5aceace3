"""FeatureCache: per-layer tokens of one dataset split, fp16 on disk, named by a fingerprint.

An entry is a folder ``<root>/<name>-<hash>/`` holding ``meta.json`` (the fingerprint inputs in
readable form, the row count and the array shapes) and one ``.npy`` file per array:

    cls.npy     (N, L, D) float16   token 0 of every tapped layer
    ap.npy      (N, L, D) float16   mean patch token of every tapped layer
    tokens.npy  (N, L', T, D) float16   all tokens of the probe's L' layers (only when asked for)
    regions.npy (N, L, k*k, D) float16  k x k pooled patch regions of every layer (when asked)
    labels.npy  (N,)      int64

The hash covers every fingerprint input, so features are never reused across settings. Entries
are built in ``.<hash>.partial/`` chunk by chunk and renamed into place only when complete: a
partial folder never looks like an entry, and an interrupted build resumes from its chunks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARRAYS = ("cls", "ap", "tokens", "regions", "labels")


class CacheMismatch(RuntimeError):
    """A cache entry does not match the settings asked for, or is damaged."""


def fingerprint_hash(fingerprint: dict) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class CacheEntry:
    """A complete, validated entry; arrays are memory-mapped (read-only)."""

    path: Path
    meta: dict

    def array(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r")

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The whole array as a tensor on ``device``, in its stored dtype (fp16 features)."""
        with warnings.catch_warnings():
            # The memory map is read-only; torch warns, but the view is only copied from.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.array(name)).to(device)

    def has(self, name: str) -> bool:
        return name in self.meta["arrays"]

    @property
    def dims(self) -> list[int]:
        return self.meta["dims"]

    def __len__(self) -> int:
        return self.meta["rows"]


class FeatureCache:
    """The store of entries under ``root``; ``entry(fingerprint)`` names one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def paths(self, fingerprint: dict, name: str = "features") -> tuple[Path, Path]:
        """(final folder, partial folder) of the entry for ``fingerprint``."""
        digest = fingerprint_hash(fingerprint)
        return self.root / f"{name}-{digest}", self.root / f".{name}-{digest}.partial"

    @contextlib.contextmanager
    def lock(self, fingerprint: dict, name: str = "features"):
        """Hold an exclusive lock on one entry while it is built: two runs (parallel sweep jobs)
        never write the same partial folder; the second finds the entry complete."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}-{fingerprint_hash(fingerprint)}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, fingerprint: dict, name: str = "features") -> CacheEntry | None:
        """The complete entry for ``fingerprint``, None if there is none.

        Raises CacheMismatch where an entry exists under that name but its metadata or array
        sizes disagree with the fingerprint: it is refused, never used.
        """
        final, _ = self.paths(fingerprint, name)
        if not final.exists():
            return None
        meta_file = final / "meta.json"
        fix = f"delete {final} to rebuild it"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise CacheMismatch(
                f"cache entry {final} has no readable meta.json ({err}); {fix}") from err
        expected = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if not isinstance(meta.get("rows"), int) or not isinstance(meta.get("arrays"), dict):
            raise CacheMismatch(f"cache entry {final}: meta.json lacks rows/arrays; {fix}")
        if meta.get("fingerprint") != expected:
            raise CacheMismatch(f"cache entry {final} was built with other settings; {fix}")
        entry = CacheEntry(final, meta)
        for name_, shape in meta["arrays"].items():
            try:
                array = entry.array(name_)
            except (OSError, ValueError) as err:
                raise CacheMismatch(
                    f"cache entry {final}: {name_}.npy unreadable ({err}); {fix}") from err
            if list(array.shape) != shape or array.shape[0] != meta["rows"]:
                raise CacheMismatch(f"cache entry {final}: {name_}.npy has shape "
                                    f"{list(array.shape)}, meta.json says {shape}; {fix}")
        return entry


class EntryWriter:
    """Builds one entry chunk by chunk in its partial folder, resumable after a crash.

    Chunks are numbered; each is written to a temporary file and renamed, so a chunk file that
    exists is complete. ``done_rows()`` tells where to resume; ``finish()`` assembles the arrays,
    writes meta.json last, and renames the folder into place.
    """

    def __init__(self, cache: FeatureCache, fingerprint: dict, name: str = "features") -> None:
        self.fingerprint = fingerprint
        self.final, self.partial = cache.paths(fingerprint, name)
        self.partial.mkdir(parents=True, exist_ok=True)
        record = self.partial / "fingerprint.json"
        text = json.dumps(fingerprint, sort_keys=True, default=str, indent=1)
        if record.exists() and record.read_text() != text:
            raise CacheMismatch(f"partial cache entry {self.partial} was started with other "
                                f"settings; delete it to start again")
        record.write_text(text)
        for stale in self.partial.glob("tmp-chunk-*"):
            stale.unlink()  # a chunk whose writer was killed before its rename: never complete

    def chunks(self) -> list[Path]:
        return sorted(self.partial.glob("chunk-*.npz"))

    def done_rows(self) -> int:
        """Rows in the complete chunks: where an interrupted extraction resumes.

        Chunk files are renamed into place only once written, so each one is complete; one that
        cannot be read anyway (a damaged disk) is refused with the fix, never skipped over.
        """
        rows, names = 0, None
        for index, chunk in enumerate(self.chunks()):
            if chunk.name != f"chunk-{index:06d}.npz":
                raise CacheMismatch(f"partial cache entry {self.partial}: chunk {index} is "
                                    f"missing before {chunk.name}; delete the folder to restart")
            try:
                with np.load(chunk) as data:
                    files = sorted(data.files)
                    n = int(data["labels"].shape[0])
            except Exception as err:  # zipfile/pickle/OS errors of a damaged file
                raise CacheMismatch(f"partial cache entry {self.partial}: {chunk.name} is "
                                    f"damaged ({err}); delete it and later chunks to resume "
                                    "before it") from err
            if names is not None and files != names:
                raise CacheMismatch(f"partial cache entry {self.partial}: {chunk.name} holds "
                                    f"{files}, earlier chunks {names}; delete the folder")
            names = files
            rows += n
        return rows

    def mark_complete(self) -> None:
        """Record that every row of this writer's data is in its chunks (DDP parts)."""
        (self.partial / "complete").write_text(str(self.done_rows()))

    def is_complete(self) -> bool:
        return (self.partial / "complete").exists()

    def adopt_chunks(self, parts: list[EntryWriter]) -> None:
        """Make this writer's chunks the chunks of ``parts``, in order (DDP merge on rank 0).

        Chunks are hard-linked (copied where links are impossible), so the parts stay intact
        until the merged entry is promoted, and a crash mid-merge can simply merge again.
        """
        for old in self.chunks():
            old.unlink()
        index = 0
        for part in parts:
            if not part.is_complete():
                raise CacheMismatch(f"DDP part {part.partial} is not complete: a rank stopped "
                                    "early; rerun the extraction")
            for chunk in part.chunks():
                target = self.partial / f"chunk-{index:06d}.npz"
                try:
                    os.link(chunk, target)
                except OSError:
                    shutil.copyfile(chunk, target)
                index += 1

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def write_chunk(self, arrays: dict[str, np.ndarray]) -> None:
        index = len(self.chunks())
        tmp = self.partial / f"tmp-chunk-{index:06d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.partial / f"chunk-{index:06d}.npz")

    def finish(self, extra_meta: dict | None = None) -> CacheEntry:
        self.done_rows()  # refuses damaged or missing chunks
        chunks = [np.load(c) for c in self.chunks()]
        if not chunks:
            raise ValueError(f"no rows were extracted for {self.final.name}: the split is empty")
        names = [n for n in ARRAYS if n in chunks[0].files]
        rows = sum(c["labels"].shape[0] for c in chunks)
        shapes = {}
        for name in names:
            first = chunks[0][name]
            shape = (rows, *first.shape[1:])
            out = np.lib.format.open_memmap(self.partial / f"{name}.npy", mode="w+",
                                            dtype=first.dtype, shape=shape)
            start = 0
            for c in chunks:
                part = c[name]
                out[start:start + len(part)] = part
                start += len(part)
            out.flush()
            del out
            shapes[name] = list(shape)
        meta = dict(fingerprint=json.loads(json.dumps(self.fingerprint, sort_keys=True,
                                                      default=str)),
                    rows=rows, arrays=shapes, **(extra_meta or {}))
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        # Chunks go only after the promotion: a kill before it leaves a resumable partial.
        for c in self.final.glob("chunk-*.npz"):
            c.unlink()
        (self.final / "complete").unlink(missing_ok=True)
        return CacheEntry(self.final, meta)
