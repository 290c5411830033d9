"""RSVD and SREVD (Alg. 1 line 13; Halko et al. 2011) against the exact top-r eigenpairs.

References: ``torch.linalg.eigh`` of the same float64 matrix. Eigenvectors are defined up to
sign (and up to rotation inside repeated eigenvalues), so subspaces are compared through the
projector ``U U^T``.
"""

from __future__ import annotations

import pytest
import torch

from bkfac.linalg import range_finder, rsvd, srevd

DT = torch.float64
METHODS = {"rsvd": rsvd, "srevd": srevd}


def _psd(dim: int, evals: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(dim, dim, dtype=DT, generator=g)).Q
    M = (Q[:, : evals.numel()] * evals) @ Q[:, : evals.numel()].mT
    return 0.5 * (M + M.mT)


def _top(M: torch.Tensor, r: int):
    evals, evecs = torch.linalg.eigh(M)
    return evecs.flip(1)[:, :r], evals.flip(0)[:r], evals.flip(0)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dim,r,seed", [(80, 5, 0), (200, 20, 1), (150, 1, 2)])
def test_exact_rank_recovered(name, dim, r, seed):
    evals = torch.linspace(10.0, 0.5, r, dtype=DT)
    M = _psd(dim, evals, seed)
    U_ref, d_ref, _ = _top(M, r)
    g = torch.Generator().manual_seed(seed + 10)
    U, d = METHODS[name](M, r, oversample=10, power_iters=4, generator=g)
    assert U.shape == (dim, r) and d.shape == (r,)
    assert float((U.mT @ U - torch.eye(r, dtype=DT)).abs().max()) <= 1e-8
    assert float((d - d_ref).abs().max()) <= 1e-8 * float(d_ref[0])
    assert bool((d[:-1] >= d[1:]).all()) and float(d.min()) >= 0
    P, P_ref = U @ U.mT, U_ref @ U_ref.mT
    assert float((P - P_ref).abs().max()) <= 1e-8
    assert float(torch.linalg.matrix_norm((U * d) @ U.mT - M)) <= 1e-8 * float(torch.linalg.matrix_norm(M))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("decay", ["geometric", "power"])
def test_decaying_spectrum_near_optimal(name, decay):
    dim, r = 300, 25
    i = torch.arange(dim, dtype=DT)
    evals = 0.93**i if decay == "geometric" else (i + 1) ** -1.5
    M = _psd(dim, evals, 7)
    _, _, all_ref = _top(M, r)
    optimal = float(torch.linalg.vector_norm(all_ref[r:]))  # Eckart-Young, Frobenius
    g = torch.Generator().manual_seed(3)
    U, d = METHODS[name](M, r, oversample=10, power_iters=4, generator=g)
    err = float(torch.linalg.matrix_norm((U * d) @ U.mT - M))
    assert optimal > 0
    assert err <= 1.5 * optimal, (err, optimal)
    # and the eigenvalues are close to the top ones (relative to the tail they cannot resolve)
    assert float((d - all_ref[:r]).abs().max()) <= 0.5 * float(all_ref[r])


@pytest.mark.parametrize("name", list(METHODS))
def test_deterministic_under_seeded_generator(name):
    M = _psd(120, 0.8 ** torch.arange(120, dtype=DT), 4)
    out1 = METHODS[name](M, 10, generator=torch.Generator().manual_seed(11))
    out2 = METHODS[name](M, 10, generator=torch.Generator().manual_seed(11))
    out3 = METHODS[name](M, 10, power_iters=0, generator=torch.Generator().manual_seed(12))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    assert not torch.equal(out1[0], out3[0])


def test_full_rank_and_oversample_clipped_to_dim():
    """``rank = dim`` (``q`` clipped to ``dim``) is the exact EVD."""
    M = _psd(30, torch.linspace(5, 1, 30, dtype=DT), 5)
    for fn in METHODS.values():
        U, d = fn(M, 30, oversample=10, power_iters=1, generator=torch.Generator().manual_seed(0))
        assert float(torch.linalg.matrix_norm((U * d) @ U.mT - M)) <= 1e-10 * float(torch.linalg.matrix_norm(M))


def test_range_finder_orthonormal():
    M = _psd(60, 0.7 ** torch.arange(60, dtype=DT), 6)
    Q = range_finder(M, 12, 2, torch.Generator().manual_seed(1))
    assert Q.shape == (60, 12)
    assert float((Q.mT @ Q - torch.eye(12, dtype=DT)).abs().max()) <= 1e-12


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_input(name):
    fn = METHODS[name]
    M = _psd(20, torch.ones(5, dtype=DT), 0)
    with pytest.raises(ValueError, match="rank"):
        fn(M, 21)
    with pytest.raises(ValueError, match="rank"):
        fn(M, 0)
    with pytest.raises(ValueError, match="rank"):
        fn(M, -3)
    with pytest.raises(ValueError, match="rank"):
        fn(M, 2.5)
    with pytest.raises(ValueError, match=r"\bM\b.*square"):
        fn(M[:, :10], 3)
    with pytest.raises(ValueError, match=r"\bM\b"):
        fn(M[0], 3)
    bad = M.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\bM\b.*non-finite"):
        fn(bad, 3)
    with pytest.raises(ValueError, match="oversample"):
        fn(M, 3, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        fn(M, 3, power_iters=-1)
    with pytest.raises(ValueError, match="power_iters"):
        fn(M, 3, power_iters=1.5)
