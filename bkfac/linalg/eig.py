"""Symmetric eigendecomposition with the documented fallback for non-convergence."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["safe_eigh", "EighError"]


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
