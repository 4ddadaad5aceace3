"""Fit checkpoints verified like cache arrays: a sha256 recorded with each, checked on resume.

A fit's folder ``<run dir>/checkpoints/<stage>/`` holds, per rank r, ``last.rank{r}.pt`` (the
newest engine state), ``previous.rank{r}.pt`` (the one before it) and ``checksums.rank{r}.json``
(the sha256 of each file, in the format of the cache's checksums). A file is intact when its
sha256 is one of those recorded; at every moment of a save each file on disk is recorded, so a
kill at any point leaves no file that looks damaged. On resume (``verify_checkpoints``, before
any work) a damaged or truncated ``last`` is replaced by the intact ``previous`` (said on the
console); with neither intact the run is refused, naming the file and the fix.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers, never
code.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from alfusion.config_check import ConfigError
from alfusion.data.cache import HASH, file_checksum


class CheckpointDamaged(ConfigError):
    """A checkpoint whose bytes differ from those recorded when it was written."""


class CheckpointWriteFailed(ConfigError, OSError):
    """A checkpoint that could not be written (a full disk, most often): one line naming the
    file, the free space and the fix; the checkpoints written before it stay intact."""

    @classmethod
    def of(cls, path: Path, err: Exception) -> CheckpointWriteFailed:
        free = shutil.disk_usage(path.parent).free
        full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            free < 64 * 2**20
        why = (f"the disk is full ({free / 2**20:.0f} MB free)" if full else
               " ".join(str(err).split())[:200])
        return cls(f"checkpoint {path} could not be written: {why}. Nothing partial is kept "
                   f"and the run's earlier checkpoint is intact: free space on the disk of "
                   f"{path.parent}, then continue the run with resume=true")


def previous_file(path: Path) -> Path:
    """``previous.rank{r}.pt`` beside ``last.rank{r}.pt``."""
    return path.with_name("previous." + path.name.removeprefix("last."))


def checksums_file(path: Path) -> Path:
    """``checksums.rank{r}.json`` beside ``last.rank{r}.pt``."""
    return path.with_name("checksums." + path.name.removeprefix("last.").removesuffix(".pt")
                          + ".json")


def recorded_checksums(path: Path) -> list[str] | None:
    """The checksums recorded for ``path``'s rank, or None when none were written (a
    checkpoint of an older alfusion)."""
    book = checksums_file(path)
    if not book.exists():
        return None
    try:
        return list(json.loads(book.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # an unreadable record verifies nothing


def _record(path: Path, checksums: list[str]) -> None:
    book = checksums_file(path)
    tmp = book.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sha256=checksums)))
    os.replace(tmp, book)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` (``last.rank{r}.pt``); the file it replaces becomes
    ``previous.rank{r}.pt``. Written to a temporary name and renamed, the checksum recorded
    before the rename: a partial or damaged file never passes as intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a short write as "unexpected pos"
        tmp.unlink(missing_ok=True)  # no partial file; the intact ones stay as they are
        raise CheckpointWriteFailed.of(path, err) from err
    new = file_checksum(tmp)
    old = recorded_checksums(path) or []
    _record(path, [new, *old[:2]])  # new, last, previous: whichever files exist are recorded
    if path.exists():
        os.replace(path, previous_file(path))
    os.replace(tmp, path)
    _record(path, [new, *old[:1]])


def why_unreadable(err: Exception) -> str:
    """The reason torch gives for refusing a file, without its advice to load it with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    text = str(err)
    if "Weights only load failed" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reasons = [line for line in lines[1:] if "weights_only" not in line
                   and not line.startswith("Check the documentation")]
        if not reasons:
            return "it holds objects other than tensors and plain containers"
        # Only what it asked for: never torch's advice to allow-list it "if you trust" it.
        reason = reasons[0].removeprefix("WeightsUnpickler error: ")
        asked = re.search(r"GLOBAL (\S+)", reason)
        if asked:
            return f"it asks for {asked.group(1)}, which is not a tensor or plain data"
        return re.split(r"(?<=\.)\s|\. Please use", reason, maxsplit=1)[0]
    return re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0]


def load_tensors(path: Path, key: str, fix: str, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain containers, never code. A file
    that needs anything else (a crafted pickle, a foreign format) or is damaged is refused,
    naming ``key`` and ``fix``."""
    try:  # memory-mapped: a fine-tuning checkpoint can be large
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # torch raises many kinds of error for a damaged or unsafe file
        raise ConfigError(f"{key}={path} cannot be read as tensors and plain data "
                          f"({why_unreadable(err)}); it is damaged, not an alfusion file, or "
                          f"carries code, which is never run: {fix}") from err


def stage_fix(folder: Path) -> str:
    return (f"delete the folder {folder} to restart that fit from its first step (finished "
            "fits of the run are kept), or start a new run without resume=true")


def is_intact(path: Path, recorded: list[str]) -> bool:
    return path.exists() and file_checksum(path) in recorded


def step_of(path: Path, fix: str) -> int:
    data = load_tensors(path, "checkpoint", fix)
    if not isinstance(data, dict) or "step_count" not in data.get("step", {}):
        raise CheckpointDamaged(f"checkpoint {path} is not an alfusion engine checkpoint (it "
                                f"has no step state): {fix}")
    return int(data["step"]["step_count"])


def verify_rank(last: Path) -> int:
    """Verify one rank's checkpoint of a fit; the step it continues from. A damaged ``last``
    is replaced by an intact ``previous`` (said so); neither intact: CheckpointDamaged."""
    fix = stage_fix(last.parent)
    recorded = recorded_checksums(last)
    previous = previous_file(last)
    if recorded is None:
        warnings.warn(f"checkpoint {last} was written without a checksum (an older alfusion), "
                      "so it cannot be verified", stacklevel=3)
        return step_of(last, fix)
    if is_intact(last, recorded):
        return step_of(last, fix)
    if is_intact(previous, recorded):
        step = step_of(previous, fix)
        what = "is damaged (its sha256 differs from the one recorded when it was written)" \
            if last.exists() else "is missing"
        print(f"[alfusion] checkpoint {last} {what}: continuing from the one before it, "
              f"{previous.name} (step {step})", flush=True)
        if last.exists():
            last.unlink()
        os.replace(previous, last)
        _record(last, [file_checksum(last)])  # the next save keeps this one as previous
        return step
    state = "is truncated or damaged" if last.exists() else "is missing"
    raise CheckpointDamaged(f"checkpoint {last} {state} (its {HASH} differs from the ones "
                            f"recorded in {checksums_file(last).name} when it was written), and "
                            f"no intact earlier checkpoint is beside it: {fix}")


def intact_steps(last: Path) -> dict[int, Path]:
    """{step: file} of one rank's intact checkpoints (``last`` and ``previous``)."""
    fix = stage_fix(last.parent)
    recorded = recorded_checksums(last)
    if recorded is None:
        return {verify_rank(last): last}  # an older alfusion's: said, and used as it is
    found = {}
    for path in (previous_file(last), last):
        if is_intact(path, recorded):
            found[step_of(path, fix)] = path
    return found


def common_step(folder: Path, ranks: list[str]) -> int:
    """The newest step every rank of a DDP fit holds an intact checkpoint of. A rank that died
    stopped at its last checkpoint while the others may have saved one more (they stop at the
    next step's collective): those ranks continue from the one before it (said so)."""
    options = {rank: intact_steps(folder / f"last.{rank}") for rank in ranks}
    for rank, steps in options.items():
        if not steps:
            verify_rank(folder / f"last.{rank}")  # raises, naming the damaged file
    common = set.intersection(*(set(steps) for steps in options.values()))
    if not common:
        shown = {rank: sorted(steps) for rank, steps in options.items()}
        raise CheckpointDamaged(f"the ranks' checkpoints in {folder} share no step (steps "
                                f"{shown}): {stage_fix(folder)}")
    step = max(common)
    for rank, steps in options.items():
        last = folder / f"last.{rank}"
        if steps[step] != last:
            print(f"[alfusion] checkpoint {last} is at step {max(steps)}, past the other "
                  f"ranks': continuing every rank from step {step}", flush=True)
            if last.exists():
                last.unlink()
            os.replace(steps[step], last)
            _record(last, [file_checksum(last)])
    return step


def verify_checkpoints(run_dir: Path) -> dict[str, int]:
    """Verify every fit checkpoint of a run folder before it is resumed (see the module);
    {fit stage: the step it continues from}. A DDP fit's ranks continue from the newest step
    they all hold (common_step)."""
    found = {}
    for folder in sorted(p for p in (Path(run_dir) / "checkpoints").glob("*") if p.is_dir()):
        ranks = sorted({p.name.removeprefix("last.").removeprefix("previous.")
                        for p in folder.glob("*.rank*.pt")})
        if len(ranks) == 1:
            found[folder.name] = verify_rank(folder / f"last.{ranks[0]}")
        elif ranks:
            found[folder.name] = common_step(folder, ranks)
    return found
