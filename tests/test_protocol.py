"""docs/protocol.md (training, metrics) on concrete numbers: class weights, batch
shrinking, the 1000-step minimum, jitter, optimiser and schedule, metrics; a diverging run
fails its MLflow run; the same CLI command twice gives the same results, and a saved probe
evaluates again without training.

Expected numbers are worked out by hand from the rules in docs/protocol.md, not from the code.
"""

from __future__ import annotations

import json
import math
import tokenize
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides

from alfusion.engine import TensorSteps, TokenData, fit_bank
from alfusion.experiment import run_train
from alfusion.probes import LinearProbe
from alfusion.protocol import (
    BETAS,
    CLIP_NORM,
    MIN_LR,
    BatchPlan,
    HParams,
    NonFiniteLoss,
    batch_plan,
    class_weights,
    clip_per_probe,
    cosine_lrs,
)
from alfusion.random_draws import ProbeStream

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- class weights

@pytest.mark.parametrize(("labels", "num_classes", "expected"), [
    # N = 4, K = 2: w_0 = 4 / (2 * 3), w_1 = 4 / (2 * 1)
    ([0, 0, 0, 1], 2, [2 / 3, 2.0]),
    # balanced: 10 classes x 50 -> N / (K n_c) = 500 / (10 * 50) = 1
    ([c for c in range(10) for _ in range(50)], 10, [1.0] * 10),
    # class 1 absent: K = 2 present classes, N = 8: 8 / (2 * 6), 0, 8 / (2 * 2)
    ([0] * 6 + [2] * 2, 3, [2 / 3, 0.0, 2.0]),
    # 3 classes of 1, 2, 5 samples: N = 8, 8 / 3, 8 / 6, 8 / 15
    ([0, 1, 1, 2, 2, 2, 2, 2], 3, [8 / 3, 4 / 3, 8 / 15]),
])
def test_class_weights_are_n_over_k_times_class_count(labels, num_classes, expected):
    w = class_weights(torch.tensor(labels), num_classes)
    assert w.tolist() == pytest.approx(expected)


# ----------------------------------------------------------------- batch size and step count

@pytest.mark.parametrize(("n", "batch", "batches", "epochs", "steps"), [
    # 2048 leaves 50000 - 24 * 2048 = 848 < 1024; 2041..2047 leave < bs / 2;
    # 2040 leaves 50000 - 24 * 2040 = 1040 >= 1020: 25 batches x 40 epochs = 1000 steps
    (50_000, 2040, 25, 40, 1000),
    # digits' train split: 1347 // 5 = 269 leaves 2; bs <= 1347 / 5.5 -> 244 leaves 127 >= 122;
    # 6 batches, 40 epochs raised to ceil(1000 / 6) = 167
    (1347, 244, 6, 167, 1002),
    # 10000 // 5 = 2000 divides exactly: 5 batches, ceil(1000 / 5) = 200 epochs
    (10_000, 2000, 5, 200, 1000),
    # 2048 leaves 20000 - 9 * 2048 = 1568 >= 1024: 10 batches, 100 epochs
    (20_000, 2048, 10, 100, 1000),
    # 2048 leaves 1696: 49 batches x 40 epochs = 1960 steps (already >= 1000)
    (100_000, 2048, 49, 40, 1960),
    # 13 // 5 = 2 leaves a last batch of 1 (the paper's rule), on which BatchNorm cannot
    # train: the smallest batch >= 2 leaving no batch of one is 5 (5, 5, 3): 334 epochs
    (13, 5, 3, 334, 1002),
    # fewer than 10 samples (the paper's rule gives batch 1): 6 -> batches of 2
    (6, 2, 3, 334, 1002),
    # 5 -> 2 would leave one sample; 3 leaves 2
    (5, 3, 2, 500, 1000),
])
def test_batch_shrink_rule_and_thousand_step_minimum(n, batch, batches, epochs, steps):
    plan = batch_plan(n, 2048, 5, 40, 1000)
    assert plan == BatchPlan(batch, batches, epochs)
    assert math.ceil(n / batch) == batches and plan.steps == steps


def test_a_fit_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        batch_plan(1, 2048, 5, 40, 1000)


def test_a_real_fit_takes_the_rule_s_batches_and_steps(tmp_path):
    """13 samples, 2 epochs raised to >= 20 steps: batches of 5, 5, 3, 7 epochs, 21 steps."""
    cfg = compose_config("train.epochs=2", "train.min_steps=20", "trainer.progress_bar=false",
                         f"paths.root={tmp_path}")
    x = torch.nn.functional.normalize(torch.randn(13, 8, generator=torch.Generator()
                                                  .manual_seed(0)), dim=-1)
    y = torch.tensor([0, 1, 2] * 4 + [0])
    fit = fit_bank([HParams(0.01, 1e-4)], lambda hp: LinearProbe(8, 3), TokenData(x, y), 3, cfg)
    assert fit.plan == BatchPlan(5, 3, 7) and fit.losses.shape == (21, 1)
    assert bool(torch.isfinite(fit.losses).all()) and fit.failures == {}
    sizes = [len(yb) for _, yb in TensorSteps(x, y, fit.plan, seed=0)]
    assert sizes == [5, 5, 3] * 7
    torch.testing.assert_close(class_weights(y, 3), torch.tensor([13 / 15, 13 / 12, 13 / 12]))


# --------------------------------------------------------- jitter, optimiser, schedule, clip

def test_jitter_noises_half_of_the_samples_whole_with_sigma_0_05():
    x = torch.zeros(4000, 3, 8)
    out = ProbeStream(0).jitter(x, 0.5, 0.05)
    touched = (out != 0).flatten(1)
    per_sample = touched.any(dim=1)
    assert torch.equal(touched.all(dim=1), per_sample)  # a noised sample is noised everywhere
    assert abs(per_sample.float().mean().item() - 0.5) < 0.03
    assert out[per_sample].std().item() == pytest.approx(0.05, rel=0.02)


def test_end_to_end_jitter_flips_one_coin_per_batch():
    stream = ProbeStream(1)
    outs = [stream.jitter(torch.zeros(16, 4), 0.5, 0.05, "per_batch") for _ in range(200)]
    whole = [bool((o != 0).all()) for o in outs]
    none = [bool((o == 0).all()) for o in outs]
    assert all(w or n for w, n in zip(whole, none, strict=True))  # all or nothing per batch
    assert 0.35 < sum(whole) / len(whole) < 0.65


def test_adamw_constants_and_per_step_cosine_to_1e_6_without_warmup():
    assert BETAS == (0.9, 0.999) and CLIP_NORM == 5.0 and MIN_LR == 1e-6
    lrs = cosine_lrs([0.01], 100)[:, 0].tolist()
    assert lrs[0] == 0.01  # no warm-up
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[50] == pytest.approx((0.01 + 1e-6) / 2)  # half-way down the cosine
    # the last step is one cosine step above the floor, reached when the schedule ends
    assert lrs[-1] == pytest.approx(1e-6 + (0.01 - 1e-6) * (1 + math.cos(math.pi * 0.99)) / 2)


def test_gradient_norm_is_clipped_at_5_per_probe():
    grads = [torch.tensor([[30.0, 40.0], [0.3, 0.4]])]  # probe norms 50 and 0.5
    norms = clip_per_probe(grads)
    assert norms.tolist() == pytest.approx([50.0, 0.5])
    assert grads[0].tolist() == [pytest.approx([3.0, 4.0], rel=1e-5), pytest.approx([0.3, 0.4])]


# ---------------------------------------------------------------- failures, determinism, CLI

def mlflow_runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow.search_runs(experiment_names=["alfusion"], output_format="list")


def test_a_diverging_final_fit_stops_the_run_names_the_config_and_fails_the_mlflow_run(
        tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path, "search.validate=false",
                                         "search.lr=[1e20]"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(NonFiniteLoss, match=r"configuration lr=1e\+20,wd=0\.0001,dropout=0"):
        run_train(cfg, run_dir)
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert not (run_dir / "results.json").exists()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny command (a 2 x 2 grid, ALF) run twice through the CLI, each in its own
    folder (own feature cache, own MLflow store): [(root, run folder), ...]."""
    runs = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # tiny runs: one thread is faster on busy cores
        for i in range(2):
            root = tmp_path_factory.mktemp(f"run{i}")
            run_cli(*tiny_overrides(root, "search=quick"))
            (run_dir,) = root.glob("runs/*")
            runs.append((root, run_dir))
    return runs


def test_the_same_command_twice_gives_the_same_results(two_runs):
    first, second = (json.loads((d / "results.json").read_text()) for _, d in two_runs)
    assert first["test"] == second["test"] and first["val"] == second["val"]
    assert first["grid"] == second["grid"] and first["chosen"] == second["chosen"]
    assert first["fit"] == second["fit"]
    a, b = (torch.load(d / "probe.pt", weights_only=True)["state_dict"] for _, d in two_runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_logs_choice_metrics_timings_and_results(two_runs):
    root, run_dir = two_runs[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["grid"]) == 3  # quick: 3 lr x 1 wd, one dropout
    assert results["fit"]["samples"] == 60 and results["num_classes"] == 10
    recall = json.loads((run_dir / "per_class_recall.json").read_text())
    assert len(recall["test"]) == len(recall["val"]) == 10
    (run,) = mlflow_runs(root)
    assert run.info.status == "FINISHED"
    assert {k: float(v) for k, v in run.data.params.items() if k.startswith("chosen/")} == {
        f"chosen/{k}": float(v) for k, v in results["chosen"].items()}
    metrics = run.data.metrics
    assert metrics["fit/steps"] == results["fit"]["steps"] and metrics["fit/samples"] == 60
    assert metrics["probe/params"] == results["probe_params"]
    assert metrics["test/bal_acc"] == pytest.approx(results["test"]["bal_acc"])
    for key in ("val/bal_acc", "val/acc1", "val/acc5", "test/acc5", "time/search_s",
                "time/fit_s"):
        assert key in metrics, key
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"results.json", "per_class_recall.json", "config.yaml"} <= artifacts


def test_evaluate_reproduces_the_test_metrics_of_a_saved_probe_without_training(
        two_runs, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, run_dir = two_runs[0]
    proc = run_cli("task=evaluate", f"probe_path={run_dir / 'probe.pt'}", f"paths.root={root}")
    assert "Trainer.fit" not in proc.stdout + proc.stderr  # nothing was trained
    (evaluation,) = root.glob("runs/*/evaluation.json")
    # the folder names what was evaluated: the probe's own run
    assert evaluation.parent.name.endswith(f"_evaluate_{run_dir.name}")
    results = json.loads((run_dir / "results.json").read_text())
    assert json.loads(evaluation.read_text())["test"] == pytest.approx(results["test"])


def test_the_recipe_is_defined_once():
    """No code outside protocol.py builds an optimiser, a schedule, a clipping rule or a
    batch plan: every fit takes them from there (docstrings may name them)."""
    package = Path(__file__).resolve().parents[1] / "alfusion"
    needles = ("torch.optim.", "lr_scheduler", "clip_grad_norm_", "gradient_clip_val",
               "def batch_size_for", "def batch_plan", "def cosine_lrs", "def adamw_step")
    found = {}
    for path in package.rglob("*.py"):
        with path.open("rb") as f:  # the code without its comments and strings
            code = " ".join(t.string for t in tokenize.tokenize(f.readline)
                            if t.type not in (tokenize.COMMENT, tokenize.STRING))
        code = code.replace(" . ", ".").replace(" .", ".").replace(". ", ".")
        for needle in needles:
            if needle in code:
                found.setdefault(needle, []).append(path.relative_to(package).as_posix())
    assert found == {"def batch_size_for": ["protocol.py"], "def batch_plan": ["protocol.py"],
                     "def cosine_lrs": ["protocol.py"], "def adamw_step": ["protocol.py"]}
