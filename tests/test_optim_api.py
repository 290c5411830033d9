"""torch.optim conventions: lr schedulers, parameter groups, KL clipping, Monte-Carlo Fisher."""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))


def step(model, opt, k=0):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    logits = model(x)
    if opt.fisher == "mc" and opt.wants_statistics():
        opt.capture.sampled_fisher_backward(logits, generator=torch.Generator().manual_seed(k))
    F.cross_entropy(logits, y).backward()
    opt.step()


def test_lr_scheduler_drives_the_step_size():
    model = mlp()
    opt = bkfac.BKFAC(model, lr=0.1, t_updt=1, t_inv=1, t_brand=1, rank=8, oversample=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    for k in range(3):
        seen.append(opt.param_groups[0]["lr"])
        step(model, opt, k)
        sched.step()
    assert seen == [0.1, 0.05, 0.025]


def test_param_groups_use_their_own_lr():
    """A group with lr 0 leaves its layer untouched while the other layer moves."""
    model = mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = bkfac.KFAC(model, params=groups, t_updt=1, t_inv=1, clip_mode=None)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    step(model, opt)
    assert torch.equal(model[0].weight, w0) and not torch.equal(model[2].weight, w2)


def test_kl_clipping_bounds_the_quadratic_model():
    """KL clipping scales the step by nu = min(1, sqrt(kl / (lr^2 S.g))), so the quadratic model
    lr^2 (nu S)^T F (nu S) = nu^2 lr^2 S.g (F S = g for the K-FAC step) equals the bound."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    lr, bound = 0.5, 1e-6

    def one_step(clip_mode):
        model = mlp()
        opt = bkfac.KFAC(model, lr=lr, t_updt=1, t_inv=1, clip=bound, clip_mode=clip_mode, weight_decay=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return [b - p.detach() for b, p in zip(before, model.parameters())], grads

    free, grads = one_step(None)  # lr * S
    clipped, _ = one_step("kl")  # lr * nu * S
    vg = sum(float((d / lr * gr).sum()) for d, gr in zip(free, grads)) * lr**2
    nu = float(torch.cat([c.flatten() for c in clipped]).norm() / torch.cat([f.flatten() for f in free]).norm())
    assert vg > bound and nu < 1  # the bound is active here
    assert abs(nu**2 * vg - bound) < 1e-6 * bound
    for c, f in zip(clipped, free):  # same direction
        assert torch.allclose(c, nu * f, atol=1e-8, rtol=1e-3)  # float32


def test_monte_carlo_fisher_trains():
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.RKFAC(model, lr=0.05, t_updt=2, t_inv=2, rank=8, oversample=2, fisher="mc")
    for k in range(6):
        step(model, opt, k)
    assert opt.steps == 6 and all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.k_factor("0", "G").ea is not None


def test_every_optimizer_takes_sync_timer():
    """Callers that time phases on CUDA pass ``sync_timer=True`` to any optimizer, SGD included."""
    for name in ("sgd", "seng", "k-fac", "b-kfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = bkfac.make_optimizer(name, nn.Sequential(nn.Linear(4, 3)), sync_timer=True)
        assert opt.timer.sync
