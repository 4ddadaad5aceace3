"""config_check: every bad setting fails in seconds, before extraction, naming the key (the
CLI's run in this process; one real command for the one-line exit-2 path); plain intents (a
single learning rate) are normalised."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import compose_config, run_cli, run_cli_process, tiny_overrides

from alfusion.config_check import ConfigError, check_config, check_labels
from alfusion.search import expand_grid

BAD_SETTINGS = [  # (overrides, the key the message must name)
    (["search.lr=abc"], "search.lr"),
    (["search.lr=[0.1,-0.01]"], "search.lr"),
    (["search.lr=nan"], "search.lr"),
    (["search.wd=-0.1"], "search.wd"),
    (["search.dropout=1.0"], "search.dropout"),
    (["search.val_fraction=1.0"], "search.val_fraction"),
    (["search.val_fraction=0"], "search.val_fraction"),
    (["fewshot_k=0"], "fewshot_k"),
    (["fewshot_k=-1"], "fewshot_k"),
    (["train.epochs=0", "train.min_steps=0"], "train.epochs"),
    (["train.epochs=-1"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["extract.batch_size=0"], "extract.batch_size"),
    (["end2end.batch_size=0"], "end2end.batch_size"),
    (["train.jitter_p=1.5"], "train.jitter_p"),
    (["train.jitter_sigma=-1"], "train.jitter_sigma"),
    (["task=fit"], "task"),
    (["seed=abc"], "seed"),
    (["dataset.num_classes=1"], "dataset.num_classes"),
    (["dataset.name=x/../../../ESCAPED"], "dataset.name"),
    (["backbone.key=.."], "backbone.key"),
    (["probe.name=a/b"], "probe.name"),
    (["probe=finetune", "mode=end2end"], "mode"),
    (["probe.regions=0"], "probe.regions"),
    (["probe.regions=-1"], "probe.regions"),
    (["probe.regions=abc"], "probe.regions"),
    (["probe.tokens=cls+ap+regions", "probe.regions=99"], "probe.regions"),
    (["probe.tokens=cls+ap+regions"], "probe.regions"),
    (["probe.regions=2"], "probe.regions"),
    (["probe.tokens=bogus"], "probe.tokens"),
    (["probe.layers=[0,99]"], "probe.layers"),
    (["backbone=tiny_vit", "probe.layers=[5]"], "probe.layers"),
    (["probe.layers=bogus"], "probe.layers"),
    (["end2end.jitter=bogus"], "end2end.jitter"),
    (["train.jitter_draws=bogus"], "train.jitter_draws"),
]


@pytest.mark.parametrize("overrides,key", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(*overrides))
    assert key in str(info.value) and "not allowed" in str(info.value)


@pytest.mark.parametrize("overrides,key", [(["search.lr=abc"], "search.lr"),
                                           (["dataset.name=x/../../../ESCAPED"],
                                            "dataset.name"),
                                           (["probe.layers=[0,99]"], "probe.layers"),
                                           (["probe.tokens=cls+ap+regions",
                                             "probe.regions=99"], "probe.regions")])
def test_bad_setting_fails_in_seconds_before_extraction_naming_the_key(tmp_path, overrides, key):
    """The CLI's run: the check runs before any work (and before the run folder)."""
    root = tmp_path / "root"
    start = time.monotonic()
    proc = run_cli(*tiny_overrides(root, *overrides), check=False, timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-2000:]
    assert "not allowed" in proc.stderr
    assert seconds < 30, seconds  # the CLI's start-up only; no backbone, no extraction
    assert not (root / "cache").exists() and not (root / "mlflow.db").exists()
    assert not list(tmp_path.rglob("ESCAPED*"))  # nothing was written outside paths.root


def test_the_finetune_head_implies_its_mode():
    cfg = check_config(compose_config("probe=finetune"))
    assert cfg.mode.name == "finetune" and cfg.mode.backbone_lr_scale == 0.001


def test_an_image_folder_with_one_class_fails_before_extraction(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "img" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / split / "cat" / "0.png")
    root = tmp_path / "root"
    proc = run_cli(*tiny_overrides(root, "dataset=folder", f"dataset.root={tmp_path / 'img'}"),
                   check=False, timeout=120)
    assert proc.returncode != 0
    assert "has 1 class: a classifier needs at least two" in proc.stderr, proc.stderr[-2000:]
    assert not list((root / "cache").glob("features-*"))


def test_a_single_number_is_a_one_value_grid():
    cfg = check_config(compose_config("search.lr=0.01", "search.wd=0", "search.dropout=0.1"))
    assert list(cfg.search.lr) == [0.01] and list(cfg.search.wd) == [0]
    configs = expand_grid(cfg.search, attentive=True)
    assert [(c.lr, c.wd, c.dropout) for c in configs] == [(0.01, 0.0, 0.1)]
    cfg = check_config(compose_config("backbone=tiny_vit", "probe.layers=3"))
    assert list(cfg.probe.layers) == [3]  # one layer number: that layer


def test_the_default_and_paper_configs_pass():
    check_config(compose_config())
    check_config(compose_config("search=paper", "fewshot_k=4", "train.epochs=0"))
    for probe in ("alf", "aat", "aat_quarterly", "linear", "linear_concat", "attentive_last"):
        check_config(compose_config(f"probe={probe}", "backbone=tiny_vit"))
    check_config(compose_config("probe.tokens=cls+ap+regions", "probe.regions=2",
                                "probe.layers=[1,12]", "train.jitter_draws=per_probe"))


def test_a_train_split_with_one_class_is_refused():
    with pytest.raises(ConfigError, match="at least two"):
        check_labels(np.zeros(10, dtype=np.int64), 10, "train")
    with pytest.raises(ConfigError, match="outside 0..9"):
        check_labels(np.array([0, 1, 10]), 10, "train")
    check_labels(np.array([0, 1, 1]), 10, "train")


@pytest.mark.parametrize("override,cli", [("search.lr=abc", run_cli_process),
                                          ("dataset.name=x/../../../ESCAPED", run_cli)],
                         ids=["a real command", "in this process"])
def test_a_refusal_is_one_line_with_exit_status_2_and_leaves_no_run_folder(tmp_path, override,
                                                                            cli):
    root = tmp_path / "root"
    proc = cli(*tiny_overrides(root, override), check=False, timeout=60, full_error=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.splitlines() == [line] and line.startswith("[alfusion] ")
    assert f"{override.split('=')[0]}=" in line and "is not allowed: " in line
    assert not [p for p in root.rglob("*") if p.is_file()]  # no run folder, no cache


def test_a_refusal_shows_its_traceback_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFUSION_DEBUG", "1")
    proc = run_cli(*tiny_overrides(tmp_path, "search.lr=abc"), check=False, timeout=60,
                   full_error=False)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "search.lr='abc' is not allowed" in proc.stderr
