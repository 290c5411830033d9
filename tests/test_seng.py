"""Tests of the SENG baseline (bkfac.baselines.seng) against independent references.

References: per-sample gradients by a brute-force autograd loop over samples; the
preconditioned step against the dense ``(F + damping I)^{-1} g`` built explicitly; the sketched
step against a dense evaluation of the same sketch formula from brute-force pieces; the SGD part
against ``torch.optim.SGD``.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bkfac.baselines import SENG, seng_exp_lr
from bkfac.optim.timer import PhaseTimer

DT = torch.float64


def _seng(model, **kw):
    """SENG without warnings about unsupported layers (tests that expect them check them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SENG(model, **kw)


def _brute_per_sample(model, layers, x, y):
    """Per-sample gradients of the per-sample CE loss, ``n x d_out x d_in`` (bias last)."""
    out = {name: [] for name in layers}
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, mod in layers.items():
            g = mod.weight.grad.reshape(mod.weight.shape[0], -1)
            if mod.bias is not None:
                g = torch.cat([g, mod.bias.grad[:, None]], dim=1)
            out[name].append(g.clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def _supported(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)).to(DT)


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 2, padding="same", dilation=2, padding_mode="reflect", bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).to(DT)


# --------------------------------------------------------------------------- 1. per-sample grads
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_sample_gradients_match_brute_force(kind, reduction):
    model = _mlp() if kind == "mlp" else _tiny_cnn()
    g = torch.Generator().manual_seed(1)
    n = 7
    x = torch.randn((n, 6) if kind == "mlp" else (n, 2, 6, 6), generator=g, dtype=DT)
    y = torch.randint(0, 4 if kind == "mlp" else 3, (n,), generator=g)
    opt = _seng(model, loss_reduction=reduction)
    ref = _brute_per_sample(model, _supported(model), x, y)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    got = opt.per_sample_gradients()
    assert set(got) == set(ref) == set(opt.layer_names)
    for name in ref:
        assert got[name].shape == ref[name].shape
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-10)
    # the batch gradient is the mean (sum) of the per-sample gradients
    for name, mod in _supported(model).items():
        agg = ref[name].mean(0) if reduction == "mean" else ref[name].sum(0)
        torch.testing.assert_close(mod.weight.grad.reshape(agg.shape[0], -1), agg[:, : mod.weight[0].numel()], rtol=0, atol=1e-10)


def test_linear_with_extra_dims_sums_over_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 2)).to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    y = torch.randint(0, 2, (5,))
    opt = _seng(model)
    ref = _brute_per_sample(model, _supported(model), x, y)
    F.cross_entropy(model(x), y).backward()
    got = opt.per_sample_gradients()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- 2. Woodbury
def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _dense_direction(G, g, lam):
    """(F + lam I)^{-1} g with F = (1/n) sum_i vec(G_i) vec(G_i)^T, built explicitly."""
    n = G.shape[0]
    V = G.reshape(n, -1)
    Fm = V.t() @ V / n
    return torch.linalg.solve(Fm + lam * torch.eye(Fm.shape[0], dtype=DT), g.reshape(-1)).reshape(g.shape)


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_woodbury_equals_dense_damped_inverse(mode):
    model = _tiny_cnn()
    lam = 0.7
    kw = dict(lr=1.0, damping=lam, momentum=0.0, weight_decay=0.0, update_freq=3,
              col_sample_size=None, lr_scheme=None)
    if mode == "implicit":  # factored path, no SVD truncation, exact U^T v: still exact
        kw.update(im_size_threshold=0, svd_rank=1000, implicit_transpose="exact")
    opt = _seng(model, **kw)
    layers = _supported(model)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 2, 6, 6, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen))
               for _ in range(2)]
    G0 = None
    for k, (x, y) in enumerate(batches):  # step 0 refreshes the curvature; step 1 reuses it
        G = _brute_per_sample(model, layers, x, y)
        if k == 0:
            G0 = G
        before = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                  for n, m in layers.items()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, mod in layers.items():
            d = _dense_direction(G0[name], G[name].mean(0), lam)
            w0, b0 = before[name]
            dw = (w0 - mod.weight.detach()).reshape(d.shape[0], -1)
            if b0 is not None:
                dw = torch.cat([dw, (b0 - mod.bias.detach())[:, None]], dim=1)
            torch.testing.assert_close(dw, d, rtol=0, atol=1e-10)
        # the curvature is stale at step 1: it is not the dense inverse of the new batch
        if k == 1:
            name = "0"
            d_new = _dense_direction(G[name], G[name].mean(0), lam)
            d_old = _dense_direction(G0[name], G[name].mean(0), lam)
            assert (d_new - d_old).abs().max() > 1e-6


def _mlp_factors(model, x, y):
    """Independent capture of the MLP's per-sample factors (inputs, output grads)."""
    x1 = x
    h = model[0](x1)
    h.retain_grad()
    z = model[2](torch.relu(h))
    z.retain_grad()
    F.cross_entropy(z, y).backward()
    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=DT)
    a = {"0": torch.cat([x1, ones], 1), "2": torch.cat([torch.relu(h).detach(), ones], 1)}
    g = {"0": h.grad * n, "2": z.grad * n}  # per-sample-loss output gradients
    model.zero_grad()
    return a, g


@pytest.mark.parametrize("scaling", ["seng", "unbiased"])
@pytest.mark.parametrize("mode,transpose", [("explicit", "seng"), ("implicit", "exact"), ("implicit", "seng")])
def test_sketched_step_matches_dense_sketch_formula(mode, transpose, scaling):
    """With column sampling the step is (g - U^T K^{-1} w)/lam with K = omega U_S U_S^T + lam I,
    w = omega U_S g_S (U rows = per-sample grads / sqrt(n)); omega = m^2 ('seng') or m."""
    model = _mlp()
    lam, n = 1.3, 8
    kw = dict(lr=1.0, damping=lam, momentum=0.0, weight_decay=0.0, update_freq=5, lr_scheme=None,
              col_scaling=scaling, implicit_transpose=transpose, seed=11)
    kw.update(col_sample_size=3 if mode == "explicit" else 2,
              im_size_threshold=10**9 if mode == "explicit" else 0)
    opt = _seng(model, **kw)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 4, (n,), generator=gen)
    a, gy = _mlp_factors(model, x, y)
    layers = _supported(model)
    before = {k: (m.weight.detach().clone(), m.bias.detach().clone()) for k, m in layers.items()}
    F.cross_entropy(model(x), y).backward()
    grads = {k: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for k, m in layers.items()}
    opt.step()
    for name, mod in layers.items():
        d_out, d_in = grads[name].shape
        G = torch.einsum("io,ic->ioc", gy[name], a[name])  # per-sample grads
        U = G / math.sqrt(n)
        st = opt.curvature_state(name)
        if mode == "explicit":
            idx = st["index"]
            assert idx.numel() == 9 and idx.unique().numel() == 9
            US = U.reshape(n, -1)[:, idx]
            gS = grads[name].reshape(-1)[idx]
            m = d_out * d_in / 9
        else:
            r, c = st.get("row_index"), st.get("col_index")
            assert r is not None and c is not None and r.numel() == 2 and c.numel() == 2
            US = U[:, r][:, :, c].reshape(n, -1)
            gS = grads[name][r][:, c].reshape(-1)
            m = (d_out / 2) * (d_in / 2)
        omega = m * m if scaling == "seng" else m
        assert st["omega"] == pytest.approx(omega, rel=1e-14)
        K = omega * US @ US.t() + lam * torch.eye(n, dtype=DT)
        v = torch.linalg.solve(K, omega * US @ gS)
        if mode == "implicit" and transpose == "seng":
            gs = gy[name] / math.sqrt(n)
            s = v.abs().sqrt()
            corr = torch.outer(s @ gs, (v / s.sum()) @ a[name])
        else:
            corr = (U.reshape(n, -1).t() @ v).reshape(d_out, d_in)
        expected = (grads[name] - corr) / lam
        w0, b0 = before[name]
        step = torch.cat([w0 - mod.weight.detach(), (b0 - mod.bias.detach())[:, None]], 1)
        torch.testing.assert_close(step, expected, rtol=0, atol=1e-10)


def test_implicit_conv_svd_truncation_is_rank_p_projection():
    """Implicit conv layers keep g_i Q_i Q_i^T a_i^T, Q_i = top svd_rank right singular vectors
    of the per-sample output gradient g_i (d_out x positions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 16, 3)).to(DT)
    opt = _seng(model, im_size_threshold=0, svd_rank=2, col_sample_size=None, implicit_transpose="exact")
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (4,))
    cap = {}

    def keep(module, inputs, output):
        output.register_hook(lambda g: cap.__setitem__("g", g))

    model[0].register_forward_hook(keep)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    st = opt.curvature_state("0")
    n = 4
    a = F.unfold(x, 3, padding=1)
    a = torch.cat([a, torch.ones(n, 1, a.shape[2], dtype=DT)], 1)
    for i in range(n):
        gi = cap["g"][i].reshape(5, -1) * n / math.sqrt(n)
        _, _, Vh = torch.linalg.svd(gi)
        Q = Vh[:2].t()
        ref = gi @ Q @ Q.t() @ a[i].t()
        got = st["g"][i] @ st["a"][i].t()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- 3. training
def _cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, 10),
    ).to(dtype)


def _synthetic(n=256, classes=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 3, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)
    return x.to(dtype), y


@pytest.mark.parametrize("variant", ["official", "unbiased-exact"])
def test_seng_trains_small_cnn(variant):
    x, y = _synthetic()
    model = _cnn()
    kw = dict(update_freq=5, col_sample_size=16, im_size_threshold=50_000, lr=0.1, seed=0)
    if variant == "unbiased-exact":
        kw.update(col_scaling="unbiased", implicit_transpose="exact")
    opt = _seng(model, **kw)
    assert [opt._by_name[n].implicit for n in opt.layer_names] == [False, False, True, False]
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x), y).item()
    for k in range(30):
        b = slice((k % 4) * 64, (k % 4 + 1) * 64)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    with torch.no_grad():
        loss1 = F.cross_entropy(model(x), y).item()
    assert math.isfinite(loss1) and loss1 < 0.3 * loss0, (loss0, loss1)
    t = opt.timer.as_dict()
    assert t["steps"] == 30 and all(t["total"][p] > 0 for p in ("statistics", "inverse", "precondition", "rest"))


# --------------------------------------------------------------------------- 4. checkpoint
def _run(model, opt, batches, start):
    for k, (x, y) in enumerate(batches):
        opt.set_epoch(1 + (start + k + 1) / 10)  # fractional epochs, as the official loop
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _small_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 64), nn.ReLU(inplace=True), nn.Linear(64, 10),
    )


def test_checkpoint_resumes_bitwise():
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(40):
        yb = torch.randint(0, 10, (12,), generator=gen)
        batches.append((torch.randn(12, 3, 8, 8, generator=gen), yb))
    # conv layers explicit and sampled (c^2 = 36 < D), FC0 implicit and sampled (c < 64, 33)
    kw = dict(update_freq=3, col_sample_size=6, im_size_threshold=2000, lr=0.05, seed=123,
              lr_decay_epoch=5)
    _cnn = _small_cnn

    model_a = _cnn(seed=1)
    opt_a = _seng(model_a, **kw)
    _run(model_a, opt_a, batches, 0)

    model_b = _cnn(seed=1)
    opt_b = _seng(model_b, **kw)
    _run(model_b, opt_b, batches[:20], 0)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    del model_b, opt_b
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_c = _cnn(seed=99)  # different init: everything must come from the checkpoint
    opt_c = _seng(model_c, **{**kw, "seed": 5})
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c._step_count == 20 and opt_c.epoch == 1 + 20 / 10
    _run(model_c, opt_c, batches[20:], 20)

    for (na, pa), (_, pc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(pa, pc), na
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"] < 0.05
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert sa["seng"]["step"] == sc["seng"]["step"] == 40
    assert torch.equal(sa["seng"]["rng_state"], sc["seng"]["rng_state"])
    for name in sa["seng"]["curvature"]:
        for key, val in sa["seng"]["curvature"][name].items():
            other = sc["seng"]["curvature"][name][key]
            assert torch.equal(val, other) if torch.is_tensor(val) else val == other, (name, key)
    # curvature refreshed in both halves (steps 0, 3, ..., 39) and sampling really happened
    assert "index" in sa["seng"]["curvature"]["0"] and "row_index" in sa["seng"]["curvature"]["8"]


def test_resume_without_checkpointed_rng_would_differ():
    """Sanity check of the previous test: the sketch really depends on the generator."""
    model = _small_cnn(seed=1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    outs = []
    for seed in (1, 2):
        opt = _seng(model, col_sample_size=6, im_size_threshold=2000, seed=seed)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        outs.append(opt.curvature_state("0")["index"].clone())
        opt.remove_hooks()
        model.zero_grad()
    assert not torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- 5. errors, SGD part
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-0.1), "lr"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(weight_decay=-1e-3), "weight_decay"),
        (dict(momentum=1.0), "momentum"),
        (dict(update_freq=0), "update_freq"),
        (dict(update_freq=2.5), "update_freq"),
        (dict(col_sample_size=0), "col_sample_size"),
        (dict(lr_scheme="cosine"), "lr_scheme"),
        (dict(lr_decay_epoch=0), "lr_decay_epoch"),
        (dict(lr_decay_rate=-1), "lr_decay_rate"),
        (dict(loss_reduction="none"), "loss_reduction"),
        (dict(svd_rank=0), "svd_rank"),
        (dict(col_scaling="x"), "col_scaling"),
        (dict(implicit_transpose="x"), "implicit_transpose"),
        (dict(timer="t"), "timer"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_bad_hyper_parameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        SENG(_mlp(), **kw)


def test_bad_model_and_epoch_raise():
    with pytest.raises(TypeError, match="nn.Module"):
        SENG([torch.zeros(2, requires_grad=True)])
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        SENG(frozen)
    opt = SENG(_mlp())
    with pytest.raises(ValueError, match="epoch"):
        opt.set_epoch(0.5)


def test_nan_input_raises_naming_the_layer():
    model = _tiny_cnn()
    opt = _seng(model)
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    x[1, 0, 2, 2] = float("nan")
    before = _params(model)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(FloatingPointError, match=r"layer '0' \(Conv2d\)"):
        opt.step()
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters()))


def test_batchnorm_gets_plain_sgd_step_and_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm2d\)"):
        opt = SENG(model, lr=0.3, weight_decay=0.1, momentum=0.0)
    assert opt.layer_names == ["0", "4"]
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    y = torch.randint(0, 2, (5,))
    F.cross_entropy(model(x), y).backward()
    bn = model[1]
    p0 = [bn.weight.detach().clone(), bn.bias.detach().clone()]
    g0 = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    w0 = model[0].weight.detach().clone()
    opt.step()
    for p, before, g in zip((bn.weight, bn.bias), p0, g0):
        torch.testing.assert_close(p.detach(), before - 0.3 * (g + 0.1 * before), rtol=0, atol=1e-14)
    # the conv layer did get a preconditioned step, not the SGD one
    sgd = w0 - 0.3 * (model[0].weight.grad + 0.1 * w0)
    assert (model[0].weight.detach() - sgd).abs().max() > 1e-6


def test_sgd_part_matches_torch_sgd_with_momentum():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.BatchNorm1d(4), nn.Tanh()).to(DT)
    m2 = nn.Sequential(nn.BatchNorm1d(4), nn.Tanh()).to(DT)
    m2.load_state_dict(m1.state_dict())
    opt1 = _seng(m1, lr=0.1, weight_decay=0.01, momentum=0.9, lr_scheme=None)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, weight_decay=0.01, momentum=0.9)
    for k in range(3):
        x = torch.randn(6, 4, dtype=DT)
        for m, o in ((m1, opt1), (m2, opt2)):
            o.zero_grad()
            (m(x) ** 2).sum().backward()
            o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_capture_only_in_training_mode_and_hooks_removable():
    model = _mlp()
    opt = _seng(model)
    x, y = torch.randn(4, 6, dtype=DT), torch.randint(0, 4, (4,))
    model.eval()
    F.cross_entropy(model(x), y).backward()
    assert all(not layer.records for layer in opt._layers)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        opt.step()
    model.train()
    opt.remove_hooks()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(not layer.records for layer in opt._layers)
    with pytest.raises(RuntimeError, match="layer '0'"):
        opt.step()


def test_exp_lr_scheme():
    assert seng_exp_lr(1, lr0=0.05, decay_rate=6, decay_epoch=75) == 0.05
    assert seng_exp_lr(38.5, lr0=0.05, decay_rate=6, decay_epoch=75) == pytest.approx(0.05 * 0.5**6)
    assert seng_exp_lr(200, lr0=0.05, decay_rate=6, decay_epoch=75) == 0.0
    opt = SENG(_mlp())
    opt.set_epoch(1 + 15 / 2)
    assert all(g["lr"] == pytest.approx(0.05 * 0.9**6) for g in opt.param_groups)
    opt2 = SENG(_mlp(), lr=0.2, lr_scheme=None)
    opt2.set_epoch(30)
    assert all(g["lr"] == 0.2 for g in opt2.param_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.step()  # no gradients yet: a no-op step
    sched.step()
    assert all(g["lr"] == pytest.approx(0.1) for g in opt2.param_groups)


def test_per_iteration_exp_lr_matches_official_loop():
    """With steps_per_epoch the lr of each step is the official one,
    lr0 (1 - (epoch0 + (b + 1) / N) / decay_epoch) ** rate (epoch0 0-indexed, b 0-indexed)."""
    model = _mlp()
    N = 3
    opt = _seng(model, steps_per_epoch=N, lr_decay_epoch=4, update_freq=100)
    x, y = torch.randn(4, 6, dtype=DT), torch.randint(0, 4, (4,))
    seen = []
    for epoch in (1, 2):
        opt.set_epoch(epoch)
        for b in range(N):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            seen.append(opt.param_groups[0]["lr"])
    official = [0.05 * (1 - (e0 + (b + 1) / N) / 4) ** 6 for e0 in (0, 1) for b in range(N)]
    assert seen == pytest.approx(official, rel=1e-12)


def test_timer_is_phase_timer_and_can_be_shared():
    t = PhaseTimer()
    opt = SENG(_mlp(), timer=t)
    assert opt.timer is t
    off = SENG(_mlp(), timer=False)
    assert isinstance(off.timer, PhaseTimer) and not off.timer.enabled
    assert SENG(_mlp(), sync_timer=True).timer.sync


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transpose", ["seng", "exact"])
def test_cuda_matches_cpu(transpose):
    """All paths (explicit, implicit with SVD truncation, sampling) give the same steps on CUDA
    as on CPU in float64 (the column sampling draws from the optimizer's CPU generator)."""
    def build(device):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Linear(32, 5),
        ).to(device=device, dtype=DT)
        opt = _seng(model, update_freq=2, col_sample_size=5, im_size_threshold=400, svd_rank=3,
                    seed=4, steps_per_epoch=4, implicit_transpose=transpose)
        return model, opt

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(10, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 5, (10,), generator=gen))
               for _ in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        model, opt = build(device)
        assert [opt._by_name[n].implicit for n in opt.layer_names] == [False, True, True, False]
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for pc, pg in zip(*results):
        torch.testing.assert_close(pg, pc, rtol=0, atol=1e-8)
