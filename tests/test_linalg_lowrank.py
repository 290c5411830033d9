"""Damped low-rank inverse application (Alg. 1 l.15-17), spectrum continuation (Sec. 3.5),
the linear-time application (Alg. 8), light correction (Alg. 6) and truncation (Alg. 4 l.3-4).

References are dense float64 matrices: explicit inverses ``torch.linalg.inv`` of the damped
factors, explicit products, and Frobenius norms of explicit differences.
"""

from __future__ import annotations

import pytest
import torch

from bkfac.linalg import (
    damped_inverse_apply,
    dense_from_lowrank,
    kfac_precondition,
    light_correction,
    linear_time_factors,
    linear_time_precondition,
    spectrum_continuation,
    truncate,
)

DT = torch.float64
TOL = 1e-10


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rep(dim, r, g):
    U = torch.linalg.qr(torch.randn(dim, r, dtype=DT, generator=g)).Q
    d = (torch.rand(r, dtype=DT, generator=g) * 5 + 0.2).sort(descending=True).values
    return U, d


def _dense_inv(U, d, lam):
    dim = U.shape[0]
    return torch.linalg.inv(dense_from_lowrank(U, d) + lam * torch.eye(dim, dtype=DT))


def _rel(x, ref):
    return float(torch.linalg.matrix_norm(x - ref)) / float(torch.linalg.matrix_norm(ref))


@pytest.mark.parametrize("dim,r,k,lam", [(30, 5, 4, 0.1), (50, 50, 3, 1.0), (40, 12, 1, 1e-3), (25, 1, 7, 3.0)])
def test_damped_inverse_apply_matches_dense(dim, r, k, lam):
    g = _gen(dim + r)
    U, d = _rep(dim, r, g)
    Xl = torch.randn(dim, k, dtype=DT, generator=g)
    Xr = torch.randn(k, dim, dtype=DT, generator=g)
    inv = _dense_inv(U, d, lam)
    assert _rel(damped_inverse_apply(U, d, lam, Xl, side="left"), inv @ Xl) <= TOL
    assert _rel(damped_inverse_apply(U, d, lam, Xr, side="right"), Xr @ inv) <= TOL
    # lam as a 0-d tensor gives the same
    assert _rel(damped_inverse_apply(U, d, torch.tensor(lam, dtype=DT), Xl), inv @ Xl) <= TOL


def test_spectrum_continuation_identity():
    g = _gen(1)
    U, d = _rep(20, 6, g)
    lam = 0.3
    d2, lam2 = spectrum_continuation(d, lam)
    assert float(d2.min()) == 0.0
    assert abs(float(lam2) - (lam + float(d.min()))) <= 1e-15
    lhs = dense_from_lowrank(U, d2) + float(lam2) * torch.eye(20, dtype=DT)
    P = torch.eye(20, dtype=DT) - U @ U.mT
    rhs = dense_from_lowrank(U, d) + lam * torch.eye(20, dtype=DT) + float(d.min()) * P
    assert _rel(lhs, rhs) <= TOL
    # full rank: the damped matrix is unchanged
    Uf, df = _rep(8, 8, g)
    df2, lamf2 = spectrum_continuation(df, lam)
    assert _rel(dense_from_lowrank(Uf, df2) + float(lamf2) * torch.eye(8, dtype=DT),
                dense_from_lowrank(Uf, df) + lam * torch.eye(8, dtype=DT)) <= TOL


@pytest.mark.parametrize("continuation", [False, True])
@pytest.mark.parametrize("dG,dA,rG,rA", [(12, 30, 4, 9), (20, 20, 20, 5), (7, 45, 3, 45)])
def test_kfac_precondition_matches_dense(continuation, dG, dA, rG, rA):
    g = _gen(dG * dA + rG + rA)
    UA, dA_ = _rep(dA, rA, g)
    UG, dG_ = _rep(dG, rG, g)
    lamA, lamG = 0.05, 0.2
    J = torch.randn(dG, dA, dtype=DT, generator=g)
    if continuation:
        dA_c, lamA_c = spectrum_continuation(dA_, lamA)
        dG_c, lamG_c = spectrum_continuation(dG_, lamG)
    else:
        dA_c, lamA_c, dG_c, lamG_c = dA_, lamA, dG_, lamG
    ref = _dense_inv(UG, dG_c, float(lamG_c)) @ J @ _dense_inv(UA, dA_c, float(lamA_c))
    S = kfac_precondition(J, UA, dA_, lamA, UG, dG_, lamG, continuation=continuation)
    assert _rel(S, ref) <= TOL
    if continuation and rA < dA:
        # continuation really changes the result for a partial representation
        plain = kfac_precondition(J, UA, dA_, lamA, UG, dG_, lamG)
        assert _rel(plain, ref) > 1e-3


@pytest.mark.parametrize("continuation", [False, True])
@pytest.mark.parametrize("scale", [1.0, 256.0])
def test_linear_time_precondition_matches_standard(continuation, scale):
    g = _gen(17)
    dA, dG, n = 60, 25, 8
    UA, dA_ = _rep(dA, 10, g)
    UG, dG_ = _rep(dG, 6, g)
    A = torch.randn(dA, n, dtype=DT, generator=g)
    G = torch.randn(dG, n, dtype=DT, generator=g)
    S = linear_time_precondition(G, A, UA, dA_, 0.1, UG, dG_, 0.3, continuation=continuation, scale=scale)
    ref = kfac_precondition(scale * G @ A.mT, UA, dA_, 0.1, UG, dG_, 0.3, continuation=continuation)
    assert _rel(S, ref) <= TOL
    # the factors themselves (Alg. 8 lines 5 and 7) against dense inverses
    G_hat, A_hat = linear_time_factors(G, A, UA, dA_, 0.1, UG, dG_, 0.3, continuation=continuation)
    if continuation:
        dA_, lamA = spectrum_continuation(dA_, 0.1)
        dG_, lamG = spectrum_continuation(dG_, 0.3)
    else:
        lamA, lamG = 0.1, 0.3
    assert _rel(G_hat, _dense_inv(UG, dG_, float(lamG)) @ G) <= TOL
    assert _rel(A_hat, _dense_inv(UA, dA_, float(lamA)) @ A) <= TOL


def _approximate_rep(seed, dim=40, width=12):
    """A PSD ``M`` and a deliberately inexact orthonormal representation of it."""
    g = _gen(seed)
    B = torch.randn(dim, dim, dtype=DT, generator=g) * (0.8 ** torch.arange(dim, dtype=DT))
    M = B @ B.mT
    evals, evecs = torch.linalg.eigh(M)
    U0 = evecs.flip(1)[:, :width] + 0.3 * torch.randn(dim, width, dtype=DT, generator=g)
    U = torch.linalg.qr(U0).Q
    d = (evals.flip(0)[:width] * (1 + 0.5 * torch.rand(width, dtype=DT, generator=g))).sort(descending=True).values
    return M, U, d


@pytest.mark.parametrize("seed,n_crc,among", [(0, 4, None), (1, 12, None), (2, 3, 6), (3, 1, None)])
def test_light_correction(seed, n_crc, among):
    M, U, d = _approximate_rep(seed)
    U_new, d_new = light_correction(U, d, M, n_crc, generator=_gen(100 + seed), among=among)
    width = U.shape[1]
    assert U_new.shape == U.shape and d_new.shape == d.shape
    assert float((U_new.mT @ U_new - torch.eye(width, dtype=DT)).abs().max()) <= TOL
    assert bool((d_new[:-1] >= d_new[1:]).all()) and float(d_new.min()) >= 0
    # identify the untouched modes (they survive as exact columns with their eigenvalue)
    kept = []
    for j in range(width):
        same = ((U_new - U[:, j : j + 1]).abs().amax(0) == 0) & (d_new == d[j])
        if bool(same.any()):
            kept.append(j)
    chosen = [j for j in range(width) if j not in kept]
    assert len(chosen) == n_crc
    limit = width if among is None else among
    assert max(chosen) < limit
    Us = U[:, chosen]
    residual = Us.mT @ (M - dense_from_lowrank(U_new, d_new)) @ Us
    assert float(residual.abs().max()) <= TOL * float(torch.linalg.matrix_norm(M))
    before = float(torch.linalg.matrix_norm(M - dense_from_lowrank(U, d)))
    after = float(torch.linalg.matrix_norm(M - dense_from_lowrank(U_new, d_new)))
    assert after <= before * (1 + 1e-12)
    assert before > 0 and after < before  # with an inexact d the correction strictly helps here


def test_light_correction_deterministic_and_bad_input():
    M, U, d = _approximate_rep(5)
    a = light_correction(U, d, M, 5, generator=_gen(1))
    b = light_correction(U, d, M, 5, generator=_gen(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="n_crc"):
        light_correction(U, d, M, 0)
    with pytest.raises(ValueError, match="n_crc"):
        light_correction(U, d, M, 13)
    with pytest.raises(ValueError, match="n_crc"):
        light_correction(U, d, M, 4, among=3)
    with pytest.raises(ValueError, match=r"\bM\b"):
        light_correction(U, d, M[:, :30], 3)
    bad = M.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\bM\b.*non-finite"):
        light_correction(U, d, bad, 3)


def test_truncate_keeps_leading_modes():
    g = _gen(9)
    U, d = _rep(30, 10, g)
    Ut, dt = truncate(U, d, 4)
    assert torch.equal(Ut, U[:, :4]) and torch.equal(dt, d[:4])
    Ua, da = truncate(U, d, 20)  # wider than the representation: keep everything
    assert torch.equal(Ua, U) and torch.equal(da, d)
    with pytest.raises(ValueError, match="rank"):
        truncate(U, d, 31)
    with pytest.raises(ValueError, match="rank"):
        truncate(U, d, 0)
    with pytest.raises(ValueError, match=r"\bd\b"):
        truncate(U, d[:5], 3)


def test_bad_input_damping_and_shapes():
    g = _gen(11)
    U, d = _rep(20, 5, g)
    X = torch.randn(20, 3, dtype=DT, generator=g)
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"damping lam\b"):
            damped_inverse_apply(U, d, lam, X)
    with pytest.raises(ValueError, match=r"\bX\b"):
        damped_inverse_apply(U, d, 0.1, X[:19])
    with pytest.raises(ValueError, match=r"\bX\b"):
        damped_inverse_apply(U, d, 0.1, X, side="right")
    with pytest.raises(ValueError, match="side"):
        damped_inverse_apply(U, d, 0.1, X, side="up")
    with pytest.raises(ValueError, match=r"\bd\b"):
        damped_inverse_apply(U, d[:4], 0.1, X)
    with pytest.raises(ValueError, match=r"\bd\b.*negative"):
        damped_inverse_apply(U, d - 1.0, 0.1, X)
    bad = X.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\bX\b.*non-finite"):
        damped_inverse_apply(U, d, 0.1, bad)
    # negatives within rounding are accepted (treated as zero)
    d_tiny = d.clone()
    d_tiny[-1] = -1e-17
    ref = damped_inverse_apply(U, d_tiny.clamp_min(0), 0.1, X)
    assert _rel(damped_inverse_apply(U, d_tiny, 0.1, X), ref) <= TOL

    UG, dG = _rep(6, 2, g)
    J = torch.randn(6, 20, dtype=DT, generator=g)
    with pytest.raises(ValueError, match="lamA"):
        kfac_precondition(J, U, d, -0.1, UG, dG, 0.1)
    with pytest.raises(ValueError, match="lamG"):
        kfac_precondition(J, U, d, 0.1, UG, dG, 0.0)
    with pytest.raises(ValueError, match=r"\bJ\b"):
        kfac_precondition(J.mT, U, d, 0.1, UG, dG, 0.1)
    with pytest.raises(ValueError, match="dG"):
        kfac_precondition(J, U, d, 0.1, UG, -dG, 0.1)
    A = torch.randn(20, 4, dtype=DT, generator=g)
    G = torch.randn(6, 4, dtype=DT, generator=g)
    with pytest.raises(ValueError, match=r"\bA\b"):
        linear_time_factors(G, A[:, :3], U, d, 0.1, UG, dG, 0.1)
    with pytest.raises(ValueError, match=r"\bG\b"):
        linear_time_factors(G[:5], A, U, d, 0.1, UG, dG, 0.1)
    with pytest.raises(ValueError, match="lamA"):
        linear_time_precondition(G, A, U, d, float("nan"), UG, dG, 0.1)
    with pytest.raises(ValueError, match="lam"):
        spectrum_continuation(d, -1.0)


@pytest.mark.parametrize("D,N", [(5, 40), (256, 300), (300, 1000), (577, 700), (600, 100)])
def test_gram_is_x_xt(D, N):
    from bkfac.linalg import gram

    X = torch.randn(D, N, dtype=torch.float64, generator=torch.Generator().manual_seed(D))
    G = gram(X)
    ref = X @ X.T
    assert float((G - ref).abs().max() / ref.abs().max()) < 1e-13
    assert float((G - G.T).abs().max() / ref.abs().max()) < 1e-15
    Xt = torch.randn(N, D, dtype=torch.float64).T  # a transposed view (a Linear layer's columns)
    assert float((gram(Xt) - Xt @ Xt.T).abs().max() / (Xt @ Xt.T).abs().max()) < 1e-13
