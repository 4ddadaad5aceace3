"""``mode=end2end`` and ``probe=finetune``: train through the backbone, one configuration.

Flow: images (DataLoader workers) -> TokenEncoder (frozen, or trainable for fine-tuning) ->
probe, inside Lightning's training step; optional validation fit on the stratified 80 % split;
final fit on the train split; test evaluation on rank 0; MLflow on rank 0. Every fit writes
epoch-end checkpoints, and the run's resume.json lets ``resume=true`` or ``ckpt_path=`` continue
it in the same MLflow run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import IterableDataset, Subset

from alfusion import tracking
from alfusion.backbones import build_backbone
from alfusion.data import build_dataset
from alfusion.distributed import batches_per_epoch, is_global_zero
from alfusion.end2end import End2EndModule, TokenEncoder, state_checksum
from alfusion.image_data import (
    augment_transform,
    eval_loader,
    labels_of,
    predict_images,
    train_loader,
)
from alfusion.metrics import classification_metrics
from alfusion.probes import build_probe, build_token_set
from alfusion.resume import RunState, checkpoint_to_resume, open_run_state
from alfusion.search import expand_grid, select, split_indices
from alfusion.training import HParams, batch_size_for, class_weights, make_trainer


def first_image(dataset) -> torch.Tensor:
    """One transformed image (3, H, W) of a dataset (map-style or streamed)."""
    item = dataset[0] if not isinstance(dataset, IterableDataset) else next(iter(dataset))
    return item[0]


def jitter_mode_of(cfg) -> str:
    return "off" if cfg.probe.get("finetune") else cfg.end2end.jitter


def fit_images(cfg, encoder: TokenEncoder, probe: torch.nn.Module, hp: HParams, dataset,
               labels: torch.Tensor, num_classes: int, *, state: RunState | None = None,
               stage: str = "final", ckpt_path: str | None = None, logger=False
               ) -> End2EndModule:
    """Train ``probe`` (and a trainable encoder) on (image, label) ``dataset``; labels (N,).

    Batch: end2end.batch_size (global over ranks), shrunk like cached mode's; epochs raised to
    train.min_steps steps; checkpoints after every epoch under state's run folder.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    encoder.reset()  # a fine-tuning fit starts from the pretrained weights, not the last fit's
    # A frozen backbone is in eval mode on purpose; Lightning warns about it at every fit.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    callbacks = []
    if state is not None:
        # One file, last.ckpt, replaced (atomically) after every epoch's worth of steps.
        callbacks.append(ModelCheckpoint(dirpath=state.checkpoint_dir(stage), filename="last",
                                         save_top_k=1, every_n_train_steps=1,
                                         enable_version_counter=False))
    trainer = make_trainer(cfg.trainer, 1, logger=logger, callbacks=callbacks,
                           enable_checkpointing=bool(callbacks), use_distributed_sampler=False,
                           default_root_dir=str(state.run_dir) if state else None)
    world, rank = trainer.world_size, trainer.global_rank
    n = len(labels)
    batch = batch_size_for(n, cfg.end2end.batch_size, cfg.train.min_batches)
    batch = max(world, batch - batch % world)  # equal per-rank batches
    per_epoch = batches_per_epoch(n, batch, world)
    epochs = max(cfg.train.epochs, math.ceil(cfg.train.min_steps / per_epoch))
    steps = per_epoch * epochs
    trainer.fit_loop.epoch_loop.max_steps = steps
    if callbacks:
        callbacks[0]._every_n_train_steps = per_epoch  # known only now (batch, world)
    start = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True
                       )["global_step"] if ckpt_path else 0
    loader, part = train_loader(dataset, batch, rank, world, cfg.seed, cfg.end2end.num_workers,
                                total_steps=steps, start_step=start,
                                pin_memory=trainer.strategy.root_device.type == "cuda",
                                shuffle_buffer=cfg.end2end.shuffle_buffer)
    if cfg.end2end.get("record_samples") and state is not None and hasattr(part, "indices"):
        # Audit trail: the samples this rank trains on in the first epoch.
        folder = state.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        (folder / f"{stage}_rank{rank}.json").write_text(json.dumps(
            dict(rank=rank, world=world, batch=batch, indices=part.indices())))
    module = End2EndModule(probe, hp, steps, class_weights(labels, num_classes), encoder,
                           jitter_mode=jitter_mode_of(cfg), jitter_p=cfg.train.jitter_p,
                           jitter_sigma=cfg.train.jitter_sigma,
                           backbone_lr_scale=cfg.probe.get("backbone_lr_scale", 0.001),
                           seed=cfg.seed)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    module.fit_info = dict(steps=trainer.global_step, batch_size=batch, samples=n,
                           epochs=epochs, world=world)
    return module


def run_end2end(cfg, run_dir: Path) -> dict:
    """One configuration trained end to end; returns the summary (rank 0) or {} (others)."""
    finetune = bool(cfg.probe.get("finetune"))
    rank0 = is_global_zero()
    state, resuming = open_run_state(cfg, run_dir)
    logger = tracking.make_logger(cfg, run_id=state.data.get("mlflow_run_id"))
    if logger is not None and not resuming:
        state.data["mlflow_run_id"] = logger.run_id
        state.save()
    ok = False
    try:
        if resuming and logger is not None:
            logger.experiment.set_tag(logger.run_id, "resumed_in", str(run_dir))
        elif not resuming:
            tracking.log_config(logger, cfg, state.run_dir)
        t0 = time.perf_counter()
        backbone, eval_tf = build_backbone(cfg.backbone)
        token_set = build_token_set(cfg.probe, num_layers=len(backbone.dims))
        encoder = TokenEncoder(backbone, token_set, trainable=finetune)
        if finetune and cfg.probe.get("grad_checkpointing"):
            encoder.set_grad_checkpointing(True)
        checksum_start = state_checksum(backbone)
        train_tf = augment_transform(eval_tf, cfg.backbone.get("img_size")) \
            if cfg.end2end.augment else eval_tf
        train_ds = build_dataset(cfg.dataset, "train", train_tf)
        configs = expand_grid(cfg.search, attentive=cfg.probe.kind == "attentive")
        subsets = cfg.search.validate or len(configs) > 1 or cfg.get("fewshot_k")
        if subsets and isinstance(train_ds, IterableDataset):  # refused before a pass over it
            raise ValueError("a streamed dataset cannot be split for validation, a search grid "
                             "or few-shot in end-to-end mode: set search=none "
                             "search.validate=false fewshot_k=null (or cache its features: "
                             "mode=cached)")
        plain_train = build_dataset(cfg.dataset, "train", eval_tf) \
            if cfg.end2end.augment else train_ds
        test_ds = build_dataset(cfg.dataset, "test", eval_tf)
        y_train = labels_of(plain_train, cfg.end2end.num_workers)
        num_classes = cfg.dataset.get("num_classes") or int(y_train.max()) + 1
        hp = configs[0]
        with torch.no_grad():
            probe_input = encoder.eval()(first_image(plain_train)[None])
        num_tokens = probe_input.shape[1] if probe_input.dim() == 3 else None

        def make_probe(hp: HParams):
            torch.manual_seed(cfg.seed)  # the same initial probe on every rank and resume
            return build_probe(cfg.probe, token_set, backbone.dims, num_classes, num_tokens,
                               attn_drop=hp.dropout)

        fit_idx, val_idx, final_idx = split_indices(y_train, cfg.search, cfg.get("fewshot_k"),
                                                    cfg.seed)
        val, grid = {}, []
        if len(configs) > 1 or cfg.search.validate:
            # The search of PROTOCOL.md 3, one end-to-end fit per configuration (each a resumable
            # stage); rank 0 scores them on the validation split and tells the other ranks.
            for i, hp in enumerate(configs):
                stage = "val" if len(configs) == 1 else f"val{i:03d}"
                metrics = (state.stage(stage) or {}).get("metrics")
                if metrics is None:
                    model = fit_images(cfg, encoder, make_probe(hp), hp, Subset(train_ds, fit_idx),
                                       y_train[fit_idx], num_classes, state=state, stage=stage,
                                       ckpt_path=checkpoint_to_resume(cfg, state, stage,
                                                                      resuming))
                    if rank0:
                        logits, y = predict_images(model, eval_loader(
                            Subset(plain_train, val_idx), cfg.end2end.eval_batch_size,
                            cfg.end2end.num_workers))
                        metrics = classification_metrics(logits, y, num_classes)
                        state.finish_stage(stage, dict(metrics=metrics))
                grid.append(metrics)
            chosen = [select([m["bal_acc"] for m in grid])] if rank0 else [0]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast_object_list(chosen, src=0)
            hp, val = configs[chosen[0]], grid[chosen[0]] or {}
        final_ds = train_ds if len(final_idx) == len(y_train) else Subset(train_ds, final_idx)
        t_fit = time.perf_counter()
        model = fit_images(cfg, encoder, make_probe(hp), hp, final_ds, y_train[final_idx],
                           num_classes, state=state, stage="final", logger=logger or False,
                           ckpt_path=checkpoint_to_resume(cfg, state, "final", resuming))
        fit_seconds = time.perf_counter() - t_fit
        if not rank0:
            ok = True
            return {}
        logits, y_test = predict_images(model, eval_loader(
            test_ds, cfg.end2end.eval_batch_size, cfg.end2end.num_workers))
        test = classification_metrics(logits, y_test, num_classes)
        summary = dict(
            mode="finetune" if finetune else "end2end", dataset=cfg.dataset.name,
            backbone=cfg.backbone.name, probe=cfg.probe.name, layers=list(token_set.layers),
            tokens=token_set.tokens, num_tokens=num_tokens, num_classes=num_classes,
            chosen=hp.__dict__, fit=model.fit_info,
            grid=[dict(c.__dict__, **{k: v for k, v in m.items() if k != "per_class_recall"})
                  for c, m in zip(configs, grid, strict=True)] if rank0 and grid else [],
            fit_samples=len(final_idx),
            val={k: v for k, v in val.items() if k != "per_class_recall"},
            test={k: v for k, v in test.items() if k != "per_class_recall"},
            backbone_checksum=dict(start=checksum_start,
                                   end=state_checksum(encoder.backbone)),
            seconds=dict(total=round(time.perf_counter() - t0, 2), fit=round(fit_seconds, 2)),
            run_dir=str(state.run_dir), mlflow_run_id=logger.run_id if logger else None)
        save_model(state.run_dir, model, cfg, summary, backbone.dims)
        tracking.log_summary(logger, state.run_dir, summary, {
            "fit/steps": model.fit_info["steps"], "fit/samples": len(final_idx),
            "time/fit_s": fit_seconds,
            "fit/images_per_s": len(final_idx) * model.fit_info["epochs"]
            / max(fit_seconds, 1e-9)})
        if logger is not None:
            for when, value in summary["backbone_checksum"].items():
                logger.experiment.set_tag(logger.run_id, f"backbone_sha256_{when}", value)
        state.data["finished"] = True
        state.save()
        ok = True
        print(f"[alfusion] {summary['mode']} {cfg.dataset.name} | {cfg.backbone.name} | "
              f"{cfg.probe.name} | test balanced accuracy {test['bal_acc']:.4f} "
              f"(results in {state.run_dir})")
        return summary
    finally:
        tracking.finish(logger, ok)


def save_model(run_dir: Path, model: End2EndModule, cfg, summary: dict, dims: list[int]
               ) -> None:
    """probe.pt (the probe, as cached mode saves it); fine-tuning also saves the backbone."""
    data = dict(state_dict=model.probe.state_dict(), dims=dims,
                config=OmegaConf.to_container(cfg, resolve=True),
                num_classes=summary["num_classes"], num_tokens=summary["num_tokens"],
                chosen=summary["chosen"], mode=summary["mode"])
    if model.encoder.trainable:
        data["backbone_state_dict"] = model.encoder.backbone.state_dict()
    torch.save(data, run_dir / "probe.pt")
