"""``make_optimizer(name, model, **hyper)`` with the paper's names and default hyper-parameters.

The defaults are those of Sec. 6 and Appendix D of the paper (DESIGN.md lists them):
rho 0.95, batch 256, T_updt 25, weight decay 7e-4, no momentum, clip 0.07 (the per-layer RMS
clip of the author's code), the epoch schedules :data:`PAPER_LR` and :data:`PAPER_PHI`;
k-fac and r-kfac T_inv 250; r-kfac rank 220 (230 from epoch 15), oversampling 10 (+1 from
epoch 22, +1 from 30), 4 power iterations; b-kfac T_brand 125; b-kfac-c T_brand 125,
T_corct 500, phi_corct 0.5; b-r-kfac T_brand 25, T_rsvd 250; the r-kfac part of the b-variants
as r-kfac. The b-variants B-update the first FC layer only (``policy="first-fc"``, Sec. 3.5, 4.2
and 6), r-kfac for every other layer. SENG: Appendix D. SGD is not in the paper's Table 2; its
defaults here (lr 0.1, momentum 0.9, weight decay 5e-4) are ours. Each method's defaults hold
only the hyper-parameters it uses (k-fac: no rank, oversampling, power iterations or spectrum
continuation).

Hyper-parameters are checked before anything is built, without a model
(:func:`check_hyper`, also called by every optimizer's constructor): a wrong type or value,
``t_rsvd``/``t_corct`` not a multiple of ``t_brand``, ``phi_crc`` outside (0, 1], or a
hyper-parameter the method does not use (``make_optimizer("r-kfac", model, t_brand=5)``)
raise ``ValueError`` naming the argument and, for an unused one, the method.
:func:`hyper_names` lists what a method uses. One exception: k-fac accepts ``rank``,
``oversample`` and ``power_iters`` with a ``UserWarning`` ("k-fac does not use rank ...;
it is ignored") instead of an error, because a run profile's shared ``kfac`` section
(:mod:`bkfac.experiments.profiles`) gives them to every K-FAC run, k-fac included.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch.nn as nn

from .kfac import BKFAC, BKFACC, BRKFAC, KFAC, RKFAC, SREKFAC
from .schedules import PAPER_LR, PAPER_OVERSAMPLE, PAPER_PHI, PAPER_RANK, EpochSchedule
from .sgd import SGD

__all__ = ["OPTIMIZERS", "PAPER_DEFAULTS", "paper_defaults", "make_optimizer", "optimizer_class",
           "check_hyper", "hyper_names", "hyper_users", "resolve_hyper", "api_reference"]

_KFAC_COMMON = dict(
    rho=0.95, t_updt=25, weight_decay=7e-4, momentum=0.0, clip=0.07, clip_mode="rms",
    lr_schedule=PAPER_LR, damping_phi=PAPER_PHI, rank=PAPER_RANK, oversample=PAPER_OVERSAMPLE,
    power_iters=4, spectrum_continuation=True, fisher="empirical",
)
_LOW_RANK = ("rank", "oversample", "power_iters", "spectrum_continuation")

PAPER_DEFAULTS: dict[str, dict] = {
    "k-fac": {**{k: v for k, v in _KFAC_COMMON.items() if k not in _LOW_RANK}, "t_inv": 250},
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
    """The class of optimizer ``name`` (paper names and a few aliases, e.g. ``"bkfac"``)."""
    key = _normalise(name)
    return _seng_class() if key == "seng" else OPTIMIZERS[key]


def paper_defaults(name: str) -> dict:
    """A copy of the paper's hyper-parameters for optimizer ``name`` (see module docstring)."""
    return copy.deepcopy(PAPER_DEFAULTS[_normalise(name)])


def hyper_names(name: str) -> tuple[str, ...]:
    """The keyword arguments optimizer ``name`` uses (its hyper-parameters and options), in
    signature order."""
    return tuple(optimizer_class(name).hyper_parameters())


def hyper_users(key: str) -> list[str]:
    """The optimizers (paper names) that use hyper-parameter ``key``."""
    return [name for name in OPTIMIZERS if key in optimizer_class(name).hyper_parameters()]


def check_hyper(name: str, hyper: dict) -> None:
    """Check hyper-parameters ``hyper`` for optimizer ``name`` without a model (module
    docstring): ``ValueError`` naming the first bad argument, and the method for one it does
    not use. Every optimizer's constructor runs the same checks; profiles run them at load."""
    if not isinstance(hyper, dict):
        raise ValueError(f"hyper must be a dict of hyper-parameters, got {type(hyper).__name__}")
    optimizer_class(name).check_hyper(hyper)


def resolve_hyper(name: str, hyper: dict, defaults: str | None = "paper") -> dict:
    """The keyword arguments :func:`make_optimizer` passes to the class: the paper's defaults
    (``defaults="paper"``) overridden by ``hyper``; an explicit ``lr`` without an
    ``lr_schedule`` replaces the paper's learning-rate schedule."""
    if defaults not in ("paper", None):
        raise ValueError(f"defaults must be 'paper' or None, got {defaults!r}")
    kw = paper_defaults(name) if defaults == "paper" else {}
    if "lr" in hyper and "lr_schedule" not in hyper:
        kw.pop("lr_schedule", None)
    kw.update(hyper)
    return kw


def make_optimizer(name: str, model: nn.Module, *, defaults: str | None = "paper", loader=None, **hyper):
    """Build optimizer ``name`` (``"k-fac"``, ``"r-kfac"``, ``"sre-kfac"``, ``"b-kfac"``,
    ``"b-r-kfac"``, ``"b-kfac-c"``, ``"seng"``, ``"sgd"``) for ``model``.

    ``defaults="paper"`` starts from :func:`paper_defaults` and overrides with ``hyper``;
    ``defaults=None`` uses only the class defaults and ``hyper``. Every hyper-parameter is
    checked first (:func:`check_hyper`). ``loader``: the training data loader; SENG takes the
    length of its per-iteration learning-rate schedule from it (``steps_per_epoch =
    len(loader)``), the other optimizers have no per-iteration schedule and do not use it.
    """
    key = _normalise(name)
    with warnings.catch_warnings():  # the class warns itself, once, for what it accepts but ignores
        warnings.simplefilter("ignore", UserWarning)
        check_hyper(key, hyper)
    kw = resolve_hyper(key, hyper, defaults)
    if key == "seng" and loader is not None:
        kw["loader"] = loader
    return optimizer_class(key)(model, **kw)


# -- the API reference of the book (appendix "API") -----------------------------------------------


def _fmt_value(v) -> str:
    if isinstance(v, EpochSchedule):
        return "{" + ", ".join(f"{k}: {x:g}" if isinstance(x, float) else f"{k}: {x}" for k, x in v.items) + "}"
    if v is inspect.Parameter.empty:
        return "(required)"
    return repr(v)


def _signature(obj, name: str) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = []
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        params.append(str(p.replace(annotation=inspect.Parameter.empty)))
    text = f"{name}({', '.join(params)})"
    if len(text) <= 100:
        return text
    return f"{name}(\n    " + ",\n    ".join(params) + ",\n)"


def _doc(obj) -> str:
    doc = inspect.getdoc(obj)
    return doc if doc else "(no docstring)"


def _public_methods(cls, owner_prefix: str) -> list[tuple[str, object]]:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_"):
            continue
        fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if inspect.isfunction(fn) and (fn.__module__ or "").startswith(owner_prefix):
            out.append((name, getattr(cls, name)))
    return out


def _section(title: str, obj, qualname: str, methods: bool = True) -> list[str]:
    lines = [f"### `{qualname}` {{.unnumbered}}", "", "```python"]
    lines.append(_signature(obj, qualname if not inspect.isclass(obj) else f"class {qualname}"))
    lines += ["```", "", "```text", _doc(obj), "```", ""]
    if methods and inspect.isclass(obj):
        for name, fn in _public_methods(obj, "bkfac"):
            lines += [f"#### `{qualname}.{name}` {{.unnumbered}}", "", "```python",
                      _signature(fn, name), "```", "", "```text", _doc(fn), "```", ""]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out + [""]


def api_reference() -> str:
    """The book's API appendix as Markdown, generated from the code: for every optimizer the
    hyper-parameters it uses with the class defaults and the paper's (:data:`PAPER_DEFAULTS`),
    then the signature and docstring of every public class and function of ``bkfac``
    (``bkfac.__all__``), ``bkfac.optim``, ``bkfac.inverses`` and ``bkfac.linalg``."""
    import bkfac
    from bkfac import inverses, linalg

    from . import kfac as kfac_mod

    names = list(OPTIMIZERS)
    lines = ["## Hyper-parameters {.unnumbered}", "",
             "Each optimizer's keyword arguments (`bkfac.optim.factory.hyper_names`), with the class "
             "default, then the paper's value where `make_optimizer(name, model)` sets one "
             "(`PAPER_DEFAULTS`); '-': the method does not use it (`check_hyper` refuses it).", ""]
    keys: list[str] = []
    for n in names:
        keys += [k for k in optimizer_class(n).hyper_parameters() if k not in keys]
    rows = []
    for k in keys:
        row = [f"`{k}`"]
        for n in names:
            used = optimizer_class(n).hyper_parameters()
            if k not in used:
                row.append("-")
                continue
            cell = _fmt_value(used[k])
            if k in PAPER_DEFAULTS[n] and PAPER_DEFAULTS[n][k] != used[k]:
                cell += f" / paper {_fmt_value(PAPER_DEFAULTS[n][k])}"
            row.append(cell)
        rows.append(row)
    lines += _table(["argument", *names], rows)

    lines += ["## Building and checking optimizers {.unnumbered}", ""]
    for fn in (make_optimizer, paper_defaults, check_hyper, hyper_names, resolve_hyper, optimizer_class):
        lines += _section("", fn, f"bkfac.optim.factory.{fn.__name__}")
    lines += ["## The optimizers {.unnumbered}", ""]
    lines += _section("", kfac_mod.KFACFamily, "bkfac.optim.KFACFamily")
    lines += _section("", kfac_mod.KFactor, "bkfac.optim.KFactor")
    for n in names:
        cls = optimizer_class(n)
        if cls in (KFAC, RKFAC, SREKFAC, BKFAC, BRKFAC, BKFACC):
            lines += _section("", cls, f"bkfac.{cls.__name__}", methods=False)
        else:
            lines += _section("", cls, f"bkfac.{cls.__name__}")
    lines += ["## Schedules {.unnumbered}", ""]
    lines += _section("", EpochSchedule, "bkfac.EpochSchedule")
    for const in ("PAPER_LR", "PAPER_PHI", "PAPER_RANK", "PAPER_OVERSAMPLE"):
        lines += [f"- `bkfac.optim.{const}` = `{_fmt_value(getattr(bkfac.optim, const))}`"]
    lines += ["", "## Factor inverses (`bkfac.inverses`) {.unnumbered}", ""]
    for n in inverses.__all__:
        obj = getattr(inverses, n)
        if inspect.isclass(obj):
            lines += _section("", obj, f"bkfac.inverses.{n}", methods=n == "FactorInverse")
    lines += ["## Linear algebra (`bkfac.linalg`) {.unnumbered}", ""]
    for n in linalg.__all__:
        obj = getattr(linalg, n)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            lines += _section("", obj, f"bkfac.linalg.{n}", methods=False)
    return "\n".join(lines).rstrip() + "\n"
