"""load_state_dict checks every layer's shapes and method before it changes anything (all or
nothing); every optimizer, SGD included, refuses a non-finite gradient before any update."""

import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac

HYPER = {
    "k-fac": dict(t_updt=1, t_inv=2),
    "k-fac (cholesky)": dict(t_updt=1, t_inv=2, inverse="cholesky"),
    "r-kfac": dict(t_updt=1, t_inv=2, rank=6, oversample=2),
    "sre-kfac": dict(t_updt=1, t_inv=2, rank=6, oversample=2),
    "b-kfac": dict(t_updt=1, t_inv=2, t_brand=1, rank=6, oversample=2, policy="all"),
    "b-r-kfac": dict(t_updt=1, t_inv=2, t_brand=1, t_rsvd=2, rank=6, oversample=2, policy="all"),
    "b-kfac-c": dict(t_updt=1, t_inv=2, t_brand=1, t_corct=2, rank=6, oversample=2, policy="all"),
    "sgd": dict(momentum=0.9),
    "seng": dict(update_freq=2, col_sample_size=4, momentum=0.9, lr_scheme=None),
}


def mlp(out: int = 3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, out))


def build(name, model, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bkfac.make_optimizer(name.split(" ")[0], model, defaults=None, lr=0.05, **{**HYPER[name], **extra})


def run(model, opt, start, stop):
    for k in range(start, stop):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def saved(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def loaded(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def same(a, b) -> bool:
    """Nested equality of state dicts, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(HYPER))
def test_wrong_width_state_dict_is_refused_before_any_change(name):
    """A checkpoint of a model whose last layer has 4 outputs does not load into one with 3: the
    error names the layer, and the optimizer is exactly as before (it then steps like one that
    never saw the checkpoint)."""
    other = mlp(out=4)
    o_other = build(name, other)
    for k in range(3):
        g = torch.Generator().manual_seed(100 + k)
        o_other.zero_grad()
        F.cross_entropy(other(torch.randn(8, 6, generator=g)), torch.randint(0, 4, (8,), generator=g)).backward()
        o_other.step()
    wrong = saved(o_other)

    model, reference = mlp(), mlp()
    opt, ref = build(name, model), build(name, reference)
    run(model, opt, 0, 3)
    run(reference, ref, 0, 3)
    before = saved(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(loaded(wrong))
    assert "'4" in str(err.value) and "shape" in str(err.value) and "another model" in str(err.value), err.value
    assert same(loaded(saved(opt)), loaded(before))  # nothing changed
    run(model, opt, 3, 6)
    run(reference, ref, 3, 6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_a_factor_saved_with_another_method_is_refused():
    """b-kfac with the mixed policy B-updates layer 2's factors and runs eigh on layer 0's A-factor
    (d = 7 <= n_M + r); with 'first-fc' layer 0 is B-updated and layer 2 runs r-kfac: the
    checkpoint of one does not load into the other, and nothing changes."""
    def make(policy):
        m = mlp()
        return m, build("b-kfac", m, policy=policy)

    m1, mixed = make("mixed")
    run(m1, mixed, 0, 2)
    m2, first = make("first-fc")
    run(m2, first, 0, 2)
    assert {r["method"] for r in mixed.describe() if r["layer"] == "2"} == {"brand"}
    assert {r["method"] for r in first.describe() if r["layer"] == "2"} == {"rsvd"}
    before = saved(first)
    with pytest.raises(ValueError, match=r"layer '0' factor A: saved with method 'eigh', this b-kfac runs 'brand'"):
        first.load_state_dict(mixed.state_dict())
    assert same(loaded(saved(first)), loaded(before))
    with pytest.raises(ValueError, match="state_dict is from 'b-kfac', this optimizer is 'b-r-kfac'"):
        build("b-r-kfac", mlp()).load_state_dict(mixed.state_dict())


def test_corrupt_factor_state_is_refused():
    model = mlp()
    opt = build("r-kfac", model)
    run(model, opt, 0, 2)
    sd = loaded(saved(opt))
    method, inner = sd["kfac"]["layers"]["2"]["G"]
    inner["d"] = inner["d"][:-1]
    before = saved(opt)
    with pytest.raises(ValueError, match=r"layer '2' factor G: d has shape \(5,\), expected a floating tensor of shape \(6,\)"):
        opt.load_state_dict(sd)
    assert same(loaded(saved(opt)), loaded(before))
    sd = loaded(saved(opt))
    sd["kfac"]["generator"] = torch.zeros(3)
    with pytest.raises(ValueError, match="generator state must be a uint8 tensor"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("name", list(HYPER))
def test_non_finite_gradient_raises_before_any_update(name):
    model = mlp()
    opt = build(name, model)
    run(model, opt, 0, 2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    x[3, 2] = float("inf")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    state = saved(opt)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .*'0\.(weight|bias)'|non-finite gradient.*layer '0'"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert same(loaded(saved(opt)), loaded(state))
