"""Toy EA processes (eqs. 8-10) against brute-force references, and the proposition checks.

References are independent of the package: numpy ``eigh``/``svd`` of explicitly formed
matrices and plain loops. The proposition checks run 1000 random instances each and must
find zero violations; deliberately wrong processes must make them fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bkfac.experiments import propositions as P
from bkfac.experiments import toy
from bkfac.linalg import brand_update

RHO = 0.8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_top(M: np.ndarray, r: int) -> np.ndarray:
    w, V = np.linalg.eigh(0.5 * (M + M.T))
    V, w = V[:, ::-1][:, :r], w[::-1][:r]
    return (V * w) @ V.T


def _np_bkfac(batches, rho, r, overwrite_at=()):
    """Brute force of eq. (10): explicit d x d matrices and numpy eigh."""
    Ms = [b.numpy() for b in batches]
    exact = Ms[0] @ Ms[0].T
    Mt = exact.copy()
    mt, bs = [], []
    for k, M in enumerate(Ms):
        if k > 0:
            exact = rho * exact + (1 - rho) * M @ M.T
            Mt = rho * bs[-1] + (1 - rho) * M @ M.T
        mt.append(Mt)
        bs.append(_np_top(exact, r) if k in overwrite_at else _np_top(Mt, r))
    return mt, bs


# ------------------------------------------------------------------------------------------
# The toy generator
# ------------------------------------------------------------------------------------------


def test_toy_generator_is_deterministic_and_shaped():
    t = toy.ToyEA(dim=12, batch=3, rho=0.9, decay="exp", rate=0.3, noise=0.1, rotation=0.2)
    a = t.sample(4, _gen(1))
    b = t.sample(4, _gen(1))
    c = t.sample(4, _gen(2))
    assert len(a) == 4 and all(M.shape == (12, 3) and M.dtype == torch.float64 for M in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("decay,rate", [("power", 1.5), ("exp", 0.4), ("flat", 0.0)])
def test_toy_generator_has_the_requested_expected_spectrum(decay, rate):
    # E[M M^T] = Q diag(s) Q^T + noise^2 I with a fixed Q: the eigenvalues of the average of
    # many independent updates approach s + noise^2.
    d, n, noise = 10, 4000, 0.05
    t = toy.ToyEA(dim=d, batch=n, decay=decay, rate=rate, noise=noise)
    (M,) = t.sample(1, _gen(3))
    ev = np.sort(np.linalg.eigvalsh((M @ M.T).numpy()))[::-1]
    s = np.sort(toy.decay_profile(d, decay, rate).numpy())[::-1] + noise**2
    np.testing.assert_allclose(ev, s, rtol=0.12, atol=0.02)


def test_toy_rotation_moves_the_basis():
    fixed = toy.ToyEA(dim=8, batch=400, decay="exp", rate=1.0)
    moving = toy.ToyEA(dim=8, batch=400, decay="exp", rate=1.0, rotation=1.0)

    def top_vec(M):
        return np.linalg.eigh((M @ M.T).numpy())[1][:, -1]

    a = fixed.sample(6, _gen(4))
    b = moving.sample(6, _gen(4))
    assert abs(top_vec(a[0]) @ top_vec(a[-1])) > 0.95
    assert abs(top_vec(b[0]) @ top_vec(b[-1])) < 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0, batch=2), "dim"),
        (dict(dim=5, batch=0), "batch"),
        (dict(dim=5, batch=2, rho=1.0), "rho"),
        (dict(dim=5, batch=2, decay="linear"), "decay"),
        (dict(dim=5, batch=2, rate=-1.0), "rate"),
        (dict(dim=5, batch=2, noise=float("nan")), "noise"),
        (dict(dim=5, batch=2, rotation=-0.1), "rotation"),
    ],
)
def test_toy_generator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.ToyEA(**kwargs)


# ------------------------------------------------------------------------------------------
# The reference processes
# ------------------------------------------------------------------------------------------


def _stream(d=20, n=3, K=6, seed=0, **kw):
    return toy.ToyEA(dim=d, batch=n, rho=RHO, noise=0.05, rotation=0.1, **kw).sample(K, _gen(seed))


def test_ea_process_matches_the_closed_form_sum():
    B = _stream()
    Ms = toy.ea_process(B, RHO)
    for k in range(len(B)):
        ref = sum(toy.kappa(i, RHO) * RHO ** (k - i) * (B[i] @ B[i].mT).numpy() for i in range(k + 1))
        np.testing.assert_allclose(Ms[k].numpy(), ref, rtol=1e-12, atol=1e-14)


def test_optimal_truncation_is_eckart_young():
    B = _stream()
    M = toy.ea_process(B, RHO)[-1]
    for r in (1, 4, 9):
        T = toy.optimal_truncation(M, r).numpy()
        U, s, Vt = np.linalg.svd(M.numpy())
        np.testing.assert_allclose(T, (U[:, :r] * s[:r]) @ Vt[:r], atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(M.numpy() - T), np.linalg.norm(s[r:]), rtol=1e-10)
        assert np.linalg.matrix_rank(T, tol=1e-10) == r
    np.testing.assert_allclose(toy.rkfac_process(B, RHO, 3)[2].numpy(), _np_top(toy.ea_process(B, RHO)[2].numpy(), 3), atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_bkfac_process_matches_brute_force(seed):
    g = _gen(100 + seed)
    d = int(torch.randint(8, 30, (1,), generator=g))
    n = int(torch.randint(1, 5, (1,), generator=g))
    r = int(torch.randint(1, d - n, (1,), generator=g))
    rho = 0.5 + 0.45 * float(torch.rand((), generator=g))
    B = toy.ToyEA(dim=d, batch=n, rho=rho, decay="power", rate=1.0, noise=0.05).sample(7, g)
    for over in ((), (2,), (0, 4)):
        proc = toy.bkfac_process(B, rho, r, overwrite_at=over)
        mt, bs = _np_bkfac(B, rho, r, over)
        for k in range(7):
            scale = np.linalg.norm(mt[k])
            assert np.linalg.norm(proc.mtilde[k].numpy() - mt[k]) <= 1e-11 * scale
            assert np.linalg.norm(proc.b[k].numpy() - bs[k]) <= 1e-11 * scale
            U, dd = proc.factors[k]
            np.testing.assert_allclose((U.mT @ U).numpy(), np.eye(U.shape[1]), atol=1e-12)
            assert U.shape[1] <= r + n and proc.b_factors[k][0].shape[1] <= r
            assert bool((dd[:-1] >= dd[1:]).all())


def test_bkfac_process_rejects_the_wrong_regime():
    B = _stream(d=6, n=3)
    with pytest.raises(ValueError, match="r \\+ n"):
        toy.bkfac_process(B, RHO, 3)
    with pytest.raises(ValueError, match="overwrite_at"):
        toy.bkfac_process(_stream(), RHO, 2, overwrite_at=(99,))
    with pytest.raises(ValueError, match="rho"):
        toy.bkfac_process(_stream(), 1.5, 2)
    with pytest.raises(ValueError, match="batches"):
        toy.bkfac_process([], RHO, 2)


def test_prop_4_1_processes_and_error_terms():
    B = _stream()
    r = 4
    none = toy.rsvd_then_no_update(B, RHO, r)
    bup = toy.rsvd_then_bupdates(B, RHO, r)
    MR0 = _np_top(B[0].numpy() @ B[0].numpy().T, r)
    assert all(np.allclose(X.numpy(), MR0, atol=1e-12) for X in none)
    np.testing.assert_allclose(bup[0].numpy(), MR0, atol=1e-12)
    mt, _ = _np_bkfac(B, RHO, r)
    for k in range(1, len(B)):
        np.testing.assert_allclose(bup[k].numpy(), mt[k], atol=1e-11)
    proc = toy.bkfac_process(B, RHO, r)
    E = toy.bupdate_error_terms(proc, 4)
    assert len(E) == 5 and float(E[-1].abs().max()) == 0.0
    np.testing.assert_allclose(E[2].numpy(), (proc.mtilde[2] - proc.b[2]).numpy() / (1 - RHO))
    with pytest.raises(ValueError, match="k must"):
        toy.bupdate_error_terms(proc, len(B))
    En = toy.no_update_error_terms(B, r)
    np.testing.assert_allclose(En[3].numpy(), (B[3] @ B[3].mT).numpy() - MR0, atol=1e-12)
    # eq. (14) by a plain loop
    Ms = toy.ea_process(B, RHO)
    k = 5
    loop = sum((1.0 if i == 0 else 1 - RHO) * RHO ** (k - i) * En[i].numpy() for i in range(k + 1))
    np.testing.assert_allclose(toy.ea_sum(En[: k + 1], RHO).numpy(), loop, atol=1e-13)
    np.testing.assert_allclose((Ms[k] - none[k]).numpy(), loop, atol=1e-12)


def test_orthogonal_no_update_case_is_orthogonal():
    W = toy.orthogonal_no_update_case(20, 4, 3, 4, generator=_gen(5))
    U = np.linalg.eigh(W[0].numpy() @ W[0].numpy().T)[1][:, ::-1][:, :3]
    for M in W[1:]:
        assert np.abs(U.T @ M.numpy()).max() < 1e-13
    with pytest.raises(ValueError, match="r \\+ batch"):
        toy.orthogonal_no_update_case(8, 4, 4, 3)


# ------------------------------------------------------------------------------------------
# The proposition checks: they hold on >= 1000 instances ...
# ------------------------------------------------------------------------------------------


def test_sample_instances_cover_the_stated_ranges():
    insts = list(P.sample_instances(300, seed=3))
    ds = [i.toy.dim for i in insts]
    assert all(i.rank + i.toy.batch < i.toy.dim for i in insts)
    assert min(ds) <= 10 and max(ds) >= 35
    assert len({i.toy.batch for i in insts}) >= 7 and len({i.rank for i in insts}) >= 10
    assert {i.toy.decay for i in insts} == {"power", "exp", "flat"}
    rhos = [i.toy.rho for i in insts]
    assert min(rhos) < 0.6 and max(rhos) > 0.95
    with pytest.raises(ValueError, match="n_instances"):
        next(P.sample_instances(0))
    with pytest.raises(ValueError, match="dims"):
        next(P.sample_instances(1, dims=(2, 1)))


def _assert_holds(res: P.PropositionCheck, errata_refuted: bool):
    assert res.instances >= 1000
    assert res.checks > 1000
    assert res.violations == 0, res.table()
    assert res.holds and res.worst <= res.tol
    for st in res.statements:
        assert st.checks > 0, st.name
    if errata_refuted:
        assert res.errata and all(e.refuted > 0 for e in res.errata), res.table()


def test_prop_3_1_holds():
    res = P.check_prop_3_1(1000, seed=0)
    _assert_holds(res, errata_refuted=False)
    names = {s.name for s in res.statements}
    for norm in P.NORMS:
        assert f"(11) ||M_k - B_k|| >= ||M_k - M~_R;k,r|| [{norm}]" in names


def test_prop_3_2_holds_and_its_proof_step_s9_is_refuted():
    res = P.check_prop_3_2(1000, seed=1)
    _assert_holds(res, errata_refuted=True)
    # the paper: for q >= 2 either process can be ahead -- both occur
    assert 0.0 < res.observations["overwrite_worse_q>=2"] < 1.0


def test_prop_4_1_holds_with_the_stated_reading_of_16():
    res = P.check_prop_4_1(1000, seed=2)
    _assert_holds(res, errata_refuted=True)


def test_prop_4_2_holds_and_s29_is_refuted():
    res = P.check_prop_4_2(1000, seed=3)
    _assert_holds(res, errata_refuted=True)
    assert res.statement("(17) attained when V_Mj^T U_M0,r = 0").worst <= 1e-12


# ------------------------------------------------------------------------------------------
# ... and they can fail
# ------------------------------------------------------------------------------------------


def _untruncated_process(batches, rho, r, overwrite_at=()):
    """Wrong: Brand updates without the truncation (M~_B,k is then the exact EA factor)."""
    proc = toy.BKFACProcess(rho=rho, rank=r)
    d = batches[0].shape[0]
    U, w = brand_update(batches[0].new_zeros(d, 0), batches[0].new_zeros(0), batches[0])
    for k, M in enumerate(batches):
        if k > 0:
            U, w = brand_update(U, rho * w, math.sqrt(1 - rho) * M)
        proc.mtilde.append((U * w) @ U.mT)
        proc.b.append(toy.optimal_truncation(proc.mtilde[-1], r))
    return proc


def _no_truncation_at_all(batches, rho, r, overwrite_at=()):
    """Wrong: B_k := M~_B,k (the truncation skipped entirely; rank grows beyond r)."""
    proc = _untruncated_process(batches, rho, r)
    proc.b = list(proc.mtilde)
    return proc


def _wrong_decay_process(batches, rho, r, overwrite_at=()):
    """Wrong: forgets the factor rho on the carried estimate (M~_B,k = B_k-1 + (1-rho) M_k M_k^T)."""
    proc = toy.bkfac_process(batches, rho, r, overwrite_at)
    proc.mtilde = [proc.mtilde[0]] + [
        proc.b[k - 1] + (1 - rho) * batches[k] @ batches[k].mT for k in range(1, len(batches))
    ]
    return proc


SMALL = dict(n_instances=60, seed=11, rhos=(0.9, 0.99), steps=(4, 8))


def test_prop_3_1_check_fails_on_wrong_processes():
    res = P.check_prop_3_1(**SMALL, process=_untruncated_process)
    assert res.statement("(11) ||M_k - M~_B,k|| >= ||M_k - M~_R;k,r+n|| [fro]").violations > 0
    assert not res.holds
    res = P.check_prop_3_1(**SMALL, process=_no_truncation_at_all)
    assert res.statement("proof: rank(B_k) <= r").violations > 0
    assert res.statement("(11) ||M_k - B_k|| >= ||M_k - M~_R;k,r|| [spectral]").violations > 0


def test_prop_3_2_check_fails_on_wrong_processes():
    for bad in (_untruncated_process, _wrong_decay_process):
        res = P.check_prop_3_2(**SMALL, process=bad)
        assert res.statement("(13) identity (pure b-kfac)").violations > 0, bad.__name__
        assert not res.holds


def test_prop_4_1_check_fails_on_wrong_processes():
    for bad in (_untruncated_process, _wrong_decay_process):
        res = P.check_prop_4_1(**SMALL, process=bad)
        assert res.statement("(14)+(16) rsvd at 0, B-updates").violations > 0, bad.__name__


def test_prop_4_2_check_fails_on_wrong_process_and_wrong_construction():
    res = P.check_prop_4_2(**SMALL, process=_untruncated_process)
    assert res.statement("(18) ||E_j|| <= ||M_j M_j^T|| (B-updates) [fro]").violations > 0
    res = P.check_prop_4_2(**SMALL, process=_wrong_decay_process)
    assert res.statement("(10) M~_B,i = rho B_i-1 + (1-rho) M_i M_i^T").violations > 0

    def gaussian(dim, batch, r, steps, generator=None):
        return [torch.randn(dim, batch, generator=generator, dtype=torch.float64) for _ in range(steps)]

    res = P.check_prop_4_2(**SMALL, construction=gaussian)
    assert res.statement("(17) attained when V_Mj^T U_M0,r = 0").violations > 0


def test_result_object_reports():
    res = P.check_prop_3_1(5, seed=0)
    assert "Proposition 3.1" in str(res) and "violations" in str(res)
    table = res.table()
    assert table.startswith("| statement |") and table.count("\n") == len(res.statements) + 1
    assert res.rows()[0]["checks"] > 0
    with pytest.raises(KeyError):
        res.statement("no such statement")


# ------------------------------------------------------------------------------------------
# Footnote 11 and the optimizer's factor-inverse classes on a toy stream
# ------------------------------------------------------------------------------------------


def test_light_correction_check_holds():
    res = P.check_light_correction(200, seed=4)
    assert res.holds and res.instances == 200
    assert res.statement("fn. 11: U_S^T (M_k - M~_k) U_S = 0 on the corrected modes").checks > 50


def test_track_inverses_matches_the_toy_processes():
    from bkfac.inverses import BrandInverse, EighInverse, RSVDInverse

    d, n, r, rho = 40, 4, 6, 0.9
    B = toy.ToyEA(dim=d, batch=n, rho=rho, decay="power", rate=1.5, noise=0.02).sample(12, _gen(8))
    kw = dict(rho=rho, dtype=torch.float64)
    invs = {
        "eigh": EighInverse(d, t_inv=1, **kw),
        "brand": BrandInverse(d, rank=r, t_brand=1, **kw),
        "stale": RSVDInverse(d, rank=r, t_inv=100, oversample=d - r, power_iters=2, generator=_gen(1), **kw),
    }
    out = toy.track_inverses(B, invs)
    assert max(out["eigh"]["error"]) < 1e-12
    # b-kfac's representation is M~_B,k of eq. (10)
    proc = toy.bkfac_process(B, rho, r)
    Ms = toy.ea_process(B, rho)
    for k in range(12):
        ref = float(torch.linalg.matrix_norm(Ms[k] - proc.mtilde[k]) / torch.linalg.matrix_norm(Ms[k]))
        assert abs(out["brand"]["error"][k] - ref) < 1e-10
        assert out["brand"]["width"][k] == min(n * (k + 1), r + n)
    # an RSVD at k = 0 never refreshed is "rsvd at 0, no update" (q = d: exact top-r)
    none = toy.rsvd_then_no_update(B, rho, r)
    for k in range(12):
        ref = float(torch.linalg.matrix_norm(Ms[k] - none[k]) / torch.linalg.matrix_norm(Ms[k]))
        assert abs(out["stale"]["error"][k] - ref) < 1e-8
    with pytest.raises(ValueError, match="inverses"):
        toy.track_inverses(B, {})


def _zero_process(batches, rho, r, overwrite_at=()):
    """Wrong: the all-zero estimate (rank 0, so eq. 11 alone cannot reject it)."""
    proc = toy.bkfac_process(batches, rho, r, overwrite_at)
    proc.b = [torch.zeros_like(b) for b in proc.b]
    proc.mtilde = [torch.zeros_like(m) for m in proc.mtilde]
    return proc


def _half_batch_process(batches, rho, r, overwrite_at=()):
    """Wrong: the b-kfac recursion fed every batch halved (M_k / sqrt(2))."""
    return toy.bkfac_process([b / 2**0.5 for b in batches], rho, r, overwrite_at)


@pytest.mark.parametrize("bad", [_zero_process, _half_batch_process])
def test_prop_3_1_check_detects_a_process_of_bounded_rank_that_is_not_b_kfac(bad):
    res = P.check_prop_3_1(**SMALL, process=bad)
    assert res.statement("(10) M~_B,0 = M_0 M_0^T; M~_B,k = rho B_k-1 + (1-rho) M_k M_k^T").violations > 0
    assert not res.holds
    assert P.check_prop_3_1(**SMALL).holds  # the real process passes the same checks


def test_prop_4_2_check_reports_a_zero_process_as_violations():
    res = P.check_prop_4_2(**SMALL, process=_zero_process)
    assert not res.holds and res.violations > 0


def test_mean_error_below_compares_the_tracked_means():
    tracked = {"a": {"error": [0.1, 0.3]}, "b": {"error": [0.25, 0.2]}}  # means 0.2 and 0.225
    assert toy.mean_error_below(tracked, "a", "b") and not toy.mean_error_below(tracked, "b", "a")
    with pytest.raises(ValueError, match="'c'"):
        toy.mean_error_below(tracked, "a", "c")
