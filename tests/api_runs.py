"""Runs shared by tests/test_python_api.py and tests/test_mlflow_model.py (each made once per
session): a tiny CLI training run (a subprocess, its probe registered), a folder of test
digits, and a fresh Python process that uses the Python API and the MLflow model on them."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, run_cli, tiny_overrides

from alfusion.data.digits import digits_split, render

REGISTERED = "alfusion-tiny"
# The tiny run of conftest (search=none: a fit on 80 % of train scored on the validation split,
# then the refit on all of train), its probe registered: the CLI command and alfusion.run get
# exactly these.
EXTRA = (f"logger.register_model={REGISTERED}",)
_memo: dict = {}


def cli_run(factory) -> dict:
    """The CLI's tiny run: root (paths.root), summary (results.json), run_id, images (a folder
    of 12 test digits as PNG files), overrides."""
    if "cli" not in _memo:
        root = factory.mktemp("api_runs")
        overrides = tiny_overrides(root, *EXTRA)
        run_cli(*overrides)
        summary = json.loads(next((root / "runs").glob("*/results.json")).read_text())
        images = root / "images"
        images.mkdir()
        pixels, _ = digits_split("test", limit=12)
        for i, image in enumerate(pixels):
            render(image).save(images / f"digit_{i:02d}.png")
        _memo["cli"] = dict(root=root, summary=summary, run_id=summary["mlflow_run_id"],
                            images=images, overrides=overrides)
    return _memo["cli"]


# Run in a fresh interpreter: what a user's script or notebook does with the Python API.
FRESH_SCRIPT = r'''
import base64, json, sys
from pathlib import Path

import mlflow
import pandas as pd

import alfusion

root, run_id, images = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
overrides = json.loads(sys.argv[4])
store = f"sqlite:///{root}/mlflow.db"
out = {}
summary = alfusion.run(overrides)  # the same command as the CLI run
out["run_test"] = summary["test"]
out["run_id"] = summary["mlflow_run_id"]
probe = alfusion.Probe.load(f"runs:/{run_id}", tracking_uri=store)
out["probe_classes"] = probe.predict(images).tolist()
out["probe_proba"] = probe.predict_proba(images).tolist()
predicted = alfusion.run(["task=predict", f"probe_path=runs:/{run_id}", "dataset=folder",
                          f"dataset.root={images}", f"paths.root={root}"])
table = pd.read_csv(predicted["csv"])
out["predict_classes"] = [str(c) for c in table["predicted"]]
tiny = [o for o in overrides if o.startswith(("train.", "dataset.limit", "trainer."))]
x, y = alfusion.extract_tokens("tiny_vit", dataset="digits", split="train", root=root,
                               overrides=tiny)
x_test, y_test = alfusion.extract_tokens("tiny_vit", dataset="digits", split="test",
                                         root=root, overrides=tiny)
clf = alfusion.ALFClassifier(overrides=tiny).fit(x.numpy(), y.numpy())
out["clf_score"] = clf.score(x_test.numpy(), y_test.numpy())
out["clf_best"] = clf.best_params_
mlflow.set_tracking_uri(store)
model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
files = sorted(images.glob("*.png"))
frame = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
answer = model.predict(frame)
out["pyfunc_classes"] = [str(c) for c in answer["class"]]
out["pyfunc_proba"] = [list(p) for p in answer["probabilities"]]
print("RESULT " + json.dumps(out))
'''


def fresh_process(factory) -> dict:
    """What FRESH_SCRIPT found, in a new Python process, on the CLI run (see cli_run)."""
    if "fresh" not in _memo:
        run = cli_run(factory)
        proc = subprocess.run(
            [sys.executable, "-c", FRESH_SCRIPT, str(run["root"]), run["run_id"],
             str(run["images"]), json.dumps(run["overrides"])],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise AssertionError(f"the fresh process failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        _memo["fresh"] = json.loads(lines[-1].removeprefix("RESULT "))
    return _memo["fresh"]
