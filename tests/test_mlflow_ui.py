"""What MLflow's UI reads: the experiment marked as model training, a saved runs view with the
test metric first, and each run's data as dataset inputs whose digest is the cache entry's."""

from __future__ import annotations

import json

import mlflow
from conftest import compose_config, run_cli, tiny_overrides
from lightning.pytorch.loggers import MLFlowLogger

from alfusion import tracking
from alfusion.data.cache import fingerprint_hash
from alfusion.data.extract import dataset_digest


def test_a_run_marks_its_experiment_and_logs_its_data_as_dataset_inputs(tmp_path):
    run_cli(*tiny_overrides(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("alfusion")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.alfusion"])
    state = json.loads(view["state"])
    assert state["selectedColumns"][0] == state["orderByKey"] == "metrics.`test/bal_acc`"

    (run,) = client.search_runs([experiment.experiment_id])
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert [t.key for d in run.inputs.dataset_inputs for t in d.tags] == \
        ["mlflow.data.context"] * 2
    assert set(inputs) == {"train", "test"}
    entries = {p.name.removeprefix("features-") for p in (tmp_path / "cache").iterdir()
               if p.is_dir()}
    assert {d.digest for d in inputs.values()} == entries  # the cache fingerprints
    assert inputs["train"].digest != inputs["test"].digest
    assert all(d.name == "digits" and d.source_type == "code" for d in inputs.values())
    assert "test/bal_acc" in run.data.metrics  # the column the view shows first

    url = tracking.runs_view_url(uri, "http://127.0.0.1:5000")
    assert url == (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
                   "?workflowType=machine_learning&viewStateShareKey=alfusion")


def test_a_kind_and_a_view_a_user_chose_are_kept(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="mine", tracking_uri=uri)
    client = logger.experiment
    client.set_experiment_tag(logger.experiment_id, "mlflow.experimentKind", "genai_development")
    client.set_experiment_tag(logger.experiment_id, "mlflow.sharedViewState.alfusion", "{}")
    tracking.mark_model_training(logger)
    tags = client.get_experiment(logger.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "genai_development"
    assert tags["mlflow.sharedViewState.alfusion"] == "{}"
    assert tracking.runs_view_url(uri, "http://h:1", "other") == "http://h:1"
    assert tracking.runs_view_url(f"sqlite:///{tmp_path}/none.db", "http://h:1") == "http://h:1"


def test_end_to_end_digests_name_the_dataset_settings_and_split(tmp_path):
    cfg = compose_config("mode=end2end", "dataset.limit=60", f"paths.root={tmp_path}")
    train, test = (dataset_digest(cfg, s) for s in ("train", "test"))
    assert train == fingerprint_hash(dict(dataset=dict(
        source="digits", name="digits", test_fraction=0.25, split_seed=0, limit=60),
        split="train"))
    assert test != train
    other = compose_config("mode=end2end", "dataset.limit=50", f"paths.root={tmp_path}")
    assert dataset_digest(other, "train") != train
