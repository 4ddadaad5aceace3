"""FeatureCache: per-layer tokens of one dataset split, fp16 on disk, named by a fingerprint.

An entry is a folder ``<root>/<name>-<hash>/`` holding ``meta.json`` (the fingerprint inputs in
readable form, the row count and the array shapes) and one ``.npy`` file per array:

    cls.npy     (N, L, D) float16   the class token of every tapped layer (where the model has one)
    ap.npy      (N, L, D) float16   mean patch token of every tapped layer
    tokens.npy  (N, L', T, D) float16   all tokens of the probe's L' layers (only when asked for)
    regions.npy (N, L, k*k, D) float16  k x k pooled patch regions of every layer (when asked)
    pool.npy    (N, 1, D) float16   the pooling head's output (models with a MAP / attention pool)
    labels.npy  (N,)      int64

The hash covers every fingerprint input, so features are never reused across settings. Entries
are built in ``.<hash>.partial/`` chunk by chunk and renamed into place only when complete: a
partial folder never looks like an entry, and an interrupted build resumes from its chunks.

meta.json records a sha256 of every ``.npy`` file (``checksums``); opening an entry verifies
them, so a damaged array is refused instead of used. Arrays are written with plain file writes
(never through a memory map: on a full disk a mapped write kills the process with SIGBUS)
after a check that the disk has room for them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARRAYS = ("cls", "ap", "tokens", "regions", "pool", "labels")
HASH = "sha256"  # hashlib name; about 1.7 GB/s on one x86_64 core with SHA extensions


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
        verify_checksums(entry)
        return entry


def file_checksum(path: Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    with open(path, "rb") as f:
        return f"{HASH}:{hashlib.file_digest(f, HASH).hexdigest()}"


def verify_checksums(entry: CacheEntry) -> None:
    """Refuse (CacheMismatch) an entry whose ``.npy`` bytes differ from the checksums recorded
    when it was written. An entry written before checksums existed is used with a warning."""
    fix = f"delete the folder {entry.path} to re-extract it"
    recorded = entry.meta.get("checksums")
    if recorded is None:
        warnings.warn(f"cache entry {entry.path} was written without checksums (an older "
                      f"alfusion), so its arrays cannot be verified; {fix} with checksums",
                      stacklevel=3)
        return
    for name in entry.meta["arrays"]:
        path = entry.path / f"{name}.npy"
        if recorded.get(name) is None:
            raise CacheMismatch(f"cache entry {entry.path}: meta.json has no checksum for "
                                f"{path.name}; {fix}")
        if file_checksum(path) != recorded[name]:
            raise CacheMismatch(f"cache entry {entry.path}: {path.name} is damaged (its "
                                f"{HASH} differs from the one recorded when it was written); "
                                f"{fix}")


def no_space_error(folder: Path, needed: int, free: int | None, what: str) -> OSError:
    """OSError(ENOSPC) that names the folder, the bytes needed and the fix."""
    have = f", {free:,} free" if free is not None else ""
    return OSError(errno.ENOSPC, f"no space left in {folder} for {what}: it needs "
                   f"{needed:,} bytes{have}. Free disk space there (or point paths.cache at a "
                   "larger disk) and run again: extraction resumes from the chunks already "
                   "written")


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy format header of a C-order array of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, dict(
        descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False,
        shape=tuple(shape)))
    return buffer.getvalue()


def write_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...],
              parts: Iterable[np.ndarray]) -> str:
    """Write the row-wise concatenation of ``parts`` (each (n_i, *shape[1:]) of ``dtype``,
    read one at a time) to ``path`` as one .npy file of ``shape`` with plain file writes;
    returns the file's checksum (``"sha256:<hex>"``)."""
    digest = hashlib.new(HASH)
    with open(path, "wb") as f:
        header = npy_header(dtype, shape)
        f.write(header)
        digest.update(header)
        for part in parts:
            data = memoryview(np.ascontiguousarray(part)).cast("B")
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return f"{HASH}:{digest.hexdigest()}"


def read_chunk_array(path: Path, name: str) -> np.ndarray:
    """One array of a chunk file, the file closed again."""
    with np.load(path) as data:
        return data[name]


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
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise no_space_error(self.partial, sum(a.nbytes for a in arrays.values()),
                                     None, f"chunk {index} of {self.final.name}") from err
            raise
        os.replace(tmp, self.partial / f"chunk-{index:06d}.npz")

    def finish(self, extra_meta: dict | None = None) -> CacheEntry:
        """Assemble the chunks into one .npy per array (checksummed), write meta.json last and
        rename the partial folder into place; returns the entry."""
        rows = self.done_rows()  # refuses damaged or missing chunks
        paths = self.chunks()
        if not paths:
            raise ValueError(f"no rows were extracted for {self.final.name}: the split is empty")
        with np.load(paths[0]) as first:  # dtypes and row shapes; every chunk has the same
            kinds = {n: (first[n].dtype, first[n].shape[1:]) for n in ARRAYS if n in first.files}
        shapes = {n: [rows, *row_shape] for n, (_, row_shape) in kinds.items()}
        needed = sum(len(npy_header(dtype, tuple(shapes[n])))
                     + int(np.prod(shapes[n])) * dtype.itemsize for n, (dtype, _) in kinds.items())
        free = shutil.disk_usage(self.partial).free
        if free < needed:
            raise no_space_error(self.partial, needed, free,
                                 f"assembling cache entry {self.final.name}")
        checksums = {}
        try:
            for name, (dtype, _) in kinds.items():  # one chunk in memory at a time
                checksums[name] = write_npy(self.partial / f"{name}.npy", dtype,
                                            tuple(shapes[name]),
                                            (read_chunk_array(p, name) for p in paths))
        except OSError as err:
            for name in kinds:  # the chunks stay: a rerun assembles the arrays again
                (self.partial / f"{name}.npy").unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise no_space_error(self.partial, needed, None,
                                     f"assembling cache entry {self.final.name}") from err
            raise
        meta = dict(fingerprint=json.loads(json.dumps(self.fingerprint, sort_keys=True,
                                                      default=str)),
                    rows=rows, arrays=shapes, checksums=checksums, **(extra_meta or {}))
        (self.partial / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        # Chunks go only after the promotion: a kill before it leaves a resumable partial.
        for c in self.final.glob("chunk-*.npz"):
            c.unlink()
        (self.final / "complete").unlink(missing_ok=True)
        return CacheEntry(self.final, meta)
