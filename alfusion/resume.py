"""Checkpoints and resume: a run's state file says which MLflow run and checkpoints it owns.

``<run dir>/resume.json`` holds the configuration the run started with (``identity``: what
decides its result, as dotted keys) and its fingerprint, the MLflow run id, the results of the
finished fit stages ("grid", "final"; grid000, ... when fine-tuning) and whether the run
finished. Each fit writes its engine checkpoint to ``<run dir>/checkpoints/<stage>/``,
checksummed (alfusion/checkpoints.py). ``resume=true`` continues the unfinished run of the same
fingerprint in ``hydra.run.dir`` (wherever it is), else the newest one under ``paths.root``, and
says which; ``ckpt_path=FILE`` continues the run that holds FILE. Its checkpoints are verified
first, and the command's configuration must be the one the run started with: any other is
refused in one line naming the keys that differ (a checkpoint belongs to one configuration).
Either way finished stages are not repeated, the unfinished one goes on from its
checkpoint, and everything logs into the same MLflow run. Cached and end-to-end runs alike.

Under DDP only rank 0 decides which run to continue: it passes the decision to the ranks it
launches in the environment (they inherit it), so every rank loads the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
from pathlib import Path

from omegaconf import OmegaConf

from alfusion.checkpoints import load_tensors, verify_checkpoints
from alfusion.config_check import ConfigError, MissingFile
from alfusion.distributed import is_global_zero
from alfusion.run_dirs import remove_if_unused

__all__ = ["RunState", "load_tensors", "open_run_state"]

STATE_FILE = "resume.json"
ENV_RESUME_DIR = "ALFUSION_RESUME_DIR"
# Keys that say how to run, not what: they may change between a run and its resume.
NOT_IDENTITY = ("resume", "ckpt_path", "trainer", "logger", "extract", "device", "paths")


def flatten(data: dict, prefix: str = "") -> dict:
    """{"search.lr": [0.1], ...}: a nested config as dotted keys."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_identity(cfg) -> dict:
    """What decides a run's result (probe, grid, data, seed, protocol), as dotted keys: the
    resolved config without the keys that may change on resume."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IDENTITY:
        data.pop(key, None)
    data.get("end2end", {}).pop("num_workers", None)
    return json.loads(json.dumps(flatten(data), default=str))


def config_fingerprint(cfg) -> str:
    """sha256 of the resolved config without the keys that may change on resume."""
    return identity_fingerprint(config_identity(cfg))


def identity_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def changed_keys(started: dict | None, now: dict) -> list[str]:
    """The keys whose values differ between the run's configuration and this command's."""
    if started is None:
        return []
    return sorted(k for k in set(started) | set(now) if started.get(k) != now.get(k))


def show(value) -> str:
    return "(absent)" if value is None else json.dumps(value)


class ConfigChanged(ConfigError):
    """A checkpoint continued with another configuration than the one it started with."""


def refuse_changed(previous: Path, data: dict, identity: dict, how: str) -> ConfigChanged:
    """The one-line refusal of continuing ``previous`` with a changed configuration."""
    keys = changed_keys(data.get("identity"), identity)
    started = data.get("identity") or {}
    if keys:
        shown = "; ".join(f"{k}={show(identity.get(k))} (the run: {show(started.get(k))})"
                          for k in keys[:6]) + (f"; and {len(keys) - 6} more"
                                                 if len(keys) > 6 else "")
        what = f"this command changes {shown}"
    else:
        what = ("this command's configuration differs from the one it started with (its "
                f"{STATE_FILE} predates the record of the settings)")
    return ConfigChanged(f"{how} continues the run {previous}, which a checkpoint ties to the "
                         f"configuration it started with: {what}; rerun with the run's "
                         "settings to continue it, or without "
                         f"{'ckpt_path' if how.startswith('ckpt_path') else 'resume=true'} "
                         "to start a new run")


class RunState:
    """The resume.json of one run folder; only rank 0 writes it."""

    def __init__(self, run_dir: Path, data: dict) -> None:
        self.run_dir, self.data = Path(run_dir), data
        self.orphan_run_id: str | None = None  # the MLflow run of a killed, unresumed run

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        return cls(run_dir, json.loads((Path(run_dir) / STATE_FILE).read_text()))

    def save(self) -> None:
        """Write resume.json (rank 0); a finished run's checkpoints are removed with it."""
        if not is_global_zero():
            return
        path = self.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        tmp.replace(path)  # never a half-written state file
        if self.data.get("finished"):
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)

    def checkpoint_dir(self, stage: str) -> Path:
        return self.run_dir / "checkpoints" / stage

    def stage(self, stage: str) -> dict | None:
        """The saved results of a finished stage, or None."""
        return self.data.setdefault("stages", {}).get(stage)

    def finish_stage(self, stage: str, results: dict) -> None:
        self.data.setdefault("stages", {})[stage] = results
        self.save()


def owner() -> dict:
    """The process that holds a run: written into its resume.json."""
    return dict(pid=os.getpid(), host=socket.gethostname())


def owner_alive(data: dict) -> bool | None:
    """Whether the process that last held a run is alive; None when that cannot be known (no
    record, or another machine)."""
    pid = data.get("pid")
    if pid is None or data.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def unfinished_runs(root: Path, fingerprint: str | None = None, names: dict | None = None
                    ) -> list[tuple[float, Path, dict]]:
    """(modification time, folder, state) of every unfinished run under root with this
    fingerprint (or, given ``names``, whose identity has these values: same dataset,
    backbone, probe and mode)."""
    found = []
    for path in Path(root).rglob(STATE_FILE):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("finished"):
            continue
        if fingerprint is not None and data.get("fingerprint") != fingerprint:
            continue
        identity = data.get("identity") or {}
        if names is not None and any(identity.get(k) != v for k, v in names.items()):
            continue
        found.append((path.stat().st_mtime, path.parent, data))
    return found


def find_unfinished(root: Path, fingerprint: str | None, names: dict | None = None
                    ) -> Path | None:
    """The newest run folder under root with this fingerprint (or these names) that did not
    finish and whose process is not running."""
    found = [(mtime, path) for mtime, path, data in unfinished_runs(root, fingerprint, names)
             if not owner_alive(data)]
    return max(found)[1] if found else None


def is_unfinished(run_dir: Path, fingerprint: str) -> bool:
    """Whether ``run_dir`` holds an unfinished run of this config whose process is gone."""
    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("fingerprint") == fingerprint and not data.get("finished")
            and not owner_alive(data))


NAME_KEYS = ("dataset.name", "backbone.key", "probe.name", "mode.name")


def find_run_to_resume(run_dir: Path, root: Path, identity: dict) -> Path | None:
    """``resume=true``: the unfinished run of this config in ``run_dir`` (``hydra.run.dir``,
    wherever it is), else the newest one under ``root`` (``paths.root``). With none, an
    unfinished run of the same dataset, backbone, probe and mode but other settings is
    refused (ConfigChanged naming the keys): it is what the command asks to continue."""
    fingerprint = identity_fingerprint(identity)
    previous = run_dir if is_unfinished(run_dir, fingerprint) else find_unfinished(
        root, fingerprint)
    if previous is None:
        other = find_unfinished(root, None, {k: identity.get(k) for k in NAME_KEYS})
        if other is not None:
            raise refuse_changed(other, json.loads((other / STATE_FILE).read_text()),
                                 identity, "resume=true")
        print(f"[alfusion] resume=true: no unfinished run with this config in {run_dir} or "
              f"under {root}; starting a new run", flush=True)
    return previous


def say_continuing(previous: Path, steps: dict[str, int]) -> None:
    data = json.loads((previous / STATE_FILE).read_text())
    done = sorted(data.get("stages") or {})
    print(f"[alfusion] resume=true: continuing the unfinished run in {previous} (MLflow run "
          f"{data.get('mlflow_run_id')}; finished fits: {', '.join(done) or 'none'}; "
          + (", ".join(f"{stage} from step {step}" for stage, step in steps.items())
             or "no fit checkpoint") + ")", flush=True)


CKPT_FIX = ("pass <run folder>/checkpoints/<stage>/last.rank0.pt of an earlier run, or "
            "resume=true to continue the newest unfinished run of this config")


def run_folder_of(ckpt_path: str) -> Path:
    """The run folder holding a checkpoint file (the nearest parent with a resume.json)."""
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise MissingFile(f"ckpt_path={ckpt_path}: no such file; {CKPT_FIX}")
    for parent in path.parents:
        if (parent / STATE_FILE).exists():
            return parent
    raise MissingFile(f"ckpt_path={ckpt_path} is not inside an alfusion run folder (no "
                      f"{STATE_FILE} above it): pass a checkpoint under "
                      "<run folder>/checkpoints/")


def check_checkpoint(ckpt_path: str, run_dir: Path) -> None:
    """Refuse a ``ckpt_path`` that is not a fit checkpoint of ``run_dir`` before any work (and
    before the run's MLflow run is reopened): it must lie in ``run_dir/checkpoints/<stage>/``
    and read, as tensors and plain containers only (nothing in it runs), as an engine
    checkpoint (a dict with the engine's ``step`` state)."""
    path = Path(ckpt_path).expanduser().resolve()
    if path.parent.parent != Path(run_dir) / "checkpoints":
        raise ConfigError(f"ckpt_path={ckpt_path} is not a fit checkpoint of the run {run_dir} "
                          f"(those are {run_dir}/checkpoints/<stage>/last.rank0.pt): {CKPT_FIX}")
    data = load_tensors(path, "ckpt_path", CKPT_FIX)
    if not isinstance(data, dict) or "step_count" not in data.get("step", {}):
        raise ConfigError(f"ckpt_path={ckpt_path} is not an alfusion engine checkpoint (it has "
                          f"no step state): {CKPT_FIX}")


def requeued() -> bool:
    """Whether this is a SLURM job started again by a requeue (preemption, or a requeue after
    SIGTERM/SIGUSR1): it continues its own unfinished run, as with resume=true."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: this command's overrides with
    ``resume=true hydra.run.dir=<run_dir>``."""
    from hydra.core.hydra_config import HydraConfig

    args = []
    if HydraConfig.initialized():
        args = [o for o in HydraConfig.get().overrides.task
                if not o.startswith(("resume=", "ckpt_path=", "hydra.run.dir="))]
    return " ".join(["python -m alfusion", *map(shlex.quote, args), "resume=true",
                     shlex.quote(f"hydra.run.dir={run_dir}")])


def interrupted_line(run_dir: Path, logger) -> str:
    """What an interrupted run (Ctrl-C, SIGTERM, SIGUSR1) prints: the MLflow run marked KILLED
    and the command that continues it."""
    from alfusion.distributed import received_signal

    signum = received_signal()
    how = f" ({signal.Signals(signum).name} received)" if signum else ""
    mlflow = f"MLflow run {logger.run_id} marked KILLED; " if logger is not None else ""
    return (f"[alfusion] interrupted{how}: {mlflow}continue it (from its last checkpoint) "
            f"with: {resume_command(run_dir)}")


def open_run_state(cfg, run_dir: Path) -> tuple[RunState, bool]:
    """(state of the run to write into, whether it continues an earlier run).

    Rank 0 picks the run (``ckpt_path``, ``resume=true`` or a new one), refuses it when its
    checkpoints are damaged or the command's configuration is not the one it started with
    (that run's MLflow run, left RUNNING by its killed process, is then marked KILLED with the
    reason), and exports the choice; other ranks read the export, so all ranks agree even
    while rank 0 writes state files.
    """
    identity = config_identity(cfg)
    fingerprint = identity_fingerprint(identity)
    if is_global_zero():
        previous = None
        if cfg.get("ckpt_path"):
            previous = run_folder_of(cfg.ckpt_path)
        elif cfg.get("resume") or requeued():
            previous = find_run_to_resume(run_dir, Path(cfg.paths.root), identity)
        if previous is not None:
            try:
                if cfg.get("ckpt_path"):
                    check_checkpoint(cfg.ckpt_path, previous)
                data = json.loads((previous / STATE_FILE).read_text())
                if data.get("fingerprint") != fingerprint:
                    how = f"ckpt_path={cfg.ckpt_path}" if cfg.get("ckpt_path") else "resume=true"
                    raise refuse_changed(previous, data, identity, how)
                steps = verify_checkpoints(previous)  # before the MLflow run is reopened
            except ConfigError as err:
                close_refused(cfg, previous, err)
                raise
            if not cfg.get("ckpt_path"):
                say_continuing(previous, steps)
        os.environ[ENV_RESUME_DIR] = str(previous or "")
    else:
        previous = Path(os.environ[ENV_RESUME_DIR]) if os.environ.get(ENV_RESUME_DIR) else None
    if previous is not None:
        state = RunState.load(previous)
        if is_global_zero():
            state.data.update(owner())
            state.save()
            if previous.resolve() != Path(run_dir).resolve():
                remove_if_unused(run_dir)  # this command's own folder stays empty
        return state, True
    orphan = None
    if (run_dir / STATE_FILE).exists() and is_global_zero():  # a run's folder, started anew
        earlier = RunState.load(run_dir).data
        orphan = None if earlier.get("finished") else earlier.get("mlflow_run_id")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # never resume from them
    if is_global_zero():
        close_orphans(cfg, run_dir, fingerprint)
    state = RunState(run_dir, dict(fingerprint=fingerprint, identity=identity, stages={},
                                   finished=False, **owner()))
    state.orphan_run_id = orphan
    state.save()
    return state, False


def close_refused(cfg, previous: Path, err: ConfigError) -> None:
    """A refused continuation: the run it named, if its process is gone, is closed in MLflow
    (KILLED, the reason as its tag), so that no run is left RUNNING for a dead process."""
    from alfusion import tracking

    try:
        data = json.loads((previous / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return
    if data.get("mlflow_run_id") and owner_alive(data) is False \
            and cfg.logger.get("name", "mlflow") == "mlflow":
        tracking.close_orphans(cfg.logger, [data["mlflow_run_id"]],
                               reason=f"resume refused: {err}")


def close_orphans(cfg, run_dir: Path, fingerprint: str) -> None:
    """Mark KILLED the MLflow runs of this config's unfinished runs under ``paths.root`` whose
    process is gone (killed): a plain rerun closes them, as a run in the same folder does."""
    from alfusion import tracking

    if cfg.logger.get("name", "mlflow") != "mlflow":
        return
    ids = [data["mlflow_run_id"] for _, path, data in
           unfinished_runs(Path(cfg.paths.root), fingerprint)
           if data.get("mlflow_run_id") and owner_alive(data) is False
           and path.resolve() != Path(run_dir).resolve()]
    tracking.close_orphans(cfg.logger, ids)
