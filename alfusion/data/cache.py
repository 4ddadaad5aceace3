"""FeatureCache: per-layer tokens of one dataset split, fp16 on disk, named by a fingerprint.

An entry is a folder ``<root>/<name>-<hash>/`` holding ``meta.json`` (the fingerprint inputs in
readable form, the row count and the array shapes) and one ``.npy`` file per array:

    cls.npy     (N, L, D) float16   token 0 of every tapped layer
    ap.npy      (N, L, D) float16   mean patch token of every tapped layer
    tokens.npy  (N, T, D) float16   all tokens of the last layer (only when asked for)
    labels.npy  (N,)      int64

The hash covers every fingerprint input, so features are never reused across settings. Entries
are built in ``.<hash>.partial/`` chunk by chunk and renamed into place only when complete: a
partial folder never looks like an entry, and an interrupted build resumes from its chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAYS = ("cls", "ap", "tokens", "labels")


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
            raise CacheMismatch(f"cache entry {final} has no readable meta.json ({err}); {fix}")
        expected = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if meta.get("fingerprint") != expected:
            raise CacheMismatch(f"cache entry {final} was built with other settings; {fix}")
        entry = CacheEntry(final, meta)
        for name_, shape in meta["arrays"].items():
            try:
                array = entry.array(name_)
            except (OSError, ValueError) as err:
                raise CacheMismatch(f"cache entry {final}: {name_}.npy unreadable ({err}); {fix}")
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
        (self.partial / "fingerprint.json").write_text(
            json.dumps(fingerprint, sort_keys=True, default=str, indent=1))

    def chunks(self) -> list[Path]:
        return sorted(self.partial.glob("chunk-*.npz"))

    def done_rows(self) -> int:
        return sum(int(np.load(c)["labels"].shape[0]) for c in self.chunks())

    def write_chunk(self, arrays: dict[str, np.ndarray]) -> None:
        index = len(self.chunks())
        tmp = self.partial / f"tmp-chunk-{index:06d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.partial / f"chunk-{index:06d}.npz")

    def finish(self, extra_meta: dict | None = None) -> CacheEntry:
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
        for c in self.chunks():
            c.unlink()
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return CacheEntry(self.final, meta)
