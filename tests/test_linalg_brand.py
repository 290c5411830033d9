"""Brand's algorithm (Alg. 2 and 3 of the paper) against explicit float64 references.

The reference for the symmetric update is ``torch.linalg.eigh`` of the explicitly formed
``U diag(d) U^T + A A^T``; for the general update ``torch.linalg.svd`` of
``U diag(s) V^T + A B^T``. The cases cover the degenerate inputs the b-kfac loop meets:
``r = 0`` (first update), rank-deficient ``A``, ``A`` inside ``span(U)`` (also exactly, with
``U`` made of identity columns), a single column, and the dense fallback ``r + n >= dim``.
"""

from __future__ import annotations

import pytest
import torch

from bkfac.linalg import brand_update, brand_update_general, orthonormal_extension

DT = torch.float64
TOL = 1e-10


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(dim: int, r: int, g: torch.Generator) -> torch.Tensor:
    if r == 0:
        return torch.zeros(dim, 0, dtype=DT)
    return torch.linalg.qr(torch.randn(dim, r, dtype=DT, generator=g)).Q


def _spectrum(r: int, g: torch.Generator) -> torch.Tensor:
    # decaying positive spectrum, descending, with a spread of several orders of magnitude
    return (torch.rand(r, dtype=DT, generator=g) * 3 + 0.1).sort(descending=True).values * 10.0 ** (
        -torch.linspace(0, 4, r, dtype=DT)
    )


# log10 of the condition number of the update block of each ill-conditioned kind:
# "ill_conditioned" is beyond CholeskyQR2 (rank-revealing path), "moderate64" / "moderate32"
# take the fast path with the extra projection out of span(U) in float64 / float32.
CONDITION = {"ill_conditioned": 9.0, "moderate64": 6.5, "moderate32": 3.0}


def _update_block(kind: str, U: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    dim, r = U.shape
    if kind in ("generic", "r0", "n1"):
        return torch.randn(dim, n, dtype=DT, generator=g)
    if kind == "rank_deficient":  # columns n//2.. are combinations of the first n//2
        k = max(n // 2, 1)
        base = torch.randn(dim, k, dtype=DT, generator=g)
        return torch.cat([base, base @ torch.randn(k, n - k, dtype=DT, generator=g)], dim=1)
    if kind == "in_span":  # every column inside span(U)
        return U @ torch.randn(r, n, dtype=DT, generator=g)
    if kind == "mixed":  # half inside span(U), half generic, plus a repeated column
        k = max(n // 2, 1)
        A = torch.cat([U @ torch.randn(r, k, dtype=DT, generator=g), torch.randn(dim, n - k, dtype=DT, generator=g)], 1)
        A[:, -1] = A[:, 0]
        return A
    if kind == "zero":
        return torch.zeros(dim, n, dtype=DT)
    if kind in CONDITION:  # full rank, singular values from 1 down to 10^-CONDITION[kind]
        left = torch.linalg.qr(torch.randn(dim, n, dtype=DT, generator=g)).Q
        right = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g)).Q
        return (left * torch.logspace(0, -CONDITION[kind], n, dtype=DT)) @ right
    raise AssertionError(kind)


# (seed, dim, r, n, kind); all with r + n < dim (the Alg. 3 path)
SYM_CASES = [
    (0, 40, 6, 5, "generic"),
    (1, 200, 30, 25, "generic"),
    (2, 97, 20, 1, "n1"),
    (3, 60, 0, 7, "r0"),
    (4, 150, 0, 40, "r0"),
    (5, 80, 10, 8, "rank_deficient"),
    (6, 120, 25, 12, "rank_deficient"),
    (7, 50, 12, 5, "in_span"),
    (8, 300, 40, 30, "in_span"),
    (9, 70, 9, 6, "mixed"),
    (10, 64, 8, 4, "zero"),
    (11, 33, 4, 1, "in_span"),
    (12, 90, 10, 12, "ill_conditioned"),
    (13, 90, 10, 12, "moderate64"),
]


def _check_sym(U, d, A, U_new, d_new, width):
    X = (U * d) @ U.mT + A @ A.mT
    ref = torch.linalg.eigvalsh(X).flip(0)  # descending
    scale = float(ref.abs().max()) if float(ref.abs().max()) > 0 else 1.0
    assert U_new.shape == (U.shape[0], width)
    assert d_new.shape == (width,)
    # orthonormal columns
    eye = torch.eye(width, dtype=DT)
    assert float((U_new.mT @ U_new - eye).abs().max()) <= TOL
    # descending, non-negative (tiny negatives from rounding are clamped to exactly >= 0)
    assert bool((d_new[:-1] >= d_new[1:]).all())
    assert float(d_new.min()) >= 0.0
    # reconstruction
    X_new = (U_new * d_new) @ U_new.mT
    denom = float(torch.linalg.matrix_norm(X)) or 1.0
    assert float(torch.linalg.matrix_norm(X - X_new)) / denom <= TOL
    # eigenvalues: the first `width` agree; the rest of the spectrum of X is zero
    assert float(torch.linalg.vector_norm(ref[:width] - d_new)) / (float(torch.linalg.vector_norm(ref)) or 1.0) <= TOL
    assert _amax(ref[width:]) <= TOL * scale


@pytest.mark.parametrize("seed,dim,r,n,kind", SYM_CASES)
def test_brand_update_matches_eigh(seed, dim, r, n, kind):
    g = _gen(seed)
    U = _orthonormal(dim, r, g)
    d = _spectrum(r, g)
    A = _update_block(kind, U, n, g)
    U_new, d_new = brand_update(U, d, A)
    _check_sym(U, d, A, U_new, d_new, r + n)
    assert U_new.dtype == DT and d_new.dtype == DT


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brand_update_exact_span_identity_columns(seed):
    """``U`` = identity columns and ``A = U X``: the projection of ``A`` is exactly zero."""
    g = _gen(seed)
    dim, r, n = 30, 7, 4
    U = torch.eye(dim, dtype=DT)[:, :r]
    d = _spectrum(r, g)
    A = U @ torch.randn(r, n, dtype=DT, generator=g)
    assert float((A - U @ (U.mT @ A)).abs().max()) == 0.0
    U_new, d_new = brand_update(U, d, A)
    _check_sym(U, d, A, U_new, d_new, r + n)
    # the update does not reach outside span(U): the n extra modes carry eigenvalue 0
    assert float(d_new[r:].abs().max()) <= TOL * float(d_new[0])


def test_brand_update_repeated_online_use():
    """A b-kfac-like loop (truncate, scale by rho, add sqrt(1-rho) A_k) stays exact."""
    g = _gen(42)
    dim, r, n, rho = 120, 15, 10, 0.95
    U, d = torch.zeros(dim, 0, dtype=DT), torch.zeros(0, dtype=DT)
    for _ in range(6):
        U, d = U[:, :r], d[:r]
        A = (1 - rho) ** 0.5 * torch.randn(dim, n, dtype=DT, generator=g).relu()
        U_new, d_new = brand_update(U, rho * d, A)
        _check_sym(U, rho * d, A, U_new, d_new, U.shape[1] + n)
        U, d = U_new, d_new


@pytest.mark.parametrize("dim,r,n", [(20, 10, 10), (20, 15, 8), (12, 0, 12), (9, 3, 30)])
def test_brand_update_dense_fallback(dim, r, n):
    """``r + n >= dim`` (documented in the docstring): exact dense route, width ``dim``."""
    assert "r + n >= dim" in brand_update.__doc__
    g = _gen(dim + r + n)
    U = _orthonormal(dim, r, g)
    d = _spectrum(r, g)
    A = torch.randn(dim, n, dtype=DT, generator=g)
    U_new, d_new = brand_update(U, d, A)
    _check_sym(U, d, A, U_new, d_new, dim)


def test_brand_update_clamps_rounding_negatives():
    g = _gen(3)
    dim, r, n = 40, 6, 3
    U = _orthonormal(dim, r, g)
    d = _spectrum(r, g)
    d_in = d.clone()
    d_in[-1] = -1e-3 * torch.finfo(DT).eps * float(d[0])  # negative within rounding
    A = U @ torch.randn(r, n, dtype=DT, generator=g)  # makes M_S singular: zeros come out as +-eps
    U_new, d_new = brand_update(U, d_in, A)
    assert float(d_new.min()) >= 0.0
    _check_sym(U, d_in.clamp_min(0), A, U_new, d_new, r + n)


def test_brand_update_clamps_rounding_negatives_of_m_s(monkeypatch):
    """Eigenvalues of ``M_S`` negative within rounding become 0; beyond rounding they raise."""
    import bkfac.linalg.brand as brand

    g = _gen(13)
    U, d = _orthonormal(40, 6, g), _spectrum(6, g)
    A = torch.randn(40, 3, dtype=DT, generator=g)
    real = brand._eigh_desc
    shift = {"value": 0.0}

    def perturbed(M):
        evals, evecs = real(M)
        evals = evals.clone()
        evals[-1] = shift["value"] * float(evals[0])
        return evals, evecs

    monkeypatch.setattr(brand, "_eigh_desc", perturbed)
    shift["value"] = -torch.finfo(DT).eps  # within 10 (r+n) eps max(d)
    _, d_new = brand_update(U, d, A)
    assert float(d_new[-1]) == 0.0 and float(d_new.min()) >= 0.0
    shift["value"] = -1e-6  # far beyond rounding: the input was not PSD
    with pytest.raises(ValueError, match="M_S.*negative"):
        brand_update(U, d, A)


def test_brand_update_rejects_clearly_negative_d():
    g = _gen(4)
    U = _orthonormal(30, 5, g)
    d = _spectrum(5, g)
    d[-1] = -1e-3 * float(d[0])
    with pytest.raises(ValueError, match=r"\bd\b.*negative"):
        brand_update(U, d, torch.randn(30, 2, dtype=DT, generator=g))


def test_brand_update_bad_input():
    g = _gen(5)
    U = _orthonormal(30, 5, g)
    d = _spectrum(5, g)
    A = torch.randn(30, 3, dtype=DT, generator=g)
    with pytest.raises(ValueError, match=r"\bU\b"):
        brand_update(U[:, 0], d, A)
    with pytest.raises(ValueError, match=r"\bd\b"):
        brand_update(U, d[:4], A)
    with pytest.raises(ValueError, match=r"\bd\b"):
        brand_update(U, d[:, None], A)
    with pytest.raises(ValueError, match=r"\bA\b"):
        brand_update(U, d, A[:29])
    with pytest.raises(ValueError, match=r"\bA\b"):
        brand_update(U, d, A[:, 0])
    bad = A.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"\bA\b.*non-finite"):
        brand_update(U, d, bad)
    bad_d = d.clone()
    bad_d[0] = float("inf")
    with pytest.raises(ValueError, match=r"\bd\b.*non-finite"):
        brand_update(U, bad_d, A)
    bad_U = U.clone()
    bad_U[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\bU\b.*non-finite"):
        brand_update(bad_U, d, A)
    with pytest.raises(ValueError, match="dtype"):
        brand_update(U, d, A.float())


def test_fast_path_on_generic_data_and_robust_path_otherwise(monkeypatch):
    """Generic blocks take the CholeskyQR2 fast path (two Cholesky-QR passes); moderately
    ill-conditioned ones take it with a third pass after projecting out of ``span(U)`` again;
    deficient or severely ill-conditioned ones take the rank-revealing path.

    (A block inside ``span(U)`` in floating point leaves a projection of pure rounding noise,
    which may be well conditioned: either path is then exact to rounding, so it is not listed.)
    """
    import bkfac.linalg.brand as brand

    taken, passes = [], []
    real, real_pass = brand._cholesky_qr2, brand._cholesky_qr

    def spy(U, P, C, anorm):
        out = real(U, P, C, anorm)
        taken.append(out is not None)
        return out

    def spy_pass(X, eye):
        passes.append(1)
        return real_pass(X, eye)

    monkeypatch.setattr(brand, "_cholesky_qr2", spy)
    monkeypatch.setattr(brand, "_cholesky_qr", spy_pass)
    g = _gen(21)
    U = _orthonormal(100, 10, g)
    d = _spectrum(10, g)
    cases = [("generic", True, 2), ("moderate64", True, 3), ("rank_deficient", False, None),
             ("ill_conditioned", False, None)]
    for kind, fast, n_passes in cases:
        taken.clear()
        passes.clear()
        A = _update_block(kind, U, 8, g)
        U_new, d_new = brand_update(U, d, A)
        assert taken == [fast], kind
        if n_passes is not None:
            assert len(passes) == n_passes, kind
        _check_sym(U, d, A, U_new, d_new, 18)


@pytest.mark.parametrize("kind,path", [("generic", "2 passes"), ("moderate32", "3 passes"),
                                       ("ill_conditioned", "rank-revealing"), ("in_span", None)])
def test_brand_update_float32(kind, path, monkeypatch):
    """In float32 (what training uses) the result is exact to float32 rounding, on each path."""
    import bkfac.linalg.brand as brand

    seen = {"fast": None, "passes": 0}
    real, real_pass = brand._cholesky_qr2, brand._cholesky_qr

    def spy(U, P, C, anorm):
        out = real(U, P, C, anorm)
        seen["fast"] = out is not None
        return out

    def spy_pass(X, eye):
        seen["passes"] += 1
        return real_pass(X, eye)

    monkeypatch.setattr(brand, "_cholesky_qr2", spy)
    monkeypatch.setattr(brand, "_cholesky_qr", spy_pass)
    g = _gen(31)
    U = _orthonormal(300, 30, g)
    d = _spectrum(30, g)
    A = _update_block(kind, U, 20, g)
    U_new, d_new = brand_update(U.float(), d.float(), A.float())
    if path == "rank-revealing":
        assert seen["fast"] is False
    elif path is not None:
        assert seen["fast"] is True and f"{seen['passes']} passes" == path
    assert U_new.dtype == torch.float32
    assert float((U_new.mT @ U_new - torch.eye(50)).abs().max()) <= 1e-5
    X = (U * d) @ U.mT + A @ A.mT
    err = torch.linalg.matrix_norm((U_new.double() * d_new.double()) @ U_new.double().mT - X)
    assert float(err / torch.linalg.matrix_norm(X)) <= 1e-5
    assert float(d_new.min()) >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (extra check of the CUDA eigh route)")
def test_brand_update_float32_cuda():
    """On CUDA the small EVD runs in float64 (torch's float32 route there is cuSOLVER's syevj)."""
    g = _gen(41)
    U = _orthonormal(3000, 200, g)
    d = _spectrum(200, g)
    A = torch.randn(3000, 60, dtype=DT, generator=g)
    U_new, d_new = brand_update(U.float().cuda(), d.float().cuda(), A.float().cuda())
    U_new, d_new = U_new.double().cpu(), d_new.double().cpu()
    assert float((U_new.mT @ U_new - torch.eye(260, dtype=DT)).abs().max()) <= 1e-5
    X = (U * d) @ U.mT + A @ A.mT
    assert float(torch.linalg.matrix_norm((U_new * d_new) @ U_new.mT - X) / torch.linalg.matrix_norm(X)) <= 1e-5


def test_orthonormal_extension_identity():
    """Lines 3-4 of Alg. 3: ``A = U C + Q R`` with ``[U Q]`` orthonormal, also when rank deficient."""
    g = _gen(6)
    U = _orthonormal(50, 8, g)
    for A in (torch.randn(50, 5, dtype=DT, generator=g), U @ torch.randn(8, 5, dtype=DT, generator=g)):
        C, Q, R = orthonormal_extension(U, A)
        assert float((U @ C + Q @ R - A).abs().max()) <= TOL * float(A.abs().max())
        W = torch.cat([U, Q], dim=1)
        assert float((W.mT @ W - torch.eye(13, dtype=DT)).abs().max()) <= TOL


# ----------------------------------------------------------------------------- Alg. 2


def _check_general(U, s, V, A, B, U_new, s_new, V_new, width):
    X = (U * s) @ V.mT + A @ B.mT
    ref = torch.linalg.svdvals(X)
    assert U_new.shape == (U.shape[0], width) and V_new.shape == (V.shape[0], width)
    assert s_new.shape == (width,)
    eye = torch.eye(width, dtype=DT)
    assert float((U_new.mT @ U_new - eye).abs().max()) <= TOL
    assert float((V_new.mT @ V_new - eye).abs().max()) <= TOL
    assert bool((s_new[:-1] >= s_new[1:]).all()) and float(s_new.min()) >= 0.0
    denom = float(torch.linalg.matrix_norm(X)) or 1.0
    assert float(torch.linalg.matrix_norm((U_new * s_new) @ V_new.mT - X)) / denom <= TOL
    k = min(width, ref.numel())
    assert float(torch.linalg.vector_norm(ref[:k] - s_new[:k])) / (float(torch.linalg.vector_norm(ref)) or 1.0) <= TOL
    assert _amax(s_new[k:]) <= TOL * denom
    assert _amax(ref[k:]) <= TOL * denom


# (seed, m, dd, r, n, kind)
GEN_CASES = [
    (0, 50, 40, 6, 5, "generic"),
    (1, 120, 200, 20, 15, "generic"),
    (2, 60, 45, 0, 8, "r0"),
    (3, 70, 90, 10, 1, "n1"),
    (4, 80, 60, 10, 8, "rank_deficient"),
    (5, 64, 48, 9, 6, "in_span"),
    (6, 100, 100, 12, 10, "mixed"),
]


@pytest.mark.parametrize("seed,m,dd,r,n,kind", GEN_CASES)
def test_brand_update_general_matches_svd(seed, m, dd, r, n, kind):
    g = _gen(100 + seed)
    U = _orthonormal(m, r, g)
    V = _orthonormal(dd, r, g)
    s = _spectrum(r, g)
    if kind == "rank_deficient":
        k = n // 2
        A0 = torch.randn(m, k, dtype=DT, generator=g)
        A = torch.cat([A0, A0 @ torch.randn(k, n - k, dtype=DT, generator=g)], 1)
        B = torch.randn(dd, n, dtype=DT, generator=g)
    elif kind == "in_span":
        A = U @ torch.randn(r, n, dtype=DT, generator=g)
        B = V @ torch.randn(r, n, dtype=DT, generator=g)
    elif kind == "mixed":
        A = torch.cat([U @ torch.randn(r, n // 2, dtype=DT, generator=g), torch.randn(m, n - n // 2, dtype=DT, generator=g)], 1)
        B = torch.randn(dd, n, dtype=DT, generator=g)
        B[:, 1] = B[:, 0]
    else:
        A = torch.randn(m, n, dtype=DT, generator=g)
        B = torch.randn(dd, n, dtype=DT, generator=g)
    U_new, s_new, V_new = brand_update_general(U, s, V, A, B)
    _check_general(U, s, V, A, B, U_new, s_new, V_new, r + n)


def test_brand_update_general_exact_span_identity_columns():
    g = _gen(7)
    m, dd, r, n = 25, 30, 5, 3
    U = torch.eye(m, dtype=DT)[:, :r]
    V = torch.eye(dd, dtype=DT)[:, 2 : 2 + r]
    s = _spectrum(r, g)
    A = U @ torch.randn(r, n, dtype=DT, generator=g)
    B = V @ torch.randn(r, n, dtype=DT, generator=g)
    U_new, s_new, V_new = brand_update_general(U, s, V, A, B)
    _check_general(U, s, V, A, B, U_new, s_new, V_new, r + n)
    assert float(s_new[r:].abs().max()) <= TOL * float(s_new[0])


@pytest.mark.parametrize("m,dd,r,n", [(20, 30, 10, 10), (30, 12, 4, 9), (10, 10, 0, 12)])
def test_brand_update_general_dense_fallback(m, dd, r, n):
    assert "r + n >= min(m, d)" in brand_update_general.__doc__
    g = _gen(m + dd + r + n)
    U, V, s = _orthonormal(m, r, g), _orthonormal(dd, r, g), _spectrum(r, g)
    A, B = torch.randn(m, n, dtype=DT, generator=g), torch.randn(dd, n, dtype=DT, generator=g)
    U_new, s_new, V_new = brand_update_general(U, s, V, A, B)
    _check_general(U, s, V, A, B, U_new, s_new, V_new, min(m, dd))


def test_brand_update_general_bad_input():
    g = _gen(8)
    U, V, s = _orthonormal(30, 4, g), _orthonormal(20, 4, g), _spectrum(4, g)
    A, B = torch.randn(30, 2, dtype=DT, generator=g), torch.randn(20, 2, dtype=DT, generator=g)
    with pytest.raises(ValueError, match=r"\bs\b.*negative"):
        brand_update_general(U, -s, V, A, B)
    with pytest.raises(ValueError, match=r"\bV\b"):
        brand_update_general(U, s, V[:, :3], A, B)
    with pytest.raises(ValueError, match=r"\bs\b"):
        brand_update_general(U, s[:3], V, A, B)
    with pytest.raises(ValueError, match=r"\bA\b"):
        brand_update_general(U, s, V, A[:10], B)
    with pytest.raises(ValueError, match=r"\bB\b"):
        brand_update_general(U, s, V, A, B[:, :1])
    bad = B.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\bB\b.*non-finite"):
        brand_update_general(U, s, V, A, bad)


def test_repeated_updates_inside_the_span_stay_orthonormal():
    """b-kfac loop where every update lies inside span(U) (a rank-6 process tracked at rank 8):
    the rounding-noise residual must not pass as a well-conditioned new block (it did: U^T U - I
    reached 0.9 after 4 updates)."""
    from bkfac.linalg import rsvd

    g = torch.Generator().manual_seed(0)
    d, n = 50, 6
    Z = (0.6 ** torch.arange(d, dtype=torch.float64))[:, None] * torch.randn(d, n, generator=g, dtype=torch.float64)
    M = Z @ Z.T
    U, s = rsvd(M, 8, 4, 3, g)
    for _ in range(6):
        U, s = brand_update(U[:, :8], 0.9 * s[:8], 0.1**0.5 * Z)
        assert float((U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max()) < 1e-10
        assert float(torch.linalg.matrix_norm((U * s) @ U.T - M) / torch.linalg.matrix_norm(M)) < 1e-10


def test_check_finite_by_its_sum_and_entries():
    """A finite sum passes at once; NaN, +-inf and +inf/-inf pairs (sum NaN) are caught; finite
    entries whose sum overflows are not mistaken for non-finite ones."""
    from bkfac._checks import check_finite

    big = torch.full((4,), torch.finfo(torch.float32).max)
    check_finite("x", big)  # the sum overflows to inf, the entries are finite
    check_finite("x", torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(5, 3)
        x[2, 1] = bad
        with pytest.raises(ValueError, match="x contains non-finite"):
            check_finite("x", x)
    x = torch.ones(6)
    x[0], x[1] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        check_finite("x", x)


def test_unchecked_update_equals_the_checked_one():
    """``check=False`` (the optimizers' path: inputs from an earlier update, the batch checked
    upstream) gives the checked result bit for bit on valid input, both routes (r + n < dim and
    the dense fallback), and still refuses shapes that do not fit."""
    g = torch.Generator().manual_seed(5)
    for dim, r, n in ((40, 6, 5), (9, 5, 6)):
        U, _ = torch.linalg.qr(torch.randn(dim, r, generator=g, dtype=torch.float64))
        d = torch.rand(r, generator=g, dtype=torch.float64).sort(descending=True).values
        A = torch.randn(dim, n, generator=g, dtype=torch.float64)
        Uc, dc = brand_update(U, d, A)
        Uu, du = brand_update(U, d, A, check=False)
        assert torch.equal(Uc, Uu) and torch.equal(dc, du)
        assert bool((du >= 0).all())
    with pytest.raises(ValueError, match="shapes do not fit"):
        brand_update(U, d, torch.randn(dim + 1, 2, dtype=torch.float64), check=False)
