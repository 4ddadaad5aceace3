"""Both axes: region tokens and all tokens of any layer set, from the taps to the cache, the
live encoder, the size budget and the attention artifacts."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides
from omegaconf import OmegaConf

from alfusion.backbones import build_backbone, open_clip_vit
from alfusion.data import build_dataset, with_transform
from alfusion.data.extract import CacheTooLarge, load_or_extract
from alfusion.end2end.encoder import TokenEncoder
from alfusion.probes import build_probe
from alfusion.tokens import TokenSet, build_token_set


def expected_regions(tokens: torch.Tensor, prefix: int, grid: tuple[int, int], k: int
                     ) -> torch.Tensor:
    """tokens (B, N, D) -> (B, k*k, D): region (i, j) is the mean of the patch tokens in rows
    floor(i*rows/k) .. ceil((i+1)*rows/k) - 1 (columns likewise), indexed one by one."""
    rows, cols = grid
    out = []
    for i in range(k):
        for j in range(k):
            r_range = range(i * rows // k, math.ceil((i + 1) * rows / k))
            c_range = range(j * cols // k, math.ceil((j + 1) * cols / k))
            index = [prefix + r * cols + c for r in r_range for c in c_range]
            out.append(tokens[:, index].mean(dim=1))
    return torch.stack(out, dim=1)


def check_regions(tapped, images: torch.Tensor, grid: tuple[int, int], k: int) -> None:
    out = tapped(images, all_tokens=True, regions=k)
    assert out.grid == grid
    assert tuple(out.regions.shape) == (len(images), len(tapped.dims), k * k, tapped.width)
    for layer in range(len(tapped.dims)):
        expected = expected_regions(out.tokens[:, layer], tapped.num_prefix_tokens, grid, k)
        torch.testing.assert_close(out.regions[:, layer], expected)


@torch.no_grad()
@pytest.mark.parametrize(("img_size", "k"), [(64, 2), (64, 4), (80, 2), (80, 4), (112, 3)])
def test_timm_regions_are_means_of_their_patches(img_size, k):
    """4 x 4 grid (k divides it), 5 x 5 and 7 x 7 (unequal, overlapping regions)."""
    tapped = build_backbone(OmegaConf.create(dict(
        family="timm", name="vit_tiny_patch16_224", pretrained=False,
        model_kwargs={"depth": 3}, img_size=img_size)))[0]
    side = img_size // 16
    check_regions(tapped, torch.randn(2, 3, img_size, img_size), (side, side), k)


@torch.no_grad()
@pytest.mark.parametrize(("img_size", "k"), [(56, 2), (70, 2), (70, 4)])
def test_register_tokens_are_never_pooled_into_a_region(img_size, k):
    tapped = build_backbone(OmegaConf.create(dict(
        family="timm", name="vit_small_patch14_reg4_dinov2", pretrained=False,
        model_kwargs={"depth": 2}, img_size=img_size)))[0]
    assert tapped.num_prefix_tokens == 5  # CLS + 4 registers, excluded as from AP
    side = img_size // 14
    check_regions(tapped, torch.randn(2, 3, img_size, img_size), (side, side), k)


@torch.no_grad()
@pytest.mark.parametrize(("image_size", "ks"), [(224, (2, 4)), (128, (2, 4))])
def test_open_clip_regions_are_means_of_their_patches(image_size, ks):
    """ViT-B/32: 7 x 7 patches at 224 px (neither k divides), 4 x 4 at 128 px (both do); the
    final layer is the projected output (512 of 768 wide, zero-padded like CLS and AP)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=image_size)
    cfg = OmegaConf.create(dict(name="ViT-B-32", tap="norm2", final="norm"))
    tapped = open_clip_vit.tap_model(model.visual, None, cfg)[0].eval()
    images = torch.randn(2, 3, image_size, image_size)
    for k in ks:
        check_regions(tapped, images, (image_size // 32, image_size // 32), k)


def test_token_order_cls_then_ap_then_regions_layer_by_layer():
    n, L, D, k = 2, 6, 64, 2
    cls, ap = torch.randn(n, L, D), torch.randn(n, L, D)
    regions = torch.randn(n, L, k * k, D)
    token_set = TokenSet((2, 4, 6), "cls+ap+regions", regions=k)
    x = token_set(cls, ap, None, [D] * L, regions=regions)
    assert tuple(x.shape) == (n, 3 + 3 + 3 * 4, D) == (n, token_set.num_tokens(), D)
    expected = torch.cat([cls[:, [1, 3, 5]], ap[:, [1, 3, 5]],
                          regions[:, 1], regions[:, 3], regions[:, 5]], dim=1)
    torch.testing.assert_close(x, torch.nn.functional.normalize(expected, dim=-1))
    only = TokenSet((6,), "regions", regions=k)(None, None, None, [D] * L, regions=regions)
    torch.testing.assert_close(only, torch.nn.functional.normalize(regions[:, 5], dim=-1))
    flat = TokenSet((2, 4, 6), "ap+regions", flat=True, regions=k)
    assert flat(cls, ap, None, [D] * L, regions=regions).shape == (n, 15 * D)
    assert flat.width([D] * L) == 15 * D


def test_region_settings_are_checked_and_heads_default_per_token_kind():
    def cfg(*overrides):
        return compose_config("probe=alf", *overrides).probe

    with pytest.raises(ValueError, match="probe.regions=k"):
        build_token_set(cfg("probe.tokens=cls+ap+regions"), 12)
    with pytest.raises(ValueError, match="probe.tokens=cls\\+ap\\+regions"):
        build_token_set(cfg("probe.regions=2"), 12)
    # ALF keeps one head per token; region and all-token sets default to AAT's 8 heads.
    alf = cfg()
    assert build_probe(alf, build_token_set(alf, 12), [384] * 12, 10, 24).num_heads == 24
    regions = cfg("probe.tokens=cls+ap+regions", "probe.regions=4")
    token_set = build_token_set(regions, 12)
    assert token_set.num_tokens() == 24 + 12 * 16
    assert build_probe(regions, token_set, [384] * 12, 10, 216).num_heads == 8
    given = cfg("probe.tokens=cls+ap+regions", "probe.regions=2", "probe.num_heads=12")
    assert build_probe(given, build_token_set(given, 12), [384] * 12, 10, 72).num_heads == 12


@torch.no_grad()
@pytest.mark.parametrize("probe", [["probe=aat_quarterly"],
                                   ["probe=alf", "probe.tokens=cls+ap+regions",
                                    "probe.regions=2"]])
def test_cached_tokens_equal_the_live_encoders(tmp_path, probe):
    """The cache (fp16) and mode=end2end's TokenEncoder give the same tokens; an 8-layer tiny
    ViT at 64 px: quarterly = layers 2, 4, 6, 8, 17 tokens each."""
    cfg = compose_config(*tiny_overrides(tmp_path, "dataset.limit=12", "backbone.img_size=64",
                                         "backbone.model_kwargs.depth=8", *probe))
    entry = load_or_extract(cfg, "test")
    token_set = build_token_set(cfg.probe, len(entry.dims))
    arrays = {n: entry.tensor(n) for n in ("cls", "ap", "tokens", "regions") if entry.has(n)}
    cached = token_set.from_arrays(arrays, entry.dims)

    backbone, transform = build_backbone(cfg.backbone)
    dataset = with_transform(build_dataset(cfg.dataset, "test"), transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    live = TokenEncoder(backbone, token_set).eval()(images)
    torch.testing.assert_close(cached, live, atol=2e-3, rtol=1e-2)
    if token_set.tokens == "all":
        assert token_set.layers == (2, 4, 6, 8)
        assert entry.meta["fingerprint"]["all_tokens"] == "quarterly"
        assert list(entry.array("tokens").shape) == [12, 4, 17, 192]
        assert tuple(cached.shape) == (12, 4 * 17, 192)
        assert entry.meta["token_layout"] == dict(tokens_per_layer=17, num_prefix_tokens=1,
                                                  class_token=True, grid=[4, 4])
    else:
        assert entry.meta["fingerprint"]["regions"] == 2
        assert list(entry.array("regions").shape) == [12, 8, 4, 192]
        assert tuple(cached.shape) == (12, 16 + 8 * 4, 192)


def test_an_oversized_cache_is_refused_before_any_extraction(tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path, "probe=aat_quarterly",
                                         "extract.max_cache_gb=0.0001"))
    start = time.perf_counter()
    with pytest.raises(CacheTooLarge) as err:
        load_or_extract(cfg, "train")
    assert time.perf_counter() - start < 20
    message = str(err.value)
    # 60 train + 60 test images x (4 layers x 5 tokens + 2 x 4 CLS/AP) x 192 x 2 bytes
    assert "60 train + 60 test images" in message and "0.0 GB" not in message
    for hint in ("extract.max_cache_gb=0.0001", "mode=end2end", "probe.layers=",
                 "probe.tokens=cls+ap+regions"):
        assert hint in message
    assert not Path(cfg.paths.cache).exists()  # no entry, no partial folder, no lock


@pytest.mark.parametrize(("name", "extra", "kinds"), [
    ("alf", ["probe.tokens=cls+ap+regions", "probe.regions=2"], ["CLS", "AP", "regions"]),
    ("aat_quarterly", ["backbone.img_size=64"], ["CLS", "patches"]),
])
def test_attention_artifacts_of_region_and_all_token_runs(tmp_path, name, extra, kinds):
    from mlflow.tracking import MlflowClient

    run_cli(*tiny_overrides(tmp_path, f"probe={name}", *extra))
    results = json.loads(next(tmp_path.glob(f"runs/*_{name}/results.json")).read_text())
    folder = Path(results["run_dir"]) / "attention"
    for file in ("layer_attention.png", "layer_attention_heads.png", "layer_attention.json",
                 "spatial_attention.png"):
        assert (folder / file).stat().st_size > 0
    data = json.loads((folder / "layer_attention.json").read_text())
    assert data["kinds"] == kinds and data["layers"] == [1, 2, 3, 4]
    assert sum(data["layer_mass"].values()) == pytest.approx(1.0, abs=1e-5)
    assert results["analysis"]["attention_layer_mass"] is not None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(results["mlflow_run_id"], "attention")}
    assert "attention/spatial_attention.png" in logged
