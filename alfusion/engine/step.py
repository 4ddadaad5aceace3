"""BankStep: one optimiser step of every probe of a ProbeBank, with the protocol's rules.

Per probe, a step is exactly what training that probe alone does (docs/protocol.md,
training): feature jitter and attention dropout from the probe's seeded streams, BatchNorm with
its own running statistics, class-weighted cross-entropy (the bank loss is the sum of the
per-probe losses, so gradients do not mix), gradient-norm clipping on the probe's own norm,
AdamW with torch's bias correction and eps placement, and the per-step cosine schedule.

Jitter draws (``jitter_draws``): ``shared`` (default) draws one jitter per step from the run
seed's stream for every probe (what each configuration trained alone with the seed sees), so
the tokens' LayerNorm is computed once for the whole bank; ``per_probe`` gives every probe its
own draws (G inputs and LayerNorms per step).

``extra``: the parameters of a trainable backbone (fine-tuning; a bank of one), updated with
the probe's AdamW at ``extra_lr_scale`` x its lr and clipped together with it. ``sync``: the
global batch is split over the ranks of the process group (end-to-end DDP): BatchNorm
statistics, the loss normaliser and the gradients are summed over ranks, so every rank takes
the step one process would take on the whole batch. ``part`` (rank, world) names the rank's
share (rows rank, rank + world, ... of the global batch): jitter and dropout are drawn for the
global batch and the rank's rows kept, so the draws too are those of one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from alfusion import native
from alfusion.engine.data import Rows
from alfusion.probes.attentive_grads import attentive_loss_and_grads
from alfusion.probes.bank import ProbeBank
from alfusion.probes.functional import probe_logits, weighted_loss
from alfusion.protocol import (
    MIN_LR,
    HParams,
    NonFiniteLoss,
    clip_divisors,
    cosine_lrs,
    fused_adamw,
    native_adamw,
    non_finite,
)
from alfusion.random_draws import JITTER_MODES, ProbeStream, probe_seed

JITTER_DRAWS = ("shared", "per_probe")


class BankStep:
    """Trains a ProbeBank one batch at a time: per-probe optimiser state and schedule.

    configs: the G configurations; total_steps: the schedule's length; weights: class weights
    (C,). ``chunk`` probes go through one forward/backward pass (all by default); passes only
    bound memory: probes never interact.
    """

    def __init__(self, bank: ProbeBank, configs: Sequence[HParams], total_steps: int,
                 weights: torch.Tensor, seed: int, jitter_p: float = 0.5,
                 jitter_sigma: float = 0.05, jitter: str = "per_sample",
                 jitter_draws: str = "shared", chunk: int | None = None,
                 extra: Sequence[torch.nn.Parameter] = (), extra_lr_scale: float = 1.0,
                 sync: bool = False, part: tuple[int, int] = (0, 1)) -> None:
        if jitter_draws not in JITTER_DRAWS:
            raise ValueError(f"train.jitter_draws={jitter_draws!r}: use one of {JITTER_DRAWS}")
        if jitter not in JITTER_MODES:
            raise ValueError(f"jitter mode {jitter!r}: use one of {JITTER_MODES}")
        if extra and len(bank) != 1:
            raise ValueError("a trainable backbone trains with a bank of one probe")
        device = bank.device
        self.bank, self.configs = bank, list(configs)
        self.total_steps, self.weights = total_steps, weights.to(device)
        self.jitter_p, self.jitter_sigma = jitter_p, jitter_sigma
        self.jitter, self.jitter_draws = jitter, jitter_draws
        self.chunk = chunk or len(bank)
        self.sync, self.part = sync, part
        self.streams = [ProbeStream(probe_seed(seed, hp), device) for hp in self.configs]
        self.shared_stream = ProbeStream(probe_seed(seed, None), device)
        self.lrs = cosine_lrs([hp.lr for hp in self.configs], total_steps)  # (S, G) float64
        self._step_t = torch.zeros((), device=device)  # the fused AdamW's step number
        self.names = list(bank.params)
        self.exp_avgs = [torch.zeros_like(bank.params[n]) for n in self.names]
        self.exp_avg_sqs = [torch.zeros_like(bank.params[n]) for n in self.names]
        self.extra = list(extra)
        self.extra_avgs = [torch.zeros_like(p) for p in self.extra]
        self.extra_avg_sqs = [torch.zeros_like(p) for p in self.extra]
        if self.extra:
            hp = self.configs[0]
            # The head's schedule scaled: the backbone keeps its lr ratio down to the floor.
            self.extra_lrs = cosine_lrs([hp.lr * extra_lr_scale], total_steps,
                                        MIN_LR * extra_lr_scale)
        self.first_bad_step = torch.full((len(bank),), -1, dtype=torch.long, device=device)
        self.losses = torch.zeros(total_steps, len(bank), device=device)
        self.step_count = 0

    # -------------------------------------------------------------------------- inputs

    def _jittered(self, stream: ProbeStream, xb: torch.Tensor, out: torch.Tensor | None = None,
                  index: torch.Tensor | None = None, defer: bool = False
                  ) -> torch.Tensor | native.JitterPass:
        """xb (B, ...) (or its rows ``index``) jittered by ``stream``, attentive tokens
        normalised (in one native pass on the CPU, random_draws.py), into ``out`` when
        given; ``defer``: that pass returned to be run by the attention forward."""
        eps = self.bank.spec.eps_kv if self.bank.kind == "attentive" else None
        return stream.jitter(xb, self.jitter_p, self.jitter_sigma, self.jitter, out=out,
                             part=self.part, eps=eps, index=index, defer=defer)

    def _inputs(self, xb: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
        """What each probe of the pass sees, attentive tokens normalised: (B, ...) shared by
        the bank (computed once per step) or (g, B, ...) with per-probe jitter."""
        if self._shared_x is not None:
            return self.bank.inputs(self._shared_x, g0, g1)
        if g1 - g0 == 1:  # one probe: its own draw, on the cheaper shared-input path
            return self._jittered(self.streams[g0], xb)
        out = torch.empty((g1 - g0, *xb.shape), dtype=xb.dtype, device=xb.device)
        for i, g in enumerate(range(g0, g1)):
            self._jittered(self.streams[g], xb, out=out[i])
        return out

    def _dropout(self, batch: int, num_tokens: int, g0: int, g1: int) -> torch.Tensor | None:
        if self.bank.kind != "attentive" or not any(self.bank.dropouts[g0:g1]):
            return None
        rank, world = self.part
        shape = (batch * world, self.bank.spec.heads, num_tokens)  # the global batch's masks
        drop = torch.ones((g1 - g0, batch, *shape[1:]), device=self.bank.device)
        for i, g in enumerate(range(g0, g1)):
            mask = self.streams[g].dropout(shape, self.bank.dropouts[g], self.bank.device)
            if mask is not None:
                drop[i] = mask[rank::world]
        return drop

    # -------------------------------------------------------------------------- the step

    def _by_hand(self, x: torch.Tensor, probes: int) -> bool:
        """Whether a pass takes the hand-derived gradients (probes/attentive_grads.py): one
        attentive probe on fp32 CPU tokens, nothing synced over ranks, no trainable backbone
        and no autocast; every other pass (GPU banks, bf16, data-parallel DDP, fine-tuning)
        uses autograd."""
        return (self.bank.kind == "attentive" and probes == 1 and not self.sync
                and not self.extra and x.device.type == "cpu" and x.dtype == torch.float32
                and not x.requires_grad and not torch.is_autocast_enabled("cpu"))

    def step(self, xb: torch.Tensor | Rows, yb: torch.Tensor, owned: bool = False
             ) -> torch.Tensor:
        """One optimiser step of every probe on the batch xb (B, ...), yb (B,) -> losses (G,).
        xb may be Rows (a batch not yet gathered: the shared jitter gathers it as it reads
        it). ``owned``: xb is this step's own copy (the image loaders make one per step), so
        the shared jitter is added to it in place instead of to a copy.

        Pass by pass: forward, backward, clipping and AdamW of the pass's probes, so that
        their activations, gradients and optimiser state are touched while still in cache."""
        if self.step_count >= self.total_steps:
            raise RuntimeError(f"the schedule has {self.total_steps} steps; all are done")
        bank, G = self.bank, len(self.bank)
        if G == 0:  # this rank's share of a split grid is empty: it only keeps step
            self.step_count += 1
            return torch.empty(0, device=bank.device)
        shared = self.jitter_draws == "shared" or self.jitter == "off" \
            or self.jitter_p <= 0 or self.jitter_sigma <= 0
        job = None  # the shared jitter, when the first pass's attention forward runs it
        if isinstance(xb, Rows) and shared and xb.source.dtype == torch.float32:
            # passes of one probe, each by hand: the first one's forward runs the jitter
            defer = self.chunk == 1 and bank.positions is None and self._by_hand(xb.source, 1)
            xb = self._jittered(self.shared_stream, xb.source, index=xb.index, defer=defer)
            if isinstance(xb, native.JitterPass):
                job, xb = xb, xb.x
            self._shared_x = xb
        else:
            if isinstance(xb, Rows):
                xb, owned = xb.gather(), True
            # fp16 cached tokens become a new fp32 tensor here: this step's own too
            owned = (owned or xb.dtype != torch.float32) and not xb.requires_grad
            xb = xb.float()
            self._shared_x = self._jittered(self.shared_stream, xb, out=xb if owned else None) \
                if shared else None
        total_weight = None
        if self.sync:  # the weighted mean over the global batch
            total_weight = self.weights[yb].sum()
            dist.all_reduce(total_weight)
        s = self.step_count
        self.step_count += 1
        losses = torch.empty(G, device=bank.device)
        for g0 in range(0, G, self.chunk):
            g1 = min(G, g0 + self.chunk)
            x = self._inputs(xb, g0, g1)
            # Jitter first, then dropout: the order in which a lone probe draws from its stream.
            drop = self._dropout(xb.shape[0], xb.shape[1], g0, g1)
            buffers = {n: b[g0:g1] for n, b in bank.buffers.items()}
            if self._by_hand(x, g1 - g0):
                loss, named = attentive_loss_and_grads(
                    bank.spec, {n: bank.params[n][g0:g1] for n in self.names}, buffers,
                    job or x, yb, self.weights, None if drop is None else drop[0], parts=True)
                grads, job = [named.get(n) for n in self.names], None  # x is jittered now
            else:
                leaves = {n: bank.params[n][g0:g1].detach().requires_grad_()
                          for n in self.names}
                logits = probe_logits(bank.kind, bank.spec, leaves, buffers, x, True, drop,
                                      normalised=True, sync_bn=self.sync)
                loss = weighted_loss(logits, yb, self.weights, total_weight)
                wrt = list(leaves.values()) + self.extra
                grads = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
            losses[g0:g1] = loss.detach()
            if self.sync:
                for grad in grads:
                    if grad is not None:
                        dist.all_reduce(grad)
            self._update(grads, g0, g1, s)
        if self.sync:  # each rank's loss is its share of the global one
            dist.all_reduce(losses)
        # A diverged probe keeps training on NaNs without touching the others; remembered.
        newly_bad = ~torch.isfinite(losses) & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(newly_bad, s)
        self.losses[s] = losses
        return losses

    def _update(self, grads, g0: int, g1: int, s: int) -> None:
        """Clip and AdamW-update probes g0 .. g1 - 1 (and the trainable backbone): per probe
        one fused AdamW pass over its tensors, its clipping folded in; on the CPU one native
        call per probe, its clipping norm included (native/adamw.c)."""
        n = len(self.names)
        probe_grads, extra_grads = grads[:n], grads[n:]
        # norm_k.bias cancels in the softmax: no gradient, so, as torch.optim does for a
        # parameter whose .grad is None, it is neither clipped nor decayed nor updated.
        used = [i for i, grad in enumerate(probe_grads) if grad is not None]
        extra = [(p, g.unsqueeze(0), m, v) for p, g, m, v in
                 zip(self.extra, extra_grads, self.extra_avgs, self.extra_avg_sqs, strict=True)
                 if g is not None]
        lrs = self.lrs[s, g0:g1].tolist()
        grads = [probe_grads[i] if isinstance(probe_grads[i], native.GradParts)
                 else probe_grads[i].contiguous() for i in used]
        state = [[ts[i] for i in used] for ts in (
            [self.bank.params[n] for n in self.names], self.exp_avgs, self.exp_avg_sqs)]
        # probe g0 + k: row g0 + k of the bank's tensors, row k of the pass's gradients (one
        # in parts is its one probe's as it is)
        if not extra and native.adamw_ready(*grads, *(t for ts in state for t in ts)):
            for k in range(g1 - g0):
                p, m, v = ([t[g0 + k] for t in ts] for ts in state)
                grad = [g if isinstance(g, native.GradParts) else g[k] for g in grads]
                native_adamw(p, grad, m, v, self.step_count, lrs[k], self.configs[g0 + k].wd)
            return
        grads = [g.tensor().unsqueeze(0) if isinstance(g, native.GradParts) else g
                 for g in grads]
        divisors = clip_divisors(grads + [g for _, g, _, _ in extra])
        self._step_t.fill_(self.step_count)
        for k in range(g1 - g0):
            p, m, v = ([t[g0 + k] for t in ts] for ts in state)
            fused_adamw(p, [g[k] for g in grads], m, v, self._step_t, lrs[k],
                        self.configs[g0 + k].wd, divisors[k])
        if extra:
            fused_adamw([p.data for p, _, _, _ in extra], [g[0] for _, g, _, _ in extra],
                        [m for _, _, m, _ in extra], [v for _, _, _, v in extra], self._step_t,
                        float(self.extra_lrs[s, 0]), self.configs[0].wd, divisors[0])

    # -------------------------------------------------------------------------- results

    @property
    def finished(self) -> bool:
        return self.step_count >= self.total_steps

    def all_failed(self) -> bool:
        return bool((self.first_bad_step >= 0).all())

    def failures(self) -> dict[int, NonFiniteLoss]:
        """Probe index -> NonFiniteLoss for every probe whose loss was ever non-finite."""
        return {g: non_finite(step, self.configs[g])
                for g, step in enumerate(self.first_bad_step.tolist()) if step >= 0}

    # -------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Everything a resumed fit needs to continue bit for bit (tensors and ints only)."""
        return dict(step_count=self.step_count, first_bad_step=self.first_bad_step,
                    losses=self.losses, params=self.bank.params, buffers=self.bank.buffers,
                    exp_avgs=self.exp_avgs, exp_avg_sqs=self.exp_avg_sqs,
                    extra_avgs=self.extra_avgs, extra_avg_sqs=self.extra_avg_sqs,
                    streams=[s.generator.get_state() for s in self.streams],
                    shared_stream=self.shared_stream.generator.get_state())

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.first_bad_step.copy_(state["first_bad_step"])
        self.losses.copy_(state["losses"])
        for name in ("params", "buffers"):
            for k, v in getattr(self.bank, name).items():
                v.copy_(state[name][k])
        for name in ("exp_avgs", "exp_avg_sqs", "extra_avgs", "extra_avg_sqs"):
            mine, saved = getattr(self, name), state[name]
            for a, b in zip(mine, saved, strict=True):
                a.copy_(b)
        for stream, gen_state in zip(self.streams, state["streams"], strict=True):
            stream.generator.set_state(gen_state.cpu())
        self.shared_stream.generator.set_state(state["shared_stream"].cpu())
