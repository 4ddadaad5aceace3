"""Shared test set-up: offline hubs, tiny settings, the real CLI, a real MLflow server."""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ALFUSION_NO_PROGRESS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import alfusion  # noqa: E402,F401  (torchvision fix before anything imports it)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A tiny, fast experiment: random 4-block ViT at 32 px, 60 train / 40 test digits, short fits.
TINY = [
    "backbone=tiny_vit",
    "dataset.limit=60",
    "train.min_steps=20",
    "train.epochs=2",
    "trainer.progress_bar=false",
]


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """Overrides for a tiny run whose outputs (cache, MLflow store, runs) live under root."""
    return [*TINY, f"paths.root={root}", *extra]


def compose_config(*overrides: str):
    """The composed Hydra config, as the CLI would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


_store_template: list[Path] = []  # an empty MLflow store, made once per session


def seed_mlflow_store(args) -> Path | None:
    """Before a run whose MLflow store (``<paths.root>/mlflow.db``, the default) does not exist
    yet: put there a copy of an empty store with MLflow's tables made. Making them runs
    MLflow's schema migrations, seconds for each new store; a copy is what a store that other
    runs created looks like. (Runs on a really new store: test_trust_tracking, test_cli.)
    Returns the copy, or None."""
    roots = [a.split("=", 1)[1] for a in args if a.startswith("paths.root=")]
    if not roots or any(a.startswith("logger.") for a in args):
        return None
    db = Path(roots[-1]) / "mlflow.db"
    if db.exists():
        return None
    if not _store_template:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="alfusion-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # makes the tables
        atexit.register(shutil.rmtree, template.parent, ignore_errors=True)
        _store_template.append(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_store_template[0], db)
    return db


def unseed_if_unused(db: Path | None) -> None:
    """Remove a seeded store that the run did not write to (a refusal leaves nothing behind)."""
    if db is not None and db.exists() and filecmp.cmp(db, _store_template[0], shallow=False):
        db.unlink()


def run_cli(*args: str, check: bool = True, full_error: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python -m alfusion ARGS`` run in this process (alfusion.app.run: the CLI's composition,
    run folder, config check and task), its printed output captured; returned as the finished
    process would be. A refusal is exit status 2 and its one line on stderr (``full_error``:
    as with HYDRA_FULL_ERROR=1, its traceback and status 1); an error, its traceback and status
    1. For what needs the process boundary (signals, DDP, multirun, concurrent processes,
    ``--help``) use ``run_cli_process``. (``timeout``: unused, kept for the same signature.)"""
    from alfusion.app import run
    from alfusion.config_check import ConfigError, full_errors, refusal_line

    seeded = seed_mlflow_store(args)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(list(args))
        except ConfigError as error:
            if full_error or full_errors():
                traceback.print_exc()
                code = 1
            else:
                print(refusal_line(error), file=sys.stderr)
                code = 2
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            _close_active_mlflow_runs()
    unseed_if_unused(seeded)
    proc = subprocess.CompletedProcess(["alfusion", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"alfusion {' '.join(args)} failed ({code}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _close_active_mlflow_runs() -> None:
    """A run that failed in this process may leave MLflow's active-run stack set (a separate
    process would have ended it): clear it so the next run starts clean."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def run_cli_process(*args: str, cwd: Path = ROOT, timeout: float = 300, check: bool = True,
                    full_error: bool = True) -> subprocess.CompletedProcess:
    """``python -m alfusion ARGS`` in a subprocess; returns the finished process.
    ``full_error``: tracebacks on (HYDRA_FULL_ERROR=1); off, as a user sees a refusal."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = subprocess.run([sys.executable, "-m", "alfusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"alfusion {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def mlflow_runs(root: Path) -> list:
    """The MLflow runs of the experiment "alfusion" in the SQLite store under ``root``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("alfusion").experiment_id])


# ``python -m alfusion ARGS`` that stops itself (SIGSTOP) right after writing the first
# checkpoint of fit stage argv[1]: a signal sent then lands at that step however loaded the
# machine is (the fit cannot go on, or finish, before it arrives).
STOP_AT_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
import alfusion.checkpoints as checkpoints

save, stage, stopped = checkpoints.save_checkpoint, f"/checkpoints/{sys.argv.pop(1)}/", []

def save_then_stop(state, path):
    save(state, path)
    if stage in str(path) and not stopped:
        stopped.append(path)
        os.kill(os.getpid(), signal.SIGSTOP)

checkpoints.save_checkpoint = save_then_stop  # before the engine imports it
runpy.run_module("alfusion", run_name="__main__", alter_sys=True)
"""


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 900) -> bool:
    """Wait until ``proc`` has stopped itself (SIGSTOP; True) or ended (False, its returncode
    set). Both states last, so polling for them has no race; past ``timeout``, it is killed."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return True
        if pid:  # ended, and reaped here: Popen cannot read its status any more
            proc.returncode = os.waitstatus_to_exitcode(status)
            return False
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args[:3]}: neither stopped nor ended after "
                                 f"{timeout:.0f} s")
        time.sleep(0.05)


def signal_at_first_checkpoint(run_dir: Path, *args: str, stage: str = "final",
                               sig: int = signal.SIGKILL,
                               timeout: float = 900) -> tuple[Path, int, str]:
    """Run ``python -m alfusion ARGS`` (its run folder ``run_dir``) until it has written the
    first checkpoint of fit ``stage`` and stopped itself there, then send it ``sig`` (and let
    it go on, to handle a signal it can catch): (that checkpoint's path, the exit code, the
    output). A process that ends without reaching the checkpoint is returned as it ended."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    seed_mlflow_store(args)
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: output never blocks it
        proc = subprocess.Popen([sys.executable, "-c", STOP_AT_FIRST_CHECKPOINT, stage, *args],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
        if wait_until_stopped(proc, timeout):
            os.kill(proc.pid, sig)
            if sig != signal.SIGKILL:
                os.kill(proc.pid, signal.SIGCONT)
            proc.wait(timeout=timeout)
        code = proc.returncode
        out.seek(0)
        output = out.read()
    return run_dir / f"checkpoints/{stage}/last.rank0.pt", code, output


def kill_at_first_checkpoint(run_dir: Path, *args: str, stage: str = "final") -> Path:
    """SIGKILL a run at the first checkpoint of fit ``stage``; that checkpoint's path."""
    ckpt, code, output = signal_at_first_checkpoint(run_dir, *args, stage=stage)
    assert code == -signal.SIGKILL, output[-3000:]  # killed, not finished
    return ckpt


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny run under this test's temporary folder."""
    return tiny_overrides(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny fits: one intra-op thread is faster and unaffected by other jobs on the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until a local server started as ``proc`` answers ``url`` with 200; fail with the
    end of its ``log`` when it exits first or does not answer within ``timeout`` seconds (a
    bound for a broken start, not a timing the test depends on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server for {url} did not start:\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and a served artifact folder in a
    temporary directory; stopped by its process group at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (root / "server.log").open("w")
    # the server's job runner (GenAI jobs, seven worker processes) has nothing to do here
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", proc, root / "server.log", 120)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The tiny CLI run of tests/api_runs.py (made once per session, its probe registered)."""
    from api_runs import cli_run

    return cli_run(tmp_path_factory)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """What a fresh Python process gets from the Python API on that run (tests/api_runs.py)."""
    from api_runs import fresh_process

    return fresh_process(tmp_path_factory)
