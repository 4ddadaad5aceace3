"""task=predict: a trained probe's classes for a folder of new images or a webdataset split."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch
from conftest import compose_config, mlflow_runs, run_cli, tiny_overrides
from PIL import Image

from alfusion.config_check import ConfigError, check_config
from alfusion.data.digits import digits_split, render
from alfusion.data.wds import DatasetUnavailable
from alfusion.data.wds_writer import write_digits_wds
from alfusion.engine import TokenData
from alfusion.features import split_tokens
from alfusion.predict import run_predict
from alfusion.probe_files import load_probe, saved_probe


@pytest.fixture(scope="module")
def cached_probe(tmp_path_factory):
    """(paths.root, run folder) of a tiny cached ALF run on digits (60 test images)."""
    root = tmp_path_factory.mktemp("predict")
    run_dir = root / "train"
    run_cli(*tiny_overrides(root, "train.min_steps=5", "search.validate=false",
                            f"hydra.run.dir={run_dir}"))
    return root, run_dir


def write_test_digits(folder, n: int = 60) -> list[int]:
    """The first n test digits as PNGs 000.png, 001.png, ... (lossless: the very images the
    probe was tested on); their labels."""
    folder.mkdir(parents=True)
    images, labels = digits_split("test", limit=n)
    for i, image in enumerate(images):
        render(image).save(folder / f"{i:03d}.png")
    return [int(y) for y in labels]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_on_a_folder_of_images_are_the_probes_argmax_through_evaluate(
        cached_probe, tmp_path):
    root, run_dir = cached_probe
    images = tmp_path / "new_images"
    labels = write_test_digits(images)
    out = tmp_path / "predict"
    proc = run_cli("task=predict", f"probe_path={run_dir / 'probe.pt'}", "dataset=folder",
                   f"dataset.root={images}", f"paths.root={root}", f"hydra.run.dir={out}")
    assert "predict 60 images" in proc.stdout
    rows = read_csv(out / "predictions.csv")
    assert [r["sample"] for r in rows] == [f"{i:03d}.png" for i in range(60)]
    assert list(rows[0]) == ["sample", "label", "predicted", "class_1", "prob_1", "class_2",
                             "prob_2", "class_3", "prob_3", "class_4", "prob_4", "class_5",
                             "prob_5"]
    for row in rows:
        probs = [float(row[f"prob_{j}"]) for j in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert row["label"] == "" and row["predicted"] == row["class_1"]
        assert len({row[f"class_{j}"] for j in range(1, 6)}) == 5

    # The same probe through task=evaluate's path on its own (cached) test split: same
    # features, same weights, so the same argmax for every image.
    cfg = compose_config(*tiny_overrides(root), "task=evaluate",
                         f"probe_path={run_dir / 'probe.pt'}")
    _, saved, saved_cfg = load_probe(cfg, tmp_path)
    assert saved["class_names"] == [str(i) for i in range(10)]
    x, y, token_set, _ = split_tokens(saved_cfg, "test", torch.device("cpu"))
    logits, _ = TokenData(x, y).logits(saved_probe(saved, saved_cfg, token_set,
                                                   torch.device("cpu")))
    assert [r["predicted"] for r in rows] == [str(int(c)) for c in logits[0].argmax(1)]
    assert y.tolist() == labels
    results = json.loads((run_dir / "results.json").read_text())
    hits = sum(r["predicted"] == str(t) for r, t in zip(rows, labels, strict=True))
    assert hits / 60 == pytest.approx(results["test"]["acc1"])

    # Logged to MLflow: a run of its own holding predictions.csv.
    (run,) = [r for r in mlflow_runs(root) if r.data.params.get("task") == "predict"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == "predict/folder/tiny_vit/alf"
    assert run.data.params["probe_run_id"] == results["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert "predictions.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_bad_inputs_are_refused_before_any_work(cached_probe, tmp_path):
    root, run_dir = cached_probe
    probe = f"probe_path={run_dir / 'probe.pt'}"
    proc = run_cli("task=predict", probe, "dataset=folder", f"dataset.root={tmp_path / 'nope'}",
                   f"paths.root={root}", check=False)
    assert proc.returncode != 0 and "no such folder" in proc.stderr

    def predict(*overrides):
        cfg = check_config(compose_config(*tiny_overrides(root), "task=predict", *overrides))
        return run_predict(cfg, tmp_path)

    with pytest.raises(ConfigError, match="probe_path"):
        predict("dataset=folder", f"dataset.root={tmp_path}")
    with pytest.raises(ConfigError, match="predict.split"):  # digits has splits: say which
        predict(probe)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetUnavailable, match="is empty"):
        predict(probe, "dataset=folder", f"dataset.root={empty}")
    broken = tmp_path / "broken"
    write_test_digits(broken, n=3)
    (broken / "001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetUnavailable, match="001.png cannot be decoded"):
        predict(probe, "dataset=folder", f"dataset.root={broken}")
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict(f"probe_path={tmp_path / 'missing.pt'}", "dataset=folder",
                f"dataset.root={broken}")
    assert not (tmp_path / "predictions.csv").exists()


def test_an_end_to_end_probe_predicts_a_webdataset_split(tmp_path):
    run_dir = tmp_path / "train"
    run_cli(*tiny_overrides(tmp_path, "mode=end2end", "search.validate=false",
                            "train.min_steps=5", "train.epochs=1",
                            "end2end.num_workers=0", f"hydra.run.dir={run_dir}"))
    shards = write_digits_wds(tmp_path / "wds", train=8, test=20, shard_size=8)
    out = tmp_path / "predict"
    run_cli("task=predict", f"probe_path={run_dir / 'probe.pt'}", "dataset=wds",
            f"dataset.root={shards}", "predict.split=test", "predict.top_k=12",
            "end2end.num_workers=0", f"paths.root={tmp_path}", f"hydra.run.dir={out}")
    rows = read_csv(out / "predictions.csv")
    assert [r["sample"] for r in rows][:9] == [f"test/0.tar/s{i:07d}" for i in range(8)] + [
        "test/1.tar/s0000008"]
    assert [r["label"] for r in rows] == [str(int(y)) for y in digits_split("test", limit=20)[1]]
    assert "class_10" in rows[0] and "class_11" not in rows[0]  # top 12 of 10 classes: 10
    for row in rows:
        assert sum(float(row[f"prob_{j}"]) for j in range(1, 11)) == pytest.approx(1, abs=1e-4)


def test_a_plain_folder_lists_every_image_under_it_in_path_order(tmp_path):
    from alfusion.data import build_dataset, split_signature

    for name in ("b/2.png", "a.png", "b/10.jpg", ".hidden/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "readme.md").write_text("not an image")
    cfg = compose_config("dataset=folder", f"dataset.root={tmp_path}").dataset
    source = build_dataset(cfg, "images")
    assert source.keys() == ["a.png", "b/10.jpg", "b/2.png"] and source.labels == [-1] * 3
    before = split_signature(cfg, "images")
    Image.new("RGB", (5, 5)).save(tmp_path / "c.png")
    assert split_signature(cfg, "images") != before  # new images: a new cache entry
