"""Hydra multirun: failed jobs do not stop a sweep, and the sweep ends with what failed.

Hydra's local launcher stops at (or re-raises after) the first failing job and then skips its
callbacks' ``on_multirun_end``. So in a multirun the entry point runs each job through
``run_job``, which records the outcome in ``<job dir>/job_status.json`` instead of raising; the
``SweepSummary`` callback reads these files (written on whichever machine ran the job, e.g. a
SLURM node) and prints and saves the summary, exiting with status 1 if any job failed.

A refused setting (ConfigError) ends a single run with one line and exit status 2
(config_check.exit_refused); in a multirun it fails its job, in one line, and the sweep goes on.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from alfusion.config_check import ConfigError, exit_refused, full_errors, refusal_line

STATUS_FILE = "job_status.json"
SUMMARY_FILE = "sweep_summary.json"
LOCAL_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def spawns_processes(trainer_cfg) -> bool:
    """Whether a trainer config starts more than one process (DDP over >1 device or node)."""
    if "ddp" not in str(trainer_cfg.get("strategy", "auto")):
        return False
    devices = trainer_cfg.get("devices", 1)
    many = not (devices == 1 or devices == [0] or str(devices) == "1")
    return many or int(trainer_cfg.get("num_nodes", 1)) > 1


def check_no_nested_ddp(cfg) -> None:
    """Refuse DDP inside a local multirun: every job would launch its own ranks from the sweep
    process (a known Lightning + Hydra hang and a mess of run folders)."""
    if not is_multirun() or not spawns_processes(cfg.trainer):
        return
    launcher = HydraConfig.get().launcher.get("_target_", "")
    if launcher == LOCAL_LAUNCHER:
        raise ConfigError("trainer=ddp with several devices cannot run under the local multirun "
                         "launcher (DDP would be nested in the sweep's process tree): sweep with "
                         "hydra/launcher=slurm (each job gets its own ranks as SLURM tasks), or "
                         "run each DDP job as its own command")


def run_job(task: Callable, cfg: DictConfig, run_dir: Path):
    """Run ``task(cfg, run_dir)``. In a multirun, a failure is printed and recorded in
    job_status.json and the sweep goes on; outside one it propagates, a refusal as one line
    (exit status 2) that leaves no run folder behind."""
    if not is_multirun():
        try:
            return task(cfg, run_dir)
        except ConfigError as err:
            from alfusion.run_dirs import remove_if_unused

            remove_if_unused(run_dir)
            exit_refused(err)
        except KeyboardInterrupt:
            exit_on_signal()
            raise
    hydra_cfg = HydraConfig.get()
    status = dict(num=hydra_cfg.job.num, overrides=list(hydra_cfg.overrides.task),
                  run_dir=str(run_dir))
    try:
        check_no_nested_ddp(cfg)
        result = task(cfg, run_dir)
        status.update(status="COMPLETED")
        return result
    except KeyboardInterrupt:  # the sweep stops, as it does on Ctrl-C
        status.update(status="FAILED", error="interrupted")
        exit_on_signal()
        raise
    except Exception as err:
        status.update(status="FAILED", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
        job = f"[alfusion] job #{status['num']} ({' '.join(status['overrides'])})"
        if isinstance(err, ConfigError) and not full_errors():
            print(f"{job} refused: {refusal_line(err).removeprefix('[alfusion] ')}",
                  file=sys.stderr, flush=True)
        else:
            print(f"{job} failed: {status['error']}\n{status['traceback']}", file=sys.stderr,
                  flush=True)
        return None
    finally:
        from alfusion.distributed import is_global_zero

        if is_global_zero():
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))


def exit_on_signal() -> None:
    """After a stop signal (SIGTERM, SIGUSR1; alfusion/distributed.py) the command ends with
    status 128 + its number, as a process ended by it would (143, 138), without a traceback;
    after Ctrl-C the KeyboardInterrupt goes on."""
    from alfusion.distributed import received_signal

    signum = received_signal()
    if signum is not None:
        sys.stdout.flush()
        raise SystemExit(128 + signum) from None


def summarise(sweep_dir: Path) -> dict:
    """{completed: [...], failed: [...]} from the job_status.json files of a sweep folder."""
    jobs = []
    for path in Path(sweep_dir).glob(f"*/{STATUS_FILE}"):
        jobs.append(json.loads(path.read_text()))
    jobs.sort(key=lambda j: j["num"])
    failed = [dict(num=j["num"], overrides=j["overrides"], error=j["error"], run_dir=j["run_dir"])
              for j in jobs if j["status"] != "COMPLETED"]
    return dict(sweep_dir=str(sweep_dir), jobs=len(jobs),
                completed=[j["num"] for j in jobs if j["status"] == "COMPLETED"], failed=failed)


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print and save which jobs failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarise(sweep_dir)
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        print(f"[alfusion] sweep {sweep_dir.name}: {len(summary['completed'])} of "
              f"{summary['jobs']} jobs completed, {len(summary['failed'])} failed",
              file=sys.stderr)
        for job in summary["failed"]:
            print(f"[alfusion]   FAILED #{job['num']} {' '.join(job['overrides'])}: "
                  f"{job['error']} ({job['run_dir']})", file=sys.stderr)
        if summary["failed"]:
            sys.stderr.flush()
            raise SystemExit(1)  # not an Exception: Hydra's callback runner lets it through
