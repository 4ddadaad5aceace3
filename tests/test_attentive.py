"""The reassociated attentive probe computes the paper's function: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from oracle import attention_reference, forward_reference

from alfusion.probes import AttentiveProbe

# (dim, heads, head_dim, tokens): the paper's head_dim rule (None), explicit head sizes, one
# token, one head, and dims that do not divide by the heads.
SHAPES = [(16, 4, None, 8), (24, 3, 5, 1), (48, 8, None, 12), (20, 1, None, 6), (30, 7, 4, 14)]


def random_probe(dim: int, heads: int, head_dim: int | None, classes: int, drop: float,
                 seed: int) -> AttentiveProbe:
    """A probe with every parameter random (LayerNorm/BatchNorm affine included), so no term
    of the reassociation hides behind a unit gain or a zero bias."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(dim, classes, num_heads=heads, head_dim=head_dim, attn_drop=drop)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
        probe.bn.running_mean.normal_()
        probe.bn.running_var.uniform_(0.5, 2.0)
    return probe


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """fp32 agreement, absolute tolerance scaled by the tensor's magnitude."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=2e-5 * scale, rtol=1e-4,
                               msg=lambda m: f"{what}: {m}")


def outputs_and_grads(probe: AttentiveProbe, x: torch.Tensor, reference: bool, seed: int):
    x = x.clone().requires_grad_()
    probe.zero_grad()
    torch.manual_seed(seed)  # the same dropout mask: both draw one (B, H, T) mask
    out = forward_reference(probe, x) if reference else probe(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in probe.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("mode,drop", [("train", 0.0), ("eval", 0.0), ("eval", 0.3),
                                       ("train", 0.3)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}h{}e{}t{}".format(*s))
def test_reassociated_forward_equals_reference(shape, mode, drop):
    """Outputs, input gradients and parameter gradients agree in fp32 (training mode uses
    batch statistics in BatchNorm; dropout masks are drawn from the same seed)."""
    dim, heads, head_dim, tokens = shape
    seed = dim * 1000 + heads * 10 + tokens
    probe = random_probe(dim, heads, head_dim, classes=7, drop=drop, seed=seed)
    probe.train(mode == "train")
    x = torch.randn(6, tokens, dim, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    out, gx, grads = outputs_and_grads(probe, x, reference=False, seed=seed)
    ref_out, ref_gx, ref_grads = outputs_and_grads(probe, x, reference=True, seed=seed)
    assert_close(out, ref_out, "logits")
    assert_close(gx, ref_gx, "grad of x")
    for name, ref in ref_grads.items():
        if name == "norm_k.bias":
            # q . W_k b_k is the same for every token: it cancels in the softmax, so the
            # reassociated form never uses it and the reference's gradient is zero.
            assert grads[name] is None
            scale = max(float(g.abs().max()) for g in ref_grads.values())
            assert float(ref.abs().max()) <= 1e-5 * scale, "norm_k.bias: not rounding noise"
            continue
        assert_close(grads[name], ref, f"grad of {name}")


def test_attention_maps_equal_reference():
    probe = random_probe(32, 6, None, classes=3, drop=0.0, seed=1).eval()
    x = torch.randn(5, 9, 32)
    attn, _ = probe.attention(x)
    ref = attention_reference(probe, x)
    torch.testing.assert_close(attn, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(5, 6))


def test_training_mode_dropout_changes_the_output():
    """Guards the train-mode dropout case above against comparing two dropout-free runs."""
    probe = random_probe(16, 4, None, classes=3, drop=0.5, seed=2).train()
    x = torch.randn(6, 8, 16)
    torch.manual_seed(0)
    a = probe(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, probe(x))
