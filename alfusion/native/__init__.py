"""Native CPU kernels for the fit's hot spots, with torch's path as the fallback.

jitter.c: the feature jitter's noise and the tokens' LayerNorm in one pass (the noise from
Philox, where the torch path in random_draws.py draws from torch's generator: the same
distribution, other numbers). For the hand-derived step of an attentive probe
(probes/attentive_grads.py), what its torch code computes, to float rounding: attention.c,
the token-side products (scores, softmax, weighted sums, the value products and their
gradients, and the jitter as it reads the tokens); params.c, the query and value side's
parameters; head.c, BatchNorm, classifier and loss. adamw.c: a CPU probe's clipping and
AdamW update in one call (every CPU fit's, the hand-derived or not). ``*_ready`` says
whether the kernel is built (build.py: compiled on first use, cached; no compiler or
``ALFUSION_NATIVE=0``: not ready) and takes the given tensors (contiguous fp32 on the CPU,
outside autograd). Kernels use torch's thread count and give the
same result for any thread count; torch.profiler sees each call as ``alfusion::<kernel>``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import NamedTuple

import torch
from torch.profiler import record_function

from alfusion.native.build import load

_P, _N, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "jitter": {"jitter_tokens": [_P] * 3 + [_N, _N, _N, _P, ctypes.c_uint64, _F, _F,
                                                ctypes.c_int]},
    "attention": {"attend_forward": [_P] * 4 + [ctypes.c_uint64, _F, _F] + [_P] * 8
                                    + [_N] * 5 + [ctypes.c_int],
                  "attend_backward": [_P] * 11 + [_N] * 5 + [ctypes.c_int]},
    "adamw": {"adamw_step": [_P] * 10 + [_N] + [ctypes.c_double] * 7 + [_P, ctypes.c_int]},
    "head": {"batch_norm_head": [_P] * 7 + [_F] + [_P] * 8 + [_N] * 3 + [ctypes.c_int]},
    "params": {"params_forward": [_P] * 9 + [_F, _F] + [_P] * 9 + [_N] * 3 + [ctypes.c_int],
               "params_backward": [_P] * 10 + [_F] + [_P] * 16 + [_N] * 3 + [ctypes.c_int]},
}


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The built library of ``<name>.c`` with its functions' signatures, or None."""
    lib = load(name)
    for function, argtypes in _SIGNATURES[name].items() if lib is not None else ():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = None
    return lib


_off = [False]


@contextlib.contextmanager
def off():
    """Within: no kernel is ready, so callers take their torch path (an oracle for the
    kernels, and what torch's FLOP counter sees). Not thread-safe: for tests and benchmarks."""
    before, _off[0] = _off[0], True
    try:
        yield
    finally:
        _off[0] = before


def _labelled(name: str) -> contextlib.AbstractContextManager:
    """A kernel call's label in torch.profiler's records while one records (the time a part
    of a step takes: benchmarks/bench_fit_limit.py); otherwise nothing (a label costs about
    20 us a call, a few tenths of a percent of a CPU step)."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def _ready(name: str, *tensors: torch.Tensor | None) -> bool:
    # a kernel writes through data pointers, out of autograd's sight
    takes = all(t is None or (t.is_cpu and t.dtype == torch.float32
                              and t.is_contiguous() and not t.requires_grad) for t in tensors)
    return not _off[0] and takes and library(name) is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def jitter_ready(x: torch.Tensor) -> bool:
    return _ready("jitter", x)


class JitterPass(NamedTuple):
    """A batch's jitter, not yet run (``jitter_pass`` makes it: rows and index contiguous
    int64, eps -1 for none): ``run()`` runs it and returns x; the attention forward takes it
    instead of its tokens and jitters each sample as it reads it (``attend_forward``), with
    the same result."""
    x: torch.Tensor
    rows: torch.Tensor
    key: int
    sigma: float
    eps: float
    source: torch.Tensor
    index: torch.Tensor | None

    def run(self) -> torch.Tensor:
        with _labelled("alfusion::jitter_tokens"):
            library("jitter").jitter_tokens(
                self.x.data_ptr(), self.source.data_ptr(), _ptr(self.index), self.x.shape[0],
                self.x[0].numel(), self.x.shape[-1], self.rows.data_ptr(), self.key,
                self.sigma, self.eps, torch.get_num_threads())
        return self.x


def jitter_pass(x: torch.Tensor, rows: torch.Tensor, key: int, sigma: float,
                eps: float | None, source: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> JitterPass:
    """x (B, ..., D) to be written from ``source``'s samples (default: x itself, in place),
    sample s from ``source[index[s]]`` ((B,) int64; default s): sample s gets sigma x the
    Philox noise of global row rows[s] ((B,) int64; -1: none) under the 64-bit ``key``; then,
    with ``eps``, each token (last dimension) is normalised: (v - mean) / sqrt(var + eps)."""
    return JitterPass(x, rows.contiguous(), key, sigma, -1.0 if eps is None else eps,
                      x if source is None else source,
                      None if index is None else index.to(torch.int64).contiguous())


def attention_ready(*tensors: torch.Tensor | None) -> bool:
    return _ready("attention", *tensors)


def attend_forward(x: torch.Tensor | JitterPass, u: torch.Tensor, w_t: torch.Tensor,
                   shift: torch.Tensor, drop: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, D) tokens, u (H, D) queries in token space, w_t (H, D, E) value weights
    transposed, shift (H, E) their shift, drop (B, H, T) or None -> attn (B, T, H) softmax
    over T of x . u, z (B, H, D) = sum_t attn drop x, mass (B, H) = sum_t attn drop,
    o (B, H, E) = w_h z[:, h] + mass[:, h] shift[h]. x a JitterPass: its tokens, jittered
    here as they are read (into its x, as ``run()`` would)."""
    job = x if isinstance(x, JitterPass) else None
    x = x.x if job else x
    B, T, D = x.shape
    H, _, E = w_t.shape
    attn, z, mass, o = (x.new_empty(B, T, H), x.new_empty(B, H, D), x.new_empty(B, H),
                        x.new_empty(B, H, E))
    jitter = (job.source.data_ptr(), _ptr(job.index), job.rows.data_ptr(), job.key,
              job.sigma, job.eps) if job else (None, None, None, 0, 0.0, -1.0)
    with _labelled("alfusion::attend_forward"):
        library("attention").attend_forward(
            x.data_ptr(), *jitter, u.data_ptr(), w_t.data_ptr(), shift.data_ptr(),
            _ptr(drop), attn.data_ptr(), z.data_ptr(), mass.data_ptr(), o.data_ptr(),
            B, T, D, H, E, torch.get_num_threads())
    return attn, z, mass, o


def attend_backward(x: torch.Tensor, z: torch.Tensor, g_o: torch.Tensor, w: torch.Tensor,
                    shift: torch.Tensor, mass: torch.Tensor, attn: torch.Tensor,
                    drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Given g_o (B, H, E), the gradient of o, -> the gradients of the queries u (H, D), of
    the shift (H, E) and of the value weights w (H, E, D); x, z, w (H, E, D), shift, mass,
    attn, drop as ``attend_forward``."""
    B, T, D = x.shape
    H, E, _ = w.shape
    g_u, g_shift, g_w = x.new_empty(H, D), x.new_empty(H, E), x.new_empty(H, E, D)
    with _labelled("alfusion::attend_backward"):
        library("attention").attend_backward(
            x.data_ptr(), z.data_ptr(), g_o.data_ptr(), w.data_ptr(), shift.data_ptr(),
            mass.data_ptr(), attn.data_ptr(), _ptr(drop), g_u.data_ptr(), g_shift.data_ptr(),
            g_w.data_ptr(), B, T, D, H, E, torch.get_num_threads())
    return g_u, g_shift, g_w


class GradParts(NamedTuple):
    """A (rows, cols) gradient in parts, composed where ``clipped_adamw`` reads it and never
    stored whole: base * cscale + left[r] * right[r // group] (a part None: absent); base
    (rows, cols), cscale (cols,), left (rows,), right (rows // group, cols)."""
    base: torch.Tensor | None
    cscale: torch.Tensor | None
    left: torch.Tensor | None
    right: torch.Tensor | None
    shape: tuple[int, int]
    group: int

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.base, self.cscale, self.left, self.right) if t is not None]

    def tensor(self) -> torch.Tensor:
        """The gradient, composed by torch."""
        rows, cols = self.shape
        out = 0.0 if self.base is None else \
            self.base * (1.0 if self.cscale is None else self.cscale)
        if self.left is not None:
            out = out + (self.left.view(-1, self.group, 1) * self.right.view(-1, 1, cols)
                         ).view(rows, cols)
        return out


def adamw_ready(*tensors: torch.Tensor | GradParts) -> bool:
    return _ready("adamw", *(t for x in tensors
                             for t in (x.tensors() if isinstance(x, GradParts) else [x])))


def clipped_adamw(params: list[torch.Tensor], grads: list[torch.Tensor | GradParts],
                  exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: int,
                  lr: float, wd: float, betas: tuple[float, float], eps: float,
                  max_norm: float) -> float:
    """One probe's clipping and AdamW step over its tensors (any shapes, matched by position),
    in one call (protocol.native_adamw gives it the protocol's settings): the gradients
    divided by max(1, (their total norm + 1e-6) / max_norm), then torch.optim.AdamW's update
    at the step number ``step`` (1, 2, ...). Gradients are only read; a GradParts one is
    composed as it is read. Returns the divisor."""
    def pointers(ts):
        return (_P * len(ts))(*(None if t is None else t.data_ptr() for t in ts))

    parts = [g if isinstance(g, GradParts) else GradParts(g, None, None, None,
                                                           (1, g.numel()), 1) for g in grads]
    sizes = (_N * len(params))(*(t.numel() for t in params))
    divisor = ctypes.c_float()
    with _labelled("alfusion::adamw_step"):
        library("adamw").adamw_step(
            pointers(params), *(pointers([getattr(g, f) for g in parts])
                                for f in ("base", "cscale", "left", "right")),
            (_N * len(parts))(*(g.shape[1] for g in parts)),
            (_N * len(parts))(*(g.group for g in parts)),
            pointers(exp_avgs), pointers(exp_avg_sqs), sizes, len(params), step, lr, wd,
            betas[0], betas[1], eps, max_norm, ctypes.byref(divisor), torch.get_num_threads())
    return divisor.value


def head_ready(*tensors: torch.Tensor | None) -> bool:
    return _ready("head", *tensors)


def batch_norm_head(pooled: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    w: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, w_y: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, ...]:
    """Training-mode BatchNorm of pooled (B, D) (affine gamma, beta (D,)), the classifier
    w (C, D), bias (C,), and the class-weighted cross-entropy of labels y (B,) with sample
    weights w_y (B,), forward and backward -> (loss (1,), batch mean (D,), biased batch
    variance (D,), and the loss's gradients: pooled (B, D), gamma, beta (D,), w (C, D),
    bias (C,))."""
    B, D = pooled.shape
    C = w.shape[0]
    loss, mean, var = pooled.new_empty(1), pooled.new_empty(D), pooled.new_empty(D)
    g_pooled, g_gamma, g_beta = torch.empty_like(pooled), pooled.new_empty(D), pooled.new_empty(D)
    g_w, g_bias = torch.empty_like(w), pooled.new_empty(C)
    y = y.to(torch.int64).contiguous()
    with _labelled("alfusion::batch_norm_head"):
        library("head").batch_norm_head(
            pooled.data_ptr(), gamma.data_ptr(), beta.data_ptr(), w.data_ptr(),
            bias.data_ptr(), y.data_ptr(), w_y.data_ptr(), eps, mean.data_ptr(),
            var.data_ptr(), loss.data_ptr(), g_pooled.data_ptr(), g_gamma.data_ptr(),
            g_beta.data_ptr(), g_w.data_ptr(), g_bias.data_ptr(), B, D, C,
            torch.get_num_threads())
    return loss, mean, var, g_pooled, g_gamma, g_beta, g_w, g_bias


def params_ready(*tensors: torch.Tensor | None) -> bool:
    return _ready("params", *tensors)


def params_forward(query, nq_w, nq_b, q_w, k_w, nk_w, v_w, nv_w, nv_b, scale: float,
                   eps_q: float, heads: int) -> tuple[torch.Tensor, ...]:
    """The attentive probe's query and value weights (probes/attentive_grads.py): query (D),
    LN_q's affine nq_w, nq_b (D), the projections q_w, k_w, v_w (A, D), LN_k's gain nk_w,
    LN_v's affine nv_w, nv_b (D) -> (qhat (D) the normalised query, rstd_q (1), qn (D),
    q (A), k_q (H, D) the query in token space, u (H, D) = k_q nk_w scale, w (H, E, D) =
    v_w nv_w, w_t (H, D, E) its transpose, shift (A) = v_w nv_b)."""
    A, D = q_w.shape
    H, E = heads, A // heads
    new = q_w.new_empty
    out = (new(D), new(1), new(D), new(A), new(H, D), new(H, D), new(H, E, D), new(H, D, E),
           new(A))
    with _labelled("alfusion::params_forward"):
        library("params").params_forward(
            *(t.data_ptr() for t in (query, nq_w, nq_b, q_w, k_w, nk_w, v_w, nv_w, nv_b)),
            scale, eps_q, *(t.data_ptr() for t in out), H, E, D, torch.get_num_threads())
    return out


def params_backward(g_u, g_w, g_shift, nq_w, q_w, k_w, nk_w, v_w, nv_w, nv_b, scale: float,
                    qhat, rstd_q, qn, q, k_q, parts: bool = False
                    ) -> tuple[torch.Tensor | GradParts, ...]:
    """The gradients of the parameters of ``params_forward`` given g_u (H, D), g_w (H, E, D)
    and g_shift (A) and its saved qhat, rstd_q, qn, q, k_q -> (query, nq_w, nq_b (D),
    q_w, k_w (A, D), nk_w (D), v_w (A, D), nv_w, nv_b (D)); ``parts``: the three matrices'
    as GradParts (for ``clipped_adamw``), not written out."""
    A, D = q_w.shape
    H = g_u.shape[0]
    new = q_w.new_empty
    shapes = [(D,), (D,), (D,), (A, D), (A, D), (D,), (A, D), (D,), (D,)]
    out = [None if parts and len(shape) == 2 else new(shape) for shape in shapes]
    g_k_q, g_q = new(H, D), new(A)
    with _labelled("alfusion::params_backward"):
        library("params").params_backward(
            *(t.data_ptr() for t in (g_u, g_w, g_shift, nq_w, q_w, k_w, nk_w, v_w, nv_w,
                                     nv_b)),
            scale, *(t.data_ptr() for t in (qhat, rstd_q, qn, q, k_q)),
            *(_ptr(t) for t in out),
            g_k_q.data_ptr(), g_q.data_ptr(), H, A // H, D, torch.get_num_threads())
    if parts:  # LN_v's affine copied: clipped_adamw updates it while it composes v's gradient
        out[3] = GradParts(None, None, g_q, qn.view(1, D), (A, D), A)
        out[4] = GradParts(None, None, q.view(A), g_k_q, (A, D), A // H)
        out[6] = GradParts(g_w.view(A, D), nv_w.clone(), g_shift.view(A),
                           nv_b.clone().view(1, D), (A, D), A)
    return tuple(out)
