"""The Python API (docs/python.md) against the CLI: alfusion.run, Probe, extract_tokens and the
scikit-learn estimators give what the same CLI commands give."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides
from PIL import Image

import alfusion
from alfusion.api.estimators import as_tokens
from alfusion.config_check import ConfigError


@pytest.fixture(scope="module")
def probe(cli):
    return alfusion.Probe.load(f"runs:/{cli['run_id']}",
                               tracking_uri=f"sqlite:///{cli['root']}/mlflow.db")


def test_run_in_a_fresh_process_gives_the_cli_metric(cli, fresh):
    assert fresh["run_id"] != cli["run_id"]  # its own run, of the same command
    assert fresh["run_test"] == cli["summary"]["test"]


def test_probe_predicts_as_task_predict(cli, fresh):
    assert len(fresh["probe_classes"]) == 12
    assert fresh["probe_classes"] == fresh["predict_classes"]
    proba = np.asarray(fresh["probe_proba"])
    assert proba.shape == (12, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)


def test_alf_classifier_on_exported_tokens_scores_as_the_cli(cli, fresh):
    # ALFClassifier().fit(x, y).score(x_test, y_test) on extract_tokens(dataset=digits)
    assert fresh["clf_score"] == cli["summary"]["test"]["bal_acc"]
    assert fresh["clf_best"] == cli["summary"]["chosen"]


def test_probe_attributes_and_inputs(cli, probe):
    summary = cli["summary"]
    assert probe.classes == [str(i) for i in range(10)]
    assert probe.metrics["test"] == summary["test"]
    assert probe.config.backbone.key == "tiny_vit" and probe.mode == "cached"
    files = sorted(cli["images"].glob("*.png"))
    pil = [Image.open(f) for f in files]
    by_folder = probe.predict(cli["images"])
    assert list(probe.predict(pil)) == list(by_folder)
    assert list(probe.predict([f.read_bytes() for f in files])) == list(by_folder)
    assert list(probe.predict(str(files[3]))) == [by_folder[3]]
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        probe.predict(cli["root"] / "missing.png")


def test_layer_weights_are_the_heatmap_cells(cli, probe):
    weights = probe.layer_weights(cli["images"])
    assert list(weights.index) == ["CLS", "AP"] and list(weights.columns) == [1, 2, 3, 4]
    assert weights.to_numpy().sum() == pytest.approx(1, abs=1e-5)
    assert (weights.to_numpy() > 0).all()


def test_probe_load_refuses_what_is_not_a_probe(cli, tmp_path):
    bad = tmp_path / "probe.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ConfigError, match="not an alfusion probe.pt"):
        alfusion.Probe.load(bad)
    with pytest.raises(Exception, match="location=runs:/0123"):
        alfusion.Probe.load("runs:/0123", tracking_uri=f"sqlite:///{cli['root']}/mlflow.db")


def test_extract_tokens_reuses_the_cli_cache(cli, probe):
    # The fresh process's task=predict cached the folder's features: they are found, not remade
    entries = set((cli["root"] / "cache").iterdir())
    by_folder = alfusion.extract_tokens("tiny_vit", images=cli["images"], root=cli["root"])
    assert set((cli["root"] / "cache").iterdir()) == entries
    assert by_folder.shape == (12, 8, 192)  # CLS + AP of 4 layers
    files = sorted(cli["images"].glob("*.png"))
    in_memory = alfusion.extract_tokens("tiny_vit", images=[Image.open(f) for f in files])
    assert torch.equal(in_memory, by_folder)  # fp16 as the cache stores it
    assert torch.equal(probe.tokens(cli["images"]), by_folder)
    last = alfusion.extract_tokens("tiny_vit", images=files[:2], layers="last", tokens="cls")
    assert last.shape == (2, 1, 192)
    with pytest.raises(ValueError, match="not both"):
        alfusion.extract_tokens("tiny_vit")


def test_compose_and_refusal_before_any_work(tmp_path):
    cfg = alfusion.compose(tiny_overrides(tmp_path, "probe=linear"))
    assert cfg.probe.name == "linear" and cfg.backbone.key == "tiny_vit"
    with pytest.raises(ConfigError, match="search.lr"):
        alfusion.run(tiny_overrides(tmp_path, "search.lr=-1"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_import_alfusion_stays_light():
    code = ("import sys, alfusion; print(sorted(m for m in ('alfusion.api', 'mlflow', "
            "'sklearn', 'lightning', 'timm') if m in sys.modules)); "
            "print(alfusion.ALFClassifier.__name__, 'run' in dir(alfusion))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "ALFClassifier True"


def small_estimators():
    """Estimators with tiny fits (sklearn's checks fit them on small random data)."""
    tiny = ("train.min_steps=5", "train.epochs=1", "trainer.progress_bar=false")
    return [alfusion.ALFClassifier(validate=False, overrides=tiny),
            alfusion.LinearProbeClassifier(search="quick", lr=[0.1, 0.01], overrides=tiny)]


@pytest.mark.parametrize("estimator", small_estimators(), ids=["alf", "linear"])
def test_estimators_pass_sklearns_checks(estimator, one_thread):
    from sklearn.base import clone
    from sklearn.utils import estimator_checks as checks

    name = type(estimator).__name__
    for check in (checks.check_parameters_default_constructible,
                  checks.check_no_attributes_set_in_init, checks.check_get_params_invariance,
                  checks.check_set_params, checks.check_estimators_unfitted,
                  checks.check_fit_check_is_fitted, checks.check_n_features_in,
                  checks.check_dont_overwrite_parameters):
        check(name, clone(estimator))
    assert clone(estimator).get_params() == estimator.get_params()


def test_estimator_fits_tokens_and_refuses_bad_input(one_thread):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4, 16))
    y = np.repeat(np.array(["a", "b", "c"]), 20)
    x = centres[np.repeat(np.arange(3), 20)] + 0.1 * rng.normal(size=(60, 4, 16))
    clf = alfusion.ALFClassifier(search="quick", overrides=(
        "train.min_steps=30", "train.epochs=2", "trainer.progress_bar=false")).fit(x, y)
    assert clf.n_tokens_in_ == 4 and clf.n_features_in_ == 16
    assert len(clf.grid_) == 3 and clf.best_params_["lr"] in (0.1, 0.01, 0.001)
    assert set(clf.predict(x)) <= {"a", "b", "c"}
    assert clf.predict_proba(torch.from_numpy(x)).shape == (60, 3)
    assert clf.score(x, y) > 0.9
    with pytest.raises(ValueError, match="fitted on"):
        clf.predict(x[:, :2])
    with pytest.raises(ValueError, match="not fitted on"):
        clf.score(x, np.repeat(np.array(["a", "b", "z"]), 20))
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(np.full((4, 2, 3), np.nan), [0, 1, 0, 1])


def test_as_tokens_normalises_raw_tokens_only():
    x = torch.randn(5, 3, 8)
    unit = torch.nn.functional.normalize(x, dim=-1)
    assert torch.equal(as_tokens(unit, flat=False), unit)  # taken as given, bit for bit
    assert torch.allclose(as_tokens(3 * x, flat=False), unit, atol=1e-6)
    assert as_tokens(unit, flat=True).shape == (5, 24)


def test_probe_of_a_fine_tuned_run(tmp_path, one_thread):
    from alfusion.data.digits import digits_split, render
    from alfusion.end2end.encoder import state_checksum
    from alfusion.metrics import classification_metrics

    summary = alfusion.run(tiny_overrides(tmp_path, "probe=finetune", "search.validate=false",
                                          "logger=none"))
    probe = alfusion.Probe.load(summary["run_dir"])  # a run folder
    assert probe.mode == "finetune"
    checksum = summary["backbone_checksum"]
    assert checksum["end"] != checksum["start"]
    assert state_checksum(probe.backbone) == checksum["end"]  # the trained weights, from probe.pt
    pixels, labels = digits_split("test", limit=60)
    logits = probe.logits([render(p) for p in pixels])
    assert classification_metrics(logits, torch.as_tensor(labels), 10)["bal_acc"] == \
        pytest.approx(summary["test"]["bal_acc"], abs=1e-12)
    with pytest.raises(ValueError, match="is linear"):
        probe.layer_weights([render(pixels[0])])
