"""Randomized low-rank decompositions of a symmetric PSD K-factor (Alg. 1, line 13).

* :func:`rsvd` -- randomized SVD (Halko, Martinsson and Tropp 2011, Alg. 4.4 + 5.1), the
  decomposition of rs-kfac ("r-kfac" in the paper; Puiu 2022a).
* :func:`srevd` -- symmetric randomized EVD (Halko et al. 2011, Alg. 5.3), the
  decomposition of sre-kfac.

Both draw a Gaussian test matrix with ``q = rank + oversample`` columns, run
``power_iters`` power iterations with re-orthonormalisation (QR) after every product, and
return ``(U, d)``: ``U`` (dim x rank) orthonormal, ``d`` (rank,) non-negative, descending.
One power iteration is the pair of products ``M^T (M Q)`` of Halko's scheme, i.e. both
methods apply ``M`` exactly ``2 * power_iters + 2`` times, so they cost the same
``O(dim^2 q)`` and differ only in the final small factorisation. Cost: quadratic in dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_matrix, check_nonnegative, check_rank, clamp_rounding_negatives
from .eig import safe_eigh

__all__ = ["rsvd", "srevd", "range_finder"]


def _gaussian(rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn(rows, cols, dtype=like.dtype, device=like.device)
    out = torch.randn(rows, cols, dtype=like.dtype, device=generator.device, generator=generator)
    return out.to(like.device)


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y).Q


def _check(M: Tensor, rank: int, oversample: int, power_iters: int) -> None:
    check_matrix("M", M)
    if M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be square (a symmetric PSD K-factor), got shape {tuple(M.shape)}")
    check_rank("rank", rank, M.shape[0])
    if isinstance(oversample, bool) or not isinstance(oversample, int):
        raise ValueError(f"oversample must be an int, got {oversample!r}")
    check_nonnegative("oversample", oversample)
    if isinstance(power_iters, bool) or not isinstance(power_iters, int):
        raise ValueError(f"power_iters must be an int, got {power_iters!r}")
    check_nonnegative("power_iters", power_iters)


def range_finder(M: Tensor, q: int, power_iters: int, generator: torch.Generator | None = None) -> Tensor:
    """Orthonormal ``Q`` (dim x q) approximating the dominant range of ``M`` (Halko Alg. 4.4)."""
    Q = _orth(M @ _gaussian(M.shape[1], q, M, generator))
    for _ in range(power_iters):
        Q = _orth(M.mT @ Q)
        Q = _orth(M @ Q)
    return Q


def rsvd(
    M: Tensor,
    rank: int,
    oversample: int = 10,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Randomized SVD of a symmetric PSD ``M`` as in rs-kfac (Alg. 1, line 13).

    ``Q = range_finder(M)``, ``B = Q^T M = U_B diag(s) V^T``; return the top ``rank`` right
    singular vectors ``V`` and values ``s`` -- Alg. 1 lines 16-17 apply the inverse with
    ``V`` (the right factor spans ``M Q``: one more product with ``M`` than ``Q`` itself).
    ``q = min(rank + oversample, dim)``.
    """
    _check(M, rank, oversample, power_iters)
    q = min(rank + oversample, M.shape[0])
    Q = range_finder(M, q, power_iters, generator)
    _, s, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return Vh[:rank].mT.contiguous(), s[:rank].contiguous()


def srevd(
    M: Tensor,
    rank: int,
    oversample: int = 10,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Symmetric randomized EVD of a PSD ``M`` as in sre-kfac (Halko Alg. 5.3).

    ``Q = range_finder(M)``, ``B = Q^T M Q = W diag(l) W^T``; return ``U = Q W`` and ``l``,
    top ``rank``, descending; eigenvalues negative within rounding are clamped to zero.
    """
    _check(M, rank, oversample, power_iters)
    q = min(rank + oversample, M.shape[0])
    Q = range_finder(M, q, power_iters, generator)
    B = Q.mT @ (M @ Q)
    B = 0.5 * (B + B.mT)
    evals, W = safe_eigh(B)
    evals, W = evals.flip(0)[:rank], W.flip(1)[:, :rank]
    evals = clamp_rounding_negatives("eigenvalues of Q^T M Q", evals, q)
    return (Q @ W).contiguous(), evals.contiguous()
