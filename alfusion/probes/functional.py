"""The probes' math, once, with a leading probe axis G (a bank of G probes; one probe is G = 1).

Parameters are the state dicts of ``AttentiveProbe`` / ``LinearProbe`` with every entry
stacked to (G, *shape). The attentive forward is the reassociated single-query attention of
probes/attentive.py. A probe's numbers must not depend on what else is in its bank: no kernel
here changes with G (tests/test_bank.py checks this bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentiveSpec:
    """The sizes and constants of an attentive probe that the functional forward needs."""

    dim: int
    heads: int
    head_dim: int
    scale: float
    eps_q: float
    eps_kv: float
    bn_eps: float
    bn_momentum: float


def normalise_tokens(spec: AttentiveSpec, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm of the tokens without affine, (..., T, D): the statistics LN_k and LN_v
    share (their gains and shifts fold into each probe's weights). Parameter-free, so a step
    computes it once for inputs shared by the whole bank. Always fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), (spec.dim,), eps=spec.eps_kv)


def attention_weights(spec: AttentiveSpec, p: dict, xhat: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every probe's query over the tokens: (G, B, H, T) fp32.

    xhat: normalised tokens, (B, T, D) shared by all probes or (G, B, T, D) per probe."""
    G = p["query"].shape[0]
    H, E, D = spec.heads, spec.head_dim, spec.dim
    qn = F.layer_norm(p["query"].reshape(G, D), (D,), eps=spec.eps_q)
    qn = qn * p["norm_q.weight"] + p["norm_q.bias"]
    q = torch.einsum("gd,gad->ga", qn, p["q.weight"]).view(G, H, E)
    # The query mapped back into token space, with LN_k's gain and the softmax scale folded
    # in: (G, H, D), parameter-sized, so no per-token elementwise work. LN_k's shift adds the
    # same score to every token and cancels in the softmax.
    u = torch.einsum("ghe,ghed->ghd", q, p["k.weight"].view(G, H, E, D))
    u = u * (p["norm_k.weight"] * spec.scale)[:, None, :]
    # One (H, D) x (D, B T) product per probe (batched over G; shared tokens are expanded,
    # not copied) rather than one product with G H rows: the kernel, and so the rounding,
    # must not depend on G.
    B, T = xhat.shape[-3], xhat.shape[-2]
    tokens = xhat.reshape(-1, B * T, D).transpose(1, 2).expand(G, D, B * T)
    scores = torch.bmm(u, tokens.to(u.dtype)).view(G, H, B, T).transpose(1, 2)
    return scores.float().softmax(dim=-1)


@torch.no_grad()
def update_running_stats(spec: AttentiveSpec, buffers: dict, mean: torch.Tensor,
                         var: torch.Tensor, n: int) -> None:
    """BatchNorm's running statistics after a training batch of n samples with (G, D) batch
    mean and biased variance, as torch updates them (momentum, unbiased running variance,
    counter)."""
    m = spec.bn_momentum
    rm, rv = buffers["bn.running_mean"], buffers["bn.running_var"]
    rm.copy_(m * mean + (1 - m) * rm)
    rv.copy_(m * var * (n / (n - 1)) + (1 - m) * rv)
    buffers["bn.num_batches_tracked"].add_(1)


def batch_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buffers: dict,
               training: bool, spec: AttentiveSpec, sync: bool = False) -> torch.Tensor:
    """BatchNorm1d per probe on h (G, B, D), fp32; in training also updates the running
    statistics like torch (momentum, unbiased running variance, counter).

    ``sync``: the statistics of the global batch over all ranks of the process group (sums
    all-reduced with the differentiable collective, so gradients equal one process holding
    the whole batch)."""
    h = h.float()
    if training:
        if sync:
            from torch.distributed.nn.functional import all_reduce

            n = torch.full((h.shape[0], 1), float(h.shape[1]), device=h.device)
            stats = all_reduce(torch.cat([h.sum(1), (h * h).sum(1), n], dim=1),
                               op=dist.ReduceOp.SUM)
            D = h.shape[2]
            count = stats[0, -1]
            mean = stats[:, :D] / count
            var = stats[:, D:2 * D] / count - mean * mean
            n_total = int(count.item())
        else:
            mean, var = h.mean(1), h.var(1, unbiased=False)
            n_total = h.shape[1]
        update_running_stats(spec, buffers, mean, var, n_total)
    else:
        mean, var = buffers["bn.running_mean"], buffers["bn.running_var"]
    return (h - mean[:, None]) * torch.rsqrt(var[:, None] + spec.bn_eps) * weight[:, None] \
        + bias[:, None]


def attentive_logits(spec: AttentiveSpec, p: dict, buffers: dict, xhat: torch.Tensor,
                     training: bool, drop: torch.Tensor | None = None, sync_bn: bool = False
                     ) -> torch.Tensor:
    """G attentive probes on normalised tokens xhat ((B, T, D) shared or (G, B, T, D) per
    probe); drop: (G, B, H, T) dropout multipliers or None -> logits (G, B, C)."""
    G = p["query"].shape[0]
    H, E, D = spec.heads, spec.head_dim, spec.dim
    attn = attention_weights(spec, p, xhat)  # (G, B, H, T)
    if drop is not None:
        attn = attn * drop
    shared = xhat.dim() == 3
    z = torch.einsum("gbht,btd->gbhd" if shared else "gbht,gbtd->gbhd", attn, xhat)
    # LN_v's affine folds into W_v: W_v (g * z + s * b) = (W_v diag g) z + s * (W_v b), with
    # s = sum_t attn (1 without dropout).
    w_v = p["v.weight"].view(G, H, E, D)
    out = torch.einsum("gbhd,ghed->gbhe", z, w_v * p["norm_v.weight"][:, None, None, :])
    # Elementwise product and sum, not an einsum: for G = 1 einsum takes a matrix-vector
    # kernel whose rounding differs from the G > 1 batched one.
    shift = (w_v * p["norm_v.bias"][:, None, None, :]).sum(-1)  # (G, H, E)
    out = (out + attn.sum(-1, keepdim=True) * shift[:, None]).flatten(2)  # (G, B, A)
    pooled = torch.einsum("gba,gda->gbd", out, p["proj.weight"]) + p["proj.bias"][:, None, :]
    h = batch_norm(pooled, p["bn.weight"], p["bn.bias"], buffers, training, spec, sync_bn)
    return torch.einsum("gbd,gcd->gbc", h, p["head.weight"]) + p["head.bias"][:, None, :]


def linear_logits(p: dict, x: torch.Tensor) -> torch.Tensor:
    """G linear probes on x, (B, F) shared or (G, B, F) per probe -> logits (G, B, C)."""
    eq = "bf,gcf->gbc" if x.dim() == 2 else "gbf,gcf->gbc"
    return torch.einsum(eq, x, p["head.weight"]) + p["head.bias"][:, None, :]


def probe_logits(kind: str, spec: AttentiveSpec | None, params: dict, buffers: dict,
                 x: torch.Tensor, training: bool, drop: torch.Tensor | None = None,
                 normalised: bool = False, sync_bn: bool = False) -> torch.Tensor:
    """Logits (G, B, C) of every probe for inputs shared (B, ...) or per probe (G, B, ...);
    ``normalised``: attentive inputs are ``normalise_tokens`` output already."""
    if kind == "attentive":
        xhat = x if normalised else normalise_tokens(spec, x)
        return attentive_logits(spec, params, buffers, xhat, training, drop, sync_bn)
    return linear_logits(params, x)


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                  total_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy per probe: logits (G, B, C), y (B,) -> (G,).

    Each entry equals F.cross_entropy(logits[g], y, weight=weights), the weighted mean;
    ``total_weight`` replaces the batch's weight sum (a global batch split over ranks)."""
    G, B, C = logits.shape
    nll = F.cross_entropy(logits.float().reshape(G * B, C), y.repeat(G), weight=weights,
                          reduction="none").view(G, B)
    return nll.sum(1) / (weights[y].sum() if total_weight is None else total_weight)
