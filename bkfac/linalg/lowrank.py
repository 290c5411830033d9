"""Low-rank representations of K-factors and their damped inverse application.

* :func:`truncate` -- keep the ``rank`` leading modes (Alg. 4, lines 3-4).
* :func:`light_correction` -- Algorithm 6: re-estimate ``n_crc`` randomly chosen modes of a
  b-kfac representation from the true EA K-factor.
* :func:`spectrum_continuation` -- Sec. 3.5: ``lambda <- lambda + min(d)``, ``d <- d - min(d)``.
* :func:`damped_inverse_apply` -- ``(U diag(d) U^T + lambda I)^{-1} X`` (or ``X (...)^{-1}``),
  the building block of Alg. 1, lines 16-17.
* :func:`kfac_precondition` -- Alg. 1, lines 15-17: ``Gamma^{-1} J A^{-1}`` for a gradient
  matrix ``J`` (d_G x d_A) from the two damped low-rank factor representations.
* :func:`linear_time_factors` / :func:`linear_time_precondition` -- Algorithm 8: the same
  product built from the batch matrices ``A_k`` (d_A x n) and ``G_k`` (d_G x n) with
  ``J = scale * G_k A_k^T``, never forming ``J``: ``O(r (d_A + d_G) n)`` instead of
  ``O(r d_A d_G)``.

Conventions: a representation is ``(U, d)`` with ``U`` orthonormal (dim x r) and ``d``
non-negative (r,), descending. The inverse of the damped low-rank factor is

    (U diag(d) U^T + lambda I)^{-1} = U [diag(1 / (d + lambda)) - I / lambda] U^T + I / lambda,

which is exact for any orthonormal ``U`` (full or partial): the ``dim - r`` missing
eigenvalues are zero, so those directions see ``1 / lambda``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_matrix, check_rank, check_vector, clamp_rounding_negatives
from .eig import safe_eigh

__all__ = [
    "truncate",
    "light_correction",
    "spectrum_continuation",
    "damped_inverse_apply",
    "kfac_precondition",
    "linear_time_factors",
    "linear_time_precondition",
    "dense_from_lowrank",
    "gram",
]


def gram(X: Tensor) -> Tensor:
    """``X X^T`` for a wide ``X`` (d x N, N >= d), computing only the blocks on and below the
    diagonal (a blocked SYRK: torch has no symmetric rank-k product) and mirroring the rest.

    With ``k`` row blocks this is ``k (k + 1) / 2`` of ``k^2`` block products: 62.5 % of the
    flops at ``k = 4`` (d >= 512), 75 % at ``k = 2`` (d >= 256). The K-factor statistics of
    convolutions (``d`` in the hundreds, ``N = n H W`` in the tens of thousands) are such
    products (the statistics use it since commit 1966bfe). Narrow or small ``X`` gets one GEMM.
    Symmetric up to the rounding of the diagonal blocks, like ``X @ X.mT``.
    """
    D, N = X.shape
    k = 4 if D >= 512 else 2 if D >= 256 else 1
    if k == 1 or N < D:
        return X @ X.mT
    b = -(-D // k)
    out = X.new_empty(D, D)
    starts = list(range(0, D, b))
    for i in starts:
        Xi = X[i:i + b]
        for j in starts:
            if j > i:
                break
            blk = Xi @ X[j:j + b].mT
            out[i:i + b, j:j + b] = blk
            if j != i:
                out[j:j + b, i:i + b] = blk.mT
    return out


def dense_from_lowrank(U: Tensor, d: Tensor) -> Tensor:
    """``U diag(d) U^T`` as a dense matrix (for tests and small factors only)."""
    return (U * d) @ U.mT


def truncate(U: Tensor, d: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Keep the ``rank`` leading modes of a representation with ``d`` descending (Alg. 4 l.3-4).

    ``rank`` larger than the current width keeps everything; larger than the dimension
    ``U.shape[0]`` raises ``ValueError``.
    """
    check_matrix("U", U)
    check_vector("d", d, U.shape[1])
    check_rank("rank", rank, U.shape[0])
    return U[:, :rank], d[:rank]


def light_correction(
    U: Tensor,
    d: Tensor,
    M: Tensor,
    n_crc: int,
    generator: torch.Generator | None = None,
    among: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Light correction of a b-kfac representation (Algorithm 6).

    Choose ``n_crc`` column indices without replacement among the ``among`` leading modes
    (default: all of them; b-kfac-c passes the truncation rank ``r``, Alg. 6 line 2), project
    the EA K-factor ``M`` on them, ``M_S = U_S^T M U_S`` (n_crc x n_crc), and replace those
    modes by the eigenpairs of ``M_S``: ``U[:, idx] <- U_S W``, ``d[idx] <- eigenvalues``.
    Afterwards ``U_S^T (M - U diag(d) U^T) U_S = 0`` and the Frobenius error cannot grow
    (paper footnote 11). The result is re-sorted in descending order. Cost
    ``O(dim^2 n_crc + n_crc^3)``.
    """
    check_matrix("U", U)
    check_vector("d", d, U.shape[1])
    check_matrix("M", M, rows=U.shape[0], cols=U.shape[0])
    width = U.shape[1]
    among = width if among is None else min(among, width)
    if isinstance(n_crc, bool) or not isinstance(n_crc, int) or n_crc < 1:
        raise ValueError(f"n_crc must be an integer >= 1, got {n_crc!r}")
    if n_crc > among:
        raise ValueError(f"n_crc={n_crc} is larger than the number of modes to choose from ({among})")
    if generator is None:
        perm = torch.randperm(among)
    else:
        perm = torch.randperm(among, generator=generator, device=generator.device)
    idx = perm[:n_crc].to(U.device)
    Us = U[:, idx]
    Ms = Us.mT @ (M @ Us)
    Ms = 0.5 * (Ms + Ms.mT)
    evals, W = safe_eigh(Ms)
    U = U.clone()
    d = d.clone()
    U[:, idx] = Us @ W
    d[idx] = evals.clamp_min(0.0)
    order = torch.argsort(d, descending=True)
    return U[:, order], d[order]


def spectrum_continuation(d: Tensor, lam: float | Tensor, check: bool = True) -> tuple[Tensor, Tensor | float]:
    """Spectrum continuation (Sec. 3.5): ``lambda' = lambda + min(d)``, ``d' = d - min(d)``.

    The ``dim - r`` eigenvalues a rank-``r`` representation sets to zero are instead taken
    equal to the smallest one it holds. ``U diag(d') U^T + lambda' I`` equals
    ``U diag(d) U^T + lambda I + min(d) (I - U U^T)``. For a full-rank representation
    (``U`` square) this is the identity transformation.

    ``d`` must be a finite vector and ``lam`` a finite non-negative number (``ValueError``
    otherwise). ``check=False`` (the optimizers' hot path, inputs validated upstream) keeps only
    the shape check: the finiteness checks cost a host sync each on CUDA.
    """
    if check:
        check_vector("d", d)
        _check_damping("lam", lam, allow_zero=True)
    elif not isinstance(d, Tensor) or d.dim() != 1:
        raise ValueError(f"d must be a vector (1-D tensor), got {d!r}")
    if d.numel() == 0:
        return d, lam
    m = d.min()
    return d - m, lam + m


def _check_damping(name: str, lam, allow_zero: bool = False) -> None:
    """Damping must be a finite number, positive (or non-negative with ``allow_zero``)."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"damping {name} must be a scalar, got a tensor of shape {tuple(lam.shape)}")
        value = float(lam)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        value = float(lam)
    else:
        raise ValueError(f"damping {name} must be a number, got {lam!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"damping {name} must be a {kind} finite number, got {value!r}")


def _check_rep(name_u: str, U: Tensor, name_d: str, d: Tensor) -> Tensor:
    """Validate a representation ``(U, d)``; return ``d`` with rounding negatives clamped."""
    check_matrix(name_u, U)
    check_vector(name_d, d, U.shape[1])
    if d.dtype != U.dtype or d.device != U.device:
        raise ValueError(f"{name_u} and {name_d} must share dtype and device")
    return clamp_rounding_negatives(name_d, d, max(U.shape[1], 1))


def _apply(U: Tensor, d: Tensor, lam, X: Tensor, side: str) -> Tensor:
    # (U diag(d) U^T + lam I)^{-1} = (I - U diag(d / (d + lam)) U^T) / lam  (no checks here):
    # one GEMM that accumulates into a copy of X and one in-place division, where the sum
    # of U diag(1/(d+lam) - 1/lam) U^T X and X / lam allocates and passes over X three times
    w = d / (d + lam)
    if X.dim() != 2:
        if side == "left":
            return (X - U @ (w[:, None] * (U.mT @ X))) / lam
        return (X - ((X @ U) * w) @ U.mT) / lam
    if side == "left":
        return torch.addmm(X, U, w[:, None] * (U.mT @ X), alpha=-1).div_(lam)
    return torch.addmm(X, (X @ U) * w, U.mT, alpha=-1).div_(lam)


def damped_inverse_apply(U: Tensor, d: Tensor, lam, X: Tensor, side: str = "left", check: bool = True) -> Tensor:
    """``(U diag(d) U^T + lam I)^{-1} X`` for ``side='left'``, ``X (...)^{-1}`` for ``'right'``.

    Alg. 1, lines 16-17 (one side each). ``U`` (dim x r) orthonormal, ``d`` (r,) non-negative
    (negatives within rounding are treated as 0, larger ones raise), ``lam > 0``; ``X`` is
    (dim x k) for ``'left'`` and (k x dim) for ``'right'``. ``O(dim r k)``; never forms a
    ``dim x dim`` matrix. ``check=False`` skips the argument checks (each costs a pass over
    ``X`` and, on CUDA, a host sync): for callers that validated their inputs already.
    """
    if not check:  # hot path of the optimizers: inputs were validated upstream, no host syncs
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        return _apply(U, d, lam, X, side)
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    d = _check_rep("U", U, "d", d)
    _check_damping("lam", lam)
    if side == "left":
        check_matrix("X", X, rows=U.shape[0])
    else:
        check_matrix("X", X, cols=U.shape[0])
    if X.dtype != U.dtype:
        raise ValueError(f"X and U must share a dtype, got {X.dtype} and {U.dtype}")
    return _apply(U, d, lam, X, side)


def _prepare(name: str, U, d, lam, continuation):
    d = _check_rep(f"U{name}", U, f"d{name}", d)
    _check_damping(f"lam{name}", lam)
    if continuation:
        d, lam = spectrum_continuation(d, lam)
    return U, d, lam


def kfac_precondition(
    J: Tensor,
    UA: Tensor,
    dA: Tensor,
    lamA,
    UG: Tensor,
    dG: Tensor,
    lamG,
    continuation: bool = False,
) -> Tensor:
    """Alg. 1, lines 15-17: ``S = (Gamma + lamG I)^{-1} J (A + lamA I)^{-1}``.

    ``J`` is the gradient in matrix form (d_G x d_A), ``(UA, dA)`` and ``(UG, dG)`` the
    representations of the A- and Gamma-factors. With ``continuation=True`` both go through
    :func:`spectrum_continuation` first. Cost ``O(r d_A d_G)``.
    """
    UA, dA, lamA = _prepare("A", UA, dA, lamA, continuation)
    UG, dG, lamG = _prepare("G", UG, dG, lamG, continuation)
    check_matrix("J", J, rows=UG.shape[0], cols=UA.shape[0])
    M = _apply(UA, dA, lamA, J, side="right")
    return _apply(UG, dG, lamG, M, side="left")


def linear_time_factors(
    G: Tensor,
    A: Tensor,
    UA: Tensor,
    dA: Tensor,
    lamA,
    UG: Tensor,
    dG: Tensor,
    lamG,
    continuation: bool = False,
) -> tuple[Tensor, Tensor]:
    """Algorithm 8, lines 5 and 7: the preconditioned batch matrices.

    Returns ``(G_hat, A_hat)`` with ``G_hat = (Gamma + lamG I)^{-1} G`` (d_G x n) and
    ``A_hat = (A + lamA I)^{-1} A`` (d_A x n), so that the preconditioned step of the
    gradient ``J = G A^T`` is ``S = G_hat A_hat^T`` (line 9; ``A_hat^T`` is the paper's
    ``[A_k]^T [A_bar]^{-1}`` since the factor is symmetric). Cost ``O(r (d_A + d_G) n)``.
    """
    UA, dA, lamA = _prepare("A", UA, dA, lamA, continuation)
    UG, dG, lamG = _prepare("G", UG, dG, lamG, continuation)
    check_matrix("G", G, rows=UG.shape[0])
    check_matrix("A", A, rows=UA.shape[0], cols=G.shape[1])
    return _apply(UG, dG, lamG, G, side="left"), _apply(UA, dA, lamA, A, side="left")


def linear_time_precondition(
    G: Tensor,
    A: Tensor,
    UA: Tensor,
    dA: Tensor,
    lamA,
    UG: Tensor,
    dG: Tensor,
    lamG,
    continuation: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Algorithm 8: ``S = scale * G_hat A_hat^T``, equal to ``kfac_precondition(scale * G A^T, ...)``.

    Cost ``O(r (d_A + d_G) n + d_A d_G n)``; the last term is forming the step itself, which
    the standard route also pays when it forms ``J = G A^T``.
    """
    G_hat, A_hat = linear_time_factors(G, A, UA, dA, lamA, UG, dG, lamG, continuation)
    S = G_hat @ A_hat.mT
    return S if scale == 1.0 else S * scale
