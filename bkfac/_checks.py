"""Argument checks shared by the whole package.

Every public function validates its input with these helpers so that bad input fails
with a ``ValueError`` that names the offending argument, never with a silent NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_matrix",
    "check_vector",
    "check_finite",
    "check_rank",
    "check_positive_int",
    "check_open_unit",
    "check_nonnegative",
    "clamp_rounding_negatives",
]


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` when ``x`` holds a NaN or an infinity.

    A finite sum implies finite entries (a NaN or an infinity makes the sum NaN or infinite), so
    one reduction decides the common case; only a non-finite sum -- which finite entries can also
    give, by overflow -- is checked entry by entry."""
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_matrix(name: str, x: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    """Check that ``x`` is a finite 2-D floating tensor, optionally of a given shape."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")
    check_finite(name, x)


def check_vector(name: str, x: Tensor, length: int | None = None) -> None:
    """Check that ``x`` is a finite 1-D floating tensor, optionally of a given length."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be a vector (1-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {x.shape[0]}")
    check_finite(name, x)


def check_rank(name: str, rank: int, dim: int) -> None:
    """A target rank must be a positive integer no larger than the factor dimension."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name} must be an int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{name} must be positive, got {rank}")
    if rank > dim:
        raise ValueError(f"{name}={rank} is larger than the matrix dimension {dim}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value >= 0) or value != value:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_open_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")


def rounding_tolerance(d: Tensor, dim: int) -> float:
    """Magnitude below which a negative eigenvalue is attributed to rounding.

    ``dim * eps * max|d|`` with a small safety factor: the backward error of a symmetric
    eigensolver is of order ``dim * eps * ||M||_2``.
    """
    if d.numel() == 0:
        return 0.0
    scale = float(d.abs().max())
    return 10.0 * max(dim, 1) * torch.finfo(d.dtype).eps * scale


def clamp_rounding_negatives(name: str, d: Tensor, dim: int) -> Tensor:
    """Clamp tiny negative eigenvalues (rounding) to zero; refuse large ones.

    Eigenvalues of a PSD matrix computed in floating point can come out slightly negative.
    Those within :func:`rounding_tolerance` are set to zero; anything more negative means the
    input was not positive semi-definite and raises ``ValueError`` naming ``name``.
    """
    if d.numel() == 0:
        return d
    tol = rounding_tolerance(d, dim)
    low = float(d.min())
    if low < -tol:
        raise ValueError(
            f"{name} has a negative eigenvalue {low:.3e} beyond rounding (tolerance {tol:.3e}); "
            "the matrix is not positive semi-definite"
        )
    return d.clamp_min(0.0)
