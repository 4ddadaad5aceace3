"""End-to-end training and the fine-tuning baseline: real CLI runs, and cached == end to end."""

from __future__ import annotations

import copy
import json

import mlflow
import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides

from alfusion.backbones import build_backbone
from alfusion.data import build_dataset
from alfusion.end2end import TokenEncoder, state_checksum
from alfusion.end2end_run import fit_images
from alfusion.image_data import eval_loader, predict_images
from alfusion.probes import build_probe, build_token_set
from alfusion.training import HParams, fit_probe, predict

E2E = ["mode=end2end", "search.validate=false", "end2end.num_workers=1"]


def finished_runs(root) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("alfusion")
    return client.search_runs([experiment.experiment_id])


def test_end2end_alf_and_finetune_through_the_cli(tmp_path):
    """A frozen ALF run leaves the backbone as built; a fine-tuning run changes it. Both end
    as FINISHED MLflow runs with test metrics."""
    alf_dir, ft_dir = tmp_path / "alf", tmp_path / "ft"
    run_cli(*tiny_overrides(tmp_path, *E2E, f"hydra.run.dir={alf_dir}"))
    run_cli(*tiny_overrides(tmp_path, "probe=finetune", "search.validate=false",
                            "end2end.num_workers=0", f"hydra.run.dir={ft_dir}"))
    runs = {r.data.tags["mlflow.runName"].split("/")[-1]: r for r in finished_runs(tmp_path)}
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
    saved = torch.load(ft_dir / "probe.pt", weights_only=False)
    backbone = build_backbone(compose_config("backbone=tiny_vit").backbone)[0]
    backbone.load_state_dict(saved["backbone_state_dict"])
    assert state_checksum(backbone) == ft["backbone_checksum"]["end"]


def fp32_tokens(encoder: TokenEncoder, dataset) -> torch.Tensor:
    """What the cache stores for a split, before its fp16 rounding: (N, T, D) fp32."""
    loader = eval_loader(dataset, 64, 0)
    with torch.no_grad():
        return torch.cat([encoder.eval()(images) for images, _ in loader])


# The ALF probe's Linear bias before its BatchNorm (and LN_v's bias, which feeds it a constant)
# get no true gradient: Adam turns float round-off into steps along them (and the BN running
# mean follows), so two equal trainings drift apart there without changing the function.
# LN_k's bias cancels in the softmax and is never used.
NULL_SPACE = ("proj.bias", "norm_v.bias", "norm_k.bias", "bn.running_mean", "bn.running_var")


@pytest.mark.parametrize("probe_name", ["alf", "linear"])
def test_cached_and_end2end_training_give_the_same_probe(tmp_path, probe_name):
    """Same probe init, data, seed and batch order, jitter off, fp32: cached mode's trainer on
    stored tokens and end-to-end training through the backbone give the same probe."""
    cfg = compose_config(*tiny_overrides(tmp_path, f"probe={probe_name}", "mode=end2end",
                                         "end2end.jitter=off", "train.jitter_p=0",
                                         "end2end.num_workers=0", "train.batch_size=256",
                                         "end2end.batch_size=256"))
    backbone, transform = build_backbone(cfg.backbone)
    token_set = build_token_set(cfg.probe, len(backbone.dims))
    encoder = TokenEncoder(backbone, token_set)
    train = build_dataset(cfg.dataset, "train", transform)
    test = build_dataset(cfg.dataset, "test", transform)
    x, x_test = fp32_tokens(encoder, train), fp32_tokens(encoder, test)
    y = torch.as_tensor(train.labels).long()
    hp = HParams(lr=0.01, wd=1e-4)
    torch.manual_seed(0)
    probe = build_probe(cfg.probe, token_set, backbone.dims, 10, x.shape[1] if x.dim() == 3
                        else None)
    cached = fit_probe(copy.deepcopy(probe), hp, x, y, 10, cfg.train, cfg.trainer, cfg.seed)
    e2e = fit_images(cfg, encoder, copy.deepcopy(probe), hp, train, y, 10)
    assert e2e.fit_info["steps"] == cached.fit_info["steps"] >= 20

    start, a, b = probe.state_dict(), cached.probe.state_dict(), e2e.probe.state_dict()
    for name in a:
        if name in NULL_SPACE or not a[name].is_floating_point():
            continue
        moved = (a[name] - start[name]).abs().max().item()
        assert moved > 0, name
        assert (a[name] - b[name]).abs().max().item() <= 0.02 * moved + 1e-6, name
    cached_logits = predict(cached.probe, x_test)
    e2e_logits = predict_images(e2e, eval_loader(test, 64, 0))[0]
    if probe_name == "linear":  # no BatchNorm, no null space: the logits agree outright
        torch.testing.assert_close(e2e_logits, cached_logits, rtol=1e-4, atol=1e-4)
    agree = (cached_logits.argmax(1) == e2e_logits.argmax(1)).float().mean().item()
    assert agree >= 0.9, agree
