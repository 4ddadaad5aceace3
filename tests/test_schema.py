"""The typed schema (alfusion/schema.py): every key of every config group has a type and, where
it has one, a range or a set of values; a wrong type, an out-of-range value and an unknown key
are refused in one line naming the key, before any run folder or MLflow run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import typing

import pytest
from conftest import CONF, ROOT, compose_config

from alfusion import schema
from alfusion.config_check import ConfigError, check_config

# group -> (the schema's dataclass, an option of the group)
GROUPS = {"backbone": schema.Backbone, "dataset": schema.Dataset, "probe": schema.Probe,
          "search": schema.Search, "mode": schema.Mode, "trainer": schema.Trainer,
          "logger": schema.Logger, "train": schema.Train, "end2end": schema.End2End,
          "extract": schema.Extract, "cka": schema.Cka, "predict": schema.Predict,
          "paths": schema.Paths, "": schema.Settings}

# An out-of-range value of every key that has a range (a set of words is tried with "bogus").
OUT_OF_RANGE = {
    "backbone.img_size": "0", "dataset.num_classes": "1", "dataset.test_fraction": "1.5",
    "dataset.limit": "-3", "probe.layers": "[0,2]", "probe.regions": "0",
    "probe.num_heads": "0", "probe.head_dim": "-1", "search.lr": "[0.1,-0.01]",
    "search.wd": "-0.1", "search.dropout": "1.0", "search.val_fraction": "1.0",
    "mode.backbone_lr_scale": "0", "trainer.accelerator": "bogus", "trainer.devices": "0",
    "trainer.num_nodes": "0", "trainer.devices_per_task": "0", "trainer.precision": "bogus",
    "train.batch_size": "0", "train.min_batches": "0", "train.epochs": "-1",
    "train.min_steps": "-1", "train.jitter_p": "1.5", "train.jitter_sigma": "-1",
    "train.checkpoint_every": "-5", "train.stream_budget_gb": "-1",
    "end2end.batch_size": "0", "end2end.num_workers": "-1", "end2end.eval_batch_size": "0",
    "end2end.shuffle_buffer": "-1", "extract.batch_size": "0", "extract.num_workers": "-1",
    "extract.chunk_rows": "0", "extract.max_cache_gb": "0", "cka.samples": "1",
    "cka.sigma": "0", "predict.top_k": "0", "device": "bogus", "fewshot_k": "0",
    "logger.register_model": "bad/name",
}


def accepts_str(tp) -> bool:
    if tp is str:
        return True
    return any(accepts_str(t) for t in typing.get_args(tp)
               if typing.get_origin(tp) is not typing.Literal)


def is_group(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def keys():
    """(dotted key, its annotation, its metadata) of every leaf of the schema."""
    for prefix, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not is_group(hints[f.name]):
                yield (f"{prefix}.{f.name}" if prefix else f.name), hints[f.name], f.metadata


ALL_KEYS = list(keys())


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(*overrides))
    return str(info.value)


def has_range(tp, meta) -> bool:
    literal = typing.Literal in {typing.get_origin(t) for t in (tp, *typing.get_args(tp))}
    return meta["ok"] is not None or literal


@pytest.mark.parametrize("key,tp,meta", ALL_KEYS, ids=[k for k, _, _ in ALL_KEYS])
def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value_in_one_line(key, tp, meta):
    wrong = "{a: 1}" if accepts_str(tp) else "abc"
    message = refused(f"++{key}={wrong}")
    assert message.startswith(f"{key}=") and "is not allowed: " in message, message
    assert "\n" not in message and meta["allowed"] in message
    if has_range(tp, meta):
        value = OUT_OF_RANGE.get(key, "bogus")
        message = refused(f"++{key}={value}")
        assert message.startswith(f"{key}=") and "\n" not in message, message
    else:  # free text (names, paths, URIs): every string is allowed by its type
        assert accepts_str(tp) or tp is bool or bool in typing.get_args(tp) or \
            dict in typing.get_args(tp) or key == "seed" or key.endswith("seed"), key


def test_every_ranged_key_has_an_out_of_range_example():
    ranged = {k for k, tp, meta in ALL_KEYS if meta["ok"] is not None}
    assert ranged <= set(OUT_OF_RANGE) | {"device", "trainer.accelerator",
                                          "trainer.precision"}, ranged - set(OUT_OF_RANGE)


def test_unknown_keys_are_refused_naming_the_known_ones():
    message = refused("+dataset.limt=3")
    assert message.startswith("dataset.limt=3 is not allowed: dataset has no such key")
    assert "limit" in message
    assert refused("+trainr=1").startswith("trainr=1 is not allowed: the config has no such")


def test_every_option_of_every_group_passes():
    for group in ("backbone", "dataset", "probe", "search", "mode", "trainer", "logger"):
        for path in sorted((CONF / group).glob("*.yaml")):
            extra = {("probe", "finetune"): ["mode=finetune"],  # backbone=timm needs its name
                     ("backbone", "timm"): ["backbone.name=vit_small_patch16_224"]}.get(
                (group, path.stem), [])
            check_config(compose_config(f"{group}={path.stem}", *extra))
    check_config(compose_config("+experiment=paper_table"))


def test_the_schema_sets_match_the_code():
    from alfusion.backbones.preprocess import PREPROCESS_MODES
    from alfusion.engine.step import JITTER_DRAWS
    from alfusion.random_draws import JITTER_MODES

    hints = typing.get_type_hints
    assert set(typing.get_args(hints(schema.Backbone)["preprocess"])) == set(PREPROCESS_MODES)
    assert set(typing.get_args(hints(schema.End2End)["jitter"])) == set(JITTER_MODES)
    assert set(typing.get_args(hints(schema.Train)["jitter_draws"])) == set(JITTER_DRAWS)


MUST_REFUSE = ["dataset.limit=-3", "dataset.limit=abc", "device=bogus",
               "dataset.test_fraction=1.5", "train.checkpoint_every=-5"]


def test_the_cli_refuses_in_one_line_with_exit_2_before_any_folder(tmp_path):
    """Through the real CLI: one line, exit status 2, seconds, nothing written."""
    for override in MUST_REFUSE:
        root = tmp_path / override.replace("=", "_")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "alfusion", f"paths.root={root}",
                               override], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip()
        assert line.splitlines() == [line], line
        assert line.startswith(f"[alfusion] {override.split('=')[0]}="), line
        assert time.monotonic() - start < 60
        assert not root.exists()  # no run folder, no MLflow store
