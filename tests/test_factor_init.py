"""The identity start of the EA factors (``factor_init='identity'``), against explicit matrices.

From ``M_{-1} = I`` the factor after ``u`` updates is ``rho^u I + L_u``. The library keeps
``L_u`` (dense or as ``(U, d)``) and the weight ``rho^u`` as a number; these tests rebuild
``rho^u I + L_u`` densely and compare every route that applies its damped inverse. The
optimizer-level exact limit (every method's step against dense k-fac from ``I``) is in
tests/test_optim_exact.py.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.inverses import BrandInverse, CholeskyInverse, EighInverse

DT = torch.float64
RHO, PHI = 0.8, 0.1


def batches(dim, n, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, n, generator=g, dtype=DT) for _ in range(count)]


def explicit_ea(bs, rho=RHO, every=1):
    """rho^u I + sum of the batches' outer products, from I, the EA updated on steps k % every == 0."""
    M = torch.eye(bs[0].shape[0], dtype=DT)
    out = []
    for k, B in enumerate(bs):
        if k % every == 0:
            M = rho * M + (1 - rho) * B @ B.T
        out.append(M.clone())
    return out


def damped_inv(M, phi=PHI):
    lam = phi * torch.linalg.eigvalsh(M).max()
    return torch.linalg.inv(M + lam * torch.eye(M.shape[0], dtype=DT))


def test_dense_ea_from_identity():
    bs = batches(6, 2, 5)
    inv = EighInverse(6, rho=RHO, dtype=DT, identity_start=True)
    for k, (B, M) in enumerate(zip(bs, explicit_ea(bs))):
        inv.observe(k, B)
        inv.refresh(k)
        assert inv.ea_identity == pytest.approx(RHO ** (k + 1), rel=1e-15)
        assert torch.allclose(inv.factor + inv.ea_identity * torch.eye(6, dtype=DT), M, atol=1e-13)
        U, d = inv.representation()
        assert torch.allclose((U * (d + inv.identity)) @ U.T, M, atol=1e-12)
        # the cached dense inverse (the k-fac route with t_inv > 1) includes the identity
        assert torch.allclose(inv.damped_inverse(PHI, 1e-12), damped_inv(M), atol=1e-10)


def test_stale_representation_keeps_its_identity_weight():
    """With t_inv = 3 the inverse between refreshes is that of the factor at the refresh,
    identity weight included (not the decayed weight of the moving EA factor)."""
    bs = batches(5, 2, 7, seed=1)
    Ms = explicit_ea(bs)
    inv = EighInverse(5, rho=RHO, t_inv=3, dtype=DT, identity_start=True)
    for k, B in enumerate(bs):
        inv.observe(k, B)
        inv.refresh(k)
        at_refresh = Ms[3 * (k // 3)]
        assert torch.allclose(inv.damped_inverse(PHI, 1e-12), damped_inv(at_refresh), atol=1e-10), k
        X = torch.randn(5, 3, dtype=DT)
        assert torch.allclose(inv.damped_apply(X, "left", PHI, 1e-12), damped_inv(at_refresh) @ X, atol=1e-10)


def test_cholesky_route_with_identity():
    bs = batches(6, 2, 4, seed=2)
    inv = CholeskyInverse(6, rho=RHO, t_inv=2, dtype=DT, identity_start=True, rtol=1e-12)
    for k, (B, M) in enumerate(zip(bs, explicit_ea(bs))):
        inv.observe(k, B)
        inv.refresh(k)
        at_refresh = explicit_ea(bs)[2 * (k // 2)]
        assert torch.allclose(inv.damped_inverse(PHI, 1e-12), damped_inv(at_refresh), atol=1e-8), k


@pytest.mark.parametrize("t_brand", [1, 2])
def test_b_process_from_identity(t_brand):
    """Alg. 4 from I: with the rank at the dimension, U diag(d) U^T + identity I is the
    B-process rho^v I + L_v exactly, v counting B-updates (every t_brand steps)."""
    bs = batches(7, 2, 6, seed=3)
    inv = BrandInverse(7, rho=RHO, rank=7, t_brand=t_brand, dtype=DT, identity_start=True)
    for k, (B, M) in enumerate(zip(bs, explicit_ea(bs, every=t_brand))):
        if inv.wants_batch(k):
            inv.observe(k, B)
        inv.refresh(k)
        inv.end_step()
        U, d = inv.representation()
        rebuilt = (U * d) @ U.T + inv.identity * torch.eye(7, dtype=DT)
        assert torch.allclose(rebuilt, M, atol=1e-12), k
        assert inv.identity == pytest.approx(RHO ** (k // t_brand + 1), rel=1e-15)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(DT)


def run(method, steps=4, model=None, opt=None, start=0, **hyper):
    model = model or small_model()
    opt = opt or bkfac.make_optimizer(method, model, defaults=None, lr=0.1, damping_phi=PHI, rho=RHO,
                                      factor_init="identity", **hyper)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 6, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))
            for _ in range(start + steps)]
    for x, y in data[start:]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("method", ["k-fac", "r-kfac", "b-kfac", "b-r-kfac", "b-kfac-c"])
def test_k_factors_report_the_identity(method):
    """k_factors(): damped() is the matrix the step inverts, rho^u I + L_u + lambda I, with
    lambda = phi * lambda_max of the whole factor."""
    extra = {} if method == "k-fac" else dict(rank=4, oversample=2, policy="all") if method.startswith("b-") else \
        dict(rank=4, oversample=2)
    _, opt = run(method, steps=3, **extra)
    for (layer, fac), kf in opt.k_factors().items():
        if kf.U is None:
            continue
        assert 0 < kf.identity <= RHO ** 3 + 1e-15
        M = kf.lowrank() + kf.identity * torch.eye(kf.dim, dtype=DT)
        lam_max = float(torch.linalg.eigvalsh(M).max())
        assert kf.damping == pytest.approx(max(PHI * lam_max, 1e-8), rel=1e-10)
        if kf.ea is not None:
            assert torch.allclose(kf.dense(), kf.ea + kf.ea_identity * torch.eye(kf.dim, dtype=DT))


def test_checkpoint_round_trip_and_mismatch():
    model, opt = run("b-r-kfac", steps=3, rank=4, oversample=2, policy="all")
    sd = copy.deepcopy(opt.state_dict())
    # resumed: the continuation equals the uninterrupted run
    ref_model, _ = run("b-r-kfac", steps=5, rank=4, oversample=2, policy="all")
    model2 = copy.deepcopy(model)
    opt2 = bkfac.make_optimizer("b-r-kfac", model2, defaults=None, lr=0.1, damping_phi=PHI, rho=RHO,
                                factor_init="identity", rank=4, oversample=2, policy="all")
    opt2.load_state_dict(sd)
    run("b-r-kfac", steps=2, start=3, model=model2, opt=opt2)
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-12)
    other = bkfac.make_optimizer("b-r-kfac", copy.deepcopy(model), defaults=None, lr=0.1, rho=RHO,
                                 rank=4, oversample=2, policy="all")
    with pytest.raises(ValueError, match="factor_init"):
        other.load_state_dict(copy.deepcopy(sd))


def test_identity_start_is_checked_and_one_process_only():
    with pytest.raises(ValueError, match="factor_init"):
        bkfac.make_optimizer("k-fac", small_model(), factor_init="eye")

    class TwoRanks(bkfac.optim.comm.LocalComm):
        world_size = 2

    with pytest.raises(ValueError, match="one process"):
        bkfac.make_optimizer("k-fac", small_model(), factor_init="identity", comm=TwoRanks())
