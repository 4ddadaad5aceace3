"""End-to-end training: the backbone runs inside the training step (PROTOCOL.md 4).

``TokenEncoder`` maps images to exactly the tokens cached mode stores and stacks (the same
TappedBackbone and TokenSet), so a probe trained end to end is the same model as one trained on
the cache. Frozen (the default), the backbone stays in eval mode and runs without autograd;
``trainable`` makes it the fine-tuning baseline's backbone, with its pretrained weights kept so
every fit starts from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from alfusion.backbones import TappedBackbone
from alfusion.tokens import TokenSet, backbone_arrays
from alfusion.training import MIN_LR, NonFiniteLoss, ProbeModule, jitter

JITTER_MODES = ("per_batch", "per_sample", "off")


class TokenEncoder(nn.Module):
    """images (B, 3, H, W) -> tokens (B, T, D), or (B, F) for a flat token set."""

    def __init__(self, backbone: TappedBackbone, token_set: TokenSet,
                 trainable: bool = False, bf16: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.token_set = token_set
        self.trainable = trainable
        self.bf16 = bf16  # bf16 autocast on CUDA; CPU always runs fp32
        # Only a trainable backbone changes; its pretrained weights are kept (on the host) so that
        # every fit starts from them.
        self.pretrained = ({k: v.detach().clone().cpu() for k, v in backbone.state_dict().items()}
                           if trainable else None)
        self.reset()

    def reset(self) -> None:
        """Restore the pretrained weights; freeze them unless the encoder is trainable."""
        if self.pretrained is not None:
            self.backbone.load_state_dict(self.pretrained)
        self.backbone.requires_grad_(self.trainable)
        self.backbone.train(self.trainable and self.training)

    def train(self, mode: bool = True) -> TokenEncoder:
        super().train(mode)
        self.backbone.train(mode and self.trainable)  # a frozen backbone is always in eval mode
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (timm models) to fit larger batches."""
        model = self.backbone.model
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing: "
                             "set probe.grad_checkpointing=false")
        model.set_grad_checkpointing(enable)

    def _autocast(self, images: torch.Tensor):
        if self.bf16 and images.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grad = self.trainable and torch.is_grad_enabled()
        # no_grad rather than inference_mode: the probe saves these tokens for its backward.
        with torch.set_grad_enabled(grad), self._autocast(images):
            arrays = backbone_arrays(self.backbone, images, self.token_set)
        return self.token_set.from_arrays(arrays, self.backbone.dims)


def state_checksum(module: nn.Module) -> str:
    """sha256 over the state dict (names and bytes, in order): equal iff the weights are."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def jitter_per_batch(x: torch.Tensor, p: float, sigma: float) -> torch.Tensor:
    """With probability p, add N(0, sigma^2) noise to the whole batch (the paper's end-to-end
    mode flips one coin per batch)."""
    if p <= 0 or sigma <= 0 or float(torch.rand(())) >= p:
        return x
    return x + sigma * torch.randn_like(x)


class End2EndModule(ProbeModule):
    """ProbeModule whose batches are (images (B, 3, H, W), labels (B,)).

    Differences from cached training, all for reasons outside the probe: the jitter coin is
    configurable (``jitter_mode``), the weighted loss is normalised by the weight sum of the
    global batch (so DDP averages to the single-process loss), a trainable backbone joins the
    optimiser at ``backbone_lr_scale`` x lr, the random draws of a step (jitter, dropout) are a
    function of (seed, step, rank), so a resumed run draws what the uninterrupted one did, and
    a frozen backbone's weights are left out of checkpoints (the config rebuilds them).
    """

    def __init__(self, probe: nn.Module, hp, total_steps: int, weights: torch.Tensor,
                 encoder: TokenEncoder, jitter_mode: str = "per_batch", jitter_p: float = 0.5,
                 jitter_sigma: float = 0.05, backbone_lr_scale: float = 0.001,
                 seed: int = 0) -> None:
        if jitter_mode not in JITTER_MODES:
            raise ValueError(f"unknown jitter mode {jitter_mode!r}: use one of {JITTER_MODES}")
        super().__init__(probe, hp, total_steps, weights, jitter_p, jitter_sigma, encoder=encoder)
        self.jitter_mode = jitter_mode
        self.backbone_lr_scale = backbone_lr_scale
        self.seed = seed
        self.strict_loading = encoder.trainable  # frozen weights are not in the checkpoint

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            from alfusion.distributed import use_global_batchnorm

            use_global_batchnorm(self.probe)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Reseeding per step rather than restoring the generator from the checkpoint: Lightning
        # may consume draws around a restart (e.g. a DataLoader iterator for the finished epoch).
        torch.manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        if self.jitter_mode == "per_batch":
            return jitter_per_batch(x, self.jitter_p, self.jitter_sigma)
        if self.jitter_mode == "per_sample":
            return jitter(x, self.jitter_p, self.jitter_sigma)
        return x

    def training_step(self, batch, batch_idx):
        images, y = batch
        x = self._jitter(self.encoder(images))
        w = self.class_weights[y]
        total_w = w.sum().detach()
        world = self.trainer.world_size
        if world > 1:  # the global batch's weight sum, times world: DDP averages rank losses
            total_w = self.trainer.strategy.reduce(total_w, reduce_op="mean")
        per_sample = F.cross_entropy(self.probe(x).float(), y, reduction="none")
        loss = (w * per_sample).sum() / total_w
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {self.global_step} "
                                f"of configuration {self.hp.name}")
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                 sync_dist=world > 1)
        return loss

    def configure_optimizers(self):
        groups = [dict(params=list(self.probe.parameters()), lr=self.hp.lr)]
        if self.encoder.trainable:
            groups.append(dict(params=list(self.encoder.backbone.parameters()),
                               lr=self.hp.lr * self.backbone_lr_scale))
        opt = torch.optim.AdamW(groups, lr=self.hp.lr, weight_decay=self.hp.wd,
                                betas=(0.9, 0.999))
        # Cosine from each group's lr down to MIN_LR x (its lr / head lr): the head's schedule
        # (lr -> 1e-6) scaled, so the backbone keeps its 0.001 ratio all the way.
        floor = min(MIN_LR / self.hp.lr, 1.0)

        def factor(step: int) -> float:
            t = min(step, self.total_steps) / max(self.total_steps, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not self.encoder.trainable:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("encoder.")}
