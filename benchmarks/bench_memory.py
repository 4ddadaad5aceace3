"""Peak memory of a ProbeBank training step at ViT-L size: G = 63, 48 tokens x 1024, batch 2048.

No GPU here, so the number is an estimate, labelled as such:

1. measured on the CPU: peak resident memory of a process that builds a bank and runs two
   steps, at ViT-L token size with small G and batch, minus the process's memory before the
   bank existed; compared with ``step_bytes`` (the analytic count below) for the same
   settings. The ratio says how far the count can be trusted.
2. computed: ``step_bytes`` for G = 63, batch 2048: fp32 parameters, gradients and the two
   AdamW moments of every probe (4 x G x P x 4 bytes), the fp32 batch, and the activations of
   one pass (``activation_bytes_per_probe`` x probes per pass), for all 63 probes in one
   pass and for the pass size ``auto_chunk`` picks on an 80 GB GPU (half the free memory).
   Counted in fp32: bf16 autocast on a GPU keeps some activations in half precision.
   The cached features themselves (N x 48 x 1024 fp16, e.g. 2.0 GB for N = 20k) come on top.

``python -m benchmarks memory``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from alfusion.engine.fit import activation_bytes_per_probe
from alfusion.probes import AttentiveProbe
from alfusion.probes.bank import ProbeBank

T, D, C = 48, 1024, 10
GIB = 1 << 30


def probe(dim: int = D, tokens: int = T) -> AttentiveProbe:
    return AttentiveProbe(dim, C, num_heads=tokens)


def step_bytes(G: int, batch: int, chunk: int, per_probe_inputs: bool) -> dict:
    """The analytic count, in bytes, of one bank step's live memory (no cached features)."""
    one = ProbeBank.from_probes([probe()])
    params = sum(v.numel() for v in one.params.values())
    state = 4 * G * params * 4  # parameters, gradients, exp_avg, exp_avg_sq
    batch_in = 2 * batch * T * D * 4  # gathered batch and its fp32 copy
    act = min(chunk, G) * activation_bytes_per_probe(one, batch, (T, D), per_probe_inputs)
    return dict(params_per_probe=params, state=state, batch=batch_in, activations=act,
                total=state + batch_in + act)


def child(G: int, batch: int, per_probe: bool) -> None:
    """Run in a fresh process: build a bank of G ViT-L-sized ALF probes, two steps, report
    peak RSS growth (bytes) since before the bank existed."""
    from alfusion.engine import BankStep
    from alfusion.protocol import HParams
    x = torch.nn.functional.normalize(torch.randn(2 * batch, T, D), dim=-1)
    y = torch.arange(2 * batch) % C
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    configs = [HParams(0.01, 1e-4 * (g + 1)) for g in range(G)]
    bank = ProbeBank.from_probes([probe() for _ in configs])
    core = BankStep(bank, configs, 10, torch.ones(C), seed=0, chunk=G,
                    jitter_draws="per_probe" if per_probe else "shared")
    for i in range(2):
        core.step(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(measured=peak - before)))


def measure(G: int, batch: int, per_probe: bool) -> int:
    code = (f"import alfusion; from benchmarks.bench_memory import child; "
            f"child({G}, {batch}, {per_probe})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]


def main(small=((2, 64), (4, 64), (4, 128))) -> dict:
    print(f"ALF bank step memory at ViT-L size ({T} tokens x {D}, {T} heads, C={C})")
    print("  1) measured on this CPU (peak RSS growth) vs the analytic count, chunk = G:")
    worst = 0.0
    for per_probe in (True, False):
        for G, batch in small:
            measured = measure(G, batch, per_probe)
            est = step_bytes(G, batch, G, per_probe)["total"]
            worst = max(worst, measured / est)
            print(f"     G={G} batch={batch:4d} jitter_draws="
                  f"{'per_probe' if per_probe else 'shared   '}: measured "
                  f"{measured / GIB:6.2f} GiB, counted {est / GIB:6.2f} GiB, "
                  f"ratio {measured / est:.2f}", flush=True)
    print("  2) counted for G=63, batch 2048 (fp32 count; GPU bf16 autocast stores less):")
    free_80gb = 79 * GIB  # an H100/A100 80 GB with the CUDA context and features loaded
    result = {}
    for per_probe in (True, False):
        one = ProbeBank.from_probes([probe()])
        per = activation_bytes_per_probe(one, 2048, (T, D), per_probe)
        state = step_bytes(63, 2048, 1, per_probe)["state"]
        chunk = max(1, min(63, (free_80gb - state) // 2 // per))
        for label, c in (("all 63 probes in one pass", 63), (f"auto_chunk: {chunk} per pass",
                                                             chunk)):
            b = step_bytes(63, 2048, c, per_probe)
            result[(per_probe, c)] = b["total"]
            print(f"     jitter_draws={'per_probe' if per_probe else 'shared   '}, {label:27s}: "
                  f"{b['total'] / GIB:6.1f} GiB (state {b['state'] / GIB:.1f}, activations "
                  f"{b['activations'] / GIB:.1f}, batch {b['batch'] / GIB:.1f}); x "
                  f"{worst:.2f} (worst measured/counted) = {b['total'] * worst / GIB:6.1f} GiB",
                  flush=True)
    print(f"  parameters per probe: {step_bytes(1, 1, 1, True)['params_per_probe']:,}")
    return result


if __name__ == "__main__":
    main()
