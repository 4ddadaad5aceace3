"""The random draws of a probe fit (feature jitter, attention dropout) from seeded generators.

Every configuration of a search draws from its own stream, seeded by (run seed,
configuration), and the jitter of the default ``train.jitter_draws=shared`` from one stream
of the run seed. A configuration therefore sees the same jitter and dropout masks, step for
step, whatever else is trained beside it: in a grid, in a refit, on any rank. The
distributions are the paper's: jitter adds N(0, sigma^2) to a whole sample with probability p
(end to end, the paper flips one coin per batch), dropout is inverted Bernoulli dropout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alfusion import native
from alfusion.protocol import HParams

JITTER_MODES = ("per_sample", "per_batch", "off")


def probe_seed(seed: int, hp: HParams | None) -> int:
    """A generator seed that depends only on the run seed and the configuration (None: the
    run's shared stream)."""
    key = f"{seed}|shared" if hp is None else f"{seed}|{hp.lr!r}|{hp.wd!r}|{hp.dropout!r}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


class ProbeStream:
    """One stream of draws from its own generator: jitter coin and noise, dropout masks.

    Draw order per step: jitter coin(s), jitter noise for the chosen samples, then the
    dropout keep mask (B, H, T) when the probe has dropout.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def jitter(self, x: torch.Tensor, p: float, sigma: float, mode: str = "per_sample",
               out: torch.Tensor | None = None, part: tuple[int, int] = (0, 1),
               eps: float | None = None, index: torch.Tensor | None = None,
               defer: bool = False) -> torch.Tensor | native.JitterPass:
        """x: (B, ..., D) -> x with N(0, sigma^2) noise on each whole sample with probability p
        (``per_batch``: on the whole batch with probability p; ``off``: none), written into
        ``out`` (B, ...) when given (``out`` may be x itself: the noise is added in place).
        ``eps``: then each token is normalised (LayerNorm without affine along D, fp32).
        ``index`` (B,): the batch is x's rows ``index`` (x.index_select(0, index)), gathered
        here.

        ``part`` (rank, world): x holds rows rank, rank + world, ... of a global batch of
        world x B rows (a data-parallel rank's share); the coins are flipped for the global
        batch and the noise is that of the rows' global positions, so the ranks together
        jitter as one process would.

        The noise: on the CPU (fp32), native/jitter.c computes it from Philox, keyed by one
        64-bit draw of this stream and the sample's global row, fused with the normalisation
        and the gather (a fifth of the time of torch's generator and LayerNorm); elsewhere
        (GPUs; no C compiler) torch's generator draws it for the chosen samples. Either way
        half the random numbers at p = 0.5: noise only for the chosen samples.

        ``defer``: where the native kernel would run, it is returned as a native.JitterPass,
        its random numbers drawn, for the attention forward to run as it reads the tokens."""
        batch = len(x) if index is None else len(index)
        rows = None
        if p > 0 and sigma > 0 and mode != "off":
            rank, world = part
            n = batch * world
            coins = 1 if mode == "per_batch" else n
            chosen = torch.rand(coins, generator=self.generator, device=x.device) < p
            rows = (chosen.expand(n) if mode == "per_batch" else chosen).nonzero()[:, 0]
        if index is not None and not native.jitter_ready(x):  # gathered here: a new tensor
            x, index = x.index_select(0, index), None
            out = x if out is None else out
        if rows is None and eps is None:  # nothing to add or normalise: the batch as it is
            x = x if index is None else x.index_select(0, index)
            if out is not None and out is not x:
                out.copy_(x)
            return x if out is None else out
        if index is not None:  # the kernel reads the rows from x
            target = x.new_empty((batch, *x.shape[1:])) if out is None else out
        else:
            if out is not None and out is not x:
                out.copy_(x)
            target = x.clone() if out is None else out
        if native.jitter_ready(target):
            local, key = torch.full((batch,), -1, dtype=torch.int64), 0  # -1: no noise
            if rows is not None:
                mine = rows[rows % world == rank]
                local[mine // world] = mine
                key = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=self.generator))
            job = native.jitter_pass(target, local, key & (2 ** 64 - 1), sigma, eps,
                                     source=None if index is None else x, index=index)
            return job if defer else job.run()
        if index is not None:  # an output the kernel does not take
            target.copy_(x.index_select(0, index))
        if rows is not None:
            noise = torch.randn((rows.numel(), *x.shape[1:]), generator=self.generator,
                                device=x.device, dtype=x.dtype)
            if world > 1:
                mine = rows % world == rank
                rows, noise = rows[mine] // world, noise[mine]
            target.index_add_(0, rows, noise, alpha=sigma)
        if eps is None:
            return target
        with torch.autocast(x.device.type, enabled=False):
            normed = F.layer_norm(target.float(), target.shape[-1:], eps=eps)
        return normed if out is None else out.copy_(normed)

    def dropout(self, shape: Sequence[int], p: float, device: torch.device | str
                ) -> torch.Tensor | None:
        """Inverted-dropout multiplier (shape) with zeros at rate p and 1/(1-p) elsewhere."""
        if p <= 0:
            return None
        keep = torch.rand(tuple(shape), generator=self.generator, device=device) >= p
        return keep.float() * (1.0 / (1.0 - p))


class StreamDropout(nn.Module):
    """nn.Dropout(p) whose masks come from a ProbeStream: (..., H, T) attention -> the same."""

    def __init__(self, stream: ProbeStream, p: float) -> None:
        super().__init__()
        self.stream, self.p = stream, p

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        mask = self.stream.dropout(attn.shape, self.p, attn.device) if self.training else None
        return attn if mask is None else attn * mask
