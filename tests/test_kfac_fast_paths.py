"""k-fac's fast paths (commit 4d7939d: one-copy outer-product statistics, the cached dense damped
inverse, the Cholesky inverse) against the reference computations, float64.

- the dense damped inverse of a full-rank eigh representation equals the low-rank application;
- ``lambda_max`` (power iteration) against ``eigh``;
- ``CholeskyInverse`` against an explicit ``inv(F + lam I)`` with lam from ``eigh``;
- ``KFAC(inverse="cholesky")`` against ``KFAC(inverse="eigh")`` along a training run, its
  clear errors (its checkpoint resume is in ``test_optim_checkpoint.py``).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.inverses import CholeskyInverse, EighInverse
from bkfac.linalg import damped_inverse_apply, lambda_max
from bkfac.optim.comm import LocalComm


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ea_factor(dim, n, seed, steps=3):
    g = torch.Generator().manual_seed(seed)
    Ms = [torch.randn(dim, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, dim, dtype=torch.float64)[:, None]
          for _ in range(steps)]
    return Ms


@pytest.mark.parametrize("dim,n", [(9, 4), (30, 50), (64, 8)])
def test_lambda_max_against_eigh(dim, n):
    F_ = sum(M @ M.T for M in ea_factor(dim, n, dim))
    lam, v = lambda_max(F_, rtol=1e-12, max_iter=20000, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvalsh(F_)[-1]
    assert abs(float(lam - ref)) <= 1e-8 * float(ref)
    assert float(lam) <= float(ref) * (1 + 1e-12)  # a Rayleigh quotient: never above
    # warm start: already converged, stops at the first check
    lam2, _ = lambda_max(F_, v, rtol=1e-12, max_iter=10)
    assert abs(float(lam2 - ref)) <= 1e-8 * float(ref)
    with pytest.raises(ValueError, match="square"):
        lambda_max(torch.ones(3, 4))


@pytest.mark.parametrize("cls", [EighInverse, CholeskyInverse])
def test_dense_damped_inverse_against_explicit(cls):
    dim, phi, floor = 40, 0.1, 1e-7
    kw = dict(rtol=1e-13) if cls is CholeskyInverse else {}
    inv = cls(dim, rho=0.9, t_inv=2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), **kw)
    ref = None
    for k, M in enumerate(ea_factor(dim, 12, 5, steps=5)):
        inv.observe_outer(k, M @ M.T) if k % 2 else inv.observe(k, M)  # both entry points
        ref = M @ M.T if ref is None else 0.9 * ref + 0.1 * M @ M.T
        inv.refresh(k)
        if k % 2 == 0:
            snapshot = ref.clone()
    lam = phi * torch.linalg.eigvalsh(snapshot)[-1]
    explicit = torch.linalg.inv(snapshot + lam * torch.eye(dim, dtype=torch.float64))
    dense = inv.damped_inverse(phi, floor)
    assert rel(dense, explicit) < 1e-9
    assert inv.damped_inverse(phi, floor) is dense  # cached until the representation or phi changes
    assert inv.damped_inverse(phi / 2, floor) is not dense
    if cls is EighInverse:
        U, d = inv.representation()
        X = torch.randn(dim, 7, dtype=torch.float64)
        assert rel(inv.damped_inverse(phi, floor) @ X, damped_inverse_apply(U, d, lam, X)) < 1e-10
        low = EighInverse(dim, dtype=torch.float64)
        assert low.damped_inverse(phi, floor) is None  # no representation yet
    else:
        with pytest.raises(RuntimeError, match="no eigen-representation"):
            inv.representation()


def test_outer_entry_point_only_where_accepted():
    from bkfac.inverses import BrandInverse

    b = BrandInverse(20, rank=3, oversample=1, dtype=torch.float64)
    assert not b.accepts_outer
    with pytest.raises(TypeError, match="batch matrix"):
        b.observe_outer(0, torch.eye(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="dimension 20"):
        EighInverse(20).observe_outer(0, torch.eye(19))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 20), nn.ReLU(), nn.Linear(20, 10),
    ).double()


def run(model, opt, start, stop):
    for k in range(start, stop):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def kfac(model, inverse):
    return bkfac.KFAC(model, lr=0.05, damping_phi=0.1, t_updt=2, t_inv=3, inverse=inverse)


def test_cholesky_kfac_follows_eigh_kfac():
    """Same damped inverses up to the power iteration's rtol (1e-4 on lambda_max, so on lam):
    the parameters after 15 steps agree to ~1e-5 relative, far below the step size."""
    m1, m2 = make_model(), make_model()
    o1, o2 = kfac(m1, "eigh"), kfac(m2, "cholesky")
    start = torch.cat([p.detach().flatten().clone() for p in m1.parameters()])
    run(m1, o1, 0, 15)
    run(m2, o2, 0, 15)
    p1 = torch.cat([p.detach().flatten() for p in m1.parameters()])
    p2 = torch.cat([p.detach().flatten() for p in m2.parameters()])
    assert rel(p2 - start, p1 - start) < 1e-4
    assert {row["method"] for row in o2.describe()} == {"cholesky"}


def test_cholesky_option_errors():
    with pytest.raises(ValueError, match="inverse must be"):
        bkfac.KFAC(make_model(), inverse="qr")

    class TwoRanks(LocalComm):
        world_size = 2

    with pytest.raises(ValueError, match="one process only"):
        bkfac.KFAC(make_model(), inverse="cholesky", comm=TwoRanks())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"b-kfac does not use inverse \(a hyper-parameter of k-fac\)"):
            bkfac.make_optimizer("b-kfac", make_model(), defaults=None, inverse="cholesky")


@pytest.mark.parametrize("cls", [EighInverse, CholeskyInverse])
@pytest.mark.parametrize("t_inv", [1, 3])
def test_damped_apply_both_sides(cls, t_inv):
    """The optimizer's entry point: a dense route where the representation serves several steps
    (t_inv > 1), the Cholesky solve at t_inv = 1, and None (apply (U, d)) for eigh at t_inv = 1."""
    dim, phi, floor = 30, 0.05, 1e-7
    kw = dict(rtol=1e-13) if cls is CholeskyInverse else {}
    inv = cls(dim, rho=0.8, t_inv=t_inv, dtype=torch.float64, generator=torch.Generator().manual_seed(2), **kw)
    ref = None
    for k, M in enumerate(ea_factor(dim, 9, 7, steps=4)):
        inv.observe(k, M)
        ref = M @ M.T if ref is None else 0.8 * ref + 0.2 * M @ M.T
        inv.refresh(k)
        if k % t_inv == 0:
            snapshot = ref.clone()
    lam = phi * torch.linalg.eigvalsh(snapshot)[-1]
    explicit = torch.linalg.inv(snapshot + lam * torch.eye(dim, dtype=torch.float64))
    X = torch.randn(dim, 5, dtype=torch.float64)
    left = inv.damped_apply(X, "left", phi, floor)
    right = inv.damped_apply(X.T, "right", phi, floor)
    if cls is EighInverse and t_inv == 1:
        assert left is None and right is None
        return
    assert rel(left, explicit @ X) < 1e-9
    assert rel(right, X.T @ explicit) < 1e-9


# ------------------------------------------------------------------ host syncs of a plain step


class _CountSyncs:
    """Counts the Python-side conversions of tensors to host values (``bool``, ``float``, ``int``,
    ``item``, ``tolist``): on CUDA each one is a host synchronisation."""

    NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                self.count += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("name", ["k-fac", "b-kfac", "b-r-kfac", "b-kfac-c"])
def test_plain_step_syncs_once(name, monkeypatch):
    """A step where no factor takes statistics asks the device for one value: the merged
    finiteness check of the gradients (and, on the Alg. 8 layers, of A_k and G_k)."""
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        periods = {"k-fac": {}, "b-kfac": dict(t_brand=4), "b-r-kfac": dict(t_brand=4, t_rsvd=8),
                   "b-kfac-c": dict(t_brand=4, t_corct=8)}[name]
        extra = {} if name == "k-fac" else dict(rank=6, oversample=2)
        opt = bkfac.make_optimizer(name, model, defaults=None, lr=0.05, t_updt=4, t_inv=8, **periods, **extra)
    run(model, opt, 0, 2)  # step 0 initialises; step 1 is plain
    if name != "k-fac":
        assert any(L.linear_time for L in opt.layers)  # the Alg. 8 path is exercised
    counter = _CountSyncs(monkeypatch)
    run(model, opt, 2, 3)  # plain
    assert counter.count == 1
    counter.count = 0
    run(model, opt, 3, 5)  # step 4 takes statistics: synchronous checks, one per batch matrix
    assert counter.count > 1


def test_deferred_checks_raise_the_gradient_error_and_leave_the_weights():
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.make_optimizer("b-kfac", model, defaults=None, lr=0.05, t_updt=4, t_inv=8, t_brand=4, rank=6,
                                   oversample=2)
    run(model, opt, 0, 1)
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in parameter '0\.weight' at step 1"):
        opt.step()  # step 1: no factor observes, the checks are deferred to one sync
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------ Alg. 8's step buffer


@pytest.mark.parametrize("clip_mode,clip", [(None, None), ("rms", 1e-3), ("kl", 1e-6)])
@pytest.mark.parametrize("bias", [True, False])
def test_alg8_step_in_its_buffer_equals_the_standard_route(clip_mode, clip, bias):
    """Alg. 8 writes its step into a buffer kept between steps, as the weight block and the bias
    column apart; clipping (RMS over both, KL against the gradient of each), weight decay and
    momentum then act on those blocks. Reference: the same optimizer with ``linear_time=False``
    (the step in matrix form from the formed gradient), float64, over 5 steps."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 10, bias=bias), nn.ReLU(), nn.Linear(10, 4)).double()

    moved = []
    for linear_time in (True, False):
        m = model()
        opt = bkfac.BKFAC(m, lr=0.1, t_updt=1, t_inv=2, t_brand=1, rank=6, oversample=2, policy="all",
                          clip=clip, clip_mode=clip_mode, weight_decay=1e-2, momentum=0.5, linear_time=linear_time)
        for k in range(5):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        assert opt.layers[0].linear_time == linear_time
        assert (opt.layers[0].step_buffer is not None) == linear_time
        moved.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*moved):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_batch_check_probe_overflow_is_not_an_error():
    """The finiteness probe of a batch matrix is its sum: finite entries whose sum overflows
    (float32) are told apart from a NaN/inf by the entry-wise check, so nothing is raised."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 4))
    opt = bkfac.BKFAC(model, lr=0.0, t_updt=4, t_inv=8, t_brand=4, rank=6, oversample=2, policy="all")
    lc = opt.layers[0].capture
    big = torch.full((49, 8), 3e37)
    pending = []
    opt._checked(big, lc, "input activations", 0, pending=pending)
    assert not bool(pending[0][0])  # the probe overflowed
    opt._flush(pending)  # and the entry-wise check clears it
    bad = big.clone()
    bad[3, 2] = float("nan")
    pending = []
    opt._checked(bad, lc, "input activations", 0, pending=pending)
    with pytest.raises(FloatingPointError, match="non-finite input activations in layer '1'"):
        opt._flush(pending)


# ------------------------------------------------------------------ channels_last statistics


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False), (1, "same", True)])
def test_channels_last_statistics_equal_the_unfold_reference(stride, padding, bias):
    """A conv layer whose input and output gradient are stored channels_last builds ``A_k A_k^T``
    from patch rows ``(kh, kw, C_in)`` reordered afterwards, and ``G_k G_k^T`` from the gradient
    as rows; both equal the brute-force reference from ``F.unfold`` (float64) and the NCHW path."""
    from bkfac.curvature import KFactorCapture

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=padding, bias=bias).double()
    x = torch.randn(4, 5, 9, 9, dtype=torch.float64)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = nn.Sequential(conv).to(memory_format=fmt)
        cap = KFactorCapture(model)
        model.zero_grad()
        y = model(x.to(memory_format=fmt))
        w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y).contiguous(memory_format=fmt)
        (y * w).sum().backward()
        lc = cap.layers[0]
        assert (lc.inputs.stride(1) == 1) == (fmt is torch.channels_last)
        assert (lc.grad_outputs.stride(1) == 1) == (fmt is torch.channels_last)
        assert (lc._patch_rows_nhwc(lc.inputs) is not None) == (fmt is torch.channels_last)
        outs.append((lc.batch_outer_A(), lc.batch_outer_G("mean")))
        A, G, _ = lc.batch_matrices("mean")
        cap.remove()
    pad = conv._reversed_padding_repeated_twice if padding == "same" else None
    xp = F.pad(x, pad) if pad is not None else x
    cols = F.unfold(xp, 3, padding=0 if pad is not None else padding, stride=stride)  # n, C*9, T
    a = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    if bias:
        a = torch.cat([a, torch.ones(1, a.shape[1], dtype=a.dtype)])
    ref_A = a @ a.T / a.shape[1]
    assert torch.allclose(A @ A.T, ref_A, rtol=1e-12, atol=1e-12)
    for outer_A, outer_G in outs:
        assert torch.allclose(outer_A, ref_A, rtol=1e-12, atol=1e-12)
        assert torch.allclose(outer_G, G @ G.T, rtol=1e-12, atol=1e-12)


def test_a_nonfinite_batch_on_a_statistics_step_changes_no_factor():
    """A statistics step checks every layer's batch with one sync before any factor takes its
    batch: an inf in the last layer's input leaves the first layer's factors as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    opt = bkfac.KFAC(model, lr=0.01, t_updt=1, t_inv=1)  # its EA factors move on every observe
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before = [t.clone() for f in opt.k_factors().values() for t in (f.ea, f.U, f.d) if t is not None]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.capture.layers[1].inputs = opt.capture.layers[1].inputs.clone().fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite input activations in layer '2'"):
        opt.step()
    after = [t for f in opt.k_factors().values() for t in (f.ea, f.U, f.d) if t is not None]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
