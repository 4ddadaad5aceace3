"""The tracking store under faults: two runs creating a new database together, a tracking URI
that answers HTTP but is not MLflow, a report pointed at a file that is no MLflow store."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

from conftest import ROOT, mlflow_runs, run_cli, tiny_overrides

# One process's start of an MLflow run through alfusion, once the file "go" exists.
OPEN_RUN = """
import pathlib, sys, time
from hydra import compose, initialize_config_dir
from alfusion import tracking
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="config", overrides=["paths.root=" + sys.argv[2]])
folder = pathlib.Path(sys.argv[2])
(folder / sys.argv[3]).touch()
while not (folder / "go").exists():
    time.sleep(0.001)
logger = tracking.make_logger(cfg)
tracking.finish(logger, "FINISHED")
"""


def test_two_runs_starting_together_on_a_new_database_both_log(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_RUN, str(ROOT / "conf"),
                               str(tmp_path), f"ready{i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start their MLflow run at once
    for proc in procs:
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output[-3000:]
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A plain file server that logs nothing (its request lines would join the run's stderr:
    the run is in this process)."""

    def log_message(self, *args) -> None:
        pass


def test_a_tracking_uri_that_answers_http_but_is_not_mlflow_is_refused(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        proc = run_cli(*tiny_overrides(tmp_path, f"logger.tracking_uri={uri}"), check=False,
                       timeout=120, full_error=False)
    finally:
        server.shutdown()
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.splitlines() == [line]
    assert f"logger.tracking_uri={uri} answers HTTP but is not an MLflow tracking server" in line
    assert "HTTP 404" in line and "logger=none" in line
    assert not (tmp_path / "cache").exists()  # before any work


def test_the_report_refuses_a_file_that_is_no_mlflow_store(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = subprocess.run([sys.executable, "-m", "alfusion.report",
                           f"--tracking-uri=sqlite:///{empty}", f"--out={tmp_path / 'r'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{empty} is an empty file, not an MLflow store" in proc.stderr
    assert empty.stat().st_size == 0  # no MLflow tables written into it
