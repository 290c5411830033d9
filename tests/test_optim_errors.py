"""Bad input: unsupported layers, non-finite values, eigh failures, invalid hyper-parameters."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.inverses import BrandInverse, RSVDInverse
from bkfac.linalg import EighError, safe_eigh


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16, 10))


def test_unsupported_layers_named_and_get_sgd_step():
    model = cnn()
    with pytest.warns(UserWarning, match=r"plain SGD step for parameters of: 1 \(BatchNorm2d"):
        opt = bkfac.KFAC(model, lr=0.1, weight_decay=0.01, momentum=0.0, t_updt=1, t_inv=1)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    bn = model[1]
    before = [p.detach().clone() for p in bn.parameters()]
    grads = [p.grad.clone() for p in bn.parameters()]
    opt.step()
    for p, b, g in zip(bn.parameters(), before, grads):
        assert torch.allclose(p, b - 0.1 * (g + 0.01 * b), atol=1e-7)
    assert any(r["kind"] == "unsupported" and r["method"] == "SGD" and "BatchNorm2d" in r["why"] for r in opt.describe())


@pytest.mark.parametrize("name", ["k-fac", "b-kfac"])
def test_non_finite_gradient_names_the_layer(name):
    model = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.make_optimizer(name, model, defaults=None, lr=0.1, t_updt=1, t_inv=1,
                                   **({} if name == "k-fac" else dict(rank=8)))
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    x[0, 0, 0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in parameter '0\.weight'"):
        opt.step()
    for p, b in zip(model.parameters(), before):  # no silent NaN step
        assert torch.equal(p.detach(), b)


def test_eigh_retries_in_float64_then_raises(monkeypatch):
    M = torch.eye(4) * 2.0
    real = torch.linalg.eigh

    def flaky(A, *a, **k):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge (simulated)")
        return real(A, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        evals, evecs = safe_eigh(M)
    assert evals.dtype == torch.float32 and torch.allclose(evals, torch.full((4,), 2.0))

    def broken(A, *a, **k):
        raise torch.linalg.LinAlgError("failed to converge (simulated)")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning), pytest.raises(EighError, match="also after retrying in float64"):
        safe_eigh(M)
    with pytest.raises(ValueError, match="non-finite"):
        safe_eigh(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=-3), "rank must be an integer >= 1"),
        (dict(rho=1.0), "rho must lie in the open interval"),
        (dict(rho=0.0), "rho must lie in the open interval"),
        (dict(damping_phi=-0.1), "damping_phi must be positive"),
        (dict(t_updt=0), "t_updt must be an integer >= 1"),
        (dict(t_inv=0), "t_inv must be an integer >= 1"),
        (dict(t_brand=0), "t_brand must be an integer >= 1"),
        (dict(lr=-1.0), "lr must be a non-negative number"),
        (dict(weight_decay=-1e-3), "weight_decay must be non-negative"),
        (dict(clip=-1.0), "clip must be positive"),
        (dict(fisher="true"), "fisher must be 'empirical' or 'mc'"),
        (dict(t_rsvd=3), "b-kfac does not use t_rsvd"),
    ],
)
def test_invalid_hyper_parameters(kw, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            bkfac.BKFAC(cnn(), **kw)


def test_rank_larger_than_dim_and_unknown_names():
    with pytest.raises(ValueError, match="rank=20 is larger than the factor dimension 10"):
        RSVDInverse(10, rank=20)
    with pytest.raises(ValueError, match="rank=20 is larger than the factor dimension 10"):
        BrandInverse(10, rank=20)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        bkfac.make_optimizer("adamw", cnn())
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        bkfac.KFAC([torch.zeros(2, requires_grad=True)])
