"""Layer taps: parity with timm/open_clip intermediates, prefix tokens, shapes, hub failures."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from alfusion.backbones import BackboneUnavailable, build_backbone

TINY_TIMM = dict(family="timm", name="vit_tiny_patch16_224", pretrained=False,
                 model_kwargs={"depth": 4}, img_size=32)


def timm_backbone(**overrides):
    return build_backbone(OmegaConf.create({**TINY_TIMM, **overrides}))[0]


@torch.no_grad()
def test_block_taps_match_timm_forward_intermediates():
    tapped = timm_backbone(tap="block", final="block")
    x = torch.randn(3, 3, 32, 32)
    out = tapped(x, all_tokens=True)
    inter = tapped.model.forward_intermediates(x, indices=[1, 2, 3], output_fmt="NLC",
                                               return_prefix_tokens=True,
                                               intermediates_only=True)
    for layer, (spatial, prefix) in enumerate(inter):
        torch.testing.assert_close(out.cls[:, layer], prefix[:, 0])
        torch.testing.assert_close(out.ap[:, layer], spatial.mean(dim=1))
    # The final output with the final norm is timm's normalised last intermediate.
    normed = timm_backbone(tap="block", final="norm")(x)
    (spatial, prefix), = tapped.model.forward_intermediates(
        x, indices=[3], norm=True, output_fmt="NLC", return_prefix_tokens=True,
        intermediates_only=True)
    torch.testing.assert_close(normed.cls[:, -1], prefix[:, 0])
    torch.testing.assert_close(normed.ap[:, -1], spatial.mean(dim=1))


@torch.no_grad()
def test_paper_tap_is_the_second_layernorm_of_each_block():
    tapped = timm_backbone()  # tap norm2, final norm: the paper's
    model = tapped.model
    x = torch.randn(2, 3, 32, 32)
    out = tapped(x, all_tokens=True)
    block_outputs = model.forward_intermediates(x, indices=[0, 1, 2], output_fmt="NLC",
                                                return_prefix_tokens=True,
                                                intermediates_only=True)
    for i, (spatial, prefix) in enumerate(block_outputs, start=1):
        h = torch.cat([prefix, spatial], dim=1)  # input of block i
        blk = model.blocks[i]
        expected = blk.norm2(h + blk.ls1(blk.attn(blk.norm1(h))))
        torch.testing.assert_close(out.tokens[:, i - 1], expected)
    torch.testing.assert_close(out.tokens[:, -1], model.forward_features(x))


@torch.no_grad()
def test_average_pool_excludes_register_tokens():
    tapped = build_backbone(OmegaConf.create(dict(
        family="timm", name="vit_small_patch14_reg4_dinov2", pretrained=False,
        model_kwargs={"depth": 2}, img_size=28)))[0]
    assert tapped.num_prefix_tokens == 5  # CLS + 4 registers
    out = tapped(torch.randn(2, 3, 28, 28), all_tokens=True)
    tokens = out.tokens[:, -1]
    torch.testing.assert_close(out.ap[:, -1], tokens[:, 5:].mean(dim=1))
    assert not torch.allclose(out.ap[:, -1], tokens[:, 1:].mean(dim=1))


@pytest.mark.parametrize("tap", ["norm2", "block"])
@pytest.mark.parametrize("final", ["norm", "block"])
@pytest.mark.parametrize("all_tokens", [False, True])
@torch.no_grad()
def test_shapes_for_every_tap_option(tap, final, all_tokens):
    out = timm_backbone(tap=tap, final=final)(torch.randn(2, 3, 32, 32), all_tokens=all_tokens)
    assert out.cls.shape == out.ap.shape == (2, 4, 192)  # layers 1..3 + final
    assert out.dims == [192] * 4
    assert (out.tokens is None) != all_tokens
    if all_tokens:
        assert out.tokens.shape == (2, 4, 1 + 4, 192)


@torch.no_grad()
def test_open_clip_taps_and_projected_final_layer():
    cfg = OmegaConf.create(dict(family="open_clip", name="ViT-B-32", pretrained=False))
    tapped, preprocess = build_backbone(OmegaConf.merge(cfg, dict(tap="block", final="block")))
    visual = tapped.model
    x = torch.randn(2, 3, 224, 224)
    out = tapped(x)
    inter = visual.forward_intermediates(x, indices=list(range(1, 12)), output_fmt="NLC",
                                         output_extra_tokens=True, intermediates_only=True)
    prefixes, spatials = inter["image_intermediates_prefix"], inter["image_intermediates"]
    for layer in range(11):
        torch.testing.assert_close(out.cls[:, layer], prefixes[layer][:, 0])
        torch.testing.assert_close(out.ap[:, layer], spatials[layer].mean(1))
    # The paper's last layer: every token after ln_post and the 768 -> 512 projection.
    paper = build_backbone(OmegaConf.merge(cfg, dict(tap="norm2", final="norm")))[0]
    out = paper(x)
    assert out.dims == [768] * 11 + [512]
    tokens = visual.ln_post(visual.transformer(visual._embeds(x))) @ visual.proj
    torch.testing.assert_close(out.cls[:, -1, :512], tokens[:, 0])
    torch.testing.assert_close(out.ap[:, -1, :512], tokens[:, 1:].mean(1))
    assert torch.all(out.cls[:, -1, 512:] == 0)  # zero-padded to the block width


@pytest.mark.parametrize("cfg", [
    dict(family="timm", name="vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    dict(family="open_clip", name="ViT-B-32", tag="openai"),
])
def test_unreachable_hub_fails_fast_with_the_fix(cfg, monkeypatch):
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        start = time.perf_counter()
        with pytest.raises(BackboneUnavailable, match="backbone.weights="):
            build_backbone(OmegaConf.create(cfg))
        assert time.perf_counter() - start < 10


def test_a_bad_preprocess_value_is_refused_naming_key_value_and_choices():
    from conftest import compose_config

    from alfusion.config_check import ConfigError, check_config

    with pytest.raises(ConfigError) as info:
        check_config(compose_config("backbone=dinov2_s", "backbone.preprocess=timm"))
    message = str(info.value)
    assert "backbone.preprocess='timm'" in message and "paper" in message and "model" in message
    check_config(compose_config("backbone=dinov2_s", "backbone.preprocess=model"))


def test_the_preprocessing_is_part_of_the_cache_fingerprint():
    """A cache extracted at timm's 518 px (preprocess=model) is never reused for the paper's
    224 px, nor one from before the setting existed (no preprocess key)."""
    from conftest import compose_config
    from omegaconf import open_dict

    from alfusion.data.cache import fingerprint_hash
    from alfusion.data.extract import feature_fingerprint

    paper = compose_config("backbone=dinov2_s")
    model = compose_config("backbone=dinov2_s", "backbone.preprocess=model")
    old = compose_config("backbone=dinov2_s")
    with open_dict(old):
        del old.backbone["preprocess"]
    hashes = {fingerprint_hash(feature_fingerprint(c, "train")) for c in (paper, model, old)}
    assert len(hashes) == 3
