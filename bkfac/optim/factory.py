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
:func:`hyper_names` lists what a method uses (a run profile's shared ``kfac`` section is
applied to each K-FAC run where the method uses it).
"""

from __future__ import annotations

import copy
import inspect

import torch.nn as nn

from .kfac import BKFAC, BKFACC, BRKFAC, KFAC, RKFAC, SREKFAC
from .schedules import PAPER_LR, PAPER_OVERSAMPLE, PAPER_PHI, PAPER_RANK, EpochSchedule
from .sgd import SGD

__all__ = ["OPTIMIZERS", "PAPER_DEFAULTS", "paper_defaults", "make_optimizer", "optimizer_class",
           "check_hyper", "hyper_names", "hyper_users", "resolve_hyper", "api_reference", "API_PARTS"]

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
    check_hyper(key, hyper)
    kw = resolve_hyper(key, hyper, defaults)
    if key == "seng" and loader is not None:
        kw["loader"] = loader
    return optimizer_class(key)(model, **kw)


# -- the API reference of the book (appendix "API") -----------------------------------------------

#: The parts of :func:`api_reference`, in book order.
API_PARTS = ("hyper-parameters", "factory", "optimizers", "schedules", "inverses", "linalg")


def _fmt_value(v) -> str:
    if isinstance(v, EpochSchedule):
        return "{" + ", ".join(f"{k}: {x!r}" for k, x in v.items) + "}"
    return repr(v)


def _signature(obj, name: str) -> str:
    """``name(params)`` without annotations, keyword-only marker kept, wrapped when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params, star = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        params.append(str(p.replace(annotation=inspect.Parameter.empty)))
    text = f"{name}({', '.join(params)})"
    return text if len(text) <= 96 else f"{name}(\n    " + ",\n    ".join(params) + ",\n)"


def _entry(obj, qualname: str, method: bool = False) -> list[str]:
    """Name, signature and docstring of ``obj`` (a class's ``__init__`` signature); no heading
    (an output's headings would enter the book's table of contents)."""
    sig = _signature(obj, f"class {qualname}" if inspect.isclass(obj) else qualname)
    out = [f"{'Method' if method else '**'}{' ' if method else ''}`{qualname}`{'' if method else '**'}", "",
           "```python", sig, "```", ""]
    doc = inspect.getdoc(obj)
    return out + (["```text", doc, "```", ""] if doc else [])


def _methods(cls, qualname: str) -> list[str]:
    """The public methods ``cls`` defines itself (not inherited from torch)."""
    out = []
    for name, member in cls.__dict__.items():
        fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if not name.startswith("_") and inspect.isfunction(fn):
            out += _entry(getattr(cls, name), f"{qualname}.{name}", method=True)
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows), ""]


def _hyper_table(names: list[str], paper_head: str) -> list[str]:
    """One row per keyword argument of the optimizers ``names``: its class default, the value
    :func:`make_optimizer` uses (``PAPER_DEFAULTS``), and which of them use it."""
    used = {n: optimizer_class(n).hyper_parameters() for n in names}
    keys: list[str] = []
    for n in names:
        keys += [k for k in used[n] if k not in keys]
    rows = []
    for k in keys:
        users = [n for n in names if k in used[n]]
        default = {_fmt_value(used[n][k]) for n in users}
        paper = {n: _fmt_value(PAPER_DEFAULTS[n][k]) for n in users if k in PAPER_DEFAULTS[n]}
        if len(set(paper.values())) > 1:
            paper_cell = "; ".join(f"{n}: {v}" for n, v in paper.items())
        else:
            paper_cell = next(iter(paper.values()), "")
        row = [f"`{k}`", " / ".join(sorted(default)), paper_cell]
        rows.append(row + ([] if len(names) == 1 else ["all" if len(users) == len(names) else ", ".join(users)]))
    return _table(["argument", "class default", paper_head] + ([] if len(names) == 1 else ["used by"]), rows)


def api_reference(part: str | None = None) -> str:
    """The book's API appendix as Markdown, generated from the code so that it cannot drift:
    ``part`` one of :data:`API_PARTS` (``None``: all). ``'hyper-parameters'``: every
    optimizer's keyword arguments with the class defaults and the paper's
    (:data:`PAPER_DEFAULTS`); the other parts: the signature and docstring of each public
    class (with its public methods) and function of ``bkfac.optim`` (and ``bkfac``'s top level),
    ``bkfac.inverses`` and ``bkfac.linalg``."""
    if part is None:
        return "".join(api_reference(p) for p in API_PARTS)
    if part not in API_PARTS:
        raise ValueError(f"part must be one of {', '.join(API_PARTS)} or None, got {part!r}")
    from .. import inverses, linalg
    from . import kfac as kfac_mod
    from . import schedules

    kfac_names = [n for n in OPTIMIZERS if n not in ("seng", "sgd")]
    lines: list[str] = []
    if part == "hyper-parameters":
        lines += ["**The K-FAC family** (`bkfac.KFAC`, ...; `hyper_names(name)`;",
                  "a blank paper value: the class default):", ""]
        lines += _hyper_table(kfac_names, "paper (`make_optimizer`)")
        lines += ["**SENG** (`bkfac.SENG`, the paper's Appendix D):", ""]
        lines += _hyper_table(["seng"], "paper (`make_optimizer`)")
        lines += ["**SGD** (`bkfac.SGD`; not in the paper, its `make_optimizer` values are ours):", ""]
        lines += _hyper_table(["sgd"], "`make_optimizer`")
    elif part == "factory":
        for fn in (make_optimizer, check_hyper, hyper_names, paper_defaults, resolve_hyper, optimizer_class):
            lines += _entry(fn, f"bkfac.optim.factory.{fn.__name__}")
    elif part == "optimizers":
        lines += _entry(kfac_mod.KFACFamily, "bkfac.optim.KFACFamily") + _methods(kfac_mod.KFACFamily,
                                                                                 "KFACFamily")
        for n in kfac_names:
            cls = optimizer_class(n)
            lines += _entry(cls, f"bkfac.{cls.__name__}")
        lines += _entry(kfac_mod.KFactor, "bkfac.KFactor") + _methods(kfac_mod.KFactor, "KFactor")
        for n in ("seng", "sgd"):
            cls = optimizer_class(n)
            lines += _entry(cls, f"bkfac.{cls.__name__}") + _methods(cls, cls.__name__)
    elif part == "schedules":
        lines += _entry(EpochSchedule, "bkfac.EpochSchedule") + _methods(EpochSchedule, "EpochSchedule")
        lines += [f"- `bkfac.optim.{c}` = `{_fmt_value(getattr(schedules, c))}`"
                  for c in ("PAPER_LR", "PAPER_PHI", "PAPER_RANK", "PAPER_OVERSAMPLE")] + [""]
    elif part == "inverses":
        for n in inverses.__all__:
            obj = getattr(inverses, n)
            if inspect.isclass(obj):
                lines += _entry(obj, f"bkfac.inverses.{n}")
                if n == "FactorInverse":
                    lines += _methods(obj, n)
    else:
        for n in linalg.__all__:
            obj = getattr(linalg, n)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                lines += _entry(obj, f"bkfac.linalg.{n}")
    return "\n".join(lines).rstrip() + "\n\n"
