"""The paper's network (Sec 6, footnote 21) and a small model for smoke tests.

The paper trains "a modified version of batch-normalized VGG16 (VGG16_bn)": the pooling
kernels shrink from 2x2 to 2x1 so that the first fully connected layer widens 32x, to
"FC layer 0: 16384-in x 2048-out with dropout (p = 0.5), and the final FC layer:
2048-in x 10-out" -- the regime where the K-factor of FC0 (d = 16385) dwarfs the batch and
the rank (d >> n_M + r, Sec 3.5), which the B-updates exploit.

Pools. Footnote 21 says every kernel is 2x1. We alternate 2x1 and 1x2
(kernel = stride = (2, 1), (1, 2), (2, 1), (1, 2), (2, 1)), which keeps the paper's
FC0 width (the spatial area after five pools is 32*32/2^5 = 32 either way) but keeps the
feature maps closer to square: on a 32x32 input the last feature map is **4 high x 8 wide**
(H: 32 -> 16 -> 8 -> 4 at pools 0, 2, 4; W: 32 -> 16 -> 8 at pools 1, 3). ``pools="2x1"``
gives the literal footnote (last map 1 x 32); FC0's input is the same 512 * 32 = 16384.

Width. ``width`` scales every conv's channel count (rounded, at least 1), so FC0 has
``round(512 * width) * 32`` inputs: 16384 at width 1, 4096 at width 0.25 (the ``cpu``
profile keeps FC0 at least 4096 wide so the b-update regime still holds).
``final_pool=False`` drops the fifth pool (it follows the last conv, so the conv cost is
unchanged): FC0 then has ``round(512 * width) * 64`` inputs, e.g. 4096 at width 0.125.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "VGG16_CFG",
    "ModifiedVGG16BN",
    "SmallCNN",
    "paper_model",
    "build_model",
    "fc_layers",
    "count_parameters",
]

#: VGG16's conv configuration ("D" in Simonyan and Zisserman): channels, "M" = a pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

_POOL_KERNELS = {
    "alternate": ((2, 1), (1, 2)),
    "2x1": ((2, 1),),
    "1x2": ((1, 2),),
}


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_dropout(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {v!r}")
    return float(v)


class ModifiedVGG16BN(nn.Module):
    """VGG16_bn with the paper's asymmetric pools (Sec 6, footnote 21).

    ``features``: 13 blocks Conv3x3(pad 1) -> BatchNorm2d -> ReLU(inplace=True), with the
    five max-pools of VGG16 of kernel = stride (2,1) / (1,2) alternating (see the module
    docstring; ``pools="2x1"`` for all (2,1); ``final_pool=False`` omits the fifth). Then flatten (C x 4 x 8 on 32x32 input) and
    the classifier ``fc0`` (Linear, 16384 -> ``fc_hidden`` at width 1) -> ReLU ->
    Dropout(``dropout``) -> ``fc1`` (Linear, ``fc_hidden`` -> ``num_classes``).

    Initialisation as torchvision's VGG: Kaiming-normal (fan_out, ReLU) convs with zero bias,
    BatchNorm weight 1 / bias 0, Linear weights N(0, 0.01^2) with zero bias.

    Attributes:
        fc0, fc1: the two Linear layers (FC0 is where the paper's B-updates apply).
        fc0_in_features: ``round(512 * width) * (H/8) * (W/4)`` for an ``HxW`` input
            (``* 2`` without the final pool).
        feature_shape: ``(C, H', W')`` of the last feature map.
        pool_kernels: the kernel of each pool, in order.
    """

    def __init__(
        self,
        width: float = 1.0,
        fc_hidden: int = 2048,
        num_classes: int = 10,
        dropout: float = 0.5,
        *,
        pools: str = "alternate",
        final_pool: bool = True,
        input_size: tuple[int, int] = (32, 32),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not float(width) > 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        _check_positive_int("fc_hidden", fc_hidden)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        dropout = _check_dropout(dropout)
        if pools not in _POOL_KERNELS:
            raise ValueError(f"pools must be one of {sorted(_POOL_KERNELS)}, got {pools!r}")
        h, w = input_size
        self.width = float(width)
        self.fc_hidden = fc_hidden
        self.num_classes = num_classes
        self.pools = pools
        self.final_pool = bool(final_pool)
        cycle = _POOL_KERNELS[pools]
        layers: list[nn.Module] = []
        kernels: list[tuple[int, int]] = []
        c_in = in_channels
        cfg = list(VGG16_CFG) if final_pool else list(VGG16_CFG[:-1])
        for v in cfg:
            if v == "M":
                k = cycle[len(kernels) % len(cycle)]
                if h % k[0] or w % k[1]:
                    raise ValueError(f"input_size {input_size} does not divide by the pools")
                h, w = h // k[0], w // k[1]
                kernels.append(k)
                layers.append(nn.MaxPool2d(kernel_size=k, stride=k))
            else:
                c_out = _scaled(int(v), width)
                layers += [
                    nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool_kernels: tuple[tuple[int, int], ...] = tuple(kernels)
        self.feature_shape = (c_in, h, w)
        self.fc0_in_features = c_in * h * w
        self.fc0 = nn.Linear(self.fc0_in_features, fc_hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(fc_hidden, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.fc1(self.dropout(self.relu(self.fc0(x))))


class SmallCNN(nn.Module):
    """A tiny CNN for smoke tests, with the paper model's structure in miniature.

    Two blocks Conv3x3 -> BatchNorm2d -> ReLU(inplace=True) -> MaxPool 2x2, then a *wide*
    ``fc0`` (``channels[-1] * 8 * 8`` inputs on 32x32 images: 2048 by default, far more than
    a smoke batch plus a rank, so FC0 sits in the b-update regime d > n_M + r) -> ReLU ->
    Dropout -> ``fc1``.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        fc_hidden: int = 64,
        num_classes: int = 10,
        dropout: float = 0.0,
        *,
        input_size: tuple[int, int] = (32, 32),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 1:
            raise ValueError("channels must list at least one conv width")
        for i, c in enumerate(channels):
            _check_positive_int(f"channels[{i}]", c)
        _check_positive_int("fc_hidden", fc_hidden)
        _check_positive_int("num_classes", num_classes)
        dropout = _check_dropout(dropout)
        h, w = input_size
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            if h % 2 or w % 2:
                raise ValueError(f"input_size {input_size} does not divide by the pools")
            layers += [
                nn.Conv2d(c_in, c, kernel_size=3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, h, w = c, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.fc0_in_features = c_in * h * w
        self.fc0 = nn.Linear(self.fc0_in_features, fc_hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(fc_hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc1(self.dropout(self.relu(self.fc0(x))))


def paper_model(num_classes: int = 10) -> ModifiedVGG16BN:
    """The paper's network: width 1, FC0 16384 -> 2048 (dropout 0.5), FC1 2048 -> 10."""
    return ModifiedVGG16BN(width=1.0, fc_hidden=2048, num_classes=num_classes, dropout=0.5)


_ARCHS: dict[str, type[nn.Module]] = {
    "vgg16_bn_mod": ModifiedVGG16BN,
    "small_cnn": SmallCNN,
}
_ALIASES = {"paper": "vgg16_bn_mod", "vgg16_bn": "vgg16_bn_mod", "smallcnn": "small_cnn"}


def build_model(spec: str | Mapping[str, Any]) -> nn.Module:
    """A model from a name or a profile's ``model`` section.

    ``spec`` is an architecture name (``"vgg16_bn_mod"`` -- alias ``"paper"`` -- or
    ``"small_cnn"``) built with its defaults (the paper's for ``vgg16_bn_mod``), or a mapping
    ``{"arch": name, **constructor keyword arguments}``, e.g.
    ``{"arch": "vgg16_bn_mod", "width": 0.25, "fc_hidden": 1024}``. Unknown names or keys
    raise ``ValueError`` naming them.

    The mapping may also say ``channels_last: true``: the model's 4-d tensors are then stored
    ``torch.channels_last`` (NHWC). The arithmetic is the same; oneDNN's CPU convolutions are
    faster on it (13-16 % per training step on the ``cpu`` model, one thread, when the option was
    added: PERFORMANCE.md as of commit 6059419),
    and convolutions turn an NCHW input into NHWC themselves.
    """
    channels_last = False
    if isinstance(spec, str):
        arch, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "arch" not in spec:
            raise ValueError(f"model spec needs an 'arch' key (one of {sorted(_ARCHS)}), got {dict(spec)}")
        arch = spec["arch"]
        kwargs = {k: v for k, v in spec.items() if k not in ("arch", "channels_last")}
        channels_last = spec.get("channels_last", False)
        if not isinstance(channels_last, bool):
            raise ValueError(f"model channels_last must be true or false, got {channels_last!r}")
    else:
        raise ValueError(f"model spec must be a name or a mapping, got {type(spec).__name__}")
    if not isinstance(arch, str):
        raise ValueError(f"model arch must be a string, got {arch!r}")
    key = _ALIASES.get(arch.lower(), arch.lower())
    if key not in _ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; known: {sorted(_ARCHS)} (aliases {sorted(_ALIASES)})")
    cls = _ARCHS[key]
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown model parameter(s) {unknown} for arch {key!r}; allowed: {sorted(allowed)}")
    for k in ("input_size", "channels"):
        if k in kwargs and isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])  # YAML gives lists
    model = cls(**kwargs)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fc_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The named Linear layers of a model, in order (``{"fc0": ..., "fc1": ...}`` here)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
