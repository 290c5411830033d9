"""The public K-factor accessor (``k_factors()``): for every factor of a small float64 model after
a few steps, the dense EA factor equals a brute-force EA of the captured batch factors (built
here with explicit loops over samples and positions), the representation's matrix equals
``U diag(d) U^T``, and the damping and continuation shift are the ones the step applied (the
parameter update is reproduced from them)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac

DT = torch.float64
N, STEPS, RHO, PHI, LR = 4, 5, 0.9, 0.1, 0.05


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 40), nn.ReLU(),
                         nn.Linear(40, 6)).to(DT)


class Recorder:
    """Our own hooks: each layer's input and output gradient of the last forward/backward."""

    def __init__(self, model):
        self.seen = {}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, out):
            entry = self.seen[name] = {"module": module, "x": inputs[0].detach().clone()}
            out.register_hook(lambda g: entry.__setitem__("g", g.detach().clone()))
        return hook


def columns(entry):
    """Brute force: the augmented inputs a_{i,t} and per-sample output gradients g_{i,t}
    (``n * dL/dy`` for the mean loss), position by position."""
    m, x, g = entry["module"], entry["x"], entry["g"]
    n = x.shape[0]
    a_cols, g_cols = [], []
    if isinstance(m, nn.Linear):
        for i in range(n):
            a_cols.append(torch.cat([x[i], torch.ones(1, dtype=DT)]))
            g_cols.append(n * g[i])
        return a_cols, g_cols, 1
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    H, W = g.shape[2], g.shape[3]
    for i in range(n):
        for h in range(H):
            for w in range(W):
                patch = xp[i, :, h:h + kh, w:w + kw].reshape(-1)  # (C_in, kh, kw) order
                a_cols.append(torch.cat([patch, torch.ones(1, dtype=DT)]))
                g_cols.append(n * g[i, :, h, w])
    return a_cols, g_cols, H * W


def batch_factors(entry):
    a_cols, g_cols, T = columns(entry)
    n = entry["x"].shape[0]
    A = sum(torch.outer(a, a) for a in a_cols) / (n * T)
    G = sum(torch.outer(g, g) for g in g_cols) / n
    return {"A": A, "G": G}


def ea(batches, steps):
    """Eq. (5) with kappa(0) = 1 over the batch factors of ``steps``."""
    M = None
    for k in steps:
        M = batches[k].clone() if M is None else RHO * M + (1 - RHO) * batches[k]
    return M


def explicit(U, d):
    return sum(d[j] * torch.outer(U[:, j], U[:, j]) for j in range(d.numel()))


CONFIGS = {
    "k-fac": ("k-fac", dict(t_updt=2, t_inv=2)),
    "k-fac cholesky": ("k-fac", dict(t_updt=1, t_inv=1, inverse="cholesky")),
    "r-kfac": ("r-kfac", dict(t_updt=2, t_inv=2, rank=6, oversample=2)),
    "sre-kfac": ("sre-kfac", dict(t_updt=1, t_inv=1, rank=6, oversample=2)),
    "b-kfac": ("b-kfac", dict(t_updt=1, t_inv=1, t_brand=1, rank=20, oversample=2, policy="all")),
    "b-kfac T_brand 2": ("b-kfac", dict(t_updt=2, t_inv=2, t_brand=2, rank=20, oversample=2, policy="all")),
    "b-r-kfac": ("b-r-kfac", dict(t_updt=1, t_inv=1, t_brand=1, t_rsvd=2, rank=20, oversample=2, policy="all")),
    "b-kfac-c": ("b-kfac-c", dict(t_updt=1, t_inv=1, t_brand=1, t_corct=2, rank=20, oversample=2, policy="all")),
}


def close(a, b, rtol):
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-300)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_k_factors_equal_brute_force(config):
    name, hyper = CONFIGS[config]
    model = make_model()
    rec = Recorder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.make_optimizer(name, model, defaults=None, lr=LR, rho=RHO, damping_phi=PHI, weight_decay=0.0,
                                   momentum=0.0, clip_mode=None, **hyper)
    with pytest.raises(RuntimeError, match="no K-factors yet"):
        opt.k_factors()
    batches = {}  # (layer, 'A'|'G') -> {step: batch factor}
    for k in range(STEPS):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(N, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 6, (N,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        # Mat(g) by brute force, sum_{i,t} dL/dy a^T (the b-variants' Alg. 8 layers form no .grad)
        grads = {name: sum(torch.outer(gc, a) for a, gc in zip(*columns(e)[:2])) / N for name, e in rec.seen.items()}
        before = {name: (e["module"].weight.detach().clone(), e["module"].bias.detach().clone())
                  for name, e in rec.seen.items()}
        for layer, entry in rec.seen.items():
            for fac, M in batch_factors(entry).items():
                batches.setdefault((layer, fac), {})[k] = M
        opt.step()

    facs = opt.k_factors()
    assert set(facs) == {(layer, fac) for layer in rec.seen for fac in "AG"}
    t_updt = hyper["t_updt"]
    lowrank_routes = 0
    for (layer, fac), kf in facs.items():
        where = (config, layer, fac, kf.method)
        assert kf.layer == layer and kf.factor == fac and kf.dim == batches[(layer, fac)][0].shape[0]
        assert kf.n_M == N * (25 if layer == "0" else 1)
        brute = ea(batches[(layer, fac)], [k for k in range(STEPS) if k % t_updt == 0])
        if kf.ea is not None:  # dense route: the EA factor of eq. (5)
            assert close(kf.dense(), brute, 1e-12), where
            assert kf.dense() is not kf.ea and torch.equal(kf.dense(), kf.ea)
        else:  # low-rank route (pure b-kfac): only (U, d)
            lowrank_routes += 1
            assert kf.method == "brand"
            assert close(kf.dense(), explicit(kf.U, kf.d), 1e-12), where
            # nothing was truncated here (width <= r at every B-update), so it is the EA of the B-updated batches
            t_brand = hyper["t_brand"]
            assert close(kf.dense(), ea(batches[(layer, fac)], [k for k in range(STEPS) if k % t_brand == 0]), 1e-10)
        if kf.U is not None:
            assert close(kf.lowrank(), explicit(kf.U, kf.d), 1e-12), where
            assert kf.damping == pytest.approx(max(PHI * float(kf.d.max()), 1e-8), rel=1e-12)
            assert kf.shift == float(kf.d.min())  # spectrum continuation (on by default; the identity for k-fac)
        else:
            assert kf.method == "cholesky" and kf.d is None
            with pytest.raises(ValueError, match="no \\(U, d\\) representation"):
                kf.lowrank()
    if name == "b-kfac":
        assert lowrank_routes > 0

    # the last step's update is -lr * damped(G)^{-1} [dW, db] damped(A)^{-1} with the accessor's matrices
    for layer in rec.seen:
        A, G = facs[(layer, "A")], facs[(layer, "G")]
        if A.U is None:
            continue
        J = grads[layer]
        S = torch.linalg.solve(G.damped(), J) @ torch.linalg.inv(A.damped())
        W, b = rec.seen[layer]["module"].weight.detach(), rec.seen[layer]["module"].bias.detach()
        step = torch.cat([(before[layer][0] - W).reshape(W.shape[0], -1), (before[layer][1] - b)[:, None]], dim=1)
        assert close(step, LR * S, 1e-9), (config, layer)


def test_k_factor_by_name_and_errors():
    model = make_model()
    opt = bkfac.RKFAC(model, rank=6, oversample=2)
    x, y = torch.randn(N, 2, 5, 5, dtype=DT), torch.randint(0, 6, (N,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    kf = opt.k_factor("3", "A")
    assert kf.method == "rsvd" and kf.U.shape == (76, 6) and kf.ea.shape == (76, 76)
    with pytest.raises(ValueError, match="factor must be 'A' or 'G'"):
        opt.k_factor("3", "Gamma")
    with pytest.raises(ValueError, match="no K-factor A for layer 'fc'; layers with K-factors: 0, 3, 5"):
        opt.k_factor("fc", "A")
