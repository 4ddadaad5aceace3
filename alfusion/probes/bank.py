"""ProbeBank: a whole hyper-parameter grid of probes trained as one model (DESIGN.md).

G probes of one architecture (linear or attentive) are held as stacked tensors: every entry
of the single probe's state dict becomes a (G, *shape) tensor under the same name, so probe g
exports as a plain ``AttentiveProbe`` / ``LinearProbe`` in the paper's parameterisation. One
step runs all G probes on the same batch with batched matmuls (einsum over a leading G axis)
and updates them with a functional AdamW whose lr and weight decay are per-probe vectors.

Per probe, one step is exactly what training that probe alone does (PROTOCOL.md 3): feature
jitter (see below) and attention dropout drawn from the probe's own generator (``ProbeStream``),
BatchNorm with its own running statistics, class-weighted cross-entropy (the bank loss is the
sum of the per-probe losses, so gradients do not mix), gradient-norm clipping at 5 on the
probe's own total norm, AdamW with torch's bias correction and eps placement, and a per-step
cosine schedule from lr to 1e-6 computed with torch's CosineAnnealingLR recursion.

Jitter draws (``train.jitter_draws``): ``shared`` (default) draws one jitter per step from the
run seed's stream and gives it to every probe, which is what each configuration trained alone
with the same seed sees (the reference's seeded one-by-one loop does the same); the LayerNorm
of the tokens is then computed once for the whole bank and serves every probe.
``per_probe`` gives every probe independent draws from a stream seeded by (seed,
configuration): the same distribution per probe, but a (G, B, T, D) input and G LayerNorms
per step, so no arithmetic is shared (about G times one probe on a CPU; see
docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from alfusion.probes.attentive import AttentiveProbe
from alfusion.probes.linear import LinearProbe
from alfusion.random_draws import ProbeStream, probe_seed
from alfusion.training import (
    MIN_LR,
    FeatureBatches,
    HParams,
    NonFiniteLoss,
    batch_size_for,
    class_weights,
    epochs_for,
)

BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, as the paper uses them
ADAM_EPS = 1e-8
CLIP_NORM = 5.0
JITTER_DRAWS = ("shared", "per_probe")


# ----------------------------------------------------------------------------- the bank

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

    @classmethod
    def of(cls, probe: AttentiveProbe) -> AttentiveSpec:
        return cls(probe.dim, probe.num_heads, probe.head_dim, probe.scale, probe.norm_q.eps,
                   probe.norm_k.eps, probe.bn.eps, probe.bn.momentum)


class ProbeBank:
    """G probes of one architecture as stacked tensors.

    params: state-dict name -> (G, *shape) trainable tensors; buffers: BatchNorm running
    statistics (G, D) and counters (G,). ``template`` is a probe of the architecture, used
    to export probe g; ``dropouts`` (G,) the attention-dropout rate of each probe.
    """

    def __init__(self, template: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], dropouts: Sequence[float]) -> None:
        if not isinstance(template, AttentiveProbe | LinearProbe):
            raise TypeError(f"ProbeBank holds AttentiveProbe or LinearProbe, not "
                            f"{type(template).__name__}: train it with training.fit_probe")
        self.template = template
        self.kind = "attentive" if isinstance(template, AttentiveProbe) else "linear"
        self.spec = AttentiveSpec.of(template) if self.kind == "attentive" else None
        self.params, self.buffers = params, buffers
        self.dropouts = [float(d) for d in dropouts]

    @classmethod
    def from_probes(cls, probes: Sequence[nn.Module], dropouts: Sequence[float] | None = None
                    ) -> ProbeBank:
        """Stack the state dicts of same-shaped probes (their initial weights are kept)."""
        first = probes[0]
        shapes = {k: v.shape for k, v in first.state_dict().items()}
        for p in probes[1:]:
            if type(p) is not type(first) or {k: v.shape for k, v in
                                              p.state_dict().items()} != shapes:
                raise ValueError("a ProbeBank needs probes of one architecture and size")
        names = {n for n, _ in first.named_parameters()}
        states = [p.state_dict() for p in probes]
        stacked = {k: torch.stack([s[k].detach() for s in states]).clone() for k in shapes}
        if dropouts is None:
            dropouts = [getattr(getattr(p, "attn_drop", None), "p", 0.0) for p in probes]
        template = copy.deepcopy(first).cpu()
        return cls(template, {k: v for k, v in stacked.items() if k in names},
                   {k: v for k, v in stacked.items() if k not in names}, dropouts)

    def __len__(self) -> int:
        return len(self.dropouts)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def to(self, device: torch.device | str) -> ProbeBank:
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def export(self, g: int) -> nn.Module:
        """Probe g as a plain probe module (on the bank's device), in eval mode."""
        probe = copy.deepcopy(self.template).to(self.device)
        probe.load_state_dict({k: v[g] for k, v in {**self.params, **self.buffers}.items()})
        if self.kind == "attentive":
            probe.attn_drop.p = self.dropouts[g]
        return probe.eval()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits of every probe: x (B, T, D) or (B, F) -> (G, B, C)."""
        return bank_logits(self.kind, self.spec, self.params, self.buffers, x, training=False)


# ----------------------------------------------------------------------------- forward

def _batch_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                buffers: dict[str, torch.Tensor], training: bool, spec: AttentiveSpec
                ) -> torch.Tensor:
    """BatchNorm1d per probe on h (G, B, D), fp32; in training also updates running stats
    like torch (momentum, unbiased running variance, counter)."""
    h = h.float()
    if training:
        mean, var = h.mean(1), h.var(1, unbiased=False)
        with torch.no_grad():
            n, m = h.shape[1], spec.bn_momentum
            rm, rv = buffers["bn.running_mean"], buffers["bn.running_var"]
            rm.copy_(m * mean + (1 - m) * rm)
            rv.copy_(m * var * (n / (n - 1)) + (1 - m) * rv)
            buffers["bn.num_batches_tracked"].add_(1)
    else:
        mean, var = buffers["bn.running_mean"], buffers["bn.running_var"]
    return (h - mean[:, None]) * torch.rsqrt(var[:, None] + spec.bn_eps) * weight[:, None] \
        + bias[:, None]


def normalise_tokens(spec: AttentiveSpec, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm of the tokens without affine, (..., T, D): the statistics LN_k and LN_v
    share (their gains and shifts fold into each probe's weights). Parameter-free, so a
    step computes it once for inputs shared by the whole bank."""
    return F.layer_norm(x, (spec.dim,), eps=spec.eps_kv)


def _attentive_logits(spec: AttentiveSpec, p: dict, buffers: dict, xhat: torch.Tensor,
                      training: bool, drop: torch.Tensor | None) -> torch.Tensor:
    """Reassociated single-query attention for G probes (see probes/attentive.py).

    xhat: normalised tokens (``normalise_tokens``), (B, T, D) shared by all probes or
    (G, B, T, D) per probe (jitter); drop: (G, B, H, T) dropout multipliers or None ->
    logits (G, B, C).
    """
    G = p["query"].shape[0]
    H, E, D = spec.heads, spec.head_dim, spec.dim
    shared = xhat.dim() == 3
    qn = F.layer_norm(p["query"].reshape(G, D), (D,), eps=spec.eps_q)
    qn = qn * p["norm_q.weight"] + p["norm_q.bias"]
    q = torch.einsum("gd,gad->ga", qn, p["q.weight"]).view(G, H, E)
    # The query mapped back into token space, with LN_k's gain and the softmax scale folded
    # in: (G, H, D), parameter-sized, so no per-token elementwise work.
    u = torch.einsum("ghe,ghed->ghd", q, p["k.weight"].view(G, H, E, D))
    u = u * (p["norm_k.weight"] * spec.scale)[:, None, :]
    # One (H, D) x (D, B T) product per probe (batched over G; shared tokens are expanded,
    # not copied) rather than one product with G H rows: the kernel, and so the rounding,
    # must not depend on G.
    B, T = xhat.shape[-3], xhat.shape[-2]
    tokens = xhat.reshape(-1, B * T, D).transpose(1, 2).expand(G, D, B * T)
    scores = torch.bmm(u, tokens).view(G, H, B, T).transpose(1, 2)  # (G, B, H, T)
    attn = scores.float().softmax(dim=-1)  # (G, B, H, T)
    if drop is not None:
        attn = attn * drop
    z = torch.einsum("gbht,btd->gbhd" if shared else "gbht,gbtd->gbhd", attn, xhat)
    # LN_v's affine folds into W_v: W_v (g * z + s * b) = (W_v diag g) z + s * (W_v b), with
    # s = sum_t attn (1 without dropout).
    w_v = p["v.weight"].view(G, H, E, D)
    out = torch.einsum("gbhd,ghed->gbhe", z, w_v * p["norm_v.weight"][:, None, None, :])
    # Elementwise product and sum, not an einsum: for G = 1 einsum takes a matrix-vector
    # kernel whose rounding differs from the G > 1 batched one, and a probe's result must
    # not depend on what else is in its bank (tests/test_bank.py checks this bitwise).
    shift = (w_v * p["norm_v.bias"][:, None, None, :]).sum(-1)  # (G, H, E)
    out = (out + attn.sum(-1, keepdim=True) * shift[:, None]).flatten(2)  # (G, B, A)
    pooled = torch.einsum("gba,gda->gbd", out, p["proj.weight"]) + p["proj.bias"][:, None, :]
    h = _batch_norm(pooled, p["bn.weight"], p["bn.bias"], buffers, training, spec)
    return torch.einsum("gbd,gcd->gbc", h, p["head.weight"]) + p["head.bias"][:, None, :]


def bank_logits(kind: str, spec: AttentiveSpec | None, params: dict, buffers: dict,
                x: torch.Tensor, training: bool, drop: torch.Tensor | None = None,
                normalised: bool = False) -> torch.Tensor:
    """Logits (G, B, C) of every probe for inputs shared (B, ...) or per probe (G, B, ...);
    ``normalised``: attentive inputs are ``normalise_tokens`` output already."""
    if kind == "attentive":
        xhat = x if normalised else normalise_tokens(spec, x)
        return _attentive_logits(spec, params, buffers, xhat, training, drop)
    w, b = params["head.weight"], params["head.bias"]
    eq = "bf,gcf->gbc" if x.dim() == 2 else "gbf,gcf->gbc"
    return torch.einsum(eq, x, w) + b[:, None, :]


def bank_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy per probe: logits (G, B, C), y (B,) -> (G,).

    Each entry equals F.cross_entropy(logits[g], y, weight=weights) (the weighted mean)."""
    G, B, C = logits.shape
    nll = F.cross_entropy(logits.float().reshape(G * B, C), y.repeat(G), weight=weights,
                          reduction="none").view(G, B)
    return nll.sum(1) / weights[y].sum()


# ----------------------------------------------------------------------------- optimiser

def cosine_lrs(base_lrs: Sequence[float], total_steps: int, eta_min: float = MIN_LR
               ) -> torch.Tensor:
    """(total_steps, G) float64: the lr used at each step, by torch's CosineAnnealingLR
    recursion (T_max = total_steps) stepped once per optimiser step."""
    lrs = torch.empty(total_steps, len(base_lrs), dtype=torch.float64)
    T = total_steps
    for g, base in enumerate(base_lrs):
        lr = float(base)
        for s in range(total_steps):
            if s > 0:
                if (s - 1 - T) % (2 * T) == 0:
                    lr = lr + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
                else:
                    lr = ((1 + math.cos(math.pi * s / T)) / (1 + math.cos(math.pi * (s - 1) / T))
                          * (lr - eta_min) + eta_min)
            lrs[s, g] = lr
    return lrs


def _per_probe(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def clip_per_probe(grads: Sequence[torch.Tensor], max_norm: float = CLIP_NORM) -> torch.Tensor:
    """Scale each probe's gradients as torch.nn.utils.clip_grad_norm_ would for that probe
    alone. grads: (G, ...) tensors -> the per-probe total norms (G,) before clipping."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_probe(coef, g))
    return total


@torch.no_grad()
def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], step: int,
               decay: torch.Tensor, step_size: torch.Tensor,
               betas: tuple[float, float] = BETAS, eps: float = ADAM_EPS) -> None:
    """torch.optim.AdamW's update (single-tensor path) on stacked (G, ...) tensors.

    step: the step number after increment (1, 2, ...); decay = 1 - lr * wd and
    step_size = lr / (1 - beta1^step), both (G,), computed in float64 like torch's Python
    scalars and then cast to the parameters' dtype.
    """
    beta1, beta2 = betas
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p.mul_(_per_probe(decay, p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.add_(m.div(denom).mul_(_per_probe(-step_size, p)))


# ----------------------------------------------------------------------------- training

def activation_bytes_per_probe(bank: ProbeBank, batch: int, sample_shape: Sequence[int],
                               per_probe_inputs: bool) -> int:
    """A generous estimate of the activation memory one probe adds to a training step.

    Counts fp32 tensors kept for backward or alive at the peak: per-probe jittered input,
    noise and normalised tokens (B, T, D) when jitter draws are per probe; scores, attention
    and dropout masks (B, H, T); weighted tokens (B, H, D); and the pooled path (B, A + 4D).
    """
    n_in = math.prod(sample_shape)
    inputs = 3 * n_in if per_probe_inputs else 0
    if bank.kind == "linear":
        return 4 * batch * (inputs + 4 * bank.params["head.weight"].shape[1])
    s = bank.spec
    T = sample_shape[0]
    per_sample = inputs + 5 * s.heads * T + 3 * s.heads * s.dim \
        + 3 * s.heads * s.head_dim + 6 * s.dim
    return 4 * batch * per_sample


def _chunk_loss(kind, spec, params, buffers, x, y, weights, drop):
    """x: the pass's inputs, attentive ones normalised already -> per-probe losses (g,)."""
    return bank_loss(bank_logits(kind, spec, params, buffers, x, True, drop, normalised=True),
                     y, weights)


class BankTrainer:
    """Trains a ProbeBank one batch at a time with per-probe optimiser state and schedule.

    configs: the G configurations (lr, wd, dropout); total_steps: the schedule length;
    weights: class weights (C,). ``chunk`` probes go through one forward/backward pass
    (all of them by default); chunks only bound memory: probes never interact.
    """

    def __init__(self, bank: ProbeBank, configs: Sequence[HParams], total_steps: int,
                 weights: torch.Tensor, seed: int, jitter_p: float = 0.5,
                 jitter_sigma: float = 0.05, jitter_draws: str = "shared",
                 autocast: bool = False, compile: bool = False, chunk: int | None = None
                 ) -> None:
        if jitter_draws not in JITTER_DRAWS:
            raise ValueError(f"train.jitter_draws={jitter_draws!r}: use one of {JITTER_DRAWS}")
        device = bank.device
        self.bank, self.configs = bank, list(configs)
        self.total_steps, self.weights = total_steps, weights.to(device)
        self.jitter_p, self.jitter_sigma, self.jitter_draws = jitter_p, jitter_sigma, jitter_draws
        self.autocast = autocast
        self.chunk = chunk or len(bank)
        self.streams = [ProbeStream(probe_seed(seed, hp), device) for hp in self.configs]
        self.shared_stream = ProbeStream(probe_seed(seed, None), device)
        lrs = cosine_lrs([hp.lr for hp in self.configs], total_steps)
        wd = torch.tensor([hp.wd for hp in self.configs], dtype=torch.float64)
        self.decay = (1 - lrs * wd).float().to(device)  # (S, G)
        self.lrs = lrs  # float64, the schedule (for inspection)
        self.names = list(bank.params)
        self.exp_avgs = [torch.zeros_like(bank.params[n]) for n in self.names]
        self.exp_avg_sqs = [torch.zeros_like(bank.params[n]) for n in self.names]
        self.first_bad_step = torch.full((len(bank),), -1, dtype=torch.long, device=device)
        self.step_count = 0
        self.loss_fn = torch.compile(_chunk_loss, dynamic=False) if compile else _chunk_loss

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.kind != "attentive":
            return x
        with torch.autocast(x.device.type, enabled=False):
            return normalise_tokens(self.bank.spec, x)

    def _inputs(self, xb: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
        """What each probe of the pass sees, attentive tokens normalised: (B, ...) shared by
        the bank (computed once per step) or (g, B, ...) with per-probe jitter."""
        p, sigma = self.jitter_p, self.jitter_sigma
        if p <= 0 or sigma <= 0 or self.jitter_draws == "shared":
            return self._shared_x
        if g1 - g0 == 1:  # one probe: its own draw, on the cheaper shared-input path
            return self._normalised(self.streams[g0].jitter(xb, p, sigma))
        out = torch.empty((g1 - g0, *xb.shape), dtype=xb.dtype, device=xb.device)
        for i, g in enumerate(range(g0, g1)):
            self.streams[g].jitter(xb, p, sigma, out=out[i])
        return self._normalised(out)

    def _dropout(self, batch: int, num_tokens: int, g0: int, g1: int) -> torch.Tensor | None:
        if self.bank.kind != "attentive" or not any(self.bank.dropouts[g0:g1]):
            return None
        shape = (batch, self.bank.spec.heads, num_tokens)
        drop = torch.ones((g1 - g0, *shape), device=self.bank.device)
        for i, g in enumerate(range(g0, g1)):
            mask = self.streams[g].dropout(shape, self.bank.dropouts[g], self.bank.device)
            if mask is not None:
                drop[i] = mask
        return drop

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One optimiser step of every probe on the batch xb (B, ...), yb (B,) -> losses (G,).

        Pass by pass: forward, backward, clipping and AdamW of the pass's probes, so that
        their activations, gradients and optimiser state are touched while still in cache
        (probes never interact, so the order changes nothing)."""
        if self.step_count >= self.total_steps:
            raise RuntimeError(f"the schedule has {self.total_steps} steps; all are done")
        bank, G = self.bank, len(self.bank)
        xb = xb.float()
        p, sigma = self.jitter_p, self.jitter_sigma
        if self.jitter_draws == "shared" or p <= 0 or sigma <= 0:  # one input for the bank
            self._shared_x = self._normalised(self.shared_stream.jitter(xb, p, sigma))
        s = self.step_count
        self.step_count += 1
        step_size = (self.lrs[s] / (1 - BETAS[0] ** self.step_count)).float().to(bank.device)
        losses = torch.empty(G, device=bank.device)
        for g0 in range(0, G, self.chunk):
            g1 = min(G, g0 + self.chunk)
            x = self._inputs(xb, g0, g1)
            # Jitter first, then dropout: the order in which a lone probe draws from its stream.
            drop = self._dropout(xb.shape[0], xb.shape[1], g0, g1)
            leaves = {n: bank.params[n][g0:g1].detach().requires_grad_() for n in self.names}
            buffers = {n: b[g0:g1] for n, b in bank.buffers.items()}
            with torch.autocast(bank.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss_fn(bank.kind, bank.spec, leaves, buffers, x, yb, self.weights,
                                    drop)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
            losses[g0:g1] = loss.detach()
            # norm_k.bias cancels in the softmax: no gradient, so, as torch.optim does for a
            # parameter whose .grad is None, it is neither clipped nor decayed nor updated.
            used = [i for i, grad in enumerate(grads) if grad is not None]
            clip_per_probe([grads[i] for i in used])
            adamw_step([bank.params[self.names[i]][g0:g1] for i in used],
                       [grads[i] for i in used],
                       [self.exp_avgs[i][g0:g1] for i in used],
                       [self.exp_avg_sqs[i][g0:g1] for i in used],
                       self.step_count, self.decay[s, g0:g1], step_size[g0:g1])
        # A diverged probe keeps training on NaNs without touching the others; remembered.
        newly_bad = ~torch.isfinite(losses) & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(newly_bad, s)
        return losses

    def failures(self) -> dict[int, NonFiniteLoss]:
        """Probe index -> NonFiniteLoss for every probe whose loss was ever non-finite."""
        return {g: NonFiniteLoss(f"loss became non-finite at step {step} of configuration "
                                 f"{self.configs[g].name}: lower the learning rate or check "
                                 "the features for NaN/inf")
                for g, step in enumerate(self.first_bad_step.tolist()) if step >= 0}


def fresh_probe(make_probe: Callable[[HParams], nn.Module], hp: HParams, seed: int
                ) -> nn.Module:
    """A new probe for ``hp`` whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return make_probe(hp)


def auto_chunk(bank: ProbeBank, batch: int, sample_shape: Sequence[int], per_probe_inputs: bool,
               budget_bytes: int | None = None) -> int:
    """How many probes go through one pass: all whose activations fit in ``budget_bytes``
    (default: half the free GPU memory).

    On the CPU one probe per pass (unless a budget is given): a pass then has exactly the
    shapes of a probe trained alone, so torch splits its work over threads alike and the
    bank's result for every probe equals, bit for bit, the one-by-one search's. That matters
    because the paper's lr 0.1 turns any rounding difference into another trained probe
    (docs/benchmarks.md). It costs little: per probe, passes of 8 to 9 probes were 0 to 13 %
    faster at the default experiment's size and no faster at ViT-B size."""
    if budget_bytes is None:
        if bank.device.type != "cuda":
            return 1
        budget_bytes = torch.cuda.mem_get_info(bank.device)[0] // 2
    per = activation_bytes_per_probe(bank, batch, sample_shape, per_probe_inputs)
    return max(1, min(len(bank), budget_bytes // max(per, 1)))


def _on_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Features on the device as one tensor; if they do not fit, pinned host memory and
    per-batch copies."""
    if x.device == device:
        return x, y.to(device), False
    try:
        return x.to(device), y.to(device), False
    except torch.OutOfMemoryError:
        return x.cpu().pin_memory(), y.cpu(), True


def fit_bank(configs: Sequence[HParams], make_probe: Callable[[HParams], nn.Module],
             x: torch.Tensor, y: torch.Tensor, num_classes: int, train_cfg, seed: int,
             device: torch.device | str | None = None, precision: str = "32-true",
             budget_bytes: int | None = None) -> list[nn.Module | NonFiniteLoss]:
    """Train every configuration on tokens x (N, ...) and labels y (N,) as one ProbeBank.

    Same schedule and batch order as ``fit_probe`` (FeatureBatches with ``seed``); bf16
    autocast when on CUDA with a bf16 ``precision``, fp32 otherwise. ``train_cfg.compile``
    compiles the step; ``train_cfg.jitter_draws`` (shared | per_probe) picks the jitter
    streams. Returns, in ``configs`` order, the trained probe (eval mode), or the
    NonFiniteLoss of a configuration whose loss became NaN/inf (the others are unaffected).
    """
    device = torch.device(device) if device is not None else x.device
    probes = [fresh_probe(make_probe, hp, seed) for hp in configs]
    bank = ProbeBank.from_probes(probes, [hp.dropout for hp in configs]).to(device)
    x, y, streamed = _on_device(x, y, device)
    batch = batch_size_for(len(y), train_cfg.batch_size, train_cfg.min_batches)
    batches = FeatureBatches(x, y, batch, shuffle=True, seed=seed)
    steps = len(batches) * epochs_for(len(y), batch, train_cfg.epochs, train_cfg.min_steps)
    jitter_draws = train_cfg.get("jitter_draws", "shared")
    chunk = auto_chunk(bank, batch, x.shape[1:], jitter_draws == "per_probe", budget_bytes)
    trainer = BankTrainer(
        bank, configs, steps, class_weights(y, num_classes), seed,
        train_cfg.jitter_p, train_cfg.jitter_sigma, jitter_draws,
        autocast=device.type == "cuda" and "bf16" in str(precision),
        compile=bool(train_cfg.get("compile", False)), chunk=chunk)
    while trainer.step_count < steps:
        for xb, yb in batches:
            if streamed:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            trainer.step(xb, yb)
            if trainer.step_count == steps:
                break
    failed = trainer.failures()
    return [failed.get(g) or bank.export(g) for g in range(len(bank))]


# ----------------------------------------------------------------------------- several ranks

def grid_slice(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of n configurations: sizes differ by at most one,
    the first ``n % world`` ranks take one more."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def fit_grid(configs: Sequence[HParams], make_probe: Callable[[HParams], nn.Module],
             x: torch.Tensor, y: torch.Tensor, num_classes: int, train_cfg, seed: int,
             precision: str = "32-true") -> list[nn.Module | NonFiniteLoss]:
    """``fit_bank`` over the whole grid; when torch.distributed is initialised with several
    ranks, each rank trains its ``grid_slice`` and the trained weights are all-gathered, so
    every rank (rank 0 included) returns all probes in ``configs`` order and the search goes
    on identically everywhere. Per-probe seeds make a probe's result independent of its rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fit_bank(configs, make_probe, x, y, num_classes, train_cfg, seed,
                        precision=precision)
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = list(configs[grid_slice(len(configs), world, rank)])
    trained = fit_bank(mine, make_probe, x, y, num_classes, train_cfg, seed,
                       precision=precision) if mine else []
    states = [p if isinstance(p, NonFiniteLoss) else {k: v.cpu() for k, v in
                                                         p.state_dict().items()}
              for p in trained]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, states)
    probes: list[nn.Module | NonFiniteLoss] = []
    for hp, state in zip(configs, [s for part in gathered for s in part], strict=True):
        if isinstance(state, NonFiniteLoss):
            probes.append(state)
            continue
        probe = make_probe(hp)
        probe.load_state_dict(state)
        probes.append(probe.to(x.device).eval())
    return probes
