"""``Probe``: a trained alfusion probe with its backbone and preprocessing, in Python.

    probe = alfusion.Probe.load("runs:/<run id>")           # or a probe.pt, a run folder,
    probe.predict(["a.png", "b.png"])                       # models:/<name>/<version>, ...
    probe.predict_proba("images/")                          # (N, C), columns probe.classes
    probe.layer_weights("images/")                          # the heatmap's attention cells

Images go through the probe's own backbone (a fine-tuned one with the weights from probe.pt),
the backbone's eval transform and the probe's token set, as in task=predict; the tokens of a
probe trained on cached features pass through fp16 as the feature cache stores them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from alfusion.api.images import image_tokens, read_images
from alfusion.probe_files import read_probe, resolve_probe_file, saved_module, saved_probe

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"  # the CLI's store (paths.root=outputs)


def default_tracking_uri() -> str:
    """MLflow's tracking URI where one is set (MLFLOW_TRACKING_URI, mlflow.set_tracking_uri),
    else the store the CLI logs to from this folder."""
    import mlflow.tracking._tracking_service.utils as mlflow_uri

    if mlflow_uri.is_tracking_uri_set():
        return mlflow_uri.get_tracking_uri()
    return DEFAULT_TRACKING_URI


class Probe:
    """A trained probe: ``classes`` (C names), ``config`` (the training run's resolved config),
    ``metrics`` (its validation and test metrics), ``mode``, ``source`` (where it came from)."""

    def __init__(self, saved: dict, source: str = "", device: str = "auto",
                 batch_size: int = 64) -> None:
        from alfusion.data import class_names
        from alfusion.distributed import resolve_device

        self.saved = saved
        self.source = source
        self.config: DictConfig = OmegaConf.create(saved["config"])
        self.classes: list[str] = list(saved.get("class_names") or class_names(
            self.config.dataset, saved["num_classes"]))
        self.metrics: dict = dict(saved.get("metrics") or {})
        self.mode: str = str(saved.get("mode") or self.config.mode.name)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._parts = None  # (backbone, transform, token set, bank, module): built on first use

    @classmethod
    def load(cls, location: str | os.PathLike, *, tracking_uri: str | None = None,
             device: str = "auto", batch_size: int = 64) -> Probe:
        """The probe at ``location``: a probe.pt, a run folder, an MLflow model folder, or a URI
        MLflow resolves (``runs:/<run id>``, ``runs:/<run id>/probe.pt``,
        ``models:/<name>/<version>``), read through ``tracking_uri`` (default: MLflow's
        tracking URI where one is set, else the CLI's store ``sqlite:///outputs/mlflow.db``)."""
        location = str(location)
        tmp = Path(tempfile.mkdtemp(prefix="alfusion-probe-"))
        try:
            path = resolve_probe_file(location, tracking_uri or default_tracking_uri(), tmp,
                                      key="location")
            saved = read_probe(path, key="location")
            # probe.pt is memory-mapped: take the tensors into memory before the download goes
            saved = {k: ({n: t.clone() for n, t in v.items()} if k.endswith("state_dict")
                         else v) for k, v in saved.items()}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(saved, location, device=device, batch_size=batch_size)

    def __repr__(self) -> str:
        c = self.config
        return (f"Probe({self.mode} | {c.dataset.name} | {c.backbone.name} | {c.probe.name}, "
                f"{len(self.classes)} classes, test {self.metrics.get('test', {})})")

    def _build(self):
        if self._parts is None:
            from alfusion.backbones import build_backbone
            from alfusion.tokens import build_token_set

            backbone, transform = build_backbone(self.config.backbone)
            if self.saved.get("backbone_state_dict") is not None:  # fine-tuned
                backbone.load_state_dict(self.saved["backbone_state_dict"])
            token_set = build_token_set(self.config.probe, num_layers=len(backbone.dims))
            bank = saved_probe(self.saved, self.config, token_set, self.device)
            module = saved_module(self.saved, self.config, token_set).to(self.device)
            self._parts = backbone.to(self.device), transform, token_set, bank, module
        return self._parts

    @property
    def backbone(self) -> torch.nn.Module:
        """The probe's backbone with its layer taps (a fine-tuned one with its trained
        weights), frozen, in eval mode."""
        return self._build()[0]

    def tokens(self, images) -> torch.Tensor:
        """The probe's input tokens (N, T, D) (or (N, F) for a linear probe) of ``images``: a
        folder, an image file, a PIL image, image bytes or a list of them."""
        backbone, transform, token_set, _, _ = self._build()
        pil, _ = read_images(images)
        return image_tokens(backbone, transform, token_set, pil, self.device, self.batch_size,
                            as_cached=self.mode == "cached")

    def logits(self, images) -> torch.Tensor:
        """(N, C) logits, computed by the engine's arithmetic (as task=predict does)."""
        bank = self._build()[3]
        x = self.tokens(images)
        return torch.cat([bank.logits(x[i:i + 4096])[0] for i in range(0, len(x), 4096)]).cpu()

    def predict_proba(self, images) -> np.ndarray:
        """(N, C) softmax probabilities; column j is class ``classes[j]``."""
        return self.logits(images).float().softmax(dim=1).numpy()

    def predict(self, images) -> np.ndarray:
        """(N,) the predicted class name of each image."""
        index = self.logits(images).argmax(dim=1).numpy()
        return np.asarray(self.classes, dtype=object)[index]

    def layer_weights(self, images):
        """The probe's attention over layers on ``images``, as its heatmap shows it: a pandas
        DataFrame with a row per token kind (CLS, AP, regions, ...) and a column per layer,
        averaged over images and heads (all cells sum to 1). Attentive probes only."""
        import pandas as pd

        from alfusion.analysis.attention import layer_attention
        from alfusion.probes.attentive import AttentiveProbe

        backbone, transform, token_set, _, module = self._build()
        if not isinstance(module, AttentiveProbe):
            raise ValueError(f"probe {self.config.probe.name} is linear: it has no attention "
                             "over layers (train an attentive probe, e.g. probe=alf)")
        layout = None
        if token_set.tokens == "all":
            from alfusion.data.extract import token_layout

            layout = token_layout(backbone.cpu(), transform)
            backbone.to(self.device)
        att = layer_attention(module, self.tokens(images), token_set, layout)
        frame = pd.DataFrame(att.grid(), index=att.kinds, columns=att.layers)
        frame.columns.name, frame.index.name = "layer", "token"
        return frame
