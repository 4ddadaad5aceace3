"""The inputs of ``mode=end2end`` and ``mode=finetune`` runs: images and the TokenEncoder.

Frozen (end2end), the backbone runs inside the engine's training step and one forward per
batch feeds every probe of the grid; trainable (finetune), it trains with a bank of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset

from alfusion.backbones import build_backbone
from alfusion.data import build_dataset
from alfusion.data.loaders import augment_transform, labels_of
from alfusion.end2end.encoder import TokenEncoder
from alfusion.engine import ImageData
from alfusion.engine.data import STREAM_SPLIT_REFUSED
from alfusion.search import expand_grid
from alfusion.tokens import TokenSet, build_token_set


@dataclass
class ImageInputs:
    train: ImageData
    test: ImageData
    token_set: TokenSet
    dims: list[int]
    num_tokens: int | None


def first_image(dataset) -> torch.Tensor:
    """One transformed image (3, H, W) of a dataset (map-style or streamed)."""
    item = dataset[0] if not isinstance(dataset, IterableDataset) else next(iter(dataset))
    return item[0]


def build_encoder(cfg, backbone_state: dict | None = None) -> tuple[TokenEncoder, object]:
    """(the run's TokenEncoder, the backbone's eval transform); ``backbone_state``: weights
    of a fine-tuned backbone to load (task=evaluate)."""
    backbone, eval_tf = build_backbone(cfg.backbone)
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    token_set = build_token_set(cfg.probe, num_layers=len(backbone.dims))
    trainable = cfg.mode.name == "finetune"
    encoder = TokenEncoder(backbone, token_set, trainable=trainable)
    if trainable and cfg.mode.get("grad_checkpointing"):
        encoder.set_grad_checkpointing(True)
    return encoder, eval_tf


def image_inputs(cfg, encoder: TokenEncoder, eval_tf, device: torch.device,
                 splits=("train", "test")) -> ImageInputs:
    """Datasets, labels and probe sizes of an image-fed run. A streamed train split cannot be
    split for validation, a grid or few-shot: refused before any pass over it."""
    encoder.to(device)
    settings = cfg.end2end
    datasets = {}
    for split in splits:
        plain = build_dataset(cfg.dataset, split, eval_tf)
        train_tf = augment_transform(eval_tf, cfg.backbone.get("img_size")) \
            if settings.augment and split == "train" else None
        shown = build_dataset(cfg.dataset, split, train_tf) if train_tf else plain
        datasets[split] = (shown, plain)
    if "train" in datasets and isinstance(datasets["train"][0], IterableDataset):
        grid = expand_grid(cfg.search, attentive=cfg.probe.kind == "attentive")
        if cfg.search.validate or len(grid) > 1 or cfg.get("fewshot_k"):
            raise ValueError(STREAM_SPLIT_REFUSED)
    any_split = next(iter(datasets.values()))[1]
    with torch.no_grad():
        was = encoder.training
        probe_input = encoder.eval()(first_image(any_split)[None].to(device))
        encoder.train(was)
    parts = {split: ImageData(shown, plain, labels_of(plain, settings.num_workers), encoder,
                              settings, tuple(probe_input.shape[1:]))
             for split, (shown, plain) in datasets.items()}
    num_tokens = probe_input.shape[1] if probe_input.dim() == 3 else None
    return ImageInputs(parts.get("train"), parts.get("test"), encoder.token_set,
                       encoder.backbone.dims, num_tokens)
