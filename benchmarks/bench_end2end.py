"""End-to-end throughput: plain inference vs end-to-end ALF training vs fine-tuning.

    python benchmarks/bench_end2end.py            # CUDA: random ViT-B/16 at 224 px, bf16
    python benchmarks/bench_end2end.py --steps 5  # CPU: a small ViT, fp32 (a smoke version)

Prints images/s of each and the ratio (end-to-end ALF step time) / (inference pass time) over
the same images: the target on a GPU is <= 1.3 (the frozen backbone dominates; the probe and
its backward are small). Both training steps are the engine's ``BankStep`` on the
``TokenEncoder``'s tokens, as ``mode=end2end`` (a bank of one ALF probe, one jitter coin per
batch) and ``mode=finetune`` (a linear head with the backbone as trainable ``extra``
parameters, no jitter) run them. Images are synthetic tensors already on the device: this
measures the model side, not JPEG decoding.
"""

# ruff: noqa: I001  (alfusion must be imported before timm: its torchvision fix)
from __future__ import annotations

import argparse
import contextlib
import time

import alfusion  # noqa: F401  (torchvision fix before timm)
import timm
import torch
from omegaconf import OmegaConf

from alfusion.backbones.timm_vit import tap_model
from alfusion.end2end.encoder import TokenEncoder
from alfusion.engine import BankStep
from alfusion.probes import AttentiveProbe, LinearProbe
from alfusion.probes.bank import ProbeBank
from alfusion.protocol import HParams
from alfusion.tokens import TokenSet


def backbone_for(device: torch.device, cpu_size: str):
    name, img = ("vit_base_patch16_224", 224) if device.type == "cuda" else (cpu_size, 64)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img)
    tapped, _ = tap_model(model, OmegaConf.create(dict(tap="norm2", final="norm", img_size=img)))
    return tapped.to(device).eval().requires_grad_(False), img, name


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-model", default="vit_small_patch16_224")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device.type == "cuda" else 16)
    backbone, img, name = backbone_for(device, args.cpu_model)
    L, D, C = len(backbone.dims), backbone.width, 100
    images = torch.randn(batch, 3, img, img, device=device)
    labels = torch.randint(0, C, (batch,), device=device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())

    def inference():
        with torch.inference_mode(), amp:
            backbone(images)

    weights = torch.ones(C, device=device)
    total = 2 * args.steps + 2
    hp = HParams(lr=1e-3, wd=1e-4)
    encoder = TokenEncoder(backbone, TokenSet(tuple(range(1, L + 1)), "cls+ap")).to(device)
    bank = ProbeBank.fresh(lambda hp: AttentiveProbe(D, C, num_heads=2 * L), [hp], 0)
    alf = BankStep(bank.to(device), [hp], total, weights, seed=0, jitter="per_batch")

    def alf_step():
        with amp:
            alf.step(encoder(images), labels)

    t_inf = timed(inference, args.steps, device)
    t_alf = timed(alf_step, args.steps, device)

    ft_encoder = TokenEncoder(backbone, TokenSet((L,), "cls", flat=True), trainable=True)
    head = ProbeBank.fresh(lambda hp: LinearProbe(D, C), [hp], 0)
    finetune = BankStep(head.to(device), [hp], total, weights, seed=0, jitter="off",
                        extra=list(backbone.parameters()), extra_lr_scale=1e-3)

    def finetune_step():
        with amp:
            finetune.step(ft_encoder(images), labels)

    ft_encoder.train()
    t_ft = timed(finetune_step, max(2, args.steps // 2), device)
    ft_encoder.reset()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}),"
          f" {name} random weights, {img} px, batch {batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    for what, t in (("inference (extraction)", t_inf), ("end-to-end ALF step", t_alf),
                    ("fine-tuning step", t_ft)):
        print(f"  {what:24s} {batch / t:9.1f} images/s  ({t * 1e3:8.1f} ms/batch)")
    print(f"  ratio end-to-end ALF / inference: {t_alf / t_inf:.3f} (target <= 1.3 on GPU)")
    print(f"  ratio fine-tuning / inference:    {t_ft / t_inf:.3f}")


if __name__ == "__main__":
    main()
