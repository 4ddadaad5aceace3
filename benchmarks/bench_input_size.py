"""Extraction cost of the paper's input size vs timm's: the DINOv2-L/14 architecture (random
weights, seeded) at 224 px (``backbone.preprocess=paper``) and at 518 px (``preprocess=model``).

Both backbones are built from ``conf/backbone/dinov2_l.yaml`` through ``build_backbone``; each
mode's own transform prepares the same real images (digits); the tapped forward (24 layers,
CLS + AP) is timed in interleaved rounds, best round kept. Printed: seconds per image, the
ratio 518 / 224, the patch tokens per image, and the cache bytes per image: a CLS/AP entry
(layers x 2 x D fp16, the same at both sizes) and an all-tokens entry of one layer
((1 + patches) x D fp16).

    python -m benchmarks.bench_input_size [--images 2] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from omegaconf import OmegaConf

import alfusion  # noqa: F401  (torchvision fix before timm)
from alfusion.backbones import build_backbone
from alfusion.config_check import CONF
from alfusion.data.digits import digits_split, render

FP16_BYTES = 2


def build(preprocess: str, blocks: int | None):
    cfg = OmegaConf.load(CONF / "backbone" / "dinov2_l.yaml")
    cfg.pretrained, cfg.preprocess = False, preprocess
    if blocks:
        cfg.model_kwargs = {"depth": blocks}
    return build_backbone(cfg)


@torch.no_grad()
def seconds_per_image(backbone, x: torch.Tensor) -> float:
    start = time.perf_counter()
    backbone(x)
    return (time.perf_counter() - start) / len(x)


def main(images: int = 2, rounds: int = 2, threads: int | None = None,
         blocks: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    pictures, _ = digits_split("train", limit=images)
    modes = {}
    for mode in ("paper", "model"):
        backbone, transform = build(mode, blocks)
        x = torch.stack([transform(render(p)) for p in pictures])
        modes[mode] = dict(backbone=backbone, x=x, times=[])
        seconds_per_image(backbone, x[:1])  # warm-up
    for _ in range(rounds):  # interleaved, so that a load change hits both alike
        for run in modes.values():
            run["times"].append(seconds_per_image(run["backbone"], run["x"]))
    result = {}
    for mode, run in modes.items():
        out = run["backbone"](run["x"][:1])
        layers, dim = out.cls.shape[1:]
        patches = out.grid[0] * out.grid[1]
        result[mode] = dict(px=run["x"].shape[-1], patches=patches,
                            s_per_image=min(run["times"]),
                            cls_ap_bytes=layers * 2 * dim * FP16_BYTES,
                            all_tokens_bytes_per_layer=(1 + patches) * dim * FP16_BYTES)
    paper, model = result["paper"], result["model"]
    print(f"DINOv2-L/14 architecture, random weights, {blocks or 24} blocks, {images} digits "
          f"images, best of {rounds} rounds, {torch.get_num_threads()} threads, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip())
    for mode, r in result.items():
        print(f"  {mode:5s} {r['px']} px: {r['patches']} patches, {r['s_per_image']:.2f} s/image, "
              f"cache per image: CLS/AP {r['cls_ap_bytes']:,} B, all tokens of one layer "
              f"{r['all_tokens_bytes_per_layer']:,} B")
    print(f"  518 / 224 px: {model['s_per_image'] / paper['s_per_image']:.2f}x time, "
          f"{model['patches'] / paper['patches']:.2f}x patches, all-token cache "
          f"{model['all_tokens_bytes_per_layer'] / paper['all_tokens_bytes_per_layer']:.2f}x, "
          f"CLS/AP cache {model['cls_ap_bytes'] / paper['cls_ap_bytes']:.2f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None,
                        help="fewer blocks for a quick look (default: all 24)")
    args = parser.parse_args()
    main(args.images, args.rounds, args.threads, args.blocks)
