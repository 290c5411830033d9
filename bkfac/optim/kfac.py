"""The K-FAC family as ``torch.optim.Optimizer`` classes, named as in the paper.

=================  ==========================  ==================================================
class              paper name                  factor-inverse method (per factor, Sec. 3.5)
=================  ==========================  ==================================================
:class:`KFAC`      k-fac (Martens+Grosse)      ``eigh`` every T_inv
:class:`RKFAC`     r-kfac (rs-kfac, Alg. 1)    ``rsvd`` every T_inv; ``eigh`` if d <= r + r_o
:class:`SREKFAC`   sre-kfac                    ``srevd`` every T_inv; ``eigh`` if d <= r + r_o
:class:`BKFAC`     b-kfac (Alg. 4)             B-updates where ``policy`` says; else as r-kfac
:class:`BRKFAC`    b-r-kfac (Alg. 5)           B-updates + RSVD overwrite where ``policy`` says
:class:`BKFACC`    b-kfac-c (Alg. 6-7)         B-updates + light correction where ``policy`` says
=================  ==========================  ==================================================

The B-update ``policy`` of the b-variants (Sec. 3.5, 4.2 and 6): ``'mixed'`` (class default)
B-updates every factor with ``d > n_M + r``; ``'first-fc'`` (the paper's, used by
:func:`~bkfac.optim.factory.make_optimizer`'s paper defaults) the factors of the first
``nn.Linear`` layer with ``d > r`` only; ``'all'`` every factor with ``d > r``. The other
factors run r-kfac (``eigh`` where ``d <= r + r_o``). ``n_M`` is the number of columns of the
layer's batch matrices (batch size times output positions per sample, times the number of
processes). :meth:`KFACFamily.describe` says, before the first step and given a batch size,
which method each factor will use and why.

One step ``k`` (``optimizer.step()`` after ``loss.backward()``), phases timed by
``optimizer.timer`` (:class:`~bkfac.optim.timer.PhaseTimer`):

1. **statistics** -- build the batch matrices ``A_k``, ``G_k`` of the layers whose factor
   representations want them this step and update the EA factors (eq. 5, every T_updt);
2. **inverse** -- update each factor's representation on its own schedule;
3. **precondition** -- ``S = (Gamma + lam_G I)^{-1} Mat(g) (A + lam_A I)^{-1}`` with
   ``lam = phi * lambda_max`` of the (possibly approximate) representation (Sec. 6) and
   spectrum continuation (Sec. 3.5) when enabled. For layers whose A-factor is on the
   B-update path the step is built with Algorithm 8 from ``A_k`` and ``G_k`` when that is
   exact (empirical Fisher, one forward/backward since the last step: then
   ``Mat(g) = scale * G_k A_k^T``); otherwise with Alg. 1 lines 16-17. Such a layer's
   backward does not form its weight gradient at all (Alg. 8 line 2, ``alg8_backward``:
   :meth:`~bkfac.curvature.capture.KFactorCapture.defer_weight_grad`), which saves the
   ``d_G x d_A x n_M`` product the step would otherwise pay twice;
4. **rest** -- clipping (the paper's per-layer RMS clip ``nu = min(1, clip / rms(S))``,
   or KL clipping ``nu = min(1, sqrt(kl_clip / (lr^2 sum S . g)))``), weight decay
   added after preconditioning, optional momentum, the update ``p -= lr * d_p``.
   Parameters of unsupported layers (BatchNorm, ...) get the plain SGD step with the same
   learning rate, weight decay and momentum (one ``UserWarning`` per model lists them).

Mixed precision: the model may run under ``torch.autocast`` (bfloat16 or float16); the
captured inputs and output gradients are cast to the factor dtype (default: the parameters',
float32) before any statistic is formed, and ``step()`` runs with autocast off, so factors,
decompositions and preconditioning stay in that dtype (``tests/test_autocast.py``). With
``torch.amp.GradScaler``, ``scaler.step(optimizer)`` hands the step the loss scale and the
overflow flag (:func:`amp_loss_scale`; the class sets ``_step_supports_amp_scaling``): a step
whose scaled backward overflowed changes nothing (parameters, factors, step count), as
GradScaler skips ``step()``; otherwise the gradients and the captured output gradients
(``G_k``, empirical Fisher) are divided by the scale here. ``scaler.unscale_(optimizer)``
before ``scaler.step`` is refused (``RuntimeError``): the optimizer clips by its own ``clip``.

Hyper-parameters are checked when the optimizer is built (:meth:`KFACFamily.check_hyper`):
a bad type or value, a period that does not divide another (``t_rsvd``, ``t_corct`` must be
multiples of ``t_brand``) or a hyper-parameter the method does not use raises ``ValueError``
naming it. The K-factors are read with :meth:`KFACFamily.k_factors` (:class:`KFactor`).

Usage::

    opt = bkfac.BKFAC(model, lr=0.1)
    print(opt.describe_table(batch_size=256, input_shape=(3, 32, 32)))  # the plan, before any step
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    A = opt.k_factor("fc0", "A").dense()   # a K-factor as a dense matrix
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_open_unit, check_positive_int
from ..curvature import KFactorCapture, LayerCapture
from ..inverses import (
    INVERSE_METHODS,
    BrandCorrectedInverse,
    BrandInverse,
    BrandRSVDInverse,
    CholeskyInverse,
    EighInverse,
    FactorInverse,
    RSVDInverse,
    SREVDInverse,
)
from ..linalg import damped_inverse_apply, spectrum_continuation
from .comm import LocalComm
from .schedules import EpochSchedule, as_schedule
from .timer import PhaseTimer

__all__ = ["KFACFamily", "KFAC", "RKFAC", "SREKFAC", "BKFAC", "BRKFAC", "BKFACC", "KFactor", "POLICIES"]

#: The B-update policies (module docstring): which factors of the b-variants take B-updates.
POLICIES = ("mixed", "first-fc", "all")


def _value(x, epoch):
    return x(epoch) if callable(x) else x


def lc_positions(lc: LayerCapture) -> float:
    """Positions per sample T of a layer's last batch (``scale = sqrt(T)`` in eq. (20))."""
    g = lc.grad_outputs
    return g.numel() / (g.shape[0] * lc.d_G)


def _max_value(x):
    return max(x.values()) if isinstance(x, EpochSchedule) else x


# -- hyper-parameter checks (model-free; KFACFamily.check_hyper, the SGD and SENG classes) --------


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_number(name: str, v, *, low: float = 0.0, low_open: bool = False, high: float | None = None,
                 high_open: bool = True) -> None:
    """``v`` must be a finite real number in ``[low, high)`` (``low_open``/``high_open`` choose the
    ends); ``ValueError`` naming ``name`` otherwise."""
    if not _is_real(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v < low or (low_open and v == low) or (high is not None and (v > high or (high_open and v == high))):
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{name} must lie in {lo}, {hi}, got {v!r}")


def check_int(name: str, v, low: int = 0) -> None:
    """``v`` must be an ``int`` (not a bool) ``>= low``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def check_choice(name: str, v, options: tuple) -> None:
    if v not in options:
        names = [repr(o) for o in options]
        raise ValueError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {v!r}")


def check_schedule(name: str, v, check) -> None:
    """A number, or an epoch schedule (``{epoch: value}`` / :class:`EpochSchedule`) of numbers,
    each passing ``check(name, value)``; any other callable of the epoch is taken as is."""
    if isinstance(v, dict):
        try:
            v = EpochSchedule(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from None
    if isinstance(v, EpochSchedule):
        for x in v.values():
            check(name, x)
    elif not callable(v):
        check(name, v)


def check_lr_schedule(name: str, v) -> None:
    if v is not None:
        check_schedule(name, v, check_number)


def _lr(name, v):
    if not (_is_real(v) and v >= 0):
        raise ValueError(f"{name} must be a non-negative number, got {v!r}")


def _phi(name, v):
    if not (_is_real(v) and v > 0):
        raise ValueError(f"{name} must be positive (lambda = phi * lambda_max), got {v!r}")


def _weight_decay(name, v):
    if not (_is_real(v) and v >= 0):
        raise ValueError(f"{name} must be non-negative, got {v!r}")


def _clip_value(name, v):
    if v is not None and not (_is_real(v) and v > 0):
        raise ValueError(f"{name} must be positive (or None), got {v!r}")


def _dtype(name, v):
    if v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point):
        raise ValueError(f"{name} must be None or a floating-point torch.dtype, got {v!r}")


def _params(name, v):
    if v is not None and (isinstance(v, (str, bytes, Tensor)) or not hasattr(v, "__iter__")):
        raise ValueError(f"{name} must be None or an iterable of parameters / parameter groups, got {type(v).__name__}")


def _exclude(name, v):
    if not (isinstance(v, (tuple, list)) and all(isinstance(t, type) for t in v)):
        raise ValueError(f"{name} must be a tuple of module types, got {v!r}")


_COMM_API = ("world_size", "all_reduce_gradients", "gather_columns", "is_owner", "sync_representations")


def _comm(name, v):
    if v is not None:
        missing = [a for a in _COMM_API if not hasattr(v, a)]
        if missing:
            raise ValueError(f"{name} must provide {', '.join(_COMM_API)} (like bkfac.optim.comm.LocalComm); "
                             f"{type(v).__name__} lacks {', '.join(missing)}")


def _seed(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {v!r}")


#: Checks of every keyword argument of the K-FAC family (model-free), by name.
FAMILY_CHECKS = {
    "lr": _lr,
    "damping_phi": lambda n, v: check_schedule(n, v, _phi),
    "rho": check_open_unit,
    "t_updt": check_positive_int,
    "t_inv": check_positive_int,
    "rank": lambda n, v: check_schedule(n, v, check_positive_int),
    "oversample": lambda n, v: check_schedule(n, v, check_int),
    "power_iters": check_int,
    "weight_decay": _weight_decay,
    "momentum": lambda n, v: check_number(n, v, high=1.0),
    "clip": _clip_value,
    "clip_mode": lambda n, v: check_choice(n, v, ("rms", "kl", None)),
    "fisher": lambda n, v: check_choice(n, v, ("empirical", "mc")),
    "loss_reduction": lambda n, v: check_choice(n, v, ("mean", "sum")),
    "spectrum_continuation": check_bool,
    "linear_time": check_bool,
    "alg8_backward": check_bool,
    "policy": lambda n, v: check_choice(n, v, POLICIES),
    "factor_init": lambda n, v: check_choice(n, v, ("batch", "identity")),
    "min_damping": lambda n, v: check_number(n, v, low_open=True),
    "seed": _seed,
    "factor_dtype": _dtype,
    "lr_schedule": check_lr_schedule,
    "params": _params,
    "exclude": _exclude,
    "timer": check_bool,
    "sync_timer": check_bool,
    "check_finite": check_bool,
    "comm": _comm,
    # the methods' own
    "inverse": lambda n, v: check_choice(n, v, ("eigh", "cholesky")),
    "t_brand": check_positive_int,
    "t_rsvd": check_positive_int,
    "t_corct": check_positive_int,
    "phi_crc": lambda n, v: check_number(n, v, low_open=True, high=1.0, high_open=False),
}


def signature_defaults(*functions) -> dict:
    """``{name: default}`` of the keyword-only parameters of ``functions`` (in order)."""
    out = {}
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                out[p.name] = p.default
    return out


# -- things shared with SGD and SENG ---------------------------------------------------------------

_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def warn_once_per_model(model: nn.Module, message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` the first time ``message`` is issued for ``model`` (an
    optimizer built again on the same model says nothing new); ``warnings`` filters apply as
    usual on top."""
    seen = _WARNED.setdefault(model, set())
    if message not in seen:
        seen.add(message)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def nonfinite_gradient(model: nn.Module, param_groups: list, step: int, pending: list | None = None,
                       who: str = "") -> None:
    """Raise ``FloatingPointError`` naming the first parameter with a NaN/inf gradient (one host
    sync for all gradients). With a ``pending`` list the check is appended as ``(ok, fail)`` to
    be flushed later instead (:meth:`KFACFamily._flush`)."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    ok = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum())

    def fail() -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        for g in param_groups:
            for p in g["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(
                        f"{who}non-finite gradient in parameter '{names.get(id(p), '?')}' at step {step}: the loss "
                        "or the backward pass produced NaN/inf (lower the learning rate?); no parameter was updated"
                    )

    if pending is not None:
        pending.append((ok, fail))
    elif not bool(ok):
        fail()


def amp_loss_scale(optimizer: torch.optim.Optimizer, who: str) -> tuple[bool, float | None]:
    """``(skip, loss_scale)`` of this step under ``torch.amp.GradScaler`` (optimizers with
    ``_step_supports_amp_scaling``: K-FAC family, SENG).

    ``GradScaler.step(optimizer)`` hands such an optimizer the tensors ``grad_scale`` (the
    factor the loss was multiplied by) and ``found_inf`` as attributes instead of unscaling
    the gradients itself, because the optimizer's captured output gradients carry the same
    factor and only the optimizer can divide it out of them. ``skip`` is true when the scaled
    backward overflowed (the step must change nothing, as GradScaler skips ``step()``);
    ``loss_scale`` is ``None`` outside GradScaler. One host sync, only under GradScaler.
    ``RuntimeError`` when ``scaler.unscale_(optimizer)`` ran before ``scaler.step``: the
    gradients are then unscaled but the scale of the captured output gradients is unknown."""
    found_inf = getattr(optimizer, "found_inf", None)
    grad_scale = getattr(optimizer, "grad_scale", None)
    if found_inf is None and grad_scale is None:
        return False, None
    if grad_scale is None:
        raise RuntimeError(
            f"{who}: scaler.unscale_(optimizer) was called before scaler.step(optimizer); this optimizer "
            "divides the loss scale out of the gradients and of its captured output gradients itself, so "
            "call scaler.step(optimizer) directly (it clips with its own clip settings)")
    if found_inf is not None and bool(found_inf):
        return True, None
    return False, float(grad_scale)


def autocast_off(param_groups: list):
    """A context in which autocast is off for the parameters' device type (a step called
    inside ``torch.autocast`` keeps its factors, decompositions and products in the factor
    dtype); a no-op context where autocast is not on."""
    p = next((p for g in param_groups for p in g["params"]), None)
    dev = p.device.type if p is not None else "cpu"
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def unscale_gradients(param_groups: list, loss_scale: float) -> None:
    """Divide every gradient of ``param_groups`` by ``loss_scale`` in place (what
    ``GradScaler.unscale_`` does for optimizers that leave it to the scaler)."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    if grads and loss_scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / loss_scale)


def check_param_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Check a ``torch.optim`` state dict against ``optimizer`` before anything is loaded: the
    parameter groups and their sizes, and the shape of every per-parameter state tensor
    (momentum buffers) against its parameter. ``ValueError`` naming the parameter otherwise."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        raise ValueError("state_dict needs 'state' and 'param_groups' entries (torch.optim format)")
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer {len(mine)}")
    names = {id(p): n for n, p in getattr(optimizer, "model", nn.Module()).named_parameters()}
    by_index = {}
    for i, (saved, group) in enumerate(zip(groups, mine)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"parameter group {i} of the state_dict has {len(saved['params'])} parameters, "
                             f"this optimizer's has {len(group['params'])}")
        by_index.update(zip(saved["params"], group["params"]))
    for index, entry in state_dict["state"].items():
        p = by_index.get(index)
        if p is None:
            raise ValueError(f"state_dict has state for parameter index {index!r}, which no group lists")
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"state_dict {key} of parameter '{names.get(id(p), index)}' has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(p.shape)}: saved for another model")


def _check_generator_state(where: str, state) -> None:
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"{where}: generator state must be a uint8 tensor, got {type(state).__name__}")
    try:
        torch.Generator().set_state(state)
    except RuntimeError as exc:
        raise ValueError(f"{where}: not a generator state ({exc})") from None


@dataclass
class _Layer:
    capture: LayerCapture
    inv_A: FactorInverse | None = None
    inv_G: FactorInverse | None = None
    linear_time: bool = False  # Alg. 8 eligible (A-factor on the B-update path)
    n_M: int | None = None
    step_buffer: Tensor | None = None  # Alg. 8's d_G x d_A step, reused every step


@dataclass(frozen=True)
class KFactor:
    """One K-factor of one layer as the optimizer holds it (:meth:`KFACFamily.k_factors`).

    ``factor`` is ``'A'`` (the layer's input side) or ``'G'`` (the output-gradient side,
    Gamma). ``ea`` is the dense EA factor of eq. (5) where the method keeps one (``None``
    for pure b-kfac factors, which never form a ``dim x dim`` matrix), updated every
    ``t_updt`` steps. ``(U, d)`` is the representation the step inverts (``U`` with
    orthonormal columns, ``d`` descending), refreshed on the method's own schedule;
    ``None`` for ``KFAC(inverse='cholesky')``, which keeps a Cholesky factor instead.
    The step applies the inverse of
    ``U diag(d) U^T + identity I + damping I + shift (I - U U^T)``:
    ``damping = max(phi * lambda_max, min_damping)`` with ``lambda_max = d_1 + identity``,
    ``shift = min(d)`` under spectrum continuation (Sec. 3.5), else 0. ``identity`` is the
    weight of ``I`` the factor still carries from an identity start (``factor_init=
    'identity'``: ``rho^u`` after ``u`` updates), 0 from the first-batch start; ``ea`` holds
    the data part of the EA factor, whose identity weight is ``ea_identity``. Tensors are the
    optimizer's own: read, do not modify. ``dense()`` gives a new dense matrix.
    """

    layer: str
    factor: str
    dim: int
    method: str
    ea: Tensor | None
    U: Tensor | None
    d: Tensor | None
    damping: float
    shift: float
    n_M: int | None
    identity: float = 0.0
    ea_identity: float = 0.0

    def lowrank(self) -> Tensor:
        """``U diag(d) U^T`` (dim x dim) of the representation."""
        if self.U is None:
            raise ValueError(f"factor {self.factor} of layer '{self.layer}' ({self.method}) has no (U, d) "
                             "representation; use dense()")
        return (self.U * self.d) @ self.U.mT

    def dense(self) -> Tensor:
        """The K-factor as a new dense matrix: the EA factor where the method keeps one, else
        ``U diag(d) U^T`` of the representation (with its identity part, if any)."""
        M = self.ea.clone() if self.ea is not None else self.lowrank()
        s = self.ea_identity if self.ea is not None else self.identity
        if s:
            M.diagonal().add_(s)
        return M

    def damped(self) -> Tensor:
        """The dense matrix whose inverse the step applies (docstring above)."""
        if self.U is None:
            raise ValueError(f"factor {self.factor} of layer '{self.layer}' ({self.method}) has no (U, d) "
                             "representation")
        M = self.lowrank() - self.shift * (self.U @ self.U.mT)
        M.diagonal().add_(self.damping + self.shift + self.identity)
        return M


def check_names(cls, hyper: dict) -> None:
    """Every key of ``hyper`` must be a hyper-parameter optimizer class ``cls`` uses: else
    ``ValueError`` naming the key and the method (and which methods do use it)."""
    used = cls.hyper_parameters()
    alg = cls.algorithm
    for key in hyper:
        if key in used:
            continue
        if key in cls._unused:
            raise ValueError(f"{alg} does not use {key}: {cls._unused[key]}")
        from .factory import hyper_users

        users = [n for n in hyper_users(key) if n != alg]
        if users:
            raise ValueError(f"{alg} does not use {key} (a hyper-parameter of {', '.join(users)})")
        raise ValueError(f"{alg} got an unknown hyper-parameter {key!r}; its hyper-parameters are: "
                         f"{', '.join(used)}")


class KFACFamily(torch.optim.Optimizer):
    """Common machinery of the K-FAC family. Use one of the subclasses.

    Keyword-only hyper-parameters (paper values in :data:`bkfac.optim.factory.PAPER_DEFAULTS`;
    :meth:`hyper_parameters` lists those a method uses, with the class defaults):

    lr: learning rate (group ``lr``; ``torch.optim.lr_scheduler`` works on it), or use
        ``lr_schedule`` (an :class:`EpochSchedule`, ``{epoch: lr}`` or callable of the epoch,
        applied by :meth:`set_epoch`; it replaces ``lr``).
    damping_phi: ``phi`` of ``lambda = phi * lambda_max`` per factor (number or epoch schedule).
    rho: EA decay of eq. (5), in (0, 1).      t_updt: statistics period T_updt.
    t_inv: period of eigh/RSVD/SREVD recomputations (k-fac, r-kfac, and the r-kfac part of
        the b-variants).
    rank, oversample, power_iters: RSVD/SREVD target rank (also the b-kfac truncation rank),
        oversampling and power iterations; ``rank``/``oversample`` may be epoch schedules.
        Not used by k-fac.
    weight_decay, momentum: applied after preconditioning and clipping; momentum in [0, 1).
    clip: the paper's clip parameter (per-layer RMS of the step); ``clip_mode`` ``'rms'``
        (paper), ``'kl'`` (KL clipping, ``clip`` is then the KL bound), or ``None``.
    fisher: ``'empirical'`` (true labels, default) or ``'mc'`` (eq. 2; call
        ``optimizer.capture.sampled_fisher_backward(logits)`` before ``loss.backward()`` on
        steps where :meth:`wants_statistics` is true).
    loss_reduction: ``'mean'`` (default) or ``'sum'`` over the batch.
    spectrum_continuation: Sec. 3.5 (default on; not used by k-fac, where it is the identity).
    linear_time: use Alg. 8 where exact (b-variants).
    alg8_backward: Alg. 8 line 2 as well (default on): the training backward of a layer
        preconditioned with Alg. 8 returns ``G_k`` and ``A_k`` and does not form ``Mat(g_k)``,
        so that layer's ``weight.grad`` is not computed (``None`` after
        ``zero_grad(set_to_none=True)``; the bias gradient is). Where a step cannot use Alg. 8
        after all (the layer ran more than once: gradient accumulation, weight sharing) the
        weight gradient is formed from the recorded calls, as autograd would have; discard a
        gradient before the step with this optimizer's :meth:`zero_grad` (``model.zero_grad()``
        cannot reach a deferred one). Off with the Monte-Carlo Fisher and for a
        ``DistributedDataParallel`` model (which waits for every gradient). ``False``:
        PyTorch's backward, ``weight.grad`` as usual (e.g. to log its norm).
    policy: which factors take B-updates (b-variants): ``'mixed'`` (default, ``d > n_M + r``),
        ``'first-fc'`` (the paper's: the first Linear layer only) or ``'all'`` (``d > r``, for
        studies); see the module docstring.
    factor_init: where the EA of eq. (5) starts: ``'batch'`` (default, the paper's eq. 5:
        ``M_0 = M_0 M_0^T``) or ``'identity'`` (the author's code: ``M_{-1} = I``, the first
        batch weighted ``1 - rho``; the identity part ``rho^u I`` is carried as a number beside
        each representation and joins the damping, see :mod:`bkfac.inverses.methods`). One
        process only.
    min_damping: absolute floor of lambda.
    seed: seed of the optimizer's generators (RSVD sketches, correction columns). Each factor
        has its own generator, seeded from ``(seed, layer index, 'A'|'G')``, so its sketches do
        not depend on the order in which, or the process on which, the factors are updated
        (data-parallel runs give the same result on any world size).
    factor_dtype: dtype of the K-factor state (default: the parameters' dtype).
    params: optional ``torch.optim``-style parameter groups (default: all of ``model``).
    exclude: module types to leave to SGD even if supported.
    timer: time the phases (``optimizer.timer``); ``sync_timer`` synchronises CUDA for it.
    check_finite: raise ``FloatingPointError`` naming the layer on a non-finite gradient.
    comm: a :class:`~bkfac.optim.comm.LocalComm`-like object (``bkfac.distributed`` provides
        the ``torch.distributed`` one); default: one process.

    Every argument is checked before anything is built (:meth:`check_hyper`): a wrong type or
    value, or a hyper-parameter the method does not use, raises ``ValueError`` naming it.
    """

    algorithm = "k-fac-family"
    #: hyper-parameters of the family this method does not use: ``{name: why}`` (an error)
    _unused: dict = {}
    #: ``torch.amp.GradScaler`` hands the step the loss scale and the overflow flag
    #: (:func:`amp_loss_scale`): the captured output gradients carry the scale too
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        *,
        lr=0.1,
        damping_phi=0.1,
        rho: float = 0.95,
        t_updt: int = 1,
        t_inv: int = 1,
        rank=220,
        oversample=10,
        power_iters: int = 4,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        clip: float | None = 0.07,
        clip_mode: str | None = "rms",
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        spectrum_continuation: bool = True,
        linear_time: bool = True,
        alg8_backward: bool = True,
        policy: str = "mixed",
        factor_init: str = "batch",
        min_damping: float = 1e-8,
        seed: int = 0,
        factor_dtype: torch.dtype | None = None,
        lr_schedule=None,
        params=None,
        exclude: tuple = (),
        timer: bool = True,
        sync_timer: bool = False,
        check_finite: bool = True,
        comm=None,
        **method_kw,
    ):
        values = {k: v for k, v in locals().items() if k in _FAMILY_DEFAULTS}
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        type(self)._check_values({**values, **method_kw})
        lr_schedule = as_schedule(lr_schedule)
        lr0 = _value(lr_schedule, 1) if lr_schedule is not None else lr
        _lr("lr" if lr_schedule is None else "lr_schedule(1)", lr0)
        damping_phi = as_schedule(damping_phi)
        rank, oversample = as_schedule(rank), as_schedule(oversample)

        defaults = dict(lr=lr0, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params if params is not None else [p for p in model.parameters() if p.requires_grad], defaults)
        self.model = model
        self.damping_phi = damping_phi
        self.rho, self.t_updt, self.t_inv = rho, t_updt, t_inv
        self.rank, self.oversample, self.power_iters = rank, oversample, power_iters
        self.clip, self.clip_mode = clip, clip_mode
        self.fisher = fisher
        self.continuation = spectrum_continuation
        self.linear_time = linear_time
        self.alg8_backward = alg8_backward
        self.policy = policy
        self.factor_init = factor_init
        self.min_damping = min_damping
        self.lr_schedule = lr_schedule
        self.factor_dtype = factor_dtype
        self.check_finite = check_finite
        self.comm = comm if comm is not None else LocalComm()
        if factor_init == "identity" and self.comm.world_size > 1:
            raise ValueError("factor_init='identity' runs on one process only (the identity weight is not "
                             f"synchronised across ranks); this comm has world_size {self.comm.world_size}")
        self.method_kw = method_kw
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.seed = seed
        self.capture = KFactorCapture(model, reduction=loss_reduction, skip=tuple(exclude))
        if self.capture.unsupported:
            names = ", ".join(f"{k} ({v})" for k, v in self.capture.unsupported.items())
            warn_once_per_model(model, f"K-FAC optimizers (bkfac): plain SGD step for parameters of: {names}",
                                stacklevel=3)
        self.layers = [_Layer(lc) for lc in self.capture.layers]
        self._kfac_params = {id(p) for L in self.layers for p in L.capture.params}
        group_of = {}
        for g in self.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
        for L in self.layers:
            for p in L.capture.params:
                if id(p) not in group_of:
                    raise ValueError(f"parameter of layer '{L.capture.name}' is not in any parameter group")
        self._group_of = group_of
        self.steps = 0
        self.epoch = 1
        self.timer = PhaseTimer(enabled=timer, sync=sync_timer)
        self._initialized = False
        bind = getattr(self.comm, "bind", None)
        if bind is not None:  # e.g. the torch.distributed comm checks hyper-parameters across ranks
            bind(self)

    # -- hyper-parameters --------------------------------------------------------------------------
    @classmethod
    def hyper_parameters(cls) -> dict:
        """``{name: class default}`` of every keyword argument this method uses."""
        out = signature_defaults(KFACFamily.__init__, cls.__init__)
        for key in cls._unused:
            out.pop(key, None)
        return out

    @classmethod
    def check_hyper(cls, hyper: dict) -> None:
        """Check keyword arguments ``hyper`` without a model: each must be one this method uses,
        of the right type and range; ``t_rsvd``/``t_corct`` must be multiples of ``t_brand``
        (the class default where ``hyper`` does not set it). ``ValueError`` naming the argument
        (and the method, for one it does not use)."""
        check_names(cls, hyper)
        cls._check_values(hyper)

    @classmethod
    def _check_values(cls, hyper: dict) -> None:
        for key, value in hyper.items():
            check = FAMILY_CHECKS.get(key)
            if check is not None:
                check(key, value)
        full = {**cls.hyper_parameters(), **hyper}
        if full.get("clip_mode") is not None and not (_is_real(full.get("clip")) and full["clip"] > 0):
            raise ValueError(f"clip must be positive when clip_mode={full['clip_mode']!r}, got {full.get('clip')!r}")
        for key in ("t_rsvd", "t_corct"):
            if key in full and "t_brand" in full and full[key] % full["t_brand"]:
                raise ValueError(f"{key}={full[key]} must be a multiple of t_brand={full['t_brand']}")

    def _check_given(self, given: dict) -> None:
        """For the subclasses' ``__init__``: the keyword arguments the caller passed."""
        check_names(type(self), given)

    # -- method policy (Sec. 3.5) ----------------------------------------------------------------
    def _lowrank_class(self):
        return RSVDInverse

    def _brand_class(self):
        return None

    def _plan(self, dim: int, n_M: int | None, first_fc: bool = False) -> tuple[type[FactorInverse] | None, str]:
        """``(method class, why)`` of a factor of dimension ``dim`` with ``n_M`` batch columns:
        B-updates where the ``policy`` says (module docstring), RSVD/SREVD where
        ``d > r + r_o``, exact ``eigh`` for factors too small for a low-rank form. The class is
        ``None`` only where the choice needs ``n_M`` and it is not known (``'mixed'``)."""
        r, ro = _max_value(self.rank), _max_value(self.oversample)
        brand = self._brand_class()
        if brand is not None and dim > r:
            if self.policy == "mixed":
                if n_M is None:
                    return None, "d > n_M + r? (needs the batch size)"
                if dim > n_M + r:
                    return brand, "d > n_M + r"
            elif self.policy == "first-fc":
                if first_fc:
                    return brand, "first FC, d > r"
            else:
                return brand, "d > r"
        low = self._lowrank_class()
        if low is not None and dim > r + ro:
            if brand is not None and self.policy == "mixed":
                return low, "d <= n_M + r, d > r + r_o"
            if brand is not None and self.policy == "first-fc":
                return low, "not first FC, d > r + r_o"
            return low, "d > r + r_o"
        return EighInverse, "d <= r + r_o"

    def _factor_generator(self, index: int, fac: str) -> torch.Generator:
        """The generator of factor ``fac`` of the ``index``-th layer (model order), seeded from
        ``(seed, index, fac)`` -- independent of layer names (a DDP wrapper prefixes them)."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + 2 * index + (fac == "G")) % (2**63 - 1))
        return g

    def _make_inverse(self, cls, dim: int, index: int = 0, fac: str = "A") -> FactorInverse:
        kw = dict(rho=self.rho, t_updt=self.t_updt, dtype=self.factor_dtype,
                  generator=self._factor_generator(index, fac), identity_start=self.factor_init == "identity")
        if cls in (EighInverse, CholeskyInverse):
            inv = cls(dim, t_inv=self.t_inv, **kw)
        elif cls in (RSVDInverse, SREVDInverse):
            inv = cls(dim, t_inv=self.t_inv, rank=self.rank, oversample=self.oversample,
                      power_iters=self.power_iters, **kw)
        else:
            extra = {k: v for k, v in self.method_kw.items()}
            inv = cls(dim, rank=self.rank, oversample=self.oversample, power_iters=self.power_iters, **extra, **kw)
        inv.epoch = self.epoch
        return inv

    def _first_fc_index(self) -> int | None:
        """Index (in ``self.layers``) of the first ``nn.Linear`` layer in model order."""
        return next((i for i, L in enumerate(self.layers) if L.capture.kind == "linear"), None)

    def _init_layers(self) -> None:
        first_fc = self._first_fc_index()
        for i, L in enumerate(self.layers):
            lc = L.capture
            if lc.inputs is None:
                continue
            if lc.grad_outputs is None:
                continue
            local = round(lc_positions(lc) * lc.grad_outputs.shape[0])
            n_M = local * self.comm.world_size  # the global batch's columns (Sec. 3.5 policy)
            L.n_M = n_M
            L.inv_A = self._make_inverse(self._plan(lc.d_A, n_M, i == first_fc)[0], lc.d_A, i, "A")
            L.inv_G = self._make_inverse(self._plan(lc.d_G, n_M, i == first_fc)[0], lc.d_G, i, "G")
            self._set_linear_time(L)
        self._initialized = True

    def _set_linear_time(self, L: _Layer) -> None:
        """Alg. 8 for layer ``L`` where its A-factor is B-updated, with line 2 (no weight
        gradient in the backward) where ``alg8_backward`` allows it (class docstring)."""
        from torch.nn.parallel import DistributedDataParallel

        L.linear_time = self.linear_time and isinstance(L.inv_A, BrandInverse)
        defer = (L.linear_time and self.alg8_backward and self.fisher == "empirical"
                 and not isinstance(self.model, DistributedDataParallel))
        if defer or L.capture.defers_weight_grad:
            self.capture.defer_weight_grad(L.capture, defer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; the weight gradients Alg. 8 line 2 deferred are
        dropped with the others (``model.zero_grad()`` cannot reach them: use this one when a
        gradient is discarded between a backward and the step)."""
        super().zero_grad(set_to_none)
        for L in self.layers:
            L.capture.drop_deferred_grads()

    def _uses_alg8(self, L: _Layer) -> bool:
        """Whether this step preconditions ``L`` with Alg. 8: exact only when the gradient is
        ``scale * G_k A_k^T`` of the recorded batch (empirical Fisher, one forward and one
        backward through the layer)."""
        lc = L.capture
        return (L.linear_time and self.fisher == "empirical"
                and lc.forward_calls == 1 and lc.backward_calls == 1)

    # -- what each factor uses, before or after the first step ---------------------------------------
    def _positions(self, input_shape) -> list[float]:
        """Output positions per sample ``T`` of every layer, from one forward of a zero sample of
        ``input_shape`` in eval mode without gradients (nothing of the model changes)."""
        shape = tuple(input_shape)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"input_shape must be the shape of one sample (positive ints), got {input_shape!r}")
        p = next((q for q in self.model.parameters() if q.is_floating_point()), None)
        x = torch.zeros((1, *shape), dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else None)
        found: dict[int, float] = {}

        def hook(i, d_G):
            return lambda module, inputs, out: found.__setitem__(i, out.numel() / (out.shape[0] * d_G))

        handles = [L.capture.module.register_forward_hook(hook(i, L.capture.d_G)) for i, L in enumerate(self.layers)]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        except Exception as exc:  # noqa: BLE001 - a wrong input_shape shows as any error of the forward
            raise ValueError(f"input_shape={shape}: the model's forward on a zero sample of that shape failed "
                             f"({type(exc).__name__}: {exc})") from None
        finally:
            for m, mode in modes:
                m.training = mode
            for h in handles:
                h.remove()
        missing = [L.capture.name for i, L in enumerate(self.layers) if i not in found]
        if missing:
            raise ValueError(f"layers {missing} were not called by the model's forward")
        return [found[i] for i in range(len(self.layers))]

    def _planned_n_M(self, batch_size: int, input_shape) -> list[int]:
        check_positive_int("batch_size", batch_size)
        if input_shape is not None:
            positions = self._positions(input_shape)
        elif all(L.capture.kind == "linear" for L in self.layers):
            positions = [1.0] * len(self.layers)  # Linear layers on (batch, features) inputs
        else:
            raise ValueError("describe(batch_size=...) needs input_shape, the shape of one input sample "
                             "(e.g. (3, 32, 32)): n_M of a Conv2d layer is the batch size times its output positions")
        return [round(T * batch_size) * self.comm.world_size for T in positions]

    def _width(self, cls, dim: int, n_M: int | None) -> int | None:
        """Columns of the representation the step applies: ``d`` (eigh), ``r`` (RSVD/SREVD),
        the working width ``r + n_M`` (B-updates; truncated to ``r`` before the next one)."""
        r = _value(self.rank, self.epoch)
        if cls is None:
            return None
        if issubclass(cls, BrandInverse):
            return None if n_M is None else min(dim, r + n_M)
        if issubclass(cls, RSVDInverse):
            return min(r, dim)
        return dim

    def describe(self, batch_size: int | None = None, *, input_shape=None) -> list[dict]:
        """One row per K-factor, then one per unsupported layer (plain SGD step).

        Keys: ``layer``, ``kind``, ``factor``, ``dim``, ``n_M`` (batch columns), ``method`` (the
        :class:`~bkfac.inverses.FactorInverse` method), ``why`` (the rule that chose it: the
        module docstring's policy), ``rank`` (r at the current epoch; ``None`` for full-rank
        methods), ``width`` (columns of the representation the step applies: ``r + n_M`` for
        B-updates), ``alg8`` (the step uses Algorithm 8), ``state_bytes`` (memory of the
        factor's state, 0 before it exists) and ``planned`` (``True``: not built yet).

        Before the first step the methods are planned with the rule the first step applies:
        ``batch_size`` (per process) gives ``n_M``, with ``input_shape`` (one sample's shape,
        e.g. ``(3, 32, 32)``) for the output positions of convolutions (a forward of a zero
        sample in eval mode; Linear-only models without it: 2-D inputs). Without
        ``batch_size`` the methods whose choice depends on ``n_M`` (``policy='mixed'``) are
        ``None``. After the first step the rows describe the factors as built.
        """
        planned_n_M = None
        if batch_size is not None and any(L.inv_A is None for L in self.layers):
            planned_n_M = self._planned_n_M(batch_size, input_shape)
        first_fc = self._first_fc_index()
        rows = []
        for i, L in enumerate(self.layers):
            lc = L.capture
            built = L.inv_A is not None
            n_M = L.n_M if built else (planned_n_M[i] if planned_n_M is not None else None)
            for fac, inv, dim in (("A", L.inv_A, lc.d_A), ("G", L.inv_G, lc.d_G)):
                cls, why = self._plan(dim, n_M, i == first_fc)
                if inv is not None:
                    cls = type(inv)
                brand = cls is not None and issubclass(cls, BrandInverse)
                rows.append(dict(
                    layer=lc.name, kind=lc.kind, factor=fac, dim=dim, n_M=n_M,
                    method=None if cls is None else cls.method, why=why,
                    rank=_value(self.rank, self.epoch) if cls is not None and issubclass(cls, (RSVDInverse, BrandInverse))
                    else None,
                    width=self._width(cls, dim, n_M),
                    alg8=(L.linear_time if built else self.linear_time and brand) and fac == "A",
                    state_bytes=inv.state_bytes() if inv is not None else 0,
                    planned=inv is None,
                ))
        for name, why in self.capture.unsupported.items():
            rows.append(dict(layer=name, kind="unsupported", factor="-", dim=None, n_M=None, method="SGD",
                             why=why, rank=None, width=None, alg8=False, state_bytes=0, planned=False))
        return rows

    def describe_table(self, batch_size: int | None = None, *, input_shape=None) -> str:
        """:meth:`describe` as an aligned text table, under a line naming the method, policy,
        rank and batch (columns: ``d`` dimension, ``n_M`` batch columns, ``r`` rank, ``width``
        of the representation the step applies, ``Alg. 8``, ``MiB`` of state)."""
        rows = self.describe(batch_size, input_shape=input_shape)
        planned = any(r["planned"] for r in rows)
        head = [self.algorithm]
        if self._brand_class() is not None:
            head.append(f"policy {self.policy}")
        if self._lowrank_class() is not None or self._brand_class() is not None:
            head.append(f"r = {_value(self.rank, self.epoch)} (epoch {self.epoch})")
        if planned:
            head.append("planned before the first step" + (f" for batch size {batch_size}" if batch_size else ""))
        cols = [("layer", "<"), ("factor", "^"), ("d", ">"), ("n_M", ">"), ("method", "<"), ("why", "<"),
                ("r", ">"), ("width", ">"), ("Alg. 8", "^"), ("MiB", ">")]

        def cells(r):
            blank = lambda v: "" if v is None else str(v)  # noqa: E731
            mib = "" if r["planned"] or r["kind"] == "unsupported" else f"{r['state_bytes'] / 2**20:.2f}"
            method = "?" if r["method"] is None else r["method"]
            return [r["layer"], r["factor"], blank(r["dim"]), blank(r["n_M"]), method, r["why"], blank(r["rank"]),
                    blank(r["width"]), "yes" if r["alg8"] else "", mib]

        body = [cells(r) for r in rows]
        widths = [max(len(c[0]), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]
        fmt = lambda vals: "  ".join(f"{v:{a}{w}}" for v, (_, a), w in zip(vals, cols, widths)).rstrip()  # noqa: E731
        header = fmt([c[0] for c in cols])
        return "\n".join([", ".join(head), header, "-" * len(header), *(fmt(b) for b in body)])

    # -- the K-factors -----------------------------------------------------------------------------
    def k_factors(self) -> dict[tuple[str, str], KFactor]:
        """Every K-factor, ``{(layer name, 'A' | 'G'): KFactor}`` in model order (see
        :class:`KFactor`: the dense EA factor where kept, the representation ``(U, d)``, the
        damping and continuation shift the step uses, ``dense()`` on request). The factors
        exist from the first ``step()`` on (:meth:`describe` plans them before); a layer
        without a gradient at that step has none yet. In data-parallel runs ``ea`` is kept by
        the factor's owner rank only (``None`` elsewhere); the representation is on every rank."""
        if not self._initialized:
            raise RuntimeError("no K-factors yet: they are built by the first step() "
                               "(describe(batch_size=...) says what each will use)")
        return {(L.capture.name, fac): self._k_factor(L, fac, inv)
                for L in self.layers for fac, inv in (("A", L.inv_A), ("G", L.inv_G)) if inv is not None}

    def k_factor(self, layer: str, factor: str) -> KFactor:
        """The K-factor ``factor`` (``'A'`` or ``'G'``) of layer ``layer`` (its name in
        ``model.named_modules()``); see :meth:`k_factors`."""
        check_choice("factor", factor, ("A", "G"))
        facs = self.k_factors()
        if (layer, factor) not in facs:
            known = sorted({name for name, _ in facs})
            raise ValueError(f"no K-factor {factor} for layer {layer!r}; layers with K-factors: {', '.join(known)}")
        return facs[(layer, factor)]

    def _damping(self, d: Tensor, identity: float = 0.0):
        """``lambda = max(phi * lambda_max, min_damping)``, ``lambda_max = d_1 + identity``."""
        phi = _value(self.damping_phi, self.epoch)
        if not d.numel():
            return torch.tensor(max(identity * phi, self.min_damping))
        return torch.clamp((d[0] + identity) * phi, min=self.min_damping)

    def _k_factor(self, L: _Layer, fac: str, inv: FactorInverse) -> KFactor:
        U, d = inv.U, inv.d
        damping = shift = None
        if U is not None:
            damping = float(self._damping(d, inv.identity))
            shift = float(d.min()) if self.continuation and d.numel() else 0.0
        elif isinstance(inv, CholeskyInverse) and inv.lam_max is not None:
            damping = max((float(inv.lam_max) + inv.identity) * _value(self.damping_phi, self.epoch),
                          self.min_damping)
            shift = 0.0
        return KFactor(layer=L.capture.name, factor=fac, dim=inv.dim, method=inv.method, ea=inv.factor, U=U, d=d,
                       damping=damping, shift=shift, n_M=L.n_M, identity=inv.identity, ea_identity=inv.ea_identity)

    # -- epochs, statistics schedule -----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the current (1-indexed) epoch for the epoch schedules (phi, rank, oversampling, lr)."""
        check_positive_int("epoch", epoch)
        self.epoch = epoch
        for L in self.layers:
            for inv in (L.inv_A, L.inv_G):
                if inv is not None:
                    inv.epoch = epoch
        if self.lr_schedule is not None:
            for g in self.param_groups:
                g["lr"] = _value(self.lr_schedule, epoch)

    def wants_statistics(self) -> bool:
        """Whether the coming step updates statistics (for the Monte-Carlo Fisher backward)."""
        return self.steps % self.t_updt == 0 or not self._initialized or any(
            (L.inv_G is not None and L.inv_G.wants_batch(self.steps)) for L in self.layers
        )

    def remove_hooks(self) -> None:
        """Take the capture hooks off the model (it is an ordinary model again)."""
        self.capture.remove()

    # -- the step ---------------------------------------------------------------------------------
    def _damped(self, inv: FactorInverse):
        """``(U, d, lam)`` such that the step applies ``(U diag(d) U^T + lam I)^{-1}``: the
        damping, spectrum continuation (Sec. 3.5) and an identity start's ``identity I``."""
        U, d = inv.representation()
        lam = self._damping(d, inv.identity)
        if self.continuation:
            d, lam = spectrum_continuation(d, lam, check=False)
        if inv.identity:
            lam = lam + inv.identity
        return U, d, lam

    def _apply_inverse(self, inv: FactorInverse, X: Tensor, side: str, phi: float) -> Tensor:
        """One side of Alg. 1 lines 16-17: the method's own dense route where it has one
        (:meth:`FactorInverse.damped_apply`), else its representation ``(U, d)``."""
        out = inv.damped_apply(X, side, phi, self.min_damping)
        if out is None:
            U, d, lam = self._damped(inv)
            out = damped_inverse_apply(U, d, lam, X.to(U.dtype), side=side, check=False)
        return out

    def _checked(self, M: Tensor, lc: LayerCapture, what: str, k: int, outer: bool = False,
                 pending: list | None = None) -> Tensor:
        """``M`` when finite, else ``FloatingPointError`` naming the layer. For an outer product
        (``outer=True``) the diagonal tells: a NaN or inf anywhere in the batch reaches it.
        With a ``pending`` list the check is deferred to :meth:`_flush` (no host sync here).
        A batch matrix is probed by its sum (one pass, no temporary: a NaN or inf anywhere
        makes it non-finite); a sum that overflowed on finite entries is told apart by the
        entry-wise check before anything is raised."""
        if self.check_finite:
            ok = torch.isfinite(M.diagonal()).all() if outer else torch.isfinite(M.sum())

            def fail() -> None:
                if not outer and bool(torch.isfinite(M).all()):
                    return  # the sum overflowed; every entry is finite
                raise FloatingPointError(f"non-finite {what} in layer '{lc.name}' at step {k}")

            if pending is not None:
                pending.append((ok, fail))
            elif not bool(ok):
                fail()
        return M

    @staticmethod
    def _flush(pending: list) -> None:
        """One host sync for all deferred finiteness checks; on failure the first failing check
        (in the order they were made: gradients first) raises its own error."""
        if pending and not bool(torch.stack([ok for ok, _ in pending]).all()):
            for ok, fail in pending:
                if not bool(ok):
                    fail()

    def _check_grads(self, pending: list | None = None) -> None:
        nonfinite_gradient(self.model, self.param_groups, self.steps, pending)

    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC step after ``loss.backward()`` (module docstring: statistics, inverse,
        precondition, rest); ``closure`` re-evaluates the loss as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, loss_scale = amp_loss_scale(self, self.algorithm)
        if skip:  # GradScaler: the scaled backward overflowed; this step changes nothing
            self.capture.clear()
            if self.fisher == "mc":
                self.capture.resume_recording()
            return loss
        for L in self.layers:  # Alg. 8 line 2 deferred a weight gradient this step needs after all
            if L.capture.deferred and not self._uses_alg8(L):
                L.capture.form_weight_grad()
        if loss_scale is not None:
            unscale_gradients(self.param_groups, loss_scale)
            if self.fisher == "empirical":  # the Monte-Carlo backward was not scaled
                self.capture.set_loss_scale(loss_scale)
        with autocast_off(self.param_groups):
            self._step()
        return loss

    def _step(self) -> None:
        k = self.steps
        timer = self.timer
        timer.start_step()
        updates: dict[int, Tensor | tuple[Tensor, Tensor]] = {}
        with timer.phase("statistics"):
            self.comm.all_reduce_gradients([p for g in self.param_groups for p in g["params"]])
            if not self._initialized:
                self._init_layers()
            # The finiteness checks of the gradients and of every batch (A_k, G_k or their outer
            # products) share one host sync at the end of this phase; the factors take their
            # batches only after it, so a step with a non-finite batch changes no factor.
            pending: list = []
            observations: list = []  # (method, batch) handed to the factors after the checks
            if self.check_finite:
                self._check_grads(pending)
            batches = {}
            for L in self.layers:
                lc = L.capture
                use_alg8 = self._uses_alg8(L)
                if L.inv_A is None or (lc.module.weight.grad is None and not (use_alg8 and lc.deferred)):
                    continue  # no gradient reached the layer this step
                dtype = self.factor_dtype or lc.module.weight.dtype
                A = G = None
                # factors that only need M_k M_k^T get it without M_k (one process: the columns of
                # the other ranks' batches are not here)
                local = self.comm.world_size == 1
                outer_A = local and not use_alg8 and L.inv_A.accepts_outer
                outer_G = local and not use_alg8 and L.inv_G.accepts_outer
                if L.inv_A.wants_batch(k) and outer_A:
                    observations.append((L.inv_A.observe_outer, self._checked(
                        lc.batch_outer_A(dtype), lc, "input activations", k, True, pending)))
                elif L.inv_A.wants_batch(k) or use_alg8:
                    A = self._checked(self.comm.gather_columns(lc.batch_A(dtype)), lc, "input activations", k,
                                      pending=pending)
                    if L.inv_A.wants_batch(k) and self.comm.is_owner((lc.name, "A")):
                        observations.append((L.inv_A.observe, A))
                if L.inv_G.wants_batch(k) and outer_G:
                    observations.append((L.inv_G.observe_outer, self._checked(
                        lc.batch_outer_G(self.capture.reduction, dtype), lc, "output gradients", k, True, pending)))
                elif L.inv_G.wants_batch(k) or use_alg8:
                    G = self._checked(self.comm.gather_columns(lc.batch_G(self.capture.reduction, dtype)), lc,
                                      "output gradients", k, pending=pending)
                    if L.inv_G.wants_batch(k) and self.comm.is_owner((lc.name, "G")):
                        observations.append((L.inv_G.observe, G))
                batches[id(L)] = (A, G, use_alg8)
            self._flush(pending)
            for observe, M in observations:
                observe(k, M)
        with timer.phase("inverse"):
            invs = {}
            for L in self.layers:
                if id(L) in batches:
                    for fac, inv in (("A", L.inv_A), ("G", L.inv_G)):
                        key = (L.capture.name, fac)
                        if self.comm.is_owner(key):
                            inv.refresh(k)
                        invs[key] = inv
            self.comm.sync_representations(invs)
        inner: dict[int, Tensor] = {}  # <S, Mat(g)> of the Alg. 8 layers, for KL clipping
        with timer.phase("precondition"):
            for L in self.layers:
                if id(L) not in batches:
                    continue
                A, G, use_alg8 = batches[id(L)]
                if use_alg8:
                    # Algorithm 8: S = (Gamma^-1 G_k)(A^-1 A_k)^T * scale, never forming Mat(g).
                    # (gathered columns: A and G both carry 1/sqrt(W), so the local scale is kept)
                    UA, dA, lamA = self._damped(L.inv_A)
                    UG, dG, lamG = self._damped(L.inv_G)
                    scale = L.capture.grad_scale(self.capture.reduction)
                    G_hat = damped_inverse_apply(UG, dG, lamG, G, side="left", check=False)
                    A_hat = damped_inverse_apply(UA, dA, lamA, A, side="left", check=False)
                    S = self._alg8_step(L, G_hat.mul_(scale), A_hat)
                    if self.clip_mode == "kl":
                        # <G_hat A_hat^T, scale G A^T> from two n x n products: Mat(g) is not formed
                        inner[id(L)] = scale * ((G_hat.mT @ G) * (A_hat.mT @ A)).sum()
                else:
                    # Alg. 1 lines 16-17; a full-rank method applies its own dense route where it
                    # pays off (k-fac: one GEMM a side with a cached inverse), else (U, d) is applied
                    phi = _value(self.damping_phi, self.epoch)
                    S = self._apply_inverse(L.inv_A, L.capture.grad_matrix(), "right", phi)
                    S = self._apply_inverse(L.inv_G, S, "left", phi)
                updates[id(L)] = S
        with timer.phase("rest"):
            self._apply(updates, self._clip(updates, inner))
            for L in self.layers:
                for inv in (L.inv_A, L.inv_G):
                    if inv is not None:
                        inv.end_step()
            self.capture.clear()
            if self.fisher == "mc":
                self.capture.resume_recording()
        self.steps += 1

    @staticmethod
    def _alg8_step(L: _Layer, G_hat: Tensor, A_hat: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Alg. 8 line 9, ``S = G_hat A_hat^T``, written into a buffer of the layer kept between
        steps (no fresh ``d_G x d_A`` allocation a step: 32 MiB for the ``cpu`` model's FC0).
        With a bias the step is returned as ``(S_W, S_b)``, the weight block ``d_G x (d_A - 1)``
        and the bias column, each contiguous: the weight block's rows are then ``d_A - 1``
        long (4096 for the ``cpu`` model's FC0, 16384 for the paper's), where a ``d_A``-long row
        (4097 floats, not a multiple of 64 bytes) slows MKL's GEMM to about half its rate
        (:func:`~bkfac.linalg.brand.aligned_width`). Valid until the next step."""
        d_G, d_A = G_hat.shape[0], A_hat.shape[0]
        buf = L.step_buffer
        if buf is None or buf.numel() != d_G * d_A or buf.dtype != G_hat.dtype or buf.device != G_hat.device:
            buf = L.step_buffer = G_hat.new_empty(d_G * d_A)
        if not L.capture.has_bias:
            return torch.mm(G_hat, A_hat.mT, out=buf.view(d_G, d_A))
        D = d_A - 1
        S_W = torch.mm(G_hat, A_hat[:D].mT, out=buf[: d_G * D].view(d_G, D))
        S_b = torch.mv(G_hat, A_hat[D], out=buf[d_G * D:])
        return S_W, S_b

    def _clip(self, updates: dict[int, Tensor | tuple[Tensor, Tensor]],
              inner: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
        """Each layer's clip factor ``nu`` (a 0-dim tensor: no host sync), by layer key of
        ``updates`` (the step in matrix form ``S``, or ``(S_W, S_b)`` from :meth:`_alg8_step`);
        empty without clipping. :meth:`_apply` scales the step by it as it updates the weights,
        so the step is not rewritten for the clip alone. KL clipping takes ``<S, Mat(g)>`` of
        a layer from ``inner`` where given (Alg. 8 layers, whose gradient may not be formed),
        else from the layer's gradient."""
        if self.clip_mode is None or not updates:
            return {}
        if self.clip_mode == "rms":
            # The paper's clip parameter: per layer, scale the step so its RMS is <= clip.
            out = {}
            for key, S in updates.items():
                parts = S if isinstance(S, tuple) else (S,)
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in parts]))
                rms = norm / math.sqrt(sum(t.numel() for t in parts))
                out[key] = torch.clamp(self.clip / torch.clamp(rms, min=1e-30), max=1.0)
            return out
        # KL clipping (Ba et al. 2017 style): nu = min(1, sqrt(kl / (lr^2 * sum S.g))).
        vg = 0.0
        for L in self.layers:
            if id(L) in updates:
                lr = self._group_of[id(L.capture.module.weight)]["lr"]
                S = updates[id(L)]
                if inner and id(L) in inner:
                    sg = inner[id(L)]
                else:
                    sg = (S * L.capture.grad_matrix().to(S.dtype)).sum()
                vg = vg + sg * lr**2
        vg = torch.as_tensor(vg)
        nu = torch.where(vg > 0, torch.clamp(torch.sqrt(self.clip / vg.clamp(min=1e-30)), max=1.0), torch.ones_like(vg))
        return {key: nu for key in updates}

    def _apply(self, updates: dict[int, Tensor], clip: dict[int, Tensor]) -> None:
        """``p <- p - lr (nu S + wd p)`` for the K-FAC layers (``nu`` from :meth:`_clip`), SGD
        with weight decay for the other parameters; momentum on the sum. Without momentum a
        K-FAC parameter is updated as ``p (1 - lr wd) - lr nu S``: two passes over ``p`` and one
        over ``S``, where scaling ``S``, adding ``wd p`` and adding it to ``p`` take eight (the
        wide FC0's step is the size of its weight)."""
        directions: dict[int, tuple[Tensor, Tensor | None]] = {}
        for L in self.layers:
            if id(L) in updates:
                S = updates[id(L)]
                parts = [t.reshape(p.shape) for t, p in zip(S, L.capture.params)] if isinstance(S, tuple) \
                    else L.capture.set_update(S)
                nu = clip.get(id(L))
                for p, v in zip(L.capture.params, parts):
                    directions[id(p)] = (v.to(p.dtype), None if nu is None else nu.to(p.dtype))
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if id(p) in directions:
                    d_p, nu = directions[id(p)]
                    if not mom:
                        if wd:
                            p.mul_(1.0 - lr * wd)
                        if nu is None:
                            p.add_(d_p, alpha=-lr)
                        else:
                            p.addcmul_(d_p, nu, value=-lr)
                        continue
                    if nu is not None:
                        d_p = d_p.mul_(nu)  # this step's own tensor
                    if wd:
                        d_p = d_p.add_(p, alpha=wd)
                elif p.grad is not None:
                    d_p = p.grad
                    if wd:
                        d_p = d_p.add(p, alpha=wd)
                else:
                    continue
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(mom).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim`` state plus ``'kfac'``: algorithm, step and epoch counters, the
        generators, and per layer ``n_M`` and each factor's ``(method, state)`` (EA factor,
        representation). Tensors are references, as in ``torch.optim``."""
        sd = super().state_dict()
        sd["kfac"] = {
            "algorithm": self.algorithm,
            "factor_init": self.factor_init,
            "steps": self.steps,
            "epoch": self.epoch,
            "initialized": self._initialized,
            "generator": self.generator.get_state(),
            "layers": {
                L.capture.name: {
                    "n_M": L.n_M,
                    "A": None if L.inv_A is None else (L.inv_A.method, L.inv_A.state_dict()),
                    "G": None if L.inv_G is None else (L.inv_G.method, L.inv_G.state_dict()),
                    "generators": {fac: inv.generator.get_state()
                                   for fac, inv in (("A", L.inv_A), ("G", L.inv_G)) if inv is not None},
                }
                for L in self.layers
            },
        }
        return sd


    def _methods(self) -> set[str]:
        """The factor-inverse methods this optimizer may run."""
        out = {EighInverse.method}
        for cls in (self._lowrank_class(), self._brand_class()):
            if cls is not None:
                out.add(cls.method)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`. Everything is checked before anything changes (all or
        nothing): the algorithm, the layers, each factor's method (the one this optimizer runs
        there, :meth:`describe`), the shapes of every tensor against this model's layers, the
        parameter groups and momentum buffers. ``ValueError`` naming what does not fit."""
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac", None)
        if not isinstance(kfac, dict):
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by a bkfac K-FAC optimizer")
        if kfac.get("algorithm") != self.algorithm:
            raise ValueError(f"state_dict is from {kfac.get('algorithm')!r}, this optimizer is {self.algorithm!r}")
        if kfac.get("factor_init", "batch") != self.factor_init:
            raise ValueError(f"state_dict starts its factors from {kfac.get('factor_init', 'batch')!r}, this "
                             f"optimizer from {self.factor_init!r} (factor_init)")
        for key, kind in (("steps", int), ("epoch", int), ("initialized", bool), ("layers", dict)):
            if not isinstance(kfac.get(key), kind):
                raise ValueError(f"state_dict['kfac'][{key!r}] must be {kind.__name__}, got {kfac.get(key)!r}")
        _check_generator_state("state_dict['kfac']['generator']", kfac.get("generator"))
        names = [L.capture.name for L in self.layers]
        missing = set(names) ^ set(kfac["layers"])
        if missing:
            raise ValueError(f"state_dict layers do not match the model: {sorted(missing)}")
        check_param_state(self, state_dict)
        first_fc = self._first_fc_index()
        methods = self._methods()
        built = []
        for i, L in enumerate(self.layers):
            st = kfac["layers"][L.capture.name]
            n_M = st.get("n_M")
            if n_M is not None and (isinstance(n_M, bool) or not isinstance(n_M, int) or n_M < 1):
                raise ValueError(f"state_dict layer '{L.capture.name}': n_M must be a positive int, got {n_M!r}")
            invs = {}
            for fac in ("A", "G"):
                where = f"state_dict layer '{L.capture.name}' factor {fac}"
                if st.get(fac) is None:
                    invs[fac] = None
                    continue
                method, inv_state = st[fac]
                dim = L.capture.d_A if fac == "A" else L.capture.d_G
                expected = self._plan(dim, n_M, i == first_fc)[0] if n_M is not None else None
                if method not in methods or (expected is not None and method != expected.method):
                    runs = expected.method if expected is not None else " or ".join(sorted(methods))
                    raise ValueError(f"{where}: saved with method {method!r}, this {self.algorithm} runs {runs!r} "
                                     "there (another algorithm, policy or rank)")
                inv = self._make_inverse(INVERSE_METHODS[method], dim, i, fac)
                inv.check_state(inv_state, where)
                gen = st.get("generators", {}).get(fac)
                if gen is not None:
                    _check_generator_state(where, gen)
                invs[fac] = (inv, inv_state, gen)
            built.append((L, n_M, invs))
        # nothing has changed so far; from here on nothing can fail
        super().load_state_dict(state_dict)
        self.steps, self.epoch = kfac["steps"], kfac["epoch"]
        self.generator.set_state(kfac["generator"])
        for L, n_M, invs in built:
            L.n_M = n_M
            for fac, entry in invs.items():
                if entry is None:
                    continue
                inv, inv_state, gen = entry
                inv.load_state_dict(inv_state)
                if gen is not None:
                    inv.generator.set_state(gen)
                setattr(L, f"inv_{fac}", inv)
            self._set_linear_time(L)
        self._initialized = kfac["initialized"]
        for L in self.layers:
            for inv in (L.inv_A, L.inv_G):
                if inv is not None:
                    inv.epoch = self.epoch


_FAMILY_DEFAULTS = signature_defaults(KFACFamily.__init__)

_NO_BRAND = {
    "policy": "the B-update policy is the b-variants' (b-kfac, b-r-kfac, b-kfac-c)",
    "linear_time": "Algorithm 8 applies to B-updated factors (b-kfac, b-r-kfac, b-kfac-c)",
    "alg8_backward": "Algorithm 8 applies to B-updated factors (b-kfac, b-r-kfac, b-kfac-c)",
}


class KFAC(KFACFamily):
    """k-fac (Martens and Grosse 2015; KFC for convolutions): exact ``eigh`` of every EA factor
    every ``t_inv`` steps (Sec. 2.1).

    ``inverse="cholesky"`` (not in the paper; one process only) replaces ``eigh`` by a
    power-iteration estimate of lambda_max and a Cholesky inverse of the damped factor
    (:class:`~bkfac.inverses.CholeskyInverse`): the same damped inverse up to the power
    iteration's tolerance, at a fraction of ``eigh``'s cost -- what other K-FAC
    implementations do. ``"eigh"`` (default) is the paper's and keeps the spectrum.

    k-fac does not use ``rank``, ``oversample``, ``power_iters``, ``spectrum_continuation``,
    ``policy`` or ``linear_time`` (an error).
    """

    algorithm = "k-fac"
    _unused = {**_NO_BRAND, "spectrum_continuation": "it is the identity on k-fac's full-rank representations",
               **{key: "k-fac keeps full-rank representations (it is a setting of r-kfac, sre-kfac and the "
                       "b-variants)" for key in ("rank", "oversample", "power_iters")}}

    def __init__(self, model, *, inverse: str = "eigh", **kw):
        self._check_given(dict(inverse=inverse, **kw))
        super().__init__(model, inverse=inverse, **kw)
        if inverse == "cholesky" and self.comm.world_size > 1:
            raise ValueError("KFAC(inverse='cholesky') runs in one process only; use inverse='eigh' "
                             "for data-parallel training")

    def _lowrank_class(self):
        return None

    def _plan(self, dim: int, n_M: int | None, first_fc: bool = False):
        if self.method_kw["inverse"] == "cholesky":
            return CholeskyInverse, "k-fac, inverse='cholesky'"
        return EighInverse, "k-fac"

    def _methods(self) -> set[str]:
        return {self._plan(1, None)[0].method}


class RKFAC(KFACFamily):
    """r-kfac (rs-kfac of Puiu 2022a, Algorithm 1): RSVD of each EA factor every ``t_inv`` steps."""

    algorithm = "r-kfac"
    _unused = _NO_BRAND

    def __init__(self, model, **kw):
        self._check_given(kw)
        super().__init__(model, **kw)


class SREKFAC(KFACFamily):
    """sre-kfac (Puiu 2022a): symmetric randomized EVD of each EA factor every ``t_inv`` steps."""

    algorithm = "sre-kfac"
    _unused = _NO_BRAND

    def __init__(self, model, **kw):
        self._check_given(kw)
        super().__init__(model, **kw)

    def _lowrank_class(self):
        return SREVDInverse


class BKFAC(KFACFamily):
    """b-kfac (Algorithm 4): truncate + symmetric Brand update every ``t_brand`` steps for the
    factors the ``policy`` names (module docstring; the paper's is ``'first-fc'``); r-kfac for
    the others. Pure b-kfac factors never form a ``d x d`` matrix (low-memory, Sec. 3.5).
    Alg. 8 for the step."""

    algorithm = "b-kfac"

    def __init__(self, model, *, t_brand: int = 1, **kw):
        self._check_given(dict(t_brand=t_brand, **kw))
        super().__init__(model, t_brand=t_brand, **kw)

    def _brand_class(self):
        return BrandInverse


class BRKFAC(BKFAC):
    """b-r-kfac (Algorithm 5): b-kfac plus an RSVD overwrite every ``t_rsvd`` steps
    (a multiple of ``t_brand``)."""

    algorithm = "b-r-kfac"

    def __init__(self, model, *, t_brand: int = 1, t_rsvd: int = 1, **kw):
        self._check_given(dict(t_brand=t_brand, t_rsvd=t_rsvd, **kw))
        KFACFamily.__init__(self, model, t_brand=t_brand, t_rsvd=t_rsvd, **kw)

    def _brand_class(self):
        return BrandRSVDInverse


class BKFACC(BKFAC):
    """b-kfac-c (Algorithm 7): b-kfac plus the light correction (Alg. 6) every ``t_corct`` steps
    (a multiple of ``t_brand``) on ``phi_crc * r`` randomly chosen modes, ``phi_crc`` in (0, 1]."""

    algorithm = "b-kfac-c"

    def __init__(self, model, *, t_brand: int = 1, t_corct: int = 1, phi_crc: float = 0.5, **kw):
        self._check_given(dict(t_brand=t_brand, t_corct=t_corct, phi_crc=phi_crc, **kw))
        KFACFamily.__init__(self, model, t_brand=t_brand, t_corct=t_corct, phi_crc=phi_crc, **kw)

    def _brand_class(self):
        return BrandCorrectedInverse
