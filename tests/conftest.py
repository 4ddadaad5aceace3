"""Shared test set-up: offline hubs, tiny settings, the real CLI, a real MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, check: bool = True,
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


def signal_at_first_checkpoint(run_dir: Path, *args: str, stage: str = "final",
                               sig: int = signal.SIGKILL) -> tuple[Path, int, str]:
    """Start ``python -m alfusion ARGS`` (its run folder ``run_dir``), send it ``sig`` as soon
    as the first checkpoint of fit ``stage`` exists: (that checkpoint's path, the exit code,
    the output)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.Popen([sys.executable, "-m", "alfusion", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = run_dir / f"checkpoints/{stage}/last.rank0.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    return ckpt, proc.returncode, output


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
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n"
                                   + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
