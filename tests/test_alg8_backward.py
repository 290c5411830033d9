"""Algorithm 8 line 2: the backward of a layer preconditioned with Alg. 8 returns G_k, A_k and
does not form Mat(g_k) (``alg8_backward``, ``KFactorCapture.defer_weight_grad``).

References: the same optimizer with PyTorch's backward (``alg8_backward=False``: the weight
gradient formed by autograd; with ``linear_time=False`` also the step from it by Alg. 1), float64."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac


def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 12, bias=bias), nn.ReLU(), nn.Linear(12, 4, bias=bias)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12), nn.ReLU(),
                         nn.Linear(12, 4)).double()


def batch(k, n=8):
    g = torch.Generator().manual_seed(k)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def make(model, alg8_backward, **kw):
    hyper = dict(lr=0.1, t_updt=1, t_inv=2, t_brand=1, rank=6, oversample=2, policy="all", weight_decay=1e-2,
                 momentum=0.5)
    hyper.update(kw)
    return bkfac.BKFAC(model, alg8_backward=alg8_backward, **hyper)


def train(build, alg8_backward, steps=5, micro=1, **kw):
    """Parameters after ``steps`` steps (each over ``micro`` forward/backward passes), and the
    weight gradients seen just before the last ``step()``."""
    m = build()
    opt = make(m, alg8_backward, **kw)
    grads = None
    for k in range(steps):
        opt.zero_grad()
        for j in range(micro):
            x, y = batch(10 * k + j)
            (F.cross_entropy(m(x), y) / micro).backward()
        grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}
        opt.step()
    return m, opt, grads


@pytest.mark.parametrize("clip_mode,clip", [(None, None), ("rms", 1e-3), ("kl", 1e-6)])
@pytest.mark.parametrize("build", [mlp, lambda: mlp(bias=False), cnn], ids=["mlp", "mlp-nobias", "cnn"])
def test_the_step_without_the_weight_gradient_equals_the_step_with_it(build, clip_mode, clip):
    """Over 5 steps (RMS and KL clipping, weight decay, momentum) the parameters are those of
    PyTorch's backward and Alg. 1's step on the formed gradient; the Alg. 8 layers' weights
    have no gradient before ``step()`` (KL clipping then takes <S, Mat(g)> from two n x n
    products)."""
    ref, _, ref_grads = train(build, False, clip_mode=clip_mode, clip=clip, linear_time=False)
    m, opt, grads = train(build, True, clip_mode=clip_mode, clip=clip)
    deferred = [L for L in opt.layers if L.capture.defers_weight_grad]
    assert deferred and all(L.linear_time for L in deferred)
    for i, L in enumerate(opt.layers):
        name = next(n for n, p in m.named_parameters() if p is L.capture.module.weight)
        # line 2: not formed, except where only the weight connects the layer to the loss (a
        # bias-less first layer on the raw input)
        skipped = L.capture.defers_weight_grad and (i > 0 or L.capture.has_bias)
        assert (grads[name] is None) == skipped, name
        assert ref_grads[name] is not None
    for (n, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), n
        assert a.requires_grad and b.requires_grad


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
def test_accumulated_micro_batches_form_the_weight_gradient_as_autograd_does(build):
    """Two forward/backward passes before a step (gradient accumulation): Alg. 8 does not apply,
    the deferred weight gradients are formed from the recorded calls, equal to autograd's, and
    the trajectory is PyTorch's backward's."""
    ref, _, _ = train(build, False, steps=3, micro=2)
    m, opt, _ = train(build, True, steps=3, micro=2)
    for (n, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), n
    # the gradient step() formed, against autograd's, for one more accumulated step
    for model, alg8_backward in ((ref, False), (m, True)):
        model.zero_grad()
        for j in range(2):
            x, y = batch(100 + j)
            F.cross_entropy(model(x), y).backward()
    deferred = [L for L in opt.layers if L.capture.defers_weight_grad]
    assert deferred
    for L in deferred:  # the first call's gradient formed when the second ran, the second's waits
        assert len(L.capture.deferred) == 1 and L.capture.deferred[0][1]
        L.capture.form_weight_grad()
    for (n, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-14), n


def test_a_weight_gradient_is_still_formed_where_line_2_does_not_apply():
    """Eval mode, ``torch.no_grad``-free evaluation backwards, the Monte-Carlo Fisher, a first
    layer whose output needs no gradient but through the weight, and after ``remove_hooks``:
    the weight gradient is PyTorch's."""
    x, y = batch(0)
    # eval mode: the hooks do nothing
    m = mlp()
    opt = make(m, True)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert opt.layers[0].capture.defers_weight_grad
    m.zero_grad()
    m.eval()
    F.cross_entropy(m(x), y).backward()
    assert m[1].weight.grad is not None
    # Monte-Carlo Fisher: G_k is of sampled labels, the step needs the true gradient
    m = mlp()
    opt = make(m, True, fisher="mc")
    for k in range(2):
        opt.zero_grad()
        logits = m(x)
        opt.capture.sampled_fisher_backward(logits)
        F.cross_entropy(logits, y).backward()
        assert m[1].weight.grad is not None
        opt.step()
    assert not any(L.capture.defers_weight_grad for L in opt.layers)
    # no bias, raw input: only the weight connects the layer to the loss, so it keeps its gradient
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 12, bias=False)).double()
    opt = make(m, True)
    for k in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x)[:, :4], y).backward()
        assert m[1].weight.grad is not None
        opt.step()
    # remove_hooks: an ordinary model again
    m = mlp()
    opt = make(m, True)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    opt.remove_hooks()
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert m[1].weight.grad is not None and not opt.layers[0].capture.defers_weight_grad


def test_the_weight_requires_grad_again_after_a_failing_forward():
    """The weight's ``requires_grad`` is off only while the layer's own forward runs: a forward
    that raises leaves it on."""
    m = mlp()
    opt = make(m, True)
    x, y = batch(0)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError):
        m[1](torch.randn(8, 47, dtype=torch.float64, requires_grad=True))  # wrong width
    assert m[1].weight.requires_grad
    assert not opt.layers[0].capture._frozen


def test_discarded_gradients_stay_discarded_and_deferred_calls_stay_bounded():
    """``optimizer.zero_grad()`` between a backward and the step drops that backward's deferred
    weight gradient as it drops the formed ones (the step equals PyTorch's backward's); many
    forward/backward passes without a step keep at most one deferred call, the earlier ones
    formed into ``weight.grad`` as autograd accumulates them."""
    runs = []
    for alg8_backward in (False, True):
        m = mlp()
        opt = make(m, alg8_backward)
        x, y = batch(0)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        for k in range(1, 4):
            opt.zero_grad()
            x, y = batch(k)
            F.cross_entropy(m(x), y).backward()  # discarded below
            opt.zero_grad()
            x, y = batch(10 + k)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        opt.zero_grad()
        sizes = []
        for k in range(5):
            x, y = batch(20 + k)
            F.cross_entropy(m(x), y).backward()
            sizes.append(max(len(L.capture.deferred) for L in opt.layers))
        for L in opt.layers:
            L.capture.form_weight_grad()
        runs.append((m, sizes))
    (ref, _), (m, sizes) = runs
    assert max(sizes) == 1
    for (n, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), n
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-13), n
