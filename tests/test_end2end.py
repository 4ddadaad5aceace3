"""End-to-end training and the fine-tuning baseline: real CLI runs, and cached == end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, mlflow_runs, run_cli, tiny_overrides

from alfusion.backbones import build_backbone
from alfusion.end2end.encoder import state_checksum
from alfusion.end2end.run import build_encoder, image_inputs
from alfusion.engine import TokenData
from alfusion.experiment import probe_factory
from alfusion.features import split_tokens
from alfusion.resume import RunState
from alfusion.search import expand_grid, run_search

E2E = ["mode=end2end", "search.validate=false", "end2end.num_workers=1"]



def test_end2end_alf_and_finetune_through_the_cli(tmp_path):
    """A frozen ALF run leaves the backbone as built; a fine-tuning run changes it. Both end
    as FINISHED MLflow runs with test metrics."""
    alf_dir, ft_dir = tmp_path / "alf", tmp_path / "ft"
    run_cli(*tiny_overrides(tmp_path, *E2E, f"hydra.run.dir={alf_dir}"))
    run_cli(*tiny_overrides(tmp_path, "probe=finetune", "mode=finetune", "search.validate=false",
                            "end2end.num_workers=0", f"hydra.run.dir={ft_dir}"))
    runs = {r.data.tags["mlflow.runName"].split("/")[-1]: r for r in mlflow_runs(tmp_path)}
    assert sorted(runs) == ["alf", "finetune"]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["test/bal_acc"] <= 1.0
        assert run.data.metrics["fit/steps"] >= 20

    pristine = state_checksum(build_backbone(compose_config("backbone=tiny_vit").backbone)[0])
    alf = json.loads((alf_dir / "results.json").read_text())
    ft = json.loads((ft_dir / "results.json").read_text())
    assert alf["mode"] == "end2end" and ft["mode"] == "finetune"
    assert alf["backbone_checksum"] == dict(start=pristine, end=pristine)
    assert ft["backbone_checksum"]["start"] == pristine
    assert ft["backbone_checksum"]["end"] != pristine
    assert runs["finetune"].data.tags["backbone_sha256_end"] == ft["backbone_checksum"]["end"]
    # The saved fine-tuned backbone is the changed one.
    saved = torch.load(ft_dir / "probe.pt", weights_only=True)
    backbone = build_backbone(compose_config("backbone=tiny_vit").backbone)[0]
    backbone.load_state_dict(saved["backbone_state_dict"])
    assert state_checksum(backbone) == ft["backbone_checksum"]["end"]
    # task=evaluate scores the fine-tuned probe with its fine-tuned backbone, end to end
    run_cli("task=evaluate", f"probe_path={ft_dir / 'probe.pt'}", f"paths.root={tmp_path}",
            f"hydra.run.dir={tmp_path}/evaluate")
    evaluation = json.loads((tmp_path / "evaluate/evaluation.json").read_text())
    assert evaluation["mode"] == "finetune"
    assert evaluation["test"] == pytest.approx(ft["test"], abs=1e-9)


def test_cached_and_end2end_searches_select_alike(tmp_path, one_thread):
    """The same frozen backbone, grid (search=quick), seed, batches and per-sample jitter
    draws: the search on the cached (fp16) tokens and the search with the backbone inside the
    step score every configuration alike up to the cache's rounding, and pick the same one.
    (lr 0.1 is left out: on this random 4-block ViT it trains chaotically, so the cache's fp16
    rounding grows into a different model within 40 steps.)"""
    cfg = compose_config(*tiny_overrides(tmp_path, "search=quick", "search.lr=[0.01,0.0001]",
                                         "train.min_steps=40", "end2end.jitter=per_sample",
                                         "end2end.num_workers=0", "train.batch_size=256",
                                         "end2end.batch_size=256", "train.checkpoint_every=0"))
    device = torch.device("cpu")
    x, y, token_set, entry = split_tokens(cfg, "train", device)
    x_test, y_test, _, _ = split_tokens(cfg, "test", device)
    make = probe_factory(cfg, token_set, entry.dims, 10, x.shape[1])
    configs = expand_grid(cfg.search, attentive=True)
    results = {}
    for mode, train, test in [("cached", TokenData(x, y), TokenData(x_test, y_test)),
                              ("end2end", None, None)]:
        run_cfg = compose_config(*tiny_overrides(tmp_path, f"mode={mode}", "search=quick",
                                                 "search.lr=[0.01,0.0001]", "train.min_steps=40",
                                                 "end2end.jitter=per_sample",
                                                 "end2end.num_workers=0", "train.batch_size=256",
                                                 "end2end.batch_size=256",
                                                 "train.checkpoint_every=0"))
        if train is None:
            encoder, eval_tf = build_encoder(run_cfg)
            inputs = image_inputs(run_cfg, encoder, eval_tf, device)
            train, test = inputs.train, inputs.test
            assert torch.equal(train.labels, y.cpu())
        (tmp_path / mode).mkdir()
        state = RunState(tmp_path / mode, dict(stages={}, finished=False))
        results[mode] = run_search(make, configs, train, test, 10, run_cfg, state)
    cached, e2e = results["cached"], results["end2end"]
    assert e2e.best == cached.best and e2e.steps == cached.steps >= 20
    scores = [[row["bal_acc"] for row in r.grid] for r in (cached, e2e)]
    assert len(set(scores[0])) > 1  # not a tie
    # 12 validation images: the fp16 rounding of the cache may flip a near-tie image or two,
    # 0.05 to 0.1 of balanced accuracy each (0.2 at lr 0.01 here); the selection is the same
    assert scores[0] == pytest.approx(scores[1], abs=0.2)
    assert e2e.test["bal_acc"] == pytest.approx(cached.test["bal_acc"], abs=0.1)
