"""The probe as an MLflow model: logged by every training run, loaded by MLflow in a fresh
process, served by `mlflow models serve`, registered with logger.register_model, and read back
by task=evaluate and task=predict as probe_path=models:/<name>/<version>."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from api_runs import REGISTERED
from conftest import MLFLOW, free_port, wait_until_answering
from mlflow.models import Model

import alfusion
from alfusion import tracking
from alfusion.config_check import MissingFile


@pytest.fixture(scope="module")
def store(cli):
    return f"sqlite:///{cli['root']}/mlflow.db"


@pytest.fixture(scope="module")
def probe(cli, store):
    return alfusion.Probe.load(f"runs:/{cli['run_id']}", tracking_uri=store)


def test_pyfunc_in_a_fresh_process_predicts_like_the_probe(cli, fresh, probe):
    assert fresh["pyfunc_classes"] == list(probe.predict(cli["images"]))
    assert np.allclose(fresh["pyfunc_proba"], probe.predict_proba(cli["images"]), atol=1e-6)


def test_the_model_folder(cli, store, tmp_path):
    folder = tracking.download_artifact(f"runs:/{cli['run_id']}/model", store, tmp_path,
                                        "model", "")
    model = Model.load(folder)
    assert model.signature.inputs.input_names() == ["image"]
    assert model.signature.outputs.input_names() == ["class", "probability", "probabilities"]
    meta = model.metadata["alfusion"]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["backbone"]["key"] == "tiny_vit" and meta["mlflow_run_id"] == cli["run_id"]
    example = model.load_input_example(folder)
    assert base64.b64decode(example["image"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    requirements = (tmp_path / "model" / "requirements.txt").read_text().split()
    for name in ("torch", "mlflow", "timm", "pandas"):
        assert f"{name}=={metadata.version(name)}" in requirements
    files = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*")}
    assert not [f for f in files if f.endswith(".pkl")]  # models from code: nothing unpickled
    probe_pt = Path(cli["summary"]["run_dir"]) / "probe.pt"  # the CLI run's (not a later run's)
    assert (tmp_path / "model" / "artifacts" / "probe.pt").read_bytes() == probe_pt.read_bytes()
    assert cli["summary"]["model"]["uri"] == f"runs:/{cli['run_id']}/model"


def test_registered_a_version_per_run(cli, fresh, store):
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {cli["run_id"], fresh["run_id"]}
    assert cli["summary"]["model"]["registered"] == f"models:/{REGISTERED}/1"
    experiment = client.get_experiment_by_name("alfusion").experiment_id
    models = client.search_logged_models(experiment_ids=[experiment])  # the UI's Models page
    assert cli["run_id"] in {m.source_run_id for m in models}


def test_evaluate_and_predict_read_a_registered_model(cli, fresh):
    root = cli["root"]
    metrics = alfusion.run(["task=evaluate", f"probe_path=models:/{REGISTERED}/1",
                            f"paths.root={root}"])
    assert metrics == cli["summary"]["test"]
    out = alfusion.run(["task=predict", f"probe_path=models:/{REGISTERED}/1",
                        "dataset=folder", f"dataset.root={cli['images']}", f"paths.root={root}"])
    assert [str(c) for c in pd.read_csv(out["csv"])["predicted"]] == fresh["predict_classes"]
    with pytest.raises(MissingFile, match=f"probe_path=models:/{REGISTERED}/7"):
        alfusion.run(["task=evaluate", f"probe_path=models:/{REGISTERED}/7",
                      f"paths.root={root}"])


def post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_an_image_post(cli, store, probe, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    # the server runs uvicorn from the PATH: this Python's scripts folder first
    env = dict(os.environ, MLFLOW_TRACKING_URI=store,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(
        [str(MLFLOW), "models", "serve", "-m", f"runs:/{cli['run_id']}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/ping", proc, tmp_path / "serve.log", 240)
        files = sorted(cli["images"].glob("*.png"))[:4]
        records = [{"image": base64.b64encode(f.read_bytes()).decode()} for f in files]
        answer = post(f"{url}/invocations", {"dataframe_records": records})
        classes = [row["class"] for row in answer["predictions"]]
        assert classes == list(probe.predict(files))
        assert np.allclose([row["probabilities"] for row in answer["predictions"]],
                           probe.predict_proba(files), atol=1e-6)
        with pytest.raises(urllib.error.HTTPError):  # no image column: refused, not served
            post(f"{url}/invocations", {"dataframe_records": [{"picture": "x"}]})
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
