"""``make_optimizer(name, model, **hyper)`` with the paper's names and default hyper-parameters.

The defaults are those of Sec. 6 and Appendix D of the paper (DESIGN.md lists them):
rho 0.95, batch 256, T_updt 25, weight decay 7e-4, no momentum, clip 0.07 (the per-layer RMS
clip of the author's code), the epoch schedules :data:`PAPER_LR` and :data:`PAPER_PHI`;
k-fac and r-kfac T_inv 250; r-kfac rank 220 (230 from epoch 15), oversampling 10 (+1 from
epoch 22, +1 from 30), 4 power iterations; b-kfac T_brand 125; b-kfac-c T_brand 125,
T_corct 500, phi_corct 0.5; b-r-kfac T_brand 25, T_rsvd 250; the r-kfac part of the b-variants
as r-kfac. The b-variants B-update the first FC layer only (``policy="first-fc"``, Sec. 3.5, 4.2
and 6), r-kfac for every other layer. SENG: Appendix D. SGD is not in the paper's Table 2; its defaults here (lr 0.1,
momentum 0.9, weight decay 5e-4) are ours.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from .kfac import BKFAC, BKFACC, BRKFAC, KFAC, RKFAC, SREKFAC
from .schedules import PAPER_LR, PAPER_OVERSAMPLE, PAPER_PHI, PAPER_RANK
from .sgd import SGD

__all__ = ["OPTIMIZERS", "PAPER_DEFAULTS", "paper_defaults", "make_optimizer", "optimizer_class"]

_KFAC_COMMON = dict(
    rho=0.95, t_updt=25, weight_decay=7e-4, momentum=0.0, clip=0.07, clip_mode="rms",
    lr_schedule=PAPER_LR, damping_phi=PAPER_PHI, rank=PAPER_RANK, oversample=PAPER_OVERSAMPLE,
    power_iters=4, spectrum_continuation=True, fisher="empirical",
)

PAPER_DEFAULTS: dict[str, dict] = {
    "k-fac": {**_KFAC_COMMON, "t_inv": 250},
    "r-kfac": {**_KFAC_COMMON, "t_inv": 250},
    "sre-kfac": {**_KFAC_COMMON, "t_inv": 250},
    "b-kfac": {**_KFAC_COMMON, "t_inv": 250, "t_brand": 125, "policy": "first-fc"},
    "b-r-kfac": {**_KFAC_COMMON, "t_inv": 250, "t_brand": 25, "t_rsvd": 250, "policy": "first-fc"},
    "b-kfac-c": {**_KFAC_COMMON, "t_inv": 250, "t_brand": 125, "t_corct": 500, "phi_crc": 0.5,
                 "policy": "first-fc"},
    "seng": dict(lr=0.05, lr_scheme="exp", lr_decay_rate=6, lr_decay_epoch=75, damping=2.0,
                 weight_decay=1e-2, momentum=0.9, update_freq=200, col_sample_size=128),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
}


def _seng_class():
    from ..baselines import SENG

    return SENG


OPTIMIZERS = {
    "k-fac": KFAC,
    "r-kfac": RKFAC,
    "sre-kfac": SREKFAC,
    "b-kfac": BKFAC,
    "b-r-kfac": BRKFAC,
    "b-kfac-c": BKFACC,
    "seng": None,  # imported lazily: bkfac.baselines.SENG
    "sgd": SGD,
}


def _normalise(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"kfac": "k-fac", "rkfac": "r-kfac", "rs-kfac": "r-kfac", "srekfac": "sre-kfac",
               "bkfac": "b-kfac", "brkfac": "b-r-kfac", "bkfacc": "b-kfac-c"}
    key = aliases.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return key


def optimizer_class(name: str):
    key = _normalise(name)
    return _seng_class() if key == "seng" else OPTIMIZERS[key]


def paper_defaults(name: str) -> dict:
    """A copy of the paper's hyper-parameters for optimizer ``name`` (see module docstring)."""
    return copy.deepcopy(PAPER_DEFAULTS[_normalise(name)])


def make_optimizer(name: str, model: nn.Module, *, defaults: str | None = "paper", **hyper):
    """Build optimizer ``name`` (``"k-fac"``, ``"r-kfac"``, ``"sre-kfac"``, ``"b-kfac"``,
    ``"b-r-kfac"``, ``"b-kfac-c"``, ``"seng"``, ``"sgd"``) for ``model``.

    ``defaults="paper"`` starts from :func:`paper_defaults` and overrides with ``hyper``;
    ``defaults=None`` uses only the class defaults and ``hyper``.
    """
    key = _normalise(name)
    if defaults not in ("paper", None):
        raise ValueError(f"defaults must be 'paper' or None, got {defaults!r}")
    kw = paper_defaults(key) if defaults == "paper" else {}
    if "lr" in hyper and "lr_schedule" not in hyper:
        kw.pop("lr_schedule", None)  # an explicit constant lr replaces the paper's schedule
    kw.update(hyper)
    return optimizer_class(key)(model, **kw)
