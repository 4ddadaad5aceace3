"""One attentive probe's training loss and its gradients, derived by hand (no autograd).

The same function as ``attentive_logits`` followed by ``weighted_loss`` in training mode,
for a pass of one probe on fp32 tokens without a gradient (how every probe trains on the
CPU: one probe per pass). Written out, the backward keeps every large tensor in the layout
its matrix products read, takes no copies between them, and records no graph: about a tenth
of a step less than autograd on the same math (docs/benchmarks.md). Where the native kernels
are built (docs/engine.md), three parts run in C, each one call forward and one backward:
the query and value side's parameters (native/params.c), the token products from the scores
to o and back to the value weights' and queries' gradients (native/attention.c), and
BatchNorm, head and loss (native/head.c); torch computes the same otherwise. Autograd on
``attentive_logits`` is the oracle of both (tests/test_attentive_grads.py).

Shapes: B samples, T tokens, D token width, H heads of width E (A = H E), C classes. The
forward, per sample b and head h (probes/attentive.py):

    s[b,t,h] = u_h . xhat[b,t]               u: the query in token space (H, D)
    a[b,:,h] = softmax_t(s[b,:,h]) * drop     (dropout multipliers, or none)
    z[b,h]   = sum_t a[b,t,h] xhat[b,t]      (B, H, D)
    o[b,h]   = W'_h z[b,h] + (sum_t a[b,t,h]) shift_h     W' = W_v diag(g_v), shift = W_v b_v
    logits   = head(BN(proj(o)))
"""

from __future__ import annotations

import torch

from alfusion import native
from alfusion.probes.functional import AttentiveSpec, update_running_stats


def _layer_norm_grad(g_out: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                     dim: int) -> torch.Tensor:
    """The gradient through (x - mean) * rstd along ``dim``, given that output's gradient."""
    return rstd * (g_out - g_out.mean(dim, keepdim=True)
                   - xhat * (g_out * xhat).mean(dim, keepdim=True))


def _batch_norm_head(spec: AttentiveSpec, p: dict, buffers: dict, pooled: torch.Tensor,
                     y: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """BatchNorm in training mode (running statistics updated), the classifier and the
    class-weighted cross-entropy on pooled (B, D), forward and backward -> (loss (),
    gradients of bn.* and head.*, gradient of pooled (B, D)); in one native call where built."""
    B = pooled.shape[0]
    w_y = weights[y]
    names = ("bn.weight", "bn.bias", "head.weight", "head.bias")
    if native.head_ready(pooled, w_y, *(p[n] for n in names)):
        loss, mean_b, var_b, g_pooled, *g = native.batch_norm_head(
            pooled, p["bn.weight"], p["bn.bias"], p["head.weight"], p["head.bias"], y, w_y,
            spec.bn_eps)
        update_running_stats(spec, buffers, mean_b.unsqueeze(0), var_b.unsqueeze(0), B)
        return loss[0], dict(zip(names, g, strict=True)), g_pooled
    # BatchNorm's batch statistics in two passes (torch.var_mean along the batch is several
    # times slower on the CPU)
    mean_b = pooled.mean(0)
    normed = pooled - mean_b
    var_b = (normed * normed).mean(0)
    update_running_stats(spec, buffers, mean_b.unsqueeze(0), var_b.unsqueeze(0), B)
    rstd_b = torch.rsqrt(var_b + spec.bn_eps)
    normed *= rstd_b
    h = normed * p["bn.weight"] + p["bn.bias"]
    logits = torch.addmm(p["head.bias"], h, p["head.weight"].t())  # (B, C)
    total = w_y.sum()
    log_p = logits.log_softmax(-1)
    loss = -(log_p.gather(1, y[:, None])[:, 0] * w_y).sum() / total
    g_logits = log_p.exp_()
    g_logits[torch.arange(B, device=y.device), y] -= 1
    g_logits *= (w_y / total)[:, None]
    # (h^T g)^T, not g^T h: with C rows the product's rounding changes with torch's thread
    # count, and a grid split over DDP ranks (a thread each) must train what one process does.
    grads = {"head.weight": (h.t() @ g_logits).t(), "head.bias": g_logits.sum(0)}
    g_h = g_logits @ p["head.weight"]
    grads["bn.weight"], grads["bn.bias"] = (g_h * normed).sum(0), g_h.sum(0)
    g_pooled = _layer_norm_grad(g_h * p["bn.weight"], normed, rstd_b, 0)
    return loss, grads, g_pooled


# The parameters of the query and value side (``_params_forward``).
PARAMS = ("query", "norm_q.weight", "norm_q.bias", "q.weight", "k.weight", "norm_k.weight",
          "v.weight", "norm_v.weight", "norm_v.bias")


def _params_forward(spec: AttentiveSpec, p: dict) -> dict[str, torch.Tensor]:
    """The query in token space u (H, D), the value weights with LN_v's gain w (H, E, D) and
    LN_v's shift (H, E), with what the backward needs."""
    H, E, D = spec.heads, spec.head_dim, spec.dim
    q0 = p["query"].reshape(D)
    var, mean = torch.var_mean(q0, unbiased=False)
    rstd_q = torch.rsqrt(var + spec.eps_q)
    qhat = (q0 - mean) * rstd_q
    qn = qhat * p["norm_q.weight"] + p["norm_q.bias"]
    q = (p["q.weight"] @ qn).view(H, E)
    w_k = p["k.weight"].view(H, E, D)
    k_q = torch.bmm(q.unsqueeze(1), w_k).squeeze(1)  # (H, D): the query in token space
    k_scale = p["norm_k.weight"] * spec.scale
    w_v = p["v.weight"].view(H, E, D)
    return dict(qhat=qhat, rstd_q=rstd_q, qn=qn, q=q, w_k=w_k, k_q=k_q, k_scale=k_scale,
                w_v=w_v, u=k_q * k_scale, w=w_v * p["norm_v.weight"],
                shift=(w_v * p["norm_v.bias"]).sum(-1))


def _params_backward(spec: AttentiveSpec, p: dict, saved: dict, g_u: torch.Tensor,
                     g_w: torch.Tensor, g_shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients of PARAMS given those of u (H, D), w (H, E, D) and the shift (H, E)."""
    H, E, D = spec.heads, spec.head_dim, spec.dim
    A = H * E
    q, k_q, w_v = saved["q"], saved["k_q"], saved["w_v"]
    g_k_q = g_u * saved["k_scale"]
    grads = {"norm_k.weight": (g_u * k_q).sum(0) * spec.scale,
             "k.weight": (q[:, :, None] * g_k_q[:, None, :]).view(A, D)}
    g_q = torch.bmm(saved["w_k"], g_k_q[:, :, None]).view(A)
    grads["q.weight"] = g_q[:, None] * saved["qn"]
    g_qn = p["q.weight"].t() @ g_q
    grads["norm_q.weight"], grads["norm_q.bias"] = g_qn * saved["qhat"], g_qn
    grads["query"] = _layer_norm_grad(g_qn * p["norm_q.weight"], saved["qhat"],
                                      saved["rstd_q"], 0).view(1, 1, D)
    grads["v.weight"] = (g_w * p["norm_v.weight"] + g_shift[:, :, None] * p["norm_v.bias"]
                         ).view(A, D)
    grads["norm_v.weight"] = (g_w * w_v).sum((0, 1))
    grads["norm_v.bias"] = (g_shift[:, :, None] * w_v).sum((0, 1))
    return grads


def _params_forward_native(spec: AttentiveSpec, p: dict) -> dict[str, torch.Tensor]:
    """``_params_forward`` in one native call (native/params.c), w also transposed (w_t)."""
    names = ("qhat", "rstd_q", "qn", "q", "k_q", "u", "w", "w_t", "shift")
    out = native.params_forward(*(p[n] for n in PARAMS), spec.scale, spec.eps_q, spec.heads)
    saved = dict(zip(names, out, strict=True))
    saved["shift"] = saved["shift"].view(spec.heads, spec.head_dim)
    return saved


def _params_backward_native(spec: AttentiveSpec, p: dict, saved: dict, g_u: torch.Tensor,
                            g_w: torch.Tensor, g_shift: torch.Tensor, parts: bool = False
                            ) -> dict[str, torch.Tensor | native.GradParts]:
    """``_params_backward`` in one native call (native/params.c); ``parts``: the q, k and v
    weights' gradients as native.GradParts, not written out."""
    out = native.params_backward(
        g_u, g_w, g_shift.contiguous(), p["norm_q.weight"], p["q.weight"], p["k.weight"],
        p["norm_k.weight"], p["v.weight"], p["norm_v.weight"], p["norm_v.bias"], spec.scale,
        *(saved[n] for n in ("qhat", "rstd_q", "qn", "q", "k_q")), parts=parts)
    grads = dict(zip(PARAMS, out, strict=True))
    grads["query"] = grads["query"].view(1, 1, spec.dim)
    return grads


def attentive_loss_and_grads(spec: AttentiveSpec, p: dict, buffers: dict,
                             xhat: torch.Tensor | native.JitterPass, y: torch.Tensor,
                             weights: torch.Tensor, drop: torch.Tensor | None = None,
                             parts: bool = False
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor | native.GradParts]]:
    """Training step of one probe: p, buffers hold (1, *shape) tensors (a pass of one probe
    of a ProbeBank); xhat (B, T, D) normalised tokens (``normalise_tokens``), or the jitter
    pass that makes them (run by the attention forward as it reads them, or first); y (B,)
    labels; weights (C,) class weights; drop (B, H, T) dropout multipliers or None.

    Returns (loss (1,), gradients: name -> (1, *shape)), the class-weighted cross-entropy and
    its gradient for every parameter that has one (``norm_k.bias`` cancels in the softmax);
    ``parts`` with the native kernels: the q, k and v weights' as native.GradParts (their
    shape without the probe axis), composed by the native AdamW (protocol.native_adamw) as
    it reads them.
    BatchNorm's running statistics in ``buffers`` are updated as in training mode."""
    H, E, D = spec.heads, spec.head_dim, spec.dim
    A = H * E
    job = xhat if isinstance(xhat, native.JitterPass) else None
    xhat = job.x if job else xhat
    B, T, _ = xhat.shape
    p = {k: v[0] for k, v in p.items()}
    tokens = xhat.reshape(B * T, D)

    # ---- forward
    use_native = native.params_ready(xhat, *(p[n] for n in PARAMS))
    saved = (_params_forward_native if use_native else _params_forward)(spec, p)
    u, w_v_g, shift = saved["u"], saved["w"], saved["shift"]
    fused = native.attention_ready(xhat, u, w_v_g, shift, drop)  # token products in C
    if job and not fused:
        job.run()
    drop_t = None if drop is None else drop.transpose(1, 2)  # (B, T, H) view
    if fused:
        w_t = saved.get("w_t")
        w_t = w_v_g.transpose(1, 2).contiguous() if w_t is None else w_t
        attn, z, mass, o = native.attend_forward(job or xhat, u, w_t, shift, drop)
    else:
        attn = (tokens @ u.t()).view(B, T, H).softmax(dim=1)  # (B, T, H)
        attn_d = attn if drop is None else attn * drop_t
        z = torch.bmm(attn_d.transpose(1, 2), xhat)  # (B, H, D)
        mass = attn_d.sum(1)  # (B, H): sum_t a, 1 without dropout
        o = torch.empty(B, H, E, dtype=xhat.dtype, device=xhat.device)
        torch.bmm(z.transpose(0, 1), w_v_g.transpose(1, 2), out=o.transpose(0, 1))
        o += mass[:, :, None] * shift
    o = o.view(B, A)
    pooled = torch.addmm(p["proj.bias"], o, p["proj.weight"].t())  # (B, D)
    loss, grads, g_pooled = _batch_norm_head(spec, p, buffers, pooled, y, weights)

    # ---- backward (g_name: the loss's gradient with respect to name)
    grads["proj.weight"], grads["proj.bias"] = g_pooled.t() @ o, g_pooled.sum(0)
    g_o = (g_pooled @ p["proj.weight"]).view(B, H, E)
    if fused:
        g_u, g_shift, g_w_v_g = native.attend_backward(xhat, z, g_o, w_v_g, shift, mass, attn,
                                                       drop)
    else:
        g_shift = (g_o * mass[:, :, None]).sum(0)  # (H, E)
        g_mass = (g_o * shift).sum(-1)  # (B, H)
        g_o_h = g_o.transpose(0, 1)  # (H, B, E) view
        g_w_v_g = torch.bmm(g_o_h.transpose(1, 2), z.transpose(0, 1))  # (H, E, D)
        g_z = torch.bmm(g_o_h, w_v_g)  # (H, B, D)
        g_attn = torch.bmm(xhat, g_z.permute(1, 2, 0))  # (B, T, H)
        g_attn += g_mass[:, None, :]
        if drop is not None:
            g_attn *= drop_t
        g_s = attn * (g_attn - (g_attn * attn).sum(1, keepdim=True))  # through the softmax
        g_u = g_s.view(B * T, H).t() @ tokens  # (H, D)
    grads.update(_params_backward_native(spec, p, saved, g_u, g_w_v_g, g_shift, parts)
                 if use_native else _params_backward(spec, p, saved, g_u, g_w_v_g, g_shift))
    return loss.view(1), {k: v if isinstance(v, native.GradParts) else v.unsqueeze(0)
                          for k, v in grads.items()}
