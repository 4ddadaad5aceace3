"""Today's ViT families (DINOv3, SigLIP 2, PE-core, AIMv2, EVA-02, DINOv2 with registers) and
``backbone=timm``: each family's cached CLS / AP / pool, extracted through its config and a
weights file of seeded random weights (2 narrow blocks), against the model's own code
(tests/oracle_families.py), layer by layer; the refusals that depend on the backbone; and a
short ALF run on every new family config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from oracle_families import SMALL, build, load_own, meta_dinov3_layout, own_tokens, own_transform
from safetensors.torch import save_file

from alfusion.app import compose, run
from alfusion.config_check import ConfigError
from alfusion.data.cache import FeatureCache
from alfusion.data.digits import DigitsDataset
from alfusion.data.extract import feature_fingerprint

SMALL_KWARGS = "{" + ",".join(f"{k}:{v}" for k, v in SMALL.items()) + "}"
N = 6
# key: (timm architecture, prefix tokens, class token, final norm is fc_norm, input sizes)
FAMILIES = {
    "dinov3_s": ("vit_small_patch16_dinov3", 5, True, False, (32, 48)),  # RoPE
    "siglip2_b": ("vit_base_patch16_siglip_224", 0, False, False, (32,)),  # MAP head
    "pe_core_b": ("vit_pe_core_base_patch16_224", 1, True, False, (32, 48)),  # RoPE, pool
    "aimv2_l": ("aimv2_large_patch14_224", 0, False, False, (28,)),
    "eva02_b": ("eva02_base_patch14_224", 1, True, True, (28, 42)),  # RoPE, fc_norm
    "dinov2_reg_b": ("vit_base_patch14_reg4_dinov2", 5, True, False, (28,)),  # registers
}


def assert_close_per_layer(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """(N, L, D) against (N, L, D): cosine >= 0.9999 at every layer."""
    for layer in range(want.shape[1]):
        g, w = got[:, layer].float().flatten(), want[:, layer].float().flatten()
        cosine = float(torch.nn.functional.cosine_similarity(g, w, dim=0))
        assert cosine >= 0.9999, f"{what} layer {layer + 1}: cosine {cosine:.6f}"


def extract(tmp_path, *overrides: str) -> dict[str, torch.Tensor]:
    """``task=extract`` in-process (the CLI's flow) on N digits -> the cached train arrays."""
    args = ["task=extract", f"dataset.limit={N}", "extract.splits=[train]",
            f"paths.root={tmp_path}", "trainer.progress_bar=false", *overrides]
    run(args)
    entry = FeatureCache(compose(args).paths.cache).load(feature_fingerprint(compose(args),
                                                                             "train"))
    return {n: torch.from_numpy(np.array(entry.array(n)))
            for n in ("cls", "ap", "pool") if entry.has(n)}


def digits() -> list:
    data = DigitsDataset("train", limit=N)
    return [data[i][0] for i in range(N)]


def check_family(tmp_path, key: str, arch: str, weights, size: int, *extra: str) -> None:
    _, prefix, has_cls, fc_norm, _ = FAMILIES[key]
    got = extract(tmp_path, f"backbone={key}", f"backbone.weights={weights}",
                  f"++backbone.model_kwargs={SMALL_KWARGS}", f"backbone.img_size={size}", *extra)
    model = load_own(arch, weights, img_size=size)
    images = torch.stack([own_transform(model, size)(im) for im in digits()])
    want = own_tokens(model, images, prefix, has_cls, fc_norm)
    assert ("cls" in got) == has_cls  # no patch (or register) token is ever stored as CLS
    assert ("pool" in got) == ("pool" in want)
    assert got["ap"].shape == (N, SMALL["depth"], SMALL["embed_dim"])
    for name in ("cls", "ap", "pool"):
        if name in want:
            assert_close_per_layer(got[name], want[name], f"{key} at {size} px: {name}")
    if prefix:  # pooling the registers / storage tokens too would be told apart
        wrong = torch.nn.functional.cosine_similarity(
            got["ap"].float().flatten(), want["ap_with_prefix"].flatten(), dim=0)
        assert wrong < 0.9999, f"{key}: AP indistinguishable from AP with the prefix tokens"


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_each_family_caches_the_tokens_of_its_own_code(tmp_path, key):
    """task=extract through backbone.weights (timm's file layout) at each input size (RoPE
    models at two) equals the model's own forward: CLS, AP (prefix tokens excluded) and the
    pool token of every layer."""
    arch, *_, sizes = FAMILIES[key]
    weights = tmp_path / "model.safetensors"
    save_file(build(arch, seed=len(key)).state_dict(), str(weights))
    for size in sizes:
        check_family(tmp_path / str(size), key, arch, weights, size)


def test_meta_dinov3_checkpoint_loads_as_downloaded_or_is_refused(tmp_path):
    """Meta's DINOv3 .pth layout (storage_tokens, ls1.gamma, qkv.bias with its mask) loads into
    the architecture with query/value biases and equals timm's own loading of the file; the
    architecture without them refuses it rather than drop the biases."""
    arch = "vit_small_patch16_dinov3_qkvb"
    model = build(arch, seed=5)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(meta_dinov3_layout(model.state_dict(), SMALL["num_heads"]), path)
    check_family(tmp_path, "dinov3_s", arch, path, 32, f"backbone.name={arch}.lvd1689m")
    with pytest.raises(ValueError, match="non-zero attention biases .*_qkvb"):
        extract(tmp_path / "plain", "backbone=dinov3_s", f"backbone.weights={path}",
                f"++backbone.model_kwargs={SMALL_KWARGS}", "backbone.img_size=32")


def test_any_timm_vit_by_name_reads_its_token_rules(tmp_path):
    """backbone=timm with a ViT that has registers and no class token (global-average models):
    no CLS stored, the registers out of AP."""
    arch = "vit_betwixt_patch16_reg4_gap_256"
    weights = tmp_path / "model.safetensors"
    save_file(build(arch, seed=7).state_dict(), str(weights))
    got = extract(tmp_path, "backbone=timm", f"backbone.name={arch}",
                  f"backbone.weights={weights}", f"++backbone.model_kwargs={SMALL_KWARGS}",
                  "backbone.img_size=32", "probe.tokens=ap")
    model = load_own(arch, weights, img_size=32)
    images = torch.stack([own_transform(model, 32)(im) for im in digits()])
    want = own_tokens(model, images, prefix=4, has_cls=False, fc_norm=True)
    assert "cls" not in got
    assert_close_per_layer(got["ap"], want["ap"], f"{arch}: ap")


REFUSALS = [
    (["backbone=siglip2_b", "probe=linear"], "probe.tokens='cls' is not allowed: backbone "
     "siglip2_b has no class token, so no CLS; use probe.tokens=pool"),
    (["backbone=aimv2_l", "probe=attentive_last"], "use probe.tokens=ap"),
    (["backbone=aimv2_l", "probe=alf", "probe.tokens=cls"], "use probe.tokens=ap"),
    (["backbone=aimv2_l", "probe=alf", "probe.tokens=ap+pool"], "has no pooling head"),
    (["backbone=siglip2_b", "probe=alf", "probe.tokens=ap+pool", "probe.layers=[1]"],
     "the pool token is the final layer's"),
    (["backbone=siglip2_b", "analysis=[layers]"], "compare every layer's CLS"),
    (["backbone=timm"], "backbone=timm needs a timm model name"),
    (["backbone=timm", "backbone.name=resnet50"], "resnet50 (ResNet) is not a plain Vision "
     "Transformer"),
    (["backbone=timm", "backbone.name=swin_tiny_patch4_window7_224"], "(SwinTransformer) is "
     "not a plain Vision Transformer"),
    (["backbone=timm", "backbone.name=convnext_tiny", "backbone.img_size=64"],
     "(ConvNeXt) is not a plain"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSALS)
def test_tokens_the_backbone_cannot_give_are_refused_before_any_work(tmp_path, overrides,
                                                                       message):
    """Refused by the config check (models on the meta device: no weights, no extraction)."""
    with pytest.raises(ConfigError, match=None) as err:
        run(tiny_overrides(tmp_path, "++backbone.pretrained=false",
                           f"++backbone.model_kwargs={SMALL_KWARGS}", *overrides))
    assert message in str(err.value)
    assert not (tmp_path / "cache").exists()


NEW_CONFIGS = ["dinov3_s", "dinov3_b", "dinov3_l", "siglip2_b", "siglip2_l", "pe_core_b",
               "pe_core_l", "aimv2_l", "eva02_b", "dinov2_reg_b"]


@pytest.mark.parametrize("key", NEW_CONFIGS)
def test_a_short_alf_run_finishes_on_every_new_family_config(tmp_path, key):
    """probe=alf on each config (random weights, 2 narrow blocks, 28-32 px, 3 steps): the run
    ends with its test score; without a class token on the model's ALF token set (AP + pool,
    or AP)."""
    side = 28 if "14" in compose([f"backbone={key}"]).backbone.name else 32
    summary = run(tiny_overrides(tmp_path, f"backbone={key}", "++backbone.pretrained=false",
                                 f"++backbone.model_kwargs={SMALL_KWARGS}",
                                 f"backbone.img_size={side}", "train.min_steps=3",
                                 "train.epochs=1", "logger=none",
                                 "search.validate=false"))
    has_cls = not key.startswith(("siglip2", "aimv2"))
    pool = key.startswith("siglip2")
    want = "cls+ap" if has_cls else ("ap+pool" if pool else "ap")
    assert summary["tokens"] == want
    assert 0.0 <= summary["test"]["bal_acc"] <= 1.0


def test_open_clip_towers_on_timm_trunks_take_the_timm_token_rules(tmp_path):
    """OpenCLIP's SigLIP 2 tower (a timm trunk with a MAP head): tapped as its timm model (no
    CLS, the pool token is the trunk's pooled output); its layout is read without weights; an
    OpenCLIP ConvNeXt tower is refused before any work."""
    from omegaconf import OmegaConf
    from open_clip.timm_model import TimmModel

    from alfusion.backbones import open_clip_vit
    from alfusion.backbones.layout import backbone_layout

    cfg = OmegaConf.create(dict(family="open_clip", name="ViT-B-16-SigLIP2", tap="norm2",
                                final="norm"))
    layout = backbone_layout(cfg)
    assert (layout.layers, layout.class_token, layout.pool_head) == (12, False, True)
    torch.manual_seed(0)
    visual = TimmModel("vit_base_patch16_siglip_224", embed_dim=768, pool="map", proj="none",
                       image_size=224)
    visual.trunk.blocks = visual.trunk.blocks[:2]  # 2 blocks: the test's size
    tapped, transform = open_clip_vit.tap_model(visual.eval(), "open_clip's preprocess", cfg)
    assert transform == "open_clip's preprocess"
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = tapped(images)
        pooled = visual.trunk.forward_head(visual.trunk.forward_features(images),
                                           pre_logits=True)
    assert out.cls is None and out.ap.shape == (3, 2, 768)
    torch.testing.assert_close(out.pool[:, 0], pooled)
    with pytest.raises(ConfigError, match="convnext_base .* is not a plain Vision Transformer"):
        run(tiny_overrides(tmp_path, "backbone=clip_b16", "backbone.name=convnext_base"))


def test_attention_cells_name_the_pool_token_and_no_missing_cls():
    """The heatmap's labels: the pool token sits at the final layer; all tokens of a model
    without a class token are registers then patches, none called CLS."""
    from alfusion.analysis.attention import token_cells
    from alfusion.tokens import TokenSet

    labels, kinds, cells = token_cells(TokenSet((1, 2), "ap+pool"), 3, None)
    assert (labels, kinds, cells) == (["AP@1", "AP@2", "pool@2"], ["AP", "pool"], [0, 1, 3])
    layout = dict(num_prefix_tokens=1, class_token=False, grid=[1, 2])
    labels, kinds, _ = token_cells(TokenSet((2,), "all"), 3, layout)
    assert labels == ["reg0@2", "P0,0@2", "P0,1@2"] and kinds == ["registers", "patches"]
