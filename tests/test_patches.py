"""The conv patch Gram matrix from shifted products (bkfac.curvature.patches) against the
explicit patch matrix of ``F.unfold``, in float64, and the K-factor statistics that use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bkfac.curvature.capture import KFactorCapture
from bkfac.curvature.patches import conv_patch_gram


def explicit(x, kernel_size, padding):
    cols = F.unfold(x, kernel_size, padding=padding)  # n x d x L
    X = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    return X @ X.mT, X.sum(1)


CASES = [
    # (n, C, H, W, kernel, padding)
    (3, 4, 6, 5, (3, 3), (1, 1)),  # "same", the VGG layers
    (2, 3, 7, 7, (3, 3), (0, 0)),  # "valid"
    (2, 2, 8, 6, (5, 5), (2, 2)),
    (2, 3, 6, 9, (3, 1), (1, 0)),  # non-square kernel
    (2, 3, 5, 5, (1, 1), (0, 0)),  # 1 x 1: one shift
    (2, 3, 6, 6, (5, 3), (1, 2)),  # padding neither same nor valid
    (2, 3, 4, 4, (3, 3), (2, 2)),  # more padding than the kernel's reach: rows clipped
    (2, 3, 6, 7, (2, 2), (0, 0)),  # even kernel
    (1, 2, 3, 3, (3, 3), (1, 1)),  # every pixel on an edge
    (2, 5, 1, 8, (1, 3), (0, 1)),  # one row
    (2, 2, 1, 6, (5, 3), (2, 1)),  # kernel rows 0 and 4 never reach the one image row
]


@pytest.mark.parametrize("n,C,H,W,k,p", CASES)
def test_patch_gram_is_the_explicit_one(n, C, H, W, k, p):
    torch.manual_seed(n * 100 + H * 10 + W)
    x = torch.randn(n, C, H, W, dtype=torch.float64)
    for xs in (x, x.to(memory_format=torch.channels_last)):
        XXt, s = conv_patch_gram(xs, k, p)
        ref_XXt, ref_s = explicit(x, k, p)
        assert XXt.shape == ref_XXt.shape
        torch.testing.assert_close(XXt, ref_XXt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)


def test_patch_gram_declines_what_it_cannot_do():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert conv_patch_gram(x, (3, 3), (1, 1)) is None  # no column that every kernel offset takes
    assert conv_patch_gram(x, (5, 5), (0, 0)) is None  # no output position


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("conv,shifted", [
    (dict(kernel_size=3, padding=1), True), (dict(kernel_size=3, padding="same"), True),
    (dict(kernel_size=(3, 5), padding=(0, 2)), True), (dict(kernel_size=2, padding="valid"), True),
    (dict(kernel_size=3, stride=2, padding=1), False),  # stride 2: the patch copy
    (dict(kernel_size=(3, 5), padding=(0, 1)), False),  # no image column every kernel column takes (W = 6)
])
def test_conv_statistics_match_the_patch_matrix(channels_last, bias, conv, shifted):
    """``batch_outer_A`` of a conv layer by every route (the shifted products where they apply,
    the patch copy otherwise) is ``A_k A_k^T`` of the explicitly formed ``A_k`` (``batch_A``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, bias=bias, **conv)).double()
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    cap = KFactorCapture(model)
    lc = cap.layers[0]
    model(x).sum().backward()
    A = lc.batch_A()
    for route in ("auto", "shifted", "patches"):
        torch.testing.assert_close(lc.batch_outer_A(route=route), A @ A.mT, rtol=1e-12, atol=1e-12)
    assert (lc._shifted_patch_gram(lc.inputs) is not None) == shifted


def test_auto_route_takes_the_shifted_products_where_they_pay(monkeypatch):
    """``route='auto'``: shifted products for a layer with ``d >= SHIFTED_MIN_D`` and enough
    work, the patch copy for a small one (``SHIFTED_MIN_*``); an unknown route is an error."""
    import bkfac.curvature.capture as capture_mod

    calls = []
    real = capture_mod.conv_patch_gram
    monkeypatch.setattr(capture_mod, "conv_patch_gram", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(16, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()
    x = torch.randn(8, 16, 32, 32, dtype=torch.float64)
    cap = KFactorCapture(model)
    model(x).sum().backward()
    big, small = cap.layers
    assert big.d_A - 1 == 144 >= capture_mod.SHIFTED_MIN_D and 144**2 * 8 * 32 * 32 >= capture_mod.SHIFTED_MIN_WORK
    A = big.batch_A()
    torch.testing.assert_close(big.batch_outer_A(), A @ A.mT, rtol=1e-12, atol=1e-12)
    assert calls == [(8, 16, 32, 32)]
    small.batch_outer_A()
    assert len(calls) == 1  # d = 36 < SHIFTED_MIN_D: the patch copy
    with pytest.raises(ValueError, match="route"):
        big.batch_outer_A(route="fast")
