"""Every probe of the paper from its real config: parameter counts, token sets, shapes, heads.

No training here: probes are built from the composed ``conf/probe`` configs and run on
hand-made per-layer arrays whose tokens can be recognised after selection and stacking.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from alfusion.probes import AttentiveProbe, LinearProbe, build_probe
from alfusion.tokens import build_token_set, resolve_layers


def probe_config(name: str, *overrides: str):
    return compose_config(f"probe={name}", *overrides).probe


def layer_arrays(n: int, num_layers: int, dim: int, num_all_tokens: int = 17):
    """Per-layer arrays whose tokens say where they came from.

    cls[:, l] is the one-hot vector e_l and ap[:, l] is e_{L + l} (times 3, so that the
    L2-normalisation has work to do); tokens (all tokens of the last layer) are random.
    Returns cls (n, L, D), ap (n, L, D), tokens (n, T, D).
    """
    assert dim >= 2 * num_layers
    eye = 3.0 * torch.eye(dim)
    cls = eye[:num_layers].expand(n, -1, -1).clone()
    ap = eye[num_layers:2 * num_layers].expand(n, -1, -1).clone()
    tokens = torch.randn(n, num_all_tokens, dim, generator=torch.Generator().manual_seed(0))
    return cls, ap, tokens


@pytest.mark.parametrize(("dim", "num_layers", "heads"), [(384, 12, 24), (768, 12, 24),
                                                          (1024, 24, 48)])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_alf_parameter_count_is_the_papers(dim, num_layers, heads, num_classes):
    """ViT-S/B/L sizes: 2L tokens, one head per token, A = H * 2 * (D // H)."""
    cfg = probe_config("alf")
    token_set = build_token_set(cfg, num_layers)
    assert token_set.num_tokens() == 2 * num_layers == heads
    probe = build_probe(cfg, token_set, [dim] * num_layers, num_classes, 2 * num_layers)
    assert isinstance(probe, AttentiveProbe)
    assert probe.num_heads == heads
    assert probe.head_dim == 2 * (dim // heads)
    inner = heads * probe.head_dim
    expected = 4 * dim * inner + 10 * dim + num_classes * (dim + 1)
    assert sum(p.numel() for p in probe.parameters()) == expected


def test_alf_vit_b_100_classes_has_4_80_million_parameters():
    """docs/protocol.md's own number: ViT-B (D 768, 12 layers), C = 100 -> 4,803,172."""
    cfg = probe_config("alf")
    probe = build_probe(cfg, build_token_set(cfg, 12), [768] * 12, 100, 24)
    # 4 * 768 * 1536 + 10 * 768 + 100 * 769, written out by hand
    assert sum(p.numel() for p in probe.parameters()) == 4_718_592 + 7_680 + 76_900


# probe -> (shape of the stacked input for N=3, L=12, D=64, 17 tokens; heads; layers)
PAPER_PROBES = {
    "alf": ((3, 24, 64), 24, list(range(1, 13))),
    "aat": ((3, 17, 64), 8, [12]),
    "attentive_last": ((3, 2, 64), 2, [12]),
    "linear": ((3, 64), None, [12]),
    "linear_last": ((3, 128), None, [12]),
    "linear_concat": ((3, 24 * 64), None, list(range(1, 13))),
}


@pytest.mark.parametrize("name", sorted(PAPER_PROBES))
def test_every_paper_probe_shapes_and_heads(name):
    shape, heads, layers = PAPER_PROBES[name]
    cfg = probe_config(name)
    assert cfg.name == name
    token_set = build_token_set(cfg, 12)
    assert list(token_set.layers) == layers
    cls, ap, tokens = layer_arrays(3, 12, 64)
    x = token_set(cls, ap, tokens, [64] * 12)
    assert tuple(x.shape) == shape
    num_tokens = x.shape[1] if x.dim() == 3 else token_set.num_tokens()
    probe = build_probe(cfg, token_set, [64] * 12, 7, num_tokens, attn_drop=0.1)
    if heads is None:
        assert isinstance(probe, LinearProbe)
        assert probe.head.in_features == shape[1]
    else:
        assert isinstance(probe, AttentiveProbe)
        assert probe.num_heads == heads
        assert probe.head_dim == 2 * (64 // heads)
        assert probe.attn_drop.p == 0.1
    probe.eval()
    assert tuple(probe(x).shape) == (3, 7)


# L = 12: the layer sets of the paper's ablations, written out by hand
LAYER_SETS = {
    "all": list(range(1, 13)),
    "last": [12],
    "middle_last": [6, 12],
    "quarterly": [3, 6, 9, 12],
    "[2,5]": [2, 5],
}


@pytest.mark.parametrize("name", ["alf", "linear"])
@pytest.mark.parametrize("tokens", ["cls", "ap", "cls+ap"])
@pytest.mark.parametrize("layers", sorted(LAYER_SETS))
def test_layer_sets_and_token_kinds_are_options_of_any_probe(name, tokens, layers):
    """probe.layers / probe.tokens overrides pick exactly those tokens, CLS block first."""
    cfg = probe_config(name, f"probe.layers={layers}", f"probe.tokens={tokens}")
    token_set = build_token_set(cfg, 12)
    expected_layers = LAYER_SETS[layers]
    assert list(token_set.layers) == expected_layers
    # where each expected token's one-hot sits: e_{l-1} for CLS of layer l, e_{11+l} for AP
    positions = []
    if tokens in ("cls", "cls+ap"):
        positions += [layer - 1 for layer in expected_layers]
    if tokens in ("ap", "cls+ap"):
        positions += [12 + layer - 1 for layer in expected_layers]
    expected = torch.eye(64)[positions]  # (T, D): unit vectors after normalisation

    cls, ap, _ = layer_arrays(2, 12, 64)
    x = token_set(cls, ap, None, [64] * 12)
    num_tokens = len(positions)
    probe = build_probe(cfg, token_set, [64] * 12, 5, num_tokens)
    if cfg.kind == "linear":
        assert tuple(x.shape) == (2, num_tokens * 64)
        torch.testing.assert_close(x, expected.flatten().expand(2, -1))
        assert probe.head.in_features == num_tokens * 64
    else:
        assert tuple(x.shape) == (2, num_tokens, 64)
        torch.testing.assert_close(x, expected.expand(2, -1, -1))
        assert probe.num_heads == num_tokens
    probe.eval()
    assert tuple(probe(x).shape) == (2, 5)


def test_narrower_last_layer_is_zero_padded_for_attention_and_unpadded_for_concat():
    """OpenCLIP's projected output is narrower (e.g. 48 < 64): attentive probes see it
    zero-padded to 64; linear_concat concatenates true widths (11 * 64 + 48 per kind)."""
    dims = [64] * 11 + [48]
    g = torch.Generator().manual_seed(1)
    cls, ap = torch.randn(4, 12, 64, generator=g), torch.randn(4, 12, 64, generator=g)
    cls[:, 11, 48:] = 0  # the cache stores the narrow layer zero-padded on the right
    ap[:, 11, 48:] = 0

    alf = build_token_set(probe_config("alf"), 12)
    x = alf(cls, ap, None, dims)
    assert tuple(x.shape) == (4, 24, 64)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(4, 24))
    assert torch.all(x[:, [11, 23], 48:] == 0)

    concat = build_token_set(probe_config("linear_concat"), 12)
    flat = concat(cls, ap, None, dims)
    width = 2 * (11 * 64 + 48)
    assert tuple(flat.shape) == (4, width) and concat.width(dims) == width
    last_cls = flat[:, 11 * 64:11 * 64 + 48]
    torch.testing.assert_close(last_cls, torch.nn.functional.normalize(cls[:, 11, :48], dim=-1))
    # no re-normalisation of the concatenation: each of the 24 pieces has norm 1
    torch.testing.assert_close(flat.norm(dim=-1), torch.full((4,), 24 ** 0.5))
    probe = build_probe(probe_config("linear_concat"), concat, dims, 3, 24)
    assert probe.head.in_features == width


def test_all_tokens_of_any_layer_set_and_bad_layer_sets_are_refused():
    """tokens=all stacks every token of each requested layer, layer after layer."""
    token_set = build_token_set(probe_config("aat", "probe.layers=quarterly"), 12)
    tokens = torch.randn(2, 4, 17, 64)  # (N, layers, T, D) as cached
    x = token_set(None, None, tokens, [64] * 12)
    assert tuple(x.shape) == (2, 4 * 17, 64) and token_set.num_tokens(17) == 68
    torch.testing.assert_close(x[:, 17], torch.nn.functional.normalize(tokens[:, 1, 0], dim=-1))
    with pytest.raises(ValueError, match="unknown layer set"):
        resolve_layers("middle", 12)
    with pytest.raises(ValueError, match=r"outside 1\.\.12"):
        resolve_layers([0, 6], 12)
