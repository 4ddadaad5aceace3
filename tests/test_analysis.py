"""Layer attention, per-layer probes and CKA (docs/protocol.md, analysis) on a synthetic
cache whose label lives in one layer only, plus CKA's closed-form properties."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_overrides
from PIL import Image

from alfusion.analysis.attention import plot_attention_rows
from alfusion.analysis.cka import cka, cka_matrix, hsic_unbiased, linear_kernel, rbf_kernel
from alfusion.data.cache import EntryWriter, FeatureCache
from alfusion.data.extract import feature_fingerprint
from alfusion.engine import TokenData, fit_bank
from alfusion.experiment import run_train
from alfusion.probes import LinearProbe
from alfusion.protocol import HParams

LAYERS, DIM, CLASSES, K = 4, 32, 4, 2  # the label lives in layer K (1-based) only


def synthetic_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """cls/ap (n, LAYERS, DIM): every (layer, kind) has its own mean direction (as real layers
    do) plus noise; only layer K's CLS and AP also carry a class direction."""
    offsets = np.random.default_rng(0).normal(size=(2, LAYERS, DIM))  # shared by the splits
    class_dirs = np.random.default_rng(1).normal(size=(CLASSES, DIM))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    tokens = offsets[:, None] + rng.normal(scale=0.7, size=(2, n, LAYERS, DIM))
    tokens[:, :, K - 1] += 1.5 * class_dirs[labels]
    return dict(cls=tokens[0].astype(np.float16), ap=tokens[1].astype(np.float16),
                labels=labels.astype(np.int64))


def write_synthetic_cache(cfg) -> None:
    """Cache entries under the run's own fingerprints: the run trains on them, no backbone."""
    cache = FeatureCache(cfg.paths.cache)
    for split, n, seed in (("train", 400, 2), ("test", 200, 3)):
        writer = EntryWriter(cache, feature_fingerprint(cfg, split))
        writer.write_chunk(synthetic_split(n, seed))
        writer.finish(dict(dims=[DIM] * LAYERS))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """One real training run (ALF, MLflow SQLite store) with analysis=[layers,cka]."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = compose_config(*tiny_overrides(
        root, "probe=alf", "analysis=[layers,cka]", f"dataset.num_classes={CLASSES}",
        "search.validate=false", "search.lr=[0.01]", "train.min_steps=300", "cka.samples=200",
        "device=cpu"))
    write_synthetic_cache(cfg)
    run_dir = root / "run"
    run_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (3x slower when busy)
    try:
        summary = run_train(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)
    return cfg, run_dir, summary


def test_alf_attention_peaks_on_the_informative_layer(synthetic_run):
    cfg, run_dir, summary = synthetic_run
    assert summary["test"]["bal_acc"] > 0.9
    data = json.loads((run_dir / "attention" / "layer_attention.json").read_text())
    assert data["tokens"][:LAYERS] == [f"CLS@{i}" for i in range(1, LAYERS + 1)]
    assert sum(data["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(np.sum(data["per_head"], axis=1), 1.0, atol=1e-5)
    mass = {int(k): v for k, v in data["layer_mass"].items()}
    assert max(mass, key=mass.get) == K
    assert mass[K] > 0.5, mass
    # the CSV says the same, and the heatmap decodes as an image
    with (run_dir / "attention" / "layer_attention.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["weight"]))
    assert int(best["position"]) == K
    for name in ("layer_attention.png", "layer_attention_heads.png"):
        with Image.open(run_dir / "attention" / name) as image:
            assert image.size[0] > 100 and image.size[1] > 50


def test_artifacts_are_logged_to_mlflow(synthetic_run):
    from mlflow.tracking import MlflowClient

    cfg, _, summary = synthetic_run
    client = MlflowClient(cfg.logger.tracking_uri)
    run_id = summary["mlflow_run_id"]
    logged = {a.path for folder in ("attention", "layers", "cka")
              for a in client.list_artifacts(run_id, folder)}
    assert {"attention/layer_attention.png", "attention/layer_attention.json",
            "layers/layer_accuracy.csv", "cka/cka_linear.png", "cka/cka_rbf.csv",
            "cka/cka_vs_accuracy.png"} <= logged
    history = client.get_metric_history(run_id, "layers/CLS_bal_acc")
    assert sorted(m.step for m in history) == list(range(1, LAYERS + 1))


def test_per_layer_probes_find_the_informative_layer(synthetic_run):
    _, run_dir, summary = synthetic_run
    with (run_dir / "layers" / "layer_accuracy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * LAYERS
    for kind in ("CLS", "AP"):
        acc = {int(r["layer"]): float(r["bal_acc"]) for r in rows if r["kind"] == kind}
        assert max(acc, key=acc.get) == K
        assert acc[K] > 0.9
        assert all(acc[i] < 0.5 for i in acc if i != K), acc  # chance is 0.25
    assert summary["analysis"]["layers_best"]["token"] in (f"CLS@{K}", f"AP@{K}")


def test_cka_files_of_the_run(synthetic_run):
    _, run_dir, summary = synthetic_run
    with (run_dir / "cka" / "cka_linear.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0][1:] == [f"{k}@{i}" for k in ("CLS", "AP") for i in range(1, LAYERS + 1)]
    matrix = np.array([[float(v) for v in row[1:]] for row in table[1:]])
    assert np.allclose(np.diag(matrix), 1.0, atol=1e-4)
    assert np.allclose(matrix, matrix.T, atol=1e-5)
    curve = summary["analysis"]["cka_last_cls"]["linear"]
    assert curve[LAYERS] == pytest.approx(1.0, abs=1e-4)
    # layers share no signal but their (removed) means: CKA between them is near 0
    assert abs(curve[1]) < 0.2
    with Image.open(run_dir / "cka" / "cka_vs_accuracy.png") as image:
        assert image.size[0] > image.size[1]  # two panels side by side


def test_per_layer_heads_train_as_each_head_alone(tmp_path):
    """The per-layer heads (one linear bank, each head reading its own token, two
    configurations) end where each head ends when the engine trains it alone on its token
    (jitter off: no random noise)."""
    cfg = compose_config(*tiny_overrides(tmp_path, "train.min_steps=30", "train.jitter_p=0"))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    x = torch.nn.functional.normalize(torch.randn(120, 3, 16, generator=g), dim=-1)
    x[:, 1, :4] += torch.nn.functional.one_hot(y, 4)  # head 1 has something to learn
    heads = [(HParams(0.01, 1e-4), 0), (HParams(0.1, 1e-2), 1), (HParams(0.01, 1e-4), 2)]
    make = lambda hp: LinearProbe(16, 4)
    bank = fit_bank([hp for hp, _ in heads], make, TokenData(x, y), 4, cfg,
                    positions=[p for _, p in heads]).bank
    for i, (hp, p) in enumerate(heads):
        alone = fit_bank([hp], make, TokenData(x[:, p], y), 4, cfg).bank
        for name, value in alone.params.items():
            torch.testing.assert_close(bank.params[name][i], value[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bank.params["head.weight"][1], make(None).head.weight, atol=1e-2)


def song_hsic(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5, written out directly."""
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)  # noqa: E741
    one = torch.ones(n, 1, dtype=k.dtype)
    value = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ k @ l @ one))
    return float(value) / (n * (n - 3))


def test_unbiased_hsic_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 5, generator=g, dtype=torch.float64) + x[:, :5]
    for k, l in ((linear_kernel(x), linear_kernel(y)), (rbf_kernel(x, 0.5), linear_kernel(y))):  # noqa: E741
        assert float(hsic_unbiased(k, l)) == pytest.approx(song_hsic(k, l), rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_properties(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 64, generator=g, dtype=torch.float64),
                                      dim=1)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    noise = torch.nn.functional.normalize(torch.randn(300, 64, generator=g,
                                                      dtype=torch.float64), dim=1)
    assert cka(x, x, kernel) == pytest.approx(1.0, abs=1e-9)
    # an orthogonal transform keeps inner products (and so distances): CKA 1
    assert cka(x, x @ q, kernel) == pytest.approx(1.0, abs=1e-9)
    assert abs(cka(x, noise, kernel)) < 0.05  # independent: ~0 (unbiased, no positive bias)
    matrix = cka_matrix(torch.stack([x, x @ q, noise]), kernel)
    assert matrix[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert abs(matrix[0, 2]) < 0.05


def test_sweep_heatmap_has_a_row_per_dataset(tmp_path):
    rows = {"eurosat": dict(tokens=["CLS@1", "CLS@2", "AP@1", "AP@2"],
                            weights=[0.1, 0.2, 0.3, 0.4]),
            "gtsrb": dict(tokens=["CLS@1", "CLS@2", "AP@1", "AP@2"],
                          weights=[0.7, 0.1, 0.1, 0.1])}
    path = plot_attention_rows(rows, tmp_path / "sweep.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
