"""ProbeBank: G probes of one architecture held as stacked tensors (DESIGN: one engine).

Every entry of the single probe's state dict becomes a (G, *shape) tensor under the same name,
so probe g exports as a plain ``AttentiveProbe`` / ``LinearProbe`` in the paper's
parameterisation. The math that runs a bank is probes/functional.py; the engine
(alfusion/engine/) trains it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from alfusion.probes.attentive import AttentiveProbe
from alfusion.probes.functional import AttentiveSpec, probe_logits
from alfusion.probes.linear import LinearProbe
from alfusion.protocol import HParams


def fresh_probe(make_probe: Callable[[HParams], nn.Module], hp: HParams, seed: int
                ) -> nn.Module:
    """A new probe for ``hp`` whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return make_probe(hp)


class ProbeBank:
    """G probes of one architecture as stacked tensors.

    params: state-dict name -> (G, *shape) trainable tensors; buffers: BatchNorm running
    statistics (G, D) and counters (G,). ``template`` is a probe of the architecture, used
    to export probe g; ``dropouts`` (G,) the attention-dropout rate of each probe.
    ``positions`` (G,), linear banks only: probe g reads token positions[g] of (B, P, D)
    inputs (the per-layer heads), instead of the whole input.
    """

    def __init__(self, template: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], dropouts: Sequence[float],
                 positions: Sequence[int] | None = None) -> None:
        if not isinstance(template, AttentiveProbe | LinearProbe):
            raise TypeError(f"ProbeBank holds AttentiveProbe or LinearProbe, not "
                            f"{type(template).__name__}")
        self.template = template
        self.kind = "attentive" if isinstance(template, AttentiveProbe) else "linear"
        self.spec: AttentiveSpec | None = template.spec if self.kind == "attentive" else None
        self.params, self.buffers = params, buffers
        self.dropouts = [float(d) for d in dropouts]
        self.positions = list(positions) if positions is not None else None

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
        stacked = {k: torch.stack([s[k].detach() for s in states]) for k in shapes}
        if dropouts is None:
            dropouts = [getattr(getattr(p, "attn_drop", None), "p", 0.0) for p in probes]
        template = copy.deepcopy(first).cpu()
        return cls(template, {k: v for k, v in stacked.items() if k in names},
                   {k: v for k, v in stacked.items() if k not in names}, dropouts)

    @classmethod
    def fresh(cls, make_probe: Callable[[HParams], nn.Module], configs: Sequence[HParams],
              seed: int) -> ProbeBank:
        """A bank of new probes, one per configuration, each initialised from ``seed``."""
        return cls.from_probes([fresh_probe(make_probe, hp, seed) for hp in configs],
                               [hp.dropout for hp in configs])

    def __len__(self) -> int:
        return len(self.dropouts)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def to(self, device: torch.device | str) -> ProbeBank:
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def part(self, g0: int, g1: int) -> ProbeBank:
        """Probes g0 .. g1 - 1 as a bank (copies)."""
        return ProbeBank(self.template, {k: v[g0:g1].clone() for k, v in self.params.items()},
                         {k: v[g0:g1].clone() for k, v in self.buffers.items()},
                         self.dropouts[g0:g1],
                         self.positions[g0:g1] if self.positions is not None else None)

    def inputs(self, x: torch.Tensor, g0: int = 0, g1: int | None = None) -> torch.Tensor:
        """What probes g0 .. g1 - 1 read of x: x itself, or with ``positions`` their own
        token of x (B, P, D) as (g, B, D)."""
        if self.positions is None:
            return x
        return x[:, self.positions[g0:g1]].transpose(0, 1)

    def state(self, g: int) -> dict[str, torch.Tensor]:
        """Probe g's state dict (host tensors)."""
        return {k: v[g].detach().cpu().clone() for k, v in {**self.params,
                                                             **self.buffers}.items()}

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
        return probe_logits(self.kind, self.spec, self.params, self.buffers, self.inputs(x),
                            training=False)
