"""The native CPU kernels' build (alfusion/native/build.py) and the jitter kernel (jitter.c):
its Philox noise against an oracle written here in plain Python, its distribution, its
LayerNorm, and the jitter it gives ProbeStream (ranks, threads, and torch's path where no
compiler builds the kernel). The attention kernel: tests/test_attentive_grads.py."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from alfusion import native
from alfusion.random_draws import ProbeStream

LOW = 0xFFFFFFFF


def philox(counter: tuple[int, int, int, int], key: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al., SC 2011) of one counter under a 64-bit key."""
    a, b, c, d = counter
    k0, k1 = key & LOW, key >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * a, 0xCD9E8D57 * c
        a, b, c, d = (p1 >> 32) ^ b ^ k0, p1 & LOW, (p0 >> 32) ^ d ^ k1, p0 & LOW
        k0, k1 = (k0 + 0x9E3779B9) & LOW, (k1 + 0xBB67AE85) & LOW
    return a, b, c, d


def oracle_normals(key: int, row: int, n: int) -> torch.Tensor:
    """Normals 0 .. n-1 of ``row`` in the kernel's documented layout: block k of 64 counters
    (64 k + j, row_lo, row_hi, 0) gives [cos(a, b)] [sin(a, b)] [cos(c, d)] [sin(c, d)] over
    j, Box-Muller of the 24-bit uniforms ((w >> 8) + 1) / 2^24 and (w >> 8) / 2^24; float64."""
    blocks = math.ceil(n / 256)
    words = torch.tensor([philox((i, row & LOW, row >> 32, 0), key)
                          for i in range(64 * blocks)], dtype=torch.float64)
    top = torch.floor(words / 256)
    out = []
    for u, v in ((top[:, 0], top[:, 1]), (top[:, 2], top[:, 3])):
        r = torch.sqrt(-2 * torch.log((u + 1) / 2 ** 24))
        theta = 2 * math.pi * v / 2 ** 24
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack([w.view(blocks, 64) for w in out], 1).reshape(-1)[:n]


def kernel_noise(key: int, rows: list[int], n: int) -> torch.Tensor:
    """The kernel's raw noise: sigma 1 on zeros, no LayerNorm -> (len(rows), n)."""
    x = torch.zeros(len(rows), n)
    return native.jitter_pass(x, torch.tensor(rows), key, 1.0, None).run()


@pytest.fixture(autouse=True)
def _kernel_built():
    assert native.jitter_ready(torch.zeros(1)), "the jitter kernel did not build (cc, -fopenmp)"


def test_philox_oracle_meets_the_published_known_answers():
    assert philox((0, 0, 0, 0), 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox((LOW, LOW, LOW, LOW), 2 ** 64 - 1) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                        0x6D5451FD)


@pytest.mark.parametrize("n", [3, 256, 1000, 9216])
def test_the_kernel_draws_the_documented_philox_normals(n):
    key, rows = 0x0123456789ABCDEF, [0, 7, 2 ** 33 + 5]
    got = kernel_noise(key, rows, n).double()
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i], oracle_normals(key, row, n), rtol=0, atol=2e-5)


def test_the_noise_is_standard_normal():
    x = kernel_noise(2024, list(range(200)), 9216).double().flatten()  # 1.8 M numbers
    n = x.numel()
    assert abs(x.mean().item()) * math.sqrt(n) < 4  # z-scores: fixed key, so no flakiness
    assert abs(x.var().item() - 1) / math.sqrt(2 / n) < 4
    assert abs(((x - x.mean()) ** 4).mean().item() / x.var().item() ** 2 - 3) < 0.02
    # rows and keys give unrelated numbers
    a, b = kernel_noise(1, [0, 1], 4096), kernel_noise(2, [0], 4096)
    assert abs(torch.corrcoef(torch.stack([a[0], a[1], b[0]]))[0, 1:]).max() < 0.06


def test_the_fused_layer_norm_is_layer_norm():
    x = torch.randn(6, 5, 96) * 3 + 1
    rows = torch.tensor([-1, 4, -1, 9, 10, -1])
    noised = x.clone()
    noised[rows >= 0] += 0.05 * kernel_noise(77, [4, 9, 10], 5 * 96).view(3, 5, 96)
    got = native.jitter_pass(x.clone(), rows, 77, 0.05, 1e-6).run()
    torch.testing.assert_close(got, F.layer_norm(noised, (96,), eps=1e-6), rtol=0, atol=2e-6)


def test_the_result_does_not_depend_on_the_thread_count():
    x, rows = torch.randn(64, 24, 384), torch.arange(64) * 3 - 50
    outs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outs.append(native.jitter_pass(x.clone(), rows, 5, 0.05, 1e-6).run())
        finally:
            torch.set_num_threads(before)
    assert torch.equal(*outs)


def test_ranks_jitter_their_rows_as_one_process_does():
    x = torch.randn(12, 4, 32)
    whole = ProbeStream(3).jitter(x, 0.5, 0.05, eps=1e-6)
    for rank in range(3):
        part = ProbeStream(3).jitter(x[rank::3].contiguous(), 0.5, 0.05, part=(rank, 3),
                                     eps=1e-6)
        assert torch.equal(part, whole[rank::3])
    touched = ProbeStream(3).jitter(x, 0.5, 0.05) != x
    assert 0 < touched.flatten(1).all(1).sum() < 12


@pytest.mark.parametrize("eps", [1e-6, None])
def test_rows_read_from_the_source_equal_the_gathered_batch(eps):
    """The fit's batch as rows of the features: the kernel reads them as it jitters; the
    result is the jitter of the gathered batch, bit for bit (torch's path alike)."""
    x, index = torch.randn(30, 4, 32), torch.tensor([7, 3, 29, 3, 0, 12, 18, 21])
    gathered = ProbeStream(5).jitter(x[index], 0.5, 0.05, eps=eps)
    assert torch.equal(ProbeStream(5).jitter(x, 0.5, 0.05, eps=eps, index=index), gathered)
    out = torch.empty(8, 4, 32)
    assert ProbeStream(5).jitter(x, 0.5, 0.05, eps=eps, index=index, out=out) is out
    assert torch.equal(out, gathered)
    with native.off():
        by_torch = ProbeStream(5).jitter(x[index], 0.5, 0.05, eps=eps)
        assert torch.equal(ProbeStream(5).jitter(x, 0.5, 0.05, eps=eps, index=index), by_torch)
    assert not torch.equal(by_torch, gathered)  # the two noises differ: both paths ran


def test_a_strided_batch_gets_the_noise_of_its_contiguous_copy():
    """A data-parallel rank's rows (x[rank::world], a strided view) are copied for the kernel:
    the same draws as the process that holds them contiguously."""
    x = torch.randn(24, 4, 32)
    expected = ProbeStream(2).jitter(x[1::2].contiguous(), 0.5, 0.05, eps=1e-6)
    assert torch.equal(ProbeStream(2).jitter(x[1::2], 0.5, 0.05, eps=1e-6), expected)
    out = torch.empty(12, 4, 32)
    ProbeStream(2).jitter(x[1::2], 0.5, 0.05, eps=1e-6, out=out)
    assert torch.equal(out, expected)


def test_tokens_that_need_a_gradient_are_jittered_and_normalised_by_torch():
    """A trainable backbone's tokens: the kernel would write out of autograd's sight."""
    x = torch.randn(8, 3, 16, requires_grad=True)
    out = ProbeStream(0).jitter(x, 0.5, 0.05, eps=1e-6)
    (out * torch.arange(16.0)).sum().backward()
    # through the LayerNorm a shift of a token changes nothing: its gradient sums to 0
    # (written in place by the kernel, the gradient would be the weights: sums of 120)
    torch.testing.assert_close(x.grad.sum(-1), torch.zeros(8, 3), atol=1e-4, rtol=0)


def test_without_a_compiler_torch_jitters_and_normalises(tmp_path, monkeypatch, caplog):
    """CC names a compiler that fails: the fit's jitter is torch's, with a warning."""
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: cannot build' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("ALFUSION_CACHE", str(tmp_path / "cache"))
    native.build.load.cache_clear()
    native.library.cache_clear()
    try:
        assert not native.jitter_ready(torch.zeros(1))
        assert "cannot build" in caplog.text
        x = torch.randn(40, 3, 16)
        out = ProbeStream(0).jitter(x, 0.5, 0.05, eps=1e-6)
        gen = torch.Generator().manual_seed(0)  # torch's draws: coins, then noise
        rows = (torch.rand(40, generator=gen) < 0.5).nonzero()[:, 0]
        noised = x.index_add(0, rows, torch.randn(len(rows), 3, 16, generator=gen), alpha=0.05)
        torch.testing.assert_close(out, F.layer_norm(noised, (16,), eps=1e-6))
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing partial left behind
    finally:
        native.build.load.cache_clear()
        native.library.cache_clear()


def test_a_build_is_cached_and_reused_by_a_new_process(tmp_path):
    code = "import torch; from alfusion import native; assert native.jitter_ready(torch.ones(1))"
    env = {**os.environ, "ALFUSION_CACHE": str(tmp_path)}
    stats = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        (built,) = tmp_path.rglob("*.so")
        stats.append((built.name, built.stat().st_ino, built.stat().st_mtime_ns))
    assert stats[0] == stats[1] and stats[0][0] == "jitter.so"  # the second run built nothing
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_changed_header_is_a_new_build(tmp_path, monkeypatch):
    """The kernels include common.h: a build is keyed by the headers beside its source too."""
    monkeypatch.setenv("ALFUSION_CACHE", str(tmp_path / "cache"))
    source, header = tmp_path / "k.c", tmp_path / "common.h"
    source.write_text('#include "common.h"\nint value(void) { return VALUE; }\n')
    built = []
    for value in (1, 2):
        header.write_text(f"#define VALUE {value}\n")
        built.append(native.build._build(source, native.build._compiler()))
        assert ctypes.CDLL(str(built[-1])).value() == value
    assert built[0] != built[1]


def test_loading_the_kernels_leaves_torchs_arithmetic_alone(tmp_path):
    """A library linked with -ffast-math would flush denormals to zero in the loading thread."""
    code = ("import torch; from alfusion import native; "
            "assert all(native.library(n) for n in ('jitter', 'attention', 'head', 'params')); "
            "assert (torch.tensor([1e-39]) * 3).item() > 0, 'denormals flushed'")
    env = {**os.environ, "ALFUSION_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
