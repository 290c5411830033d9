"""K-factor capture against brute-force per-sample / per-position computations (float64)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bkfac.curvature import KFactorCapture

TOL = 1e-10


@pytest.fixture(autouse=True)
def float64_default():
    """float64 for this module only (restored afterwards: other tests build float32 models)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


def per_sample_output_grads(model, layer, x, y):
    """g_i = d l_i / d y_i for the per-sample loss l_i (loop over samples, autograd only).

    In-place activations are switched off for this reference pass (``retain_grad`` on a
    tensor that is later modified in place would report the gradient of the new version).
    """
    inplace = [m for m in model.modules() if getattr(m, "inplace", False)]
    for m in inplace:
        m.inplace = False
    outs, grads, ins = [], [], []
    for i in range(x.shape[0]):
        store = {}

        def hook(m, inp, out):
            out.retain_grad()
            store["out"], store["in"] = out, inp[0].detach().clone()

        h = layer.register_forward_hook(hook)
        logits = model(x[i : i + 1])
        h.remove()
        F.cross_entropy(logits, y[i : i + 1], reduction="sum").backward()
        model.zero_grad()
        grads.append(store["out"].grad[0].detach().clone())
        ins.append(store["in"][0])
    for m in inplace:
        m.inplace = True
    return torch.stack(ins), torch.stack(grads)


def conv_patches_bruteforce(x, conv):
    """Explicit patch extraction by index loops: rows a_{t} (T x C*kh*kw) for one sample."""
    C, H, W = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    xp = torch.zeros(C, H + 2 * ph, W + 2 * pw)
    xp[:, ph : ph + H, pw : pw + W] = x
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for p in range(Ho):
        for q in range(Wo):
            patch = torch.empty(C, kh, kw)
            for u in range(kh):
                for v in range(kw):
                    patch[:, u, v] = xp[:, p * sh + u * dh, q * sw + v * dw]
            rows.append(patch.reshape(-1))
    return torch.stack(rows), Ho * Wo


def outer_products(lc):
    """The fast path (``batch_outer_A``/``batch_outer_G``: no batch matrix formed), for both
    loss reductions, and G G^T under 'sum' -- taken before the reference passes re-run the hooks."""
    Gs = lc.batch_G("sum")
    return lc.batch_outer_A(), lc.batch_outer_G("mean"), lc.batch_outer_G("sum"), Gs @ Gs.T, lc.grad_outputs.shape[0]


def assert_outer_products(outers, A_ref, G_ref):
    """Same factors as the reference; a 'sum' loss scales G G^T by 1/n^2."""
    outer_A, outer_G, outer_G_sum, GGs, n = outers
    assert rel(outer_A, A_ref) < TOL
    assert rel(outer_G, G_ref) < TOL
    assert rel(outer_G_sum, G_ref / n**2) < TOL
    assert rel(GGs, G_ref / n**2) < TOL


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_bruteforce(bias):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=bias)
    model = nn.Sequential(lin, nn.ReLU(inplace=True), nn.Linear(5, 4))
    n = 7
    x, y = torch.randn(n, 6), torch.randint(0, 4, (n,))
    cap = KFactorCapture(model)
    F.cross_entropy(model(x), y).backward()
    A, G, scale = cap.layers[0].batch_matrices()
    outers = outer_products(cap.layers[0])
    assert scale == 1.0
    ins, gs = per_sample_output_grads(model, lin, x, y)
    a = torch.cat([ins, torch.ones(n, 1)], 1) if bias else ins
    A_ref = sum(torch.outer(a[i], a[i]) for i in range(n)) / n
    G_ref = sum(torch.outer(gs[i], gs[i]) for i in range(n)) / n
    assert rel(A @ A.T, A_ref) < TOL
    assert rel(G @ G.T, G_ref) < TOL
    assert_outer_products(outers, A_ref, G_ref)
    # The gradient of the mean loss is scale * G A^T (eq. 20).
    F.cross_entropy(model(x), y).backward()
    J = cap.layers[0].grad_matrix()
    assert rel(scale * G @ A.T, J) < TOL


def test_linear_with_positions_bruteforce():
    """Linear on (n, T, in): positions are summed like convolution positions; scale = sqrt(T)."""
    torch.manual_seed(1)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.Flatten(), nn.Linear(3 * 5, 2))
    n, T = 6, 5
    x, y = torch.randn(n, T, 4), torch.randint(0, 2, (n,))
    cap = KFactorCapture(model)
    F.cross_entropy(model(x), y).backward()
    A, G, scale = cap.layers[0].batch_matrices()
    outers = outer_products(cap.layers[0])
    J = cap.layers[0].grad_matrix().clone()
    ins, gs = per_sample_output_grads(model, lin, x, y)
    a = torch.cat([ins, torch.ones(n, T, 1)], -1)
    A_ref = torch.einsum("nti,ntj->ij", a, a) / (n * T)
    G_ref = torch.einsum("nti,ntj->ij", gs, gs) / n
    assert rel(A @ A.T, A_ref) < TOL and rel(G @ G.T, G_ref) < TOL
    assert_outer_products(outers, A_ref, G_ref)
    assert abs(scale - T**0.5) < 1e-12
    assert rel(scale * G @ A.T, J) < TOL


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1, bias=False),
        dict(kernel_size=(3, 2), dilation=(2, 1), padding=(2, 0)),
        dict(kernel_size=2, stride=(1, 2)),
    ],
)
def test_conv_factors_bruteforce(kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, **kw)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
    n = 3
    x, y = torch.randn(n, 2, 6, 7), torch.randint(0, 4, (n,))
    cap = KFactorCapture(model)
    F.cross_entropy(model(x), y).backward()
    A, G, scale = cap.layers[0].batch_matrices()
    outers = outer_products(cap.layers[0])
    J = cap.layers[0].grad_matrix().clone()
    ins, gs = per_sample_output_grads(model, conv, x, y)  # gs: (n, O, Ho, Wo)
    A_ref = 0
    G_ref = 0
    has_bias = conv.bias is not None
    for i in range(n):
        rows, T = conv_patches_bruteforce(ins[i], conv)
        if has_bias:
            rows = torch.cat([rows, torch.ones(T, 1)], 1)
        A_ref = A_ref + rows.T @ rows
        g = gs[i].reshape(gs.shape[1], -1).T  # (T, O), positions in row-major order
        G_ref = G_ref + g.T @ g
    A_ref = A_ref / (n * T)
    G_ref = G_ref / n
    assert rel(A @ A.T, A_ref) < TOL
    assert rel(G @ G.T, G_ref) < TOL
    assert_outer_products(outers, A_ref, G_ref)
    assert A.shape[1] == n * T and abs(scale - T**0.5) < 1e-12
    assert rel(scale * G @ A.T, J) < TOL


def test_training_mode_only_and_removable():
    model = nn.Sequential(nn.Linear(3, 2))
    cap = KFactorCapture(model)
    x = torch.randn(4, 3)
    model.eval()
    model(x)
    assert cap.layers[0].inputs is None
    with torch.no_grad():
        model.train()
        model(x)
    assert cap.layers[0].inputs is None
    model(x).sum().backward()
    assert cap.layers[0].inputs is not None and cap.layers[0].grad_outputs is not None
    cap.remove()
    model(x).sum().backward()
    assert cap.layers[0].inputs is None


def test_unsupported_layers_are_reported():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, padding_mode="zeros"))
    cap = KFactorCapture(model)
    assert [lc.name for lc in cap.layers] == ["2"]
    assert "groups=2" in cap.unsupported["0"]
    assert "BatchNorm2d" in cap.unsupported["1"]


def test_monte_carlo_fisher_records_sampled_labels():
    torch.manual_seed(3)
    lin = nn.Linear(5, 4)
    model = nn.Sequential(lin)
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    cap = KFactorCapture(model)
    logits = model(x)
    gen = torch.Generator().manual_seed(11)
    cap.sampled_fisher_backward(logits, generator=gen)
    G_mc = cap.layers[0].batch_G().clone()
    assert lin.weight.grad is None  # the sampled backward leaves .grad alone
    F.cross_entropy(logits, y).backward()
    assert torch.equal(cap.layers[0].batch_G(), G_mc)  # not overwritten by the real backward
    # reference: the same sampled labels, per-sample gradients of the sampled loss
    gen = torch.Generator().manual_seed(11)
    ys = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
    p = torch.softmax(logits.detach(), -1)
    g = p - F.one_hot(ys, 4).double()  # d CE_i / d logits_i
    assert rel(G_mc @ G_mc.T, g.T @ g / 8) < TOL


def test_patch_scratch_is_shared_and_does_not_leak_between_layers():
    """The conv statistics copy their patches (or, by shifted products, their input) into one
    host block shared by the layers (``Scratch``): each layer's ``A_k A_k^T`` equals the one
    from ``A_k`` (formed apart), in either order of the calls, and the block is reused, not
    reallocated."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).double().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    cap = KFactorCapture(model)
    F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
    c0, c1 = cap.layers[0], cap.layers[1]
    assert c0.scratch is c1.scratch is cap.scratch
    ref = []
    for lc in (c0, c1):
        A = lc.batch_A()
        ref.append(A @ A.T)
    first = c1.batch_outer_A()
    block = cap.scratch._buf
    assert block is not None and block.numel() >= 4 * 36 * 4 * 9  # layer 1's patches (small layers: copied)
    for lc, R in ((c0, ref[0]), (c1, ref[1]), (c0, ref[0])):
        assert rel(lc.batch_outer_A(), R) < 1e-13
    assert rel(first, ref[1]) < 1e-13
    assert cap.scratch._buf is block  # grown once to the largest layer, then reused
    cap.remove()
    assert cap.scratch._buf is None
