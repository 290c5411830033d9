"""The paper's modified VGG16_bn (Sec 6, footnote 21) and the smoke-test CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bkfac.experiments.models import (
    ModifiedVGG16BN,
    SmallCNN,
    build_model,
    count_parameters,
    fc_layers,
    paper_model,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed 2-core machine OpenMP's spinning
    threads make small conv steps 10-50x slower; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# VGG16 "D", written out independently of the module's constant
_CONVS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _expected_params(width: float, fc_hidden: int, num_classes: int = 10) -> int:
    chans = [max(1, round(c * width)) for c in _CONVS]
    total, c_in = 0, 3
    for c in chans:
        total += 9 * c_in * c + c + 2 * c  # conv weight + bias, BN weight + bias
        c_in = c
    fc0_in = c_in * 4 * 8
    return total + fc0_in * fc_hidden + fc_hidden + fc_hidden * num_classes + num_classes


def test_paper_model_matches_the_paper():
    m = paper_model()
    assert isinstance(m.fc0, nn.Linear) and isinstance(m.fc1, nn.Linear)
    assert (m.fc0.in_features, m.fc0.out_features) == (16384, 2048)  # "16384-in x 2048-out"
    assert (m.fc1.in_features, m.fc1.out_features) == (2048, 10)  # "2048-in x 10-out"
    assert m.dropout.p == 0.5
    assert m.feature_shape == (512, 4, 8)
    assert count_parameters(m) == _expected_params(1.0, 2048)
    assert 48.0e6 < count_parameters(m) < 48.6e6  # 14.7M conv (VGG16) + 33.6M FC0 + FC1
    assert list(fc_layers(m)) == ["fc0", "fc1"]
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == _CONVS
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.features) == 13
    relus = [x for x in m.modules() if isinstance(x, nn.ReLU)]
    assert len(relus) == 14 and all(r.inplace for r in relus)


def test_pools_alternate_and_shapes_follow():
    m = ModifiedVGG16BN(width=0.125, fc_hidden=32)
    pools = [x for x in m.features if isinstance(x, nn.MaxPool2d)]
    kernels = [tuple(p.kernel_size) for p in pools]
    assert kernels == [(2, 1), (1, 2), (2, 1), (1, 2), (2, 1)]
    assert all(tuple(p.stride) == tuple(p.kernel_size) for p in pools)
    assert m.pool_kernels == tuple(kernels)
    shapes = []
    hooks = [p.register_forward_hook(lambda mod, i, o: shapes.append(tuple(o.shape[2:]))) for p in pools]
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [(16, 32), (16, 16), (8, 16), (8, 8), (4, 8)]  # last map: 4 high x 8 wide
    literal = ModifiedVGG16BN(width=0.125, fc_hidden=32, pools="2x1")
    assert literal.feature_shape == (64, 1, 32) and literal.fc0.in_features == 2048
    four = ModifiedVGG16BN(width=0.125, fc_hidden=32, final_pool=False)
    assert four.pool_kernels == ((2, 1), (1, 2), (2, 1), (1, 2))
    assert four.feature_shape == (64, 8, 8) and four.fc0.in_features == 4096
    assert four(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # same conv stack (the dropped pool follows the last conv): same conv parameters
    conv_params = lambda mod: sum(p.numel() for p in mod.features.parameters())  # noqa: E731
    assert conv_params(four) == conv_params(m)


@pytest.mark.parametrize(
    "width, fc_hidden, fc0_in",
    [(0.125, 512, 2048), (0.25, 1024, 4096), (0.5, 512, 8192), (0.001, 16, 32)],
)
def test_width_scaling(width, fc_hidden, fc0_in):
    m = ModifiedVGG16BN(width=width, fc_hidden=fc_hidden)
    assert m.fc0.in_features == m.fc0_in_features == fc0_in
    assert m.fc0.out_features == fc_hidden
    assert count_parameters(m) == _expected_params(width, fc_hidden)
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert all(c.out_channels >= 1 for c in convs)


def test_cpu_profile_width_keeps_fc0_wide():
    """The `cpu` profile's model keeps FC0 in the B-update regime d >> n_M + r (batch 256, rank
    220) on its input side, with the paper's output width 2048, stored NHWC."""
    from bkfac.experiments.profiles import load_profile

    p = load_profile("cpu")
    m = build_model(p.model)
    assert (m.fc0.in_features, m.fc0.out_features) == (4096, 2048)
    assert m.fc0.in_features + 1 > 8 * (p.train["batch_size"] + p.raw["kfac"]["rank"])
    assert m.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_forward_backward_and_learning():
    torch.manual_seed(0)
    m = ModifiedVGG16BN(width=0.125, fc_hidden=64, dropout=0.0)
    x = torch.randn(6, 3, 32, 32)
    y = torch.arange(6) % 10
    out = m(x)
    assert out.shape == (6, 10)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.fc0.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    first = float(loss.detach())
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    m = ModifiedVGG16BN(width=0.125, fc_hidden=64)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.equal(a, b)


@torch.no_grad()
def test_init_like_torchvision_vgg():
    torch.manual_seed(0)
    m = ModifiedVGG16BN(width=0.25, fc_hidden=1024)
    assert abs(float(m.fc0.weight.std()) - 0.01) < 5e-4 and float(m.fc0.bias.abs().max()) == 0.0
    conv = m.features[0]
    fan_out = conv.out_channels * 9
    assert abs(float(conv.weight.std()) - (2.0 / fan_out) ** 0.5) < 0.25 * (2.0 / fan_out) ** 0.5


def test_small_cnn():
    m = SmallCNN()
    assert m.fc0.in_features == 2048 >= 512
    out = m(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert list(fc_layers(m)) == ["fc0", "fc1"]
    assert build_model({"arch": "small_cnn", "channels": [8, 16], "fc_hidden": 32}).fc0.in_features == 1024


def test_build_model_names_and_errors():
    assert isinstance(build_model("small_cnn"), SmallCNN)
    m = build_model({"arch": "vgg16_bn_mod", "width": 0.125, "fc_hidden": 128, "dropout": 0.3})
    assert isinstance(m, ModifiedVGG16BN) and m.fc0.out_features == 128 and m.dropout.p == 0.3
    with pytest.raises(ValueError, match="resnet"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="hidden_size"):
        build_model({"arch": "vgg16_bn_mod", "hidden_size": 3})
    with pytest.raises(ValueError, match="arch"):
        build_model({"width": 0.25})
    with pytest.raises(ValueError, match="width"):
        ModifiedVGG16BN(width=0)
    with pytest.raises(ValueError, match="dropout"):
        ModifiedVGG16BN(width=0.125, dropout=1.0)
    with pytest.raises(ValueError, match="pools"):
        ModifiedVGG16BN(width=0.125, pools="2x2")
    with pytest.raises(ValueError, match="fc_hidden"):
        SmallCNN(fc_hidden=0)


def test_build_paper_alias_is_the_paper_model():
    m = build_model("paper")
    assert m.fc0.in_features == 16384 and m.fc0.out_features == 2048 and m.fc1.out_features == 10


_CL_SPEC = {"arch": "vgg16_bn_mod", "width": 0.0625, "fc_hidden": 48, "dropout": 0.0, "final_pool": False}


def _four_kfac_steps(name, channels_last, device="cpu"):
    """Parameters after four float64 steps of ``name`` (statistics and inverses every step or two)
    on the small vgg16_bn_mod with the given storage, on ``device``; returned on the CPU."""
    import warnings

    import bkfac

    torch.manual_seed(0)
    xs = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randint(0, 10, (8,)) for _ in range(4)]
    torch.manual_seed(1)
    m = build_model({**_CL_SPEC, "channels_last": channels_last}).double().to(device)
    conv = m.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.is_contiguous() != channels_last
    extra = dict(t_brand=2, rank=6, oversample=2) if name == "b-kfac" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.make_optimizer(name, m, defaults=None, lr=0.05, t_updt=1, t_inv=2, **extra)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x.to(device)), y.to(device)).backward()
        opt.step()
    return [p.detach().cpu().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", ["k-fac", "b-kfac"])
def test_channels_last_model_trains_like_nchw(name):
    """``channels_last: true`` changes the storage only: in float64, four K-FAC steps (statistics,
    inverse and B-updates every step or two) give the NCHW model's parameters to rounding."""
    for a, b in zip(_four_kfac_steps(name, False), _four_kfac_steps(name, True)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="channels_last"):
        build_model({**_CL_SPEC, "channels_last": "yes"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_channels_last_model_on_cuda_trains_like_nchw_on_cpu():
    """The NHWC model on CUDA (cuDNN convolutions, the K-FAC unfold of NHWC activations) follows the
    NCHW model on the CPU through four float64 b-kfac steps."""
    for a, b in zip(_four_kfac_steps("b-kfac", False), _four_kfac_steps("b-kfac", True, "cuda")):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
