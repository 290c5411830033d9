"""Checkpoints: 20 steps + save/load into fresh objects + 20 steps == 40 steps, bitwise (CPU)."""

import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac

HYPER = {
    "k-fac": dict(t_updt=2, t_inv=4),
    "k-fac (cholesky)": dict(t_updt=2, t_inv=4, inverse="cholesky"),
    "r-kfac": dict(t_updt=2, t_inv=4, rank=12, oversample=3),
    "sre-kfac": dict(t_updt=2, t_inv=4, rank=12, oversample=3),
    "b-kfac": dict(t_updt=2, t_inv=4, t_brand=2, rank=12, oversample=3),
    "b-r-kfac": dict(t_updt=2, t_inv=4, t_brand=2, t_rsvd=6, rank=12, oversample=3),
    "b-kfac-c": dict(t_updt=2, t_inv=4, t_brand=2, t_corct=6, rank=12, oversample=3),
    "sgd": dict(momentum=0.9),
    "seng": dict(update_freq=7, col_sample_size=8, momentum=0.9, lr_scheme=None),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 120), nn.ReLU(inplace=True), nn.Linear(120, 10),
    )


def data(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def build(name, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bkfac.make_optimizer(name.split(" ")[0], model, defaults=None, lr=0.05, weight_decay=1e-3, **HYPER[name])


def run(model, opt, start, stop):
    for k in range(start, stop):
        x, y = data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(HYPER))
def test_resume_is_bitwise(name):
    m1 = make_model()
    o1 = build(name, m1)
    run(m1, o1, 0, 40)

    m2 = make_model()
    o2 = build(name, m2)
    run(m2, o2, 0, 20)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    m3 = make_model()
    with torch.no_grad():
        for p in m3.parameters():
            p.add_(1.0)  # make sure the load, not the seed, sets the state
    o3 = build(name, m3)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    run(m3, o3, 20, 40)
    for (n1, p1), p3 in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(p1, p3), (name, n1)
