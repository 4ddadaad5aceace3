"""The paper's feature pipeline, family by family, against an independent oracle
(tests/oracle_backbones.py): official checkpoint layouts with seeded random weights, real images,
every layer's CLS and AP; and the eval transform of each of the paper's 11 backbone configs."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import CONF, compose_config, run_cli
from omegaconf import OmegaConf
from oracle_backbones import (
    IMAGENET,
    dinov2_checkpoint,
    hub_pos_embed,
    hub_transform,
    mae_checkpoint,
    pil_transform,
    plain_vit_taps,
    random_vit_state,
    timm_vit_transform,
)
from PIL import Image
from sklearn.datasets import load_sample_image

from alfusion.backbones import WeightsMismatch, build_backbone
from alfusion.data.cache import FeatureCache
from alfusion.data.digits import DigitsDataset
from alfusion.data.extract import feature_fingerprint

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# The paper's transform of each backbone config (its code: thingsvision 2.7.2), as PIL + numpy.
PAPER_TRANSFORMS = {
    **dict.fromkeys(["vit_s", "vit_b", "vit_l"], timm_vit_transform),
    **dict.fromkeys(["dinov2_s", "dinov2_b", "dinov2_l", "mae_b", "mae_l"], hub_transform),
    **dict.fromkeys(["clip_b32", "clip_b16", "clip_l14"],
                    lambda im: pil_transform(im, 224, 224, Image.BICUBIC, OPENAI_CLIP)),
}


def photos() -> list[Image.Image]:
    """Real photographs of two shapes: sklearn's bundled 427 x 640 china.jpg and a portrait
    crop of it."""
    china = Image.fromarray(load_sample_image("china.jpg"))
    return [china, china.crop((100, 0, 400, 427))]


def assert_close_per_layer(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """(N, L, D) against (N, L, D): every layer's cosine >= 0.9999 and relative L2 <= 1 %."""
    got, want = got.float(), want.float()
    for layer in range(want.shape[1]):
        g, w = got[:, layer].flatten(), want[:, layer].flatten()
        cosine = float(torch.nn.functional.cosine_similarity(g, w, dim=0))
        rel = float((g - w).norm() / w.norm())
        assert cosine >= 0.9999 and rel <= 0.01, f"{what} layer {layer + 1}: {cosine=}, {rel=}"


def cached_arrays(tmp_path, *overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``python -m alfusion task=extract ...`` (the real CLI), then the cached train CLS, AP."""
    args = ["task=extract", "dataset.limit=6", f"paths.root={tmp_path}", *overrides]
    run_cli(*args)
    cfg = compose_config(*args)
    entry = FeatureCache(cfg.paths.cache).load(feature_fingerprint(cfg, "train"))
    return (torch.from_numpy(np.array(entry.array("cls"))),
            torch.from_numpy(np.array(entry.array("ap"))))


def digit_images(n: int = 6) -> list[Image.Image]:
    data = DigitsDataset("train", limit=n)
    return [data[i][0] for i in range(n)]


def test_dinov2_checkpoint_through_the_cli_matches_the_paper_pipeline(tmp_path):
    """DINOv2-S/14 (3 blocks) in DINOv2's checkpoint layout, task=extract backbone=dinov2_s."""
    state = dinov2_checkpoint(width=384, depth=3, seed=1)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    cls, ap = cached_arrays(tmp_path, "backbone=dinov2_s", "+backbone.model_kwargs={depth:3}",
                            f"backbone.weights={tmp_path / 'dinov2_vits14_pretrain.pth'}")
    images = torch.stack([hub_transform(im) for im in digit_images()])
    want_cls, want_ap = plain_vit_taps(state, images, heads=6,
                                       pos_embed=hub_pos_embed(state["pos_embed"], 16))
    assert cls.shape == (6, 3, 384)
    assert_close_per_layer(cls, want_cls, "CLS")
    assert_close_per_layer(ap, want_ap, "AP")


def test_mae_checkpoint_through_the_cli_matches_the_paper_pipeline(tmp_path):
    """MAE-B/16 (2 blocks) in MAE's checkpoint layout ("model" key, decoder tensors beside)."""
    checkpoint = mae_checkpoint(width=768, depth=2, seed=2)
    torch.save(checkpoint, tmp_path / "mae_pretrain_vit_base.pth")
    cls, ap = cached_arrays(tmp_path, "backbone=mae_b", "+backbone.model_kwargs={depth:2}",
                            f"backbone.weights={tmp_path / 'mae_pretrain_vit_base.pth'}")
    state = checkpoint["model"]
    images = torch.stack([hub_transform(im) for im in digit_images()])
    want_cls, want_ap = plain_vit_taps(state, images, heads=12, pos_embed=state["pos_embed"])
    assert cls.shape == (6, 2, 768)
    assert_close_per_layer(cls, want_cls, "CLS")
    assert_close_per_layer(ap, want_ap, "AP")


def test_timm_safetensors_vit_matches_the_paper_pipeline(tmp_path):
    from safetensors.torch import save_file

    state = random_vit_state(width=384, depth=3, patch=16, grid=14, layer_scale=False, seed=3)
    save_file(state | {"head.weight": torch.zeros(1000, 384), "head.bias": torch.zeros(1000)},
              str(tmp_path / "model.safetensors"))
    cfg = OmegaConf.load(CONF / "backbone" / "vit_s.yaml")
    cfg.weights, cfg.model_kwargs = str(tmp_path), {"depth": 3}  # timm's hub folder
    backbone, transform = build_backbone(cfg)
    images = photos()
    got = torch.stack([transform(im) for im in images])
    want = torch.stack([timm_vit_transform(im) for im in images])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        out = backbone(want)
    want_cls, want_ap = plain_vit_taps(state, want, heads=6, pos_embed=state["pos_embed"])
    assert_close_per_layer(out.cls, want_cls, "CLS")
    assert_close_per_layer(out.ap, want_ap, "AP")


def test_dinov2_position_embeddings_are_the_hub_models_not_timms():
    cfg = OmegaConf.load(CONF / "backbone" / "dinov2_s.yaml")
    cfg.pretrained, cfg.model_kwargs = False, {"depth": 1}
    paper = build_backbone(cfg)[0].model
    native = build_backbone(OmegaConf.merge(cfg, {"preprocess": "model"}))[0].model
    assert native.pos_embed.shape == (1, 1 + 37 * 37, 384)  # timm's own: 518 px
    assert paper.pos_embed.shape == (1, 1 + 16 * 16, 384)  # the paper's: 224 px
    hub = hub_pos_embed(native.pos_embed.detach(), 16)
    torch.testing.assert_close(paper.pos_embed.detach(), hub, atol=0, rtol=0)
    native.set_input_size(img_size=(224, 224))  # timm's own resampling: other numbers
    assert (native.pos_embed - hub).abs().max() > 1e-3


def test_a_file_of_another_architecture_is_refused_naming_the_mismatch(tmp_path):
    torch.save(dinov2_checkpoint(width=768, depth=2), tmp_path / "dinov2_vitb14_pretrain.pth")
    cfg = OmegaConf.load(CONF / "backbone" / "dinov2_s.yaml")
    cfg.weights, cfg.model_kwargs = str(tmp_path / "dinov2_vitb14_pretrain.pth"), {"depth": 2}
    with pytest.raises(WeightsMismatch) as err:
        build_backbone(cfg)
    message = str(err.value)
    assert "pos_embed: file (1, 1370, 768) vs model (1, 1370, 384)" in message
    assert "the file holds a vit of width 768, 2 blocks, patch 14" in message.lower()
    assert "is a ViT of width 384, 2 blocks, patch 14" in message


def test_a_full_size_mismatch_names_the_config_that_fits():
    from alfusion.backbones.weights import describe, vit_shape

    state = dinov2_checkpoint(width=768, depth=12)
    assert describe(vit_shape(state)) == ("a ViT of width 768, 12 blocks, patch 14 "
                                          "(backbone=dinov2_b)")


def test_a_checkpoint_that_would_execute_code_is_refused(tmp_path):
    checkpoint = mae_checkpoint(width=768, depth=1)
    checkpoint["args"] = argparse.Namespace(lr=0.1)  # a pickled object, not a tensor
    torch.save(checkpoint, tmp_path / "mae.pth")
    cfg = OmegaConf.load(CONF / "backbone" / "mae_b.yaml")
    cfg.weights, cfg.model_kwargs = str(tmp_path / "mae.pth"), {"depth": 1}
    with pytest.raises(ValueError, match="without executing code"):
        build_backbone(cfg)


TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 1}}


def test_open_clip_checkpoint_loads_and_a_wrong_one_is_refused(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(4)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    save_file(model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    cfg = OmegaConf.load(CONF / "backbone" / "clip_b32.yaml")
    cfg.weights, cfg.model_kwargs = str(tmp_path / "open_clip_model.safetensors"), TINY_CLIP
    visual = build_backbone(cfg)[0].model
    for name, value in model.visual.state_dict().items():
        torch.testing.assert_close(visual.state_dict()[name], value, atol=0, rtol=0)
    wide = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], width=128))
    save_file(open_clip.create_model("ViT-B-32", pretrained=None, **wide).state_dict(),
              str(tmp_path / "wide.safetensors"))
    cfg.weights = str(tmp_path / "wide.safetensors")
    with pytest.raises(WeightsMismatch, match="visual.conv1.weight: file \\(128, 3, 32, 32\\)"):
        build_backbone(cfg)


@pytest.mark.parametrize("key", sorted(PAPER_TRANSFORMS))
def test_each_paper_backbone_config_preprocesses_as_the_paper(key):
    """The composed config of each of the paper's backbones, built with random weights (no
    hub), transforms real photos as the paper's code does. The timm models are built with 2
    blocks (their transform and input size come from the name's data config, not the depth:
    full ViT-L builds would add half a minute); the OpenCLIP towers in full."""
    depth = [] if key.startswith("clip") else ["+backbone.model_kwargs={depth:2}"]
    cfg = compose_config(f"backbone={key}", "+backbone.pretrained=false", *depth).backbone
    assert cfg.preprocess == "paper"
    backbone, transform = build_backbone(cfg)
    for image in photos():
        torch.testing.assert_close(transform(image), PAPER_TRANSFORMS[key](image),
                                   atol=1e-5, rtol=0)
    if key.startswith("dinov2"):  # 224 px: a 16 x 16 grid, not timm's 37 x 37
        assert backbone.model.pos_embed.shape[1] == 1 + 16 * 16
    del backbone


def test_preprocess_model_keeps_the_models_own_transform():
    cfg = compose_config("backbone=mae_b", "+backbone.pretrained=false",
                         "+backbone.model_kwargs={depth:1}", "backbone.preprocess=model").backbone
    transform = build_backbone(cfg)[1]
    image = photos()[0]
    want = pil_transform(image, 248, 224, Image.BICUBIC, IMAGENET)  # timm's: crop_pct 0.9
    torch.testing.assert_close(transform(image), want, atol=1e-5, rtol=0)
