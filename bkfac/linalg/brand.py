"""Brand's online SVD update (Brand 2006) in the two forms the paper uses.

* :func:`brand_update_general` -- Algorithm 2 of the paper: the thin SVD of
  ``U diag(s) V^T + A B^T`` from the thin SVD ``U diag(s) V^T``.
* :func:`brand_update` -- Algorithm 3 of the paper (the symmetric adaptation): the
  eigendecomposition of ``U diag(d) U^T + A A^T`` from ``U diag(d) U^T``.

Both rest on identity (7) of the paper: with ``A = U C + Q R`` where ``[U Q]`` is
orthonormal,

    U diag(d) U^T + A A^T = [U Q] M_S [U Q]^T,
    M_S = [[I, C], [0, R]] diag(d, I) [[I, C], [0, R]]^T,

so only the small ``(r+n) x (r+n)`` matrix ``M_S`` is decomposed. The cost is
``O(d (r+n)^2 + (r+n)^3)``: linear in the dimension ``d``.

Numerical care (all of it documented and tested):

* the projection ``A - U U^T A`` uses two Gram-Schmidt passes ("twice is enough"), so
  ``[U Q]`` stays orthonormal to working precision;
* the QR of the projected block (Alg. 3 line 4) is CholeskyQR2 when the block is well
  conditioned (generic data: level-3 BLAS only, several times faster than Householder QR);
* when ``A`` is rank deficient (dependent columns, or columns inside ``span(U)``) or
  ill conditioned, the orthonormal basis ``Q`` is built from a rank-revealing SVD of the
  projected block and the directions with a vanishing singular value are completed
  deterministically into the orthogonal complement, so ``U_new`` is always orthonormal and
  of width ``r + n``;
* eigenvalues of ``M_S`` that come out slightly negative through rounding are clamped to
  zero (the exact matrix is PSD); input eigenvalues ``d`` more negative than rounding raise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_matrix, check_vector, clamp_rounding_negatives

__all__ = ["aligned_width", "brand_update", "brand_update_general", "orthonormal_extension"]


def _complete_basis(B: Tensor, k: int) -> Tensor:
    """Return ``k`` orthonormal columns orthogonal to the orthonormal columns of ``B``.

    Deterministic: candidates are the coordinate vectors of least leverage
    ``||B[i, :]||^2`` (at least one has leverage ``<= width/dim < 1``), each projected out
    of everything chosen so far with two Gram-Schmidt passes.
    """
    dim = B.shape[0]
    out = B.new_zeros(dim, k)
    basis = B
    for j in range(k):
        leverage = (basis * basis).sum(dim=1)
        for i in torch.argsort(leverage).tolist():
            v = B.new_zeros(dim)
            v[i] = 1.0
            for _ in range(2):
                v = v - basis @ (basis.mT @ v)
            nv = torch.linalg.vector_norm(v)
            if nv > 0.5:
                out[:, j] = v / nv
                basis = torch.cat([basis, out[:, j : j + 1]], dim=1)
                break
        else:  # pragma: no cover - impossible while width < dim
            raise RuntimeError("could not complete the orthonormal basis")
    return out


def _fast_path_limits(dtype: torch.dtype) -> tuple[float, float]:
    """Thresholds on ``rho = min|R_ii| / max|R_ii|`` (``1/rho`` estimates ``cond(P)``).

    * ``rho > 4 sqrt(eps)``: CholeskyQR2 is accurate (its limit is ``cond ~ eps^(-1/2)``);
      below, the rank-revealing path is taken.
    * ``rho < eps^(1/4)`` (and ``r > 0``): the columns of ``Q`` are orthogonal to ``U`` only up
      to about ``eps * cond(P)``, so ``Q`` is projected out of ``U`` once more. Above it
      ``cond(P)`` is at most a few times ``eps^(-1/4)`` (``1/rho`` underestimates it by a
      small factor), so the loss is a few ``eps^(3/4)`` (1e-12 in float64, 1e-6 in float32)
      and is left alone.
    """
    eps = float(torch.finfo(dtype).eps)
    return 4.0 * eps**0.5, eps**0.25


def aligned_width(cols: int, like: Tensor) -> int:
    """Row length (elements) of a GEMM output buffer for ``cols`` columns of ``like``'s dtype
    and device: ``cols`` rounded up to a multiple of 64 bytes on the CPU, ``cols`` elsewhere.

    MKL's GEMM writes a tall output whose rows are not a multiple of 64 bytes long (the
    ``r + n = 476`` columns of a B-update, the ``d_A = 4097`` of FC0's step, in float32) at
    about 60 % of its rate on aligned rows (measured on the 2-core AMD EPYC build machine, one
    thread: the ``16385 x 476`` product of Alg. 3 line 9 in 0.21-0.26 s, into a 480-wide
    buffer in 0.08-0.14 s)."""
    if like.device.type != "cpu":
        return cols
    per_line = max(64 // like.element_size(), 1)
    return -(-cols // per_line) * per_line


def _aligned_product(*pairs: tuple[Tensor, Tensor]) -> Tensor:
    """``sum_i X_i @ Y_i`` as a new contiguous matrix, computed into a buffer of
    :func:`aligned_width` (the one copy back to contiguous rows costs about a tenth of what
    the alignment saves on a tall output)."""
    X0, Y0 = pairs[0]
    rows, cols = X0.shape[0], Y0.shape[1]
    ld = aligned_width(cols, X0)
    if ld == cols or rows < 4 * cols:
        out = X0 @ Y0
        for X, Y in pairs[1:]:
            out = torch.addmm(out, X, Y)
        return out
    out = X0.new_empty(rows, ld)[:, :cols]
    torch.mm(X0, Y0, out=out)
    for X, Y in pairs[1:]:
        out.addmm_(X, Y)
    return out.contiguous()


def _cholesky_qr(X: Tensor, eye: Tensor) -> tuple[Tensor, Tensor] | None:
    """One CholeskyQR pass ``X = Q R``; ``None`` when the Cholesky factorisation breaks down."""
    L, info = torch.linalg.cholesky_ex(X.mT @ X)
    if int(info) != 0:
        return None
    R = L.mT
    # Q = X R^{-1}: explicit inverse of the small triangle, then one GEMM
    return X @ torch.linalg.solve_triangular(R, eye, upper=True), R


def _cholesky_qr2(U: Tensor, P: Tensor, C: Tensor, anorm: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """Fast path of :func:`orthonormal_extension`: CholeskyQR2 (Fukaya et al. 2014) of ``P``.

    Hand-written because it is several times faster than Householder QR for the tall block
    ``P`` (dim x n, dim >> n): Gram matrices and matrix products only, all level-3 BLAS.
    ``P = Q1 R1`` then ``Q1 = Q R2`` (the second pass restores orthonormality), ``R = R2 R1``;
    for moderately ill-conditioned ``P`` one more projection of ``Q`` out of ``span(U)`` (see
    :func:`_fast_path_limits`) with ``C`` and ``R`` adjusted so that ``A = U C + Q R`` still
    holds. The acceptance ``rho`` is taken relative to ``max(max|R_ii|, ||A||_F)`` (a block of
    pure rounding noise is refused); the extra projection depends on ``cond(P)`` alone, i.e.
    on ``rho`` relative to ``max|R_ii|``: after the two Gram-Schmidt passes ``P`` is orthogonal
    to ``U`` to working precision relative to its own norm, so ``Q = P R^{-1}`` is orthogonal to
    ``U`` up to ``eps * cond(P)``. (A batch mostly inside ``span(U)`` -- FC0's activations, whose
    mean direction the representation already holds -- has ``||P|| << ||A||`` and a
    well-conditioned ``P``: it takes two passes, not three.) Returns ``(C, Q, R)``, or ``None``
    when ``P`` is too ill-conditioned (a Cholesky breaks down, ``rho`` is below the limit, or
    the first pass leaves ``Q1^T Q1`` more than 0.1 from the identity); the caller then takes
    the rank-revealing path.
    """
    n = P.shape[1]
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    accept, clean = _fast_path_limits(P.dtype)
    first = _cholesky_qr(P, eye)
    if first is None:
        return None
    Q1, R1 = first
    diag = R1.diagonal()
    dmin, dmax = float(diag.min()), float(diag.max())
    # relative to ||A|| (not only to max|R_ii|): a block that is all rounding noise left over
    # from the projection (A inside span(U)) is well conditioned but not orthogonal to U
    if not dmin / max(dmax, anorm) > accept:
        return None
    second = _cholesky_qr(Q1, eye)
    if second is None:
        return None
    Q, R2 = second
    # Q1^T Q1 = R2^T R2: the first pass's loss of orthogonality, from the small triangle
    if float((R2.mT @ R2 - eye).abs().max()) > 0.1:
        return None
    R = R2 @ R1
    if dmin / dmax < clean and U.shape[1] > 0:
        # A = U C + Q R with Q = Qp + U W, Qp = Q3 R3  =>  A = U (C + W R) + Q3 (R3 R)
        W = U.mT @ Q
        third = _cholesky_qr(torch.addmm(Q, U, W, alpha=-1.0), eye)
        if third is None:  # pragma: no cover - Q - U W is orthonormal up to eps * cond(P)
            return None
        Q, R3 = third
        C = torch.addmm(C, W, R)
        R = R3 @ R
    return C, Q, R


def orthonormal_extension(U: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``A = U C + Q R`` with ``[U Q]`` orthonormal (lines 3-4 of Alg. 2 and 3).

    ``U`` (dim x r) must be orthonormal and ``r + n <= dim`` (``n = A.shape[1]``).
    Returns ``(C, Q, R)`` with ``C`` (r x n), ``Q`` (dim x n), ``R`` (n x n).

    The projected block ``P = (I - U U^T) A`` is computed with two Gram-Schmidt passes
    ("twice is enough"). The fast path factors ``P = Q R`` by CholeskyQR2 when ``P`` is
    well conditioned (the generic case of a batch of activations or gradients, see
    :func:`_fast_path_limits`); this is the QR of Alg. 3 line 4. Otherwise (rank-deficient
    ``A``, columns inside ``span(U)``, or just ill conditioned) the rank-revealing path uses
    a thin SVD ``P = Y S Z^T``: directions with non-negligible singular value are projected
    out of ``U`` once more and re-orthonormalised (so they are orthogonal to ``U`` to working
    precision whatever the conditioning), the others (noise of size ``eps * ||A||``) are
    replaced by an exact orthonormal completion and their rounding-level contribution is
    dropped.
    """
    dim, n = A.shape
    # Two classical Gram-Schmidt passes: P = (I - U U^T) A to working precision.
    C = U.mT @ A
    P = torch.addmm(A, U, C, alpha=-1.0)
    C2 = U.mT @ P
    P = torch.addmm(P, U, C2, alpha=-1.0)
    C = C + C2
    if n == 0:
        return C, A.new_zeros(dim, 0), A.new_zeros(0, 0)
    fast = _cholesky_qr2(U, P, C, float(torch.linalg.matrix_norm(A)))
    if fast is not None:
        return fast
    # Rank-revealing path.
    Y, S, Zh = torch.linalg.svd(P, full_matrices=False)
    W = U.mT @ Y
    Yp = Y - U @ W
    smax = float(S.max()) if S.numel() else 0.0
    good = torch.linalg.vector_norm(Yp, dim=0) > 0.5
    if smax > 0:
        good &= S > smax * torch.finfo(A.dtype).eps * max(dim, n)
    else:
        good &= False
    k = int(good.sum())
    Qg, R2 = torch.linalg.qr(Yp[:, good])
    SZ = S[good, None] * Zh[good]  # (k x n)
    # Y_g S_g Z_g^T = (Yp_g + U W_g) S_g Z_g^T = Qg R2 S_g Z_g^T + U W_g S_g Z_g^T
    C = C + W[:, good] @ SZ
    Rg = R2 @ SZ
    if k < n:
        Qc = _complete_basis(torch.cat([U, Qg], dim=1), n - k)
        Q = torch.cat([Qg, Qc], dim=1)
        R = torch.cat([Rg, A.new_zeros(n - k, n)], dim=0)
    else:
        Q, R = Qg, Rg
    return C, Q, R


def _check_lowrank(name_u: str, U: Tensor, name_d: str, d: Tensor, name_a: str, A: Tensor):
    if not isinstance(U, Tensor) or U.dim() != 2:
        raise ValueError(f"{name_u} must be a matrix (dim x r)")
    check_matrix(name_u, U)
    check_vector(name_d, d, U.shape[1])
    check_matrix(name_a, A, rows=U.shape[0])
    if not (U.dtype == d.dtype == A.dtype):
        raise ValueError(f"{name_u}, {name_d} and {name_a} must share a dtype, got {U.dtype}, {d.dtype}, {A.dtype}")
    if not (U.device == d.device == A.device):
        raise ValueError(f"{name_u}, {name_d} and {name_a} must be on one device")


def brand_update(U: Tensor, d: Tensor, A: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric Brand update (Algorithm 3 of Puiu 2022; Brand 2006).

    Given an orthonormal ``U`` (dim x r), eigenvalues ``d`` (r,) of the PSD matrix
    ``X = U diag(d) U^T`` and an update block ``A`` (dim x n), return ``(U_new, d_new)``,
    the exact eigendecomposition of ``X + A A^T``: ``U_new`` orthonormal, ``d_new``
    non-negative and in descending order.

    * Width: ``U_new`` has ``r + n`` columns. Directions the update does not reach carry an
      eigenvalue of exactly zero (rank-deficient ``A``, ``A`` inside ``span(U)``).
    * ``r = 0`` (pass ``U`` of shape ``(dim, 0)`` and an empty ``d``) gives the EVD of
      ``A A^T`` from scratch, in ``O(dim n^2)``.
    * ``r + n >= dim``: the paper's algorithm needs ``r + n < dim``. Here we fall back to the
      exact dense route: form the ``dim x dim`` matrix and call ``eigh``; ``U_new`` then has
      width ``dim`` (the cost is that of ``eigh`` on a matrix no larger than ``r + n``).
    * Rounding: eigenvalues of the small matrix ``M_S`` that come out negative within
      ``10 * (r+n) * eps * max(d)`` are clamped to zero; input ``d`` more negative than that
      raises ``ValueError``.

    In b-kfac (Alg. 4, line 6) the call is ``brand_update(U, rho * d, sqrt(1 - rho) * A_k)``.
    Cost ``O(dim (r+n)^2 + (r+n)^3)``.

    ``check=False`` (the optimizers' hot path) skips the argument checks -- shapes aside, each
    is a pass over ``U`` or ``A`` and a host sync -- for callers whose ``U``, ``d`` come from an
    earlier update and whose ``A`` was checked finite: ``d`` is taken as non-negative, and the
    eigenvalues of ``M_S = L diag(d, 1) L^T`` (positive semi-definite by construction) are
    clamped at zero without the test that only a negative ``d`` could fail.
    """
    if check:
        _check_lowrank("U", U, "d", d, "A", A)
    elif U.dim() != 2 or A.dim() != 2 or A.shape[0] != U.shape[0] or d.shape != (U.shape[1],):
        raise ValueError(f"shapes do not fit: U {tuple(U.shape)}, d {tuple(d.shape)}, A {tuple(A.shape)}")
    dim, r = U.shape
    n = A.shape[1]
    if check:
        d = clamp_rounding_negatives("d", d, max(r, 1))
    if r + n >= dim:
        X = (U * d) @ U.mT + A @ A.mT
        X = 0.5 * (X + X.mT)
        evals, evecs = _eigh_desc(X)
        if not check:
            return evecs, evals.clamp_min(0.0)
        return evecs, clamp_rounding_negatives("eigenvalues of U diag(d) U^T + A A^T", evals, dim)
    C, Q, R = orthonormal_extension(U, A)
    # L = [[I, C], [0, R]];  M_S = L diag(d, 1) L^T   (identity (7) with B = A, V = U)
    L = A.new_zeros(r + n, r + n)
    L[:r, :r] = torch.eye(r, dtype=A.dtype, device=A.device)
    L[:r, r:] = C
    L[r:, r:] = R
    w = torch.cat([d, A.new_ones(n)])
    MS = (L * w) @ L.mT
    MS = 0.5 * (MS + MS.mT)
    evals, Um = _eigh_desc(MS)
    evals = clamp_rounding_negatives("eigenvalues of M_S", evals, r + n) if check else evals.clamp_min(0.0)
    U_new = _aligned_product((U, Um[:r]), (Q, Um[r:]))
    return U_new, evals


def brand_update_general(
    U: Tensor, s: Tensor, V: Tensor, A: Tensor, B: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """General Brand update (Algorithm 2 of Puiu 2022; Brand 2006).

    Given the thin SVD ``X = U diag(s) V^T`` (``U`` m x r, ``V`` d x r orthonormal,
    ``s >= 0``) and blocks ``A`` (m x n), ``B`` (d x n), return ``(U_new, s_new, V_new)``, the
    exact thin SVD of ``X + A B^T`` with ``s_new`` in descending order and width ``r + n``.

    ``r + n >= min(m, d)`` falls back to a dense SVD of the explicit matrix (width
    ``min(m, d)``). Cost otherwise ``O((m + d)(r+n)^2 + (r+n)^3)``.
    """
    check_matrix("U", U)
    check_matrix("V", V, cols=U.shape[1])
    check_vector("s", s, U.shape[1])
    check_matrix("A", A, rows=U.shape[0])
    check_matrix("B", B, rows=V.shape[0], cols=A.shape[1])
    if s.numel() and float(s.min()) < 0:
        raise ValueError("s must hold non-negative singular values")
    m, r = U.shape
    dd = V.shape[0]
    n = A.shape[1]
    if r + n >= min(m, dd):
        X = (U * s) @ V.mT + A @ B.mT
        Un, sn, Vh = torch.linalg.svd(X, full_matrices=False)
        return Un, sn, Vh.mT
    CA, QA, RA = orthonormal_extension(U, A)
    CB, QB, RB = orthonormal_extension(V, B)
    eye = torch.eye(r, dtype=A.dtype, device=A.device)
    LA = A.new_zeros(r + n, r + n)
    LA[:r, :r], LA[:r, r:], LA[r:, r:] = eye, CA, RA
    LB = A.new_zeros(r + n, r + n)
    LB[:r, :r], LB[:r, r:], LB[r:, r:] = eye, CB, RB
    w = torch.cat([s, A.new_ones(n)])
    MS = (LA * w) @ LB.mT
    Um, sm, Vmh = torch.linalg.svd(MS)
    U_new = U @ Um[:r] + QA @ Um[r:]
    V_new = V @ Vmh.mT[:r] + QB @ Vmh.mT[r:]
    return U_new, sm, V_new


def _eigh_desc(M: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` with eigenvalues in descending order (and matching eigenvector columns).

    On CUDA, torch sends float32 matrices of size 32..512 (``M_S`` of b-kfac is 476) to
    cuSOLVER's Jacobi solver ``syevj``; on an H100 we measured a single float32 B-update
    there ~100x less accurate (orthogonality and reconstruction ~1e-4) than with LAPACK on the
    CPU (~1e-6). The small ``(r+n) x (r+n)`` problem is therefore solved in float64 on CUDA
    (divide and conquer, ``syevd``) and cast back; its cost stays independent of ``dim``.
    """
    from .eig import safe_eigh

    if M.is_cuda and M.dtype in (torch.float32, torch.float16, torch.bfloat16):
        evals, evecs = safe_eigh(M.double())
        evals, evecs = evals.to(M.dtype), evecs.to(M.dtype)
    else:
        evals, evecs = safe_eigh(M)
    return evals.flip(0), evecs.flip(1)
