"""docs/protocol.md (training) on concrete numbers: class weights, batch shrinking, the
1000-step minimum, jitter, optimiser and schedule, metrics; a diverging run fails its MLflow
run; the same CLI command twice gives the same results, and a saved probe evaluates again
without training.

Expected numbers are worked out by hand from the rules in docs/protocol.md, not from the code.
"""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides
from sklearn.metrics import balanced_accuracy_score

from alfusion.experiment import run_train
from alfusion.metrics import classification_metrics
from alfusion.probes import LinearProbe
from alfusion.training import (
    MIN_LR,
    HParams,
    NonFiniteLoss,
    ProbeModule,
    batch_size_for,
    class_weights,
    epochs_for,
    fit_probe,
    jitter,
    make_trainer,
)

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
    # 13 // 5 = 2 leaves 1 = half of 2: 7 batches, ceil(1000 / 7) = 143 epochs
    (13, 2, 7, 143, 1001),
])
def test_batch_shrink_rule_and_thousand_step_minimum(n, batch, batches, epochs, steps):
    assert batch_size_for(n, 2048, 5) == batch
    assert math.ceil(n / batch) == batches
    assert epochs_for(n, batch, 40, 1000) == epochs
    assert batches * epochs == steps


def test_a_real_fit_takes_the_rule_s_batches_and_steps_and_ends_at_min_lr():
    """13 samples, 2 epochs raised to >= 20 steps: batch 2 (7 per epoch), 3 epochs, 21 steps."""
    cfg = compose_config("train.epochs=2", "train.min_steps=20", "trainer.progress_bar=false")
    x = torch.nn.functional.normalize(torch.randn(13, 8, generator=torch.Generator()
                                                  .manual_seed(0)), dim=-1)
    y = torch.tensor([0, 1, 2] * 4 + [0])
    probe = LinearProbe(8, 3)
    sizes = []
    probe.register_forward_hook(lambda m, inp, out: sizes.append(len(inp[0])) if m.training
                                else None)
    module = fit_probe(probe, HParams(0.01, 1e-4), x, y, 3, cfg.train, cfg.trainer, seed=0)
    assert module.fit_info == dict(steps=21, batch_size=2, samples=13)
    assert sizes == [2, 2, 2, 2, 2, 2, 1] * 3
    torch.testing.assert_close(module.class_weights, torch.tensor([13 / 15, 13 / 12, 13 / 12]))
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(MIN_LR)


# --------------------------------------------------------- jitter, optimiser, schedule, clip

def test_jitter_noises_half_of_the_samples_whole_with_sigma_0_05():
    torch.manual_seed(0)
    x = torch.zeros(4000, 3, 8)
    out = jitter(x, 0.5, 0.05)
    touched = (out != 0).flatten(1)
    per_sample = touched.any(dim=1)
    assert torch.equal(touched.all(dim=1), per_sample)  # a noised sample is noised everywhere
    assert abs(per_sample.float().mean().item() - 0.5) < 0.03
    assert out[per_sample].std().item() == pytest.approx(0.05, rel=0.02)


def test_adamw_on_all_parameters_and_per_step_cosine_to_1e_6_without_warmup():
    probe = LinearProbe(16, 4)
    module = ProbeModule(probe, HParams(0.01, 0.1), total_steps=100, weights=torch.ones(4))
    setup = module.configure_optimizers()
    opt, sched = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and setup["lr_scheduler"]["interval"] == "step"
    (group,) = opt.param_groups
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in probe.parameters()}
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.01  # no warm-up
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[50] == pytest.approx((0.01 + 1e-6) / 2)  # half-way down the cosine
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)


def test_gradient_norm_is_clipped_at_5():
    trainer = make_trainer(compose_config("trainer.progress_bar=false").trainer, max_steps=10)
    assert trainer.gradient_clip_val == 5.0
    assert str(trainer.gradient_clip_algorithm.value) == "norm"


# ---------------------------------------------------------------------------------- metrics

def test_balanced_accuracy_is_over_present_classes_and_recall_is_none_for_absent():
    # C = 4, class 3 absent from the targets but predicted once
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 3, 2, 0])
    logits = torch.nn.functional.one_hot(preds, 4).float()
    m = classification_metrics(logits, targets, 4)
    assert m["per_class_recall"] == [0.5, 0.5, 0.5, None]
    assert m["bal_acc"] == pytest.approx(0.5)  # (1/2 + 1/2 + 1/2) / 3, not / 4
    assert m["acc1"] == pytest.approx(0.5)
    assert "acc5" not in m  # fewer than 5 classes
    assert m["bal_acc"] == pytest.approx(balanced_accuracy_score(targets, preds))
    json.dumps(m, allow_nan=False)  # valid JSON for results files


def test_top5_counts_the_true_class_among_the_five_highest_logits():
    # C = 6; the true class is ranked 1st, 5th and 6th: top-1 = 1/3, top-5 = 2/3
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    m = classification_metrics(logits, torch.tensor([0, 4, 5]), 6)
    assert m["acc1"] == pytest.approx(1 / 3) and m["acc5"] == pytest.approx(2 / 3)
    assert m["bal_acc"] == pytest.approx(1 / 3)  # classes 0, 4, 5 present: (1 + 0 + 0) / 3
    assert m["per_class_recall"] == [1.0, None, None, None, 0.0, 0.0]


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
    assert first["steps"] == second["steps"]
    a, b = (torch.load(d / "probe.pt", weights_only=False)["state_dict"] for _, d in two_runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_logs_choice_metrics_timings_and_results(two_runs):
    root, run_dir = two_runs[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["grid"]) == 4  # quick: 2 lr x 2 wd, one dropout
    assert results["fit_samples"] == 60 and results["num_classes"] == 10
    recall = json.loads((run_dir / "per_class_recall.json").read_text())
    assert len(recall["test"]) == len(recall["val"]) == 10
    (run,) = mlflow_runs(root)
    assert run.info.status == "FINISHED"
    assert {k: float(v) for k, v in run.data.params.items() if k.startswith("chosen/")} == {
        f"chosen/{k}": float(v) for k, v in results["chosen"].items()}
    metrics = run.data.metrics
    assert metrics["fit/steps"] == results["steps"] and metrics["fit/samples"] == 60
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
    results = json.loads((run_dir / "results.json").read_text())
    assert json.loads(evaluation.read_text())["test"] == pytest.approx(results["test"])
