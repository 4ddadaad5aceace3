"""End-to-end options: streamed webdataset shards (one process and 2-process DDP), train-time
augmentation, fine-tuning with gradient checkpointing and fresh pretrained weights per fit, and
an explicit ``ckpt_path=`` resume (its errors too)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    compose_config,
    kill_at_first_checkpoint,
    mlflow_runs,
    run_cli,
    run_cli_process,
    tiny_overrides,
)
from torch.utils.data import DataLoader

from alfusion.backbones import build_backbone
from alfusion.data import build_dataset
from alfusion.data.loaders import augment_transform
from alfusion.data.wds_writer import write_digits_wds
from alfusion.distributed import RankSlice
from alfusion.end2end.encoder import TokenEncoder
from alfusion.engine import ImageData, fit_bank
from alfusion.experiment import run_train
from alfusion.probes import build_probe
from alfusion.protocol import HParams
from alfusion.resume import ENV_RESUME_DIR, open_run_state
from alfusion.tokens import build_token_set

E2E = ["mode=end2end", "search.validate=false", "end2end.num_workers=0"]



# --- streamed webdataset shards -----------------------------------------------------------------

def test_end2end_trains_on_streamed_webdataset_shards_with_augmentation(tmp_path):
    """One CLI run covers both options (each CLI start costs seconds): streamed tar shards, and
    augmented train images beside the plain images that give the labels."""
    shards = write_digits_wds(tmp_path / "wds", train=60, test=40, shard_size=16)
    run_cli(*tiny_overrides(tmp_path, *E2E, "dataset=wds", f"dataset.root={shards}",
                            "end2end.augment=true", f"hydra.run.dir={tmp_path}/run"))
    [run] = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["end2end/augment"] == "True"
    assert 0.0 <= run.data.metrics["test/bal_acc"] <= 1.0
    assert run.data.metrics["fit/samples"] == 60 and run.data.metrics["fit/steps"] >= 20
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["mode"] == "end2end" and results["dataset"] == "wds"
    assert results["num_classes"] == 10 and results["fit"]["samples"] == 60


@pytest.mark.parametrize("override", ["search.validate=true", "search.lr=[0.01,0.001]",
                                      "fewshot_k=2"])
def test_streamed_end2end_refuses_splits_before_reading_the_data(tmp_path, monkeypatch,
                                                                 override):
    """Validation, a grid and few-shot need random access: refused with the settings to use,
    before the labels pass over the shards."""
    monkeypatch.setenv(ENV_RESUME_DIR, "")  # open_run_state exports its choice; undone after
    shards = write_digits_wds(tmp_path / "wds", train=16, test=8, shard_size=8)
    cfg = compose_config(*tiny_overrides(tmp_path, *E2E, "logger=none", "dataset=wds",
                                         f"dataset.root={shards}", override))
    with pytest.raises(ValueError, match="a streamed dataset cannot be split") as info:
        run_train(cfg, tmp_path)
    assert "search.validate=false" in str(info.value)


def rank_batches(source, n: int, rank: int, world: int, per_rank: int) -> list[list[int]]:
    """The label batches one rank's DataLoader (2 workers, shuffle buffer) yields in an epoch."""
    part = RankSlice(source, n, rank, world, per_rank, shuffle_buffer=8)
    loader = DataLoader(part, batch_size=per_rank, num_workers=2)
    return [y.tolist() for _, y in loader]


def test_rank_slices_give_equal_batch_counts_through_worker_loaders(tmp_path):
    """50 streamed samples over 2 ranks, 4 per rank and batch, 2 DataLoader workers each: both
    ranks get 25 samples in the planned number of batches (none waits for another)."""
    shards = write_digits_wds(tmp_path / "wds", train=50, test=8, shard_size=8)
    cfg = compose_config("dataset=wds", f"dataset.root={shards}").dataset
    source = build_dataset(cfg, "train", lambda image: torch.zeros(1))
    labels = [y for _, y in build_dataset(cfg, "train", None)]
    per_epoch = 7  # 25 samples per rank in batches of 4
    seen = []
    for rank in (0, 1):
        batches = rank_batches(source, 50, rank, 2, 4)
        assert len(batches) == per_epoch == len(DataLoader(RankSlice(source, 50, rank, 2, 4),
                                                           batch_size=4))
        assert sum(len(b) for b in batches) == 25
        assert sorted(sum(batches, [])) == sorted(labels[rank * 25:(rank + 1) * 25])
        seen.append(RankSlice(source, 50, rank, 2, 4).indices())
    assert seen == [list(range(25)), list(range(25, 50))]


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.progress_bar=false",
       "dataset.limit=64", "train.min_batches=4", "end2end.batch_size=16", "train.min_steps=8",
       "end2end.jitter=off", "end2end.record_samples=true"]


def test_two_process_ddp_on_streamed_shards_gives_each_rank_its_own_shards(tmp_path):
    """2-process gloo DDP over 4 shards of 16: rank 0 reads shards 0-1, rank 1 shards 2-3, the
    same number of rows and batches; one FINISHED MLflow run."""
    shards = write_digits_wds(tmp_path / "wds", train=64, test=16, shard_size=16)
    run_cli_process(*tiny_overrides(tmp_path, *E2E, *DDP, "dataset=wds", f"dataset.root={shards}",
                            f"hydra.run.dir={tmp_path}/run"))
    ranks = [json.loads((tmp_path / f"run/samples/final_rank{r}.json").read_text())
             for r in (0, 1)]
    assert [(r["rank"], r["world"], r["batch"]) for r in ranks] == [(0, 2, 16), (1, 2, 16)]
    rows = [r["indices"] for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 32 and not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(64))
    assert [sorted({i // 16 for i in r}) for r in rows] == [[0, 1], [2, 3]]  # shard numbers

    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["fit"]["world"] == 2 and results["fit"]["steps"] == 8
    [run] = mlflow_runs(tmp_path)  # rank 1 logged nothing
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/bal_acc"] == results["test"]["bal_acc"]


# --- augmentation -------------------------------------------------------------------------------

def test_augmented_train_images_are_new_draws_and_eval_images_are_fixed():
    cfg = compose_config("backbone=tiny_vit", "dataset.limit=8")
    _, eval_tf = build_backbone(cfg.backbone)
    train_tf = augment_transform(eval_tf, cfg.backbone.img_size)
    augmented = build_dataset(cfg.dataset, "train", train_tf)
    plain = build_dataset(cfg.dataset, "train", eval_tf)
    torch.manual_seed(0)  # fixed draws: the test does not depend on what ran before it
    a, b = augmented[3][0], augmented[3][0]
    assert a.shape == b.shape == plain[3][0].shape == (3, 32, 32)
    assert (a - b).abs().max() > 0.1  # two draws of one image differ
    assert (a - plain[3][0]).abs().max() > 0.1
    torch.testing.assert_close(plain[3][0], plain[3][0], rtol=0, atol=0)
    # The draws come from torch's generator (seeded per step and per DataLoader worker), so a
    # seeded run, and a resumed one, sees the same views.
    torch.manual_seed(7)
    c = augmented[3][0]
    torch.manual_seed(7)
    torch.testing.assert_close(augmented[3][0], c, rtol=0, atol=0)


# --- fine-tuning ----------------------------------------------------------------------------------

def finetune_encoder(cfg) -> tuple[TokenEncoder, object]:
    backbone, transform = build_backbone(cfg.backbone)
    token_set = build_token_set(cfg.probe, len(backbone.dims))
    return TokenEncoder(backbone, token_set, trainable=True), transform


def test_grad_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(one_thread):
    cfg = compose_config("backbone=tiny_vit", "probe=finetune", "mode=finetune", "dataset.limit=8")
    encoder, transform = finetune_encoder(cfg)
    encoder.train()
    torch.manual_seed(0)
    probe = build_probe(cfg.probe, encoder.token_set, encoder.backbone.dims, 10, None)
    data = build_dataset(cfg.dataset, "train", transform)
    images = torch.stack([data[i][0] for i in range(8)])
    y = torch.as_tensor(data.labels).long()
    calls = []
    # A pre-hook: a recomputation stops as soon as the saved tensors are back, before the block
    # returns (so a forward hook would not see it).
    encoder.backbone.model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_gradients():
        encoder.zero_grad(set_to_none=True)
        probe.zero_grad(set_to_none=True)
        calls.clear()
        loss = F.cross_entropy(probe(encoder(images)), y)
        in_forward = len(calls)
        loss.backward()
        # the recomputation in backward leaves no tapped activations behind
        assert encoder.backbone._captured == {}
        grads = {n: p.grad.clone() for n, p in encoder.backbone.named_parameters()}
        return loss.detach(), grads, (in_forward, len(calls) - in_forward)

    plain_loss, plain_grads, plain_calls = loss_and_gradients()
    encoder.set_grad_checkpointing(True)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_gradients()
    assert plain_calls == (1, 0)  # block 1 runs once, in the forward pass
    assert ckpt_calls == (1, 1)  # and again in backward: its activations were recomputed
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads["model.blocks.0.attn.qkv.weight"].abs().max() > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_finetuning_fit_starts_from_the_pretrained_backbone(tmp_path, one_thread):
    """Two fits with one encoder (a validation fit, then the final fit) end alike: the second
    starts from the pretrained weights, not from the first fit's fine-tuned ones."""
    cfg = compose_config(*tiny_overrides(tmp_path, "probe=finetune", "mode=finetune",
                                         "end2end.num_workers=0", "dataset.limit=40",
                                         "train.min_steps=10", "train.epochs=1"))
    encoder, transform = finetune_encoder(cfg)
    pristine = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    data = build_dataset(cfg.dataset, "train", transform)
    images = ImageData(data, data, torch.as_tensor(data.labels).long(), encoder, cfg.end2end)
    make = lambda hp: build_probe(cfg.probe, encoder.token_set, encoder.backbone.dims, 10, None)

    def fit() -> dict:
        result = fit_bank([HParams(lr=0.01, wd=1e-4)], make, images, 10, cfg, trainable=True)
        assert result.plan.steps == 10
        return {k: v.clone() for k, v in encoder.backbone.state_dict().items()}

    first, second = fit(), fit()
    name = "model.blocks.0.attn.qkv.weight"
    moved = (first[name] - pristine[name]).abs().max().item()
    assert moved > 1e-5  # backbone lr = 0.001 x 0.01
    for key in first:
        gap = (second[key] - first[key]).abs().max().item()
        assert gap <= 1e-3 * moved + 1e-7, (key, gap)  # without a reset: gap ~ moved


# --- ckpt_path ----------------------------------------------------------------------------------

# 6 epochs of 5 steps, a checkpoint every 5 steps; jitter on (its streams are checkpointed).
RESUME = [*E2E, "train.min_steps=30", "train.checkpoint_every=5"]


def kill_after_first_checkpoint(root) -> str:
    """Start a run, SIGKILL it once its first checkpoint exists; the checkpoint's path."""
    ckpt = kill_at_first_checkpoint(
        root / "run", *tiny_overrides(root, *RESUME, f"hydra.run.dir={root}/run"))
    step = torch.load(ckpt, weights_only=True)["step"]["step_count"]
    assert 0 < step < 30, step
    return str(ckpt)


def test_ckpt_path_continues_its_run_to_the_uninterrupted_result(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*tiny_overrides(full, *RESUME, f"hydra.run.dir={full}/run"))
    ckpt = kill_after_first_checkpoint(cut)
    [killed] = mlflow_runs(cut)
    assert killed.info.status == "RUNNING"

    run_cli(*tiny_overrides(cut, *RESUME, f"ckpt_path={ckpt}", f"hydra.run.dir={cut}/run2"))
    [run] = mlflow_runs(cut)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags.get("resumed_in") == str(cut / "run2")
    resumed = json.loads((cut / "run/results.json").read_text())  # the continued run's folder
    uninterrupted = json.loads((full / "run/results.json").read_text())
    assert not (cut / "run2/results.json").exists()
    assert resumed["fit"]["steps"] == uninterrupted["fit"]["steps"] == 30
    assert resumed["test"] == uninterrupted["test"]
    assert run.data.metrics["test/bal_acc"] == uninterrupted["test"]["bal_acc"]


def test_a_missing_or_foreign_ckpt_path_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_RESUME_DIR, "")  # open_run_state exports its choice; undone after
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config(*tiny_overrides(tmp_path, *E2E))
    open_run_state(cfg, run_dir)  # a run folder with its resume.json

    def refused(path, error=ValueError) -> str:
        with pytest.raises(error) as info:
            open_run_state(compose_config(*tiny_overrides(tmp_path, *E2E,
                                                          f"ckpt_path={path}")), tmp_path)
        return str(info.value)

    message = refused(tmp_path / "nope.ckpt", FileNotFoundError)
    assert "no such file" in message and "resume=true" in message
    (tmp_path / "elsewhere.ckpt").write_bytes(b"x")
    assert "not inside an alfusion run folder" in refused(tmp_path / "elsewhere.ckpt",
                                                          FileNotFoundError)
    torch.save(dict(global_step=3, state_dict={}), run_dir / "probe.pt")
    assert "is not a fit checkpoint of the run" in refused(run_dir / "probe.pt")
    stage = run_dir / "checkpoints/final"
    stage.mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, stage / "other.ckpt")
    assert "is not an alfusion engine checkpoint" in refused(stage / "other.ckpt")
    (stage / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert "cannot be read as tensors and plain data" in refused(stage / "cut.ckpt")
