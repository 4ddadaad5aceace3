"""Kernel CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

For kernel matrices K, L (n, n) with zeroed diagonals (K~, L~), the unbiased HSIC is

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),

which equals <U(K), U(L)> / (n(n-3)) with U the "U-centring" of Szekely & Rizzo (2014):
U(K)_ij = K~_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) off the diagonal (r: row sums of K~,
s: total), 0 on it. So one U-centred matrix per feature set turns the whole CKA matrix into one
Gram matrix: CKA(i, j) = <U_i, U_j> / sqrt(<U_i, U_i> <U_j, U_j>).
"""

from __future__ import annotations

import torch


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """x: (n, D) -> (n, n) inner products."""
    return x @ x.T


def rbf_kernel(x: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
    """x: (n, D) -> (n, n) exp(-|xi - xj|^2 / (2 sigma^2)), sigma fixed (docs/protocol.md,
    analysis)."""
    sq = x.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    return torch.exp(-dist / (2 * sigma**2))


KERNELS = {"linear": lambda x, sigma: linear_kernel(x), "rbf": rbf_kernel}


def u_center(k: torch.Tensor) -> torch.Tensor:
    """(n, n) kernel -> its U-centred form (zero diagonal); needs n >= 4."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    k = k.clone()
    k.fill_diagonal_(0)
    rows = k.sum(dim=1)
    u = k - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + rows.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0)
    return u


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC of two (n, n) kernel matrices (a scalar tensor)."""
    n = k.shape[0]
    return (u_center(k) * u_center(l)).sum() / (n * (n - 3))


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", sigma: float = 0.2
        ) -> float:
    """CKA between features x (n, Dx) and y (n, Dy) of the same n samples."""
    k, l = KERNELS[kernel](x, sigma), KERNELS[kernel](y, sigma)  # noqa: E741
    return float(hsic_unbiased(k, l) / (hsic_unbiased(k, k) * hsic_unbiased(l, l)).sqrt())


def cka_matrix(features: torch.Tensor, kernel: str = "linear", sigma: float = 0.2
               ) -> torch.Tensor:
    """features: (F, n, D), F feature sets of the same n samples -> (F, F) CKA matrix.

    Memory: F U-centred (n, n) matrices, i.e. F * n^2 * 8 bytes in float64.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}: use {' or '.join(KERNELS)} "
                         "(cka.kernels)")
    feats = features.double()
    u = torch.stack([u_center(KERNELS[kernel](f, sigma)).flatten() for f in feats])
    gram = u @ u.T  # (F, F): n(n-3) HSIC_1 for every pair
    scale = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / scale[:, None] / scale[None, :]).float()
