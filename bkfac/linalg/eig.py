"""Symmetric eigendecomposition with the documented fallback for non-convergence."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["safe_eigh", "EighError", "lambda_max"]


class EighError(RuntimeError):
    """``torch.linalg.eigh`` failed to converge, also after the float64 retry."""


def safe_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (ascending), retried in float64 when it fails to converge.

    LAPACK's ``syevd`` (and cuSOLVER) can fail on ill-conditioned float32 input. We then
    retry once in float64 and cast back, with a warning; a second failure raises
    :class:`EighError` (a ``RuntimeError``) that says so. Non-finite input raises
    ``ValueError`` before any attempt.
    """
    if not bool(torch.isfinite(M).all()):
        raise ValueError("matrix passed to eigh contains non-finite values (NaN or inf)")
    try:
        return torch.linalg.eigh(M)
    except RuntimeError as first:  # torch.linalg.LinAlgError subclasses RuntimeError
        if M.dtype == torch.float64:
            raise EighError(f"eigh failed to converge in float64: {first}") from first
        warnings.warn(f"eigh failed to converge in {M.dtype}; retrying in float64", RuntimeWarning, stacklevel=2)
        try:
            evals, evecs = torch.linalg.eigh(M.double())
        except RuntimeError as second:
            raise EighError(f"eigh failed to converge, also after retrying in float64: {second}") from second
        return evals.to(M.dtype), evecs.to(M.dtype)


def lambda_max(M: Tensor, v0: Tensor | None = None, *, rtol: float = 1e-4, max_iter: int = 500,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration: ``(lambda, v)``.

    Starts from ``v0`` (a warm start: the vector returned for the previous, similar matrix)
    or from a random vector drawn with ``generator``. Stops when the Rayleigh quotient moves
    by less than ``rtol`` of itself between two checks ten iterations apart, or after
    ``max_iter`` iterations. The Rayleigh quotient never exceeds the true lambda_max, and
    approaches it from below as the iteration converges (slowly when the two leading
    eigenvalues are close -- harmless where lambda_max only sets a damping, as in K-FAC).
    ``lambda`` is a 0-d tensor on ``M``'s device (no host sync but the checks).
    """
    n = M.shape[0]
    if M.ndim != 2 or M.shape[1] != n:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    if v0 is None or v0.shape != (n,):
        v0 = torch.randn(n, generator=generator, dtype=M.dtype).to(M.device)
    v = v0 / torch.linalg.vector_norm(v0).clamp_min(torch.finfo(M.dtype).tiny)
    lam = v @ (M @ v)
    last = lam
    for it in range(1, max_iter + 1):
        w = M @ v
        lam = v @ w
        v = w / torch.linalg.vector_norm(w).clamp_min(torch.finfo(M.dtype).tiny)
        if it % 10 == 0:
            if bool(torch.abs(lam - last) <= rtol * torch.abs(lam)):
                break
            last = lam
    return lam, v
