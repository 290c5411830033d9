"""Algorithm 8 (the linear-time inverse application from ``A_k``, ``G_k``) equals Alg. 1 lines
16-17 applied to the autograd gradient, in float64, for both loss reductions, batch sizes 1 and
several, Linear layers with and without extra positions, and Conv2d.

With ``loss_reduction='sum'`` the gradient is ``Mat(g) = n sqrt(T) G_k A_k^T`` (with a mean loss
``sqrt(T) G_k A_k^T``): the factor ``n`` is what these cases check.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.curvature import KFactorCapture

DT = torch.float64


class Positions(nn.Module):
    """A Linear layer applied at T = 3 positions per sample (input ``(n, 3, 4)``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 30)
        self.out = nn.Linear(30, 5)

    def forward(self, x):
        h = torch.tanh(self.fc(x.view(x.shape[0], 3, 4)))
        return self.out(h.mean(1))


def make(kind: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 5)).to(DT), (12,)
    if kind == "positions":
        return Positions().to(DT), (12,)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 5)).to(DT), (2, 5, 5)


def run(kind: str, reduction: str, n: int, linear_time: bool, steps: int = 4):
    model, shape = make(kind)
    opt = bkfac.BKFAC(model, lr=0.1, damping_phi=0.05, rho=0.9, t_updt=1, t_inv=1, t_brand=1, rank=2,
                      oversample=1, policy="all", loss_reduction=reduction, linear_time=linear_time,
                      clip=None, clip_mode=None)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(n, *shape, generator=g, dtype=DT)
        y = torch.randint(0, 5, (n,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["linear", "positions", "conv"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 6])
def test_alg8_step_equals_alg1_for_both_reductions(kind, reduction, n):
    m8, o8 = run(kind, reduction, n, True)
    m1, o1 = run(kind, reduction, n, False)
    assert any(r["alg8"] for r in o8.describe()), "the Alg. 8 route was not taken"
    assert not any(r["alg8"] for r in o1.describe())
    for p, q in zip(m8.parameters(), m1.parameters()):
        assert float((p.detach() - q.detach()).norm() / q.detach().norm()) < 1e-10, (kind, reduction, n)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_scale_reconstructs_the_gradient(reduction):
    """``Mat(g) = scale * G_k A_k^T`` with the capture's scale, against autograd."""
    model, shape = make("positions")
    cap = KFactorCapture(model, reduction=reduction)
    x = torch.randn(4, *shape, dtype=DT)
    y = torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    for lc in cap.layers:
        A, G, scale = lc.batch_matrices(reduction)
        J = lc.grad_matrix()
        assert float((scale * G @ A.mT - J).norm() / J.norm()) < 1e-13
