"""SENG: the sketch-based empirical natural gradient baseline.

SENG (Yang, Xu, Wen, Chen and Xu, *Sketch-based empirical natural gradient methods for deep
learning*, J. Sci. Comput. 92, 2022; arXiv:2006.05924) is the state-of-the-art benchmark of
the paper's Sec 6 ("Benchmark 0", Table 2), run with the hyper-parameters of the paper's
Appendix D: ``lr 0.05``, ``lr_scheme 'exp'``, ``lr_decay_rate 6``, ``lr_decay_epoch 75``,
``damping 2``, ``weight_decay 1e-2``, ``momentum 0.9``, ``curvature_update_freq 200``,
``fim_col_sample_size 128`` (label smoothing 0, everything else at the official defaults:
``im_size_threshold 700000`` from the official ``main_seng.py``, SVD rank 16).

This is our own implementation; the facts below were read from the paper and the official
code (github.com/yangorwell/SENG, ``Pytorch/cifar10``).

The method, per layer ``l`` (Linear, or Conv2d with ``groups=1``)
-----------------------------------------------------------------
Let ``G_i`` (``d_out x d_in``, bias as the last column) be the gradient of the *per-sample*
loss of sample ``i`` with respect to the layer's parameters, ``u_i = vec(G_i)`` (length
``D = d_out * d_in``) and ``U = [u_1 .. u_n] / sqrt(n)`` (stored as the ``n x D`` matrix of
rows ``u_i^T / sqrt(n)``, as the official code does). The per-layer empirical Fisher is

    F = (1/n) sum_i u_i u_i^T = U^T U            (block-diagonal over layers)

and SENG's direction is ``(F + lambda I)^{-1} g`` by the Woodbury identity (``g`` = the
layer's batch gradient, ``lambda`` = ``damping``)::

    (F + lambda I)^{-1} g = (g - U^T (lambda I_n + U U^T)^{-1} U g) / lambda.

With the un-normalised ``V = [u_1 .. u_n]`` (``D x n``) this is the same as
``(g - V (n lambda I + V^T V)^{-1} V^T g) / lambda``.

Per-sample gradients come from the layer's input and output gradient (forward hooks on the
input, a tensor hook on the output): ``G_i = sum_t g_{i,t} a_{i,t}^T`` where ``a_{i,t}`` is
the (bias-augmented) input at position ``t`` -- the unfolded patch for Conv2d -- and
``g_{i,t}`` the gradient of the *per-sample* loss with respect to the output at ``t``
(``n * grad_output`` for a mean-reduced loss, ``grad_output`` for a summed one).

The curvature (``U``, the sketch and the Cholesky factor of the ``n x n`` matrix) is
recomputed on the step's own batch every ``update_freq`` steps (steps 0, T, 2T, ...); in
between, the stored ``U`` and factor are applied to each new gradient.

Sketching (official code, ``seng.py``)
--------------------------------------
* **Explicit layers** (``D <= im_size_threshold``): ``U`` is formed exactly (``n x D``). When
  ``c^2 < D`` (``c = col_sample_size``) a set ``S`` of ``c^2`` coordinates is drawn uniformly
  without replacement and the two products through ``U`` that cost ``O(nD)`` per use of
  ``U`` on the *left* are sketched: ``K = omega U_S U_S^T + lambda I`` and ``w = omega U_S g_S``;
  ``U^T v`` uses the full ``U``.
* **Implicit layers** (``D > im_size_threshold``): ``U`` is never formed. Each ``G_i`` is kept
  as the product of factors ``g_i a_i^T`` (``d_out x p`` times ``p x d_in``); for conv layers
  with more than ``svd_rank`` output positions the per-sample output gradient is truncated to
  its top ``svd_rank`` singular triplets, ``g_i ~ P_i S_i Q_i^T`` -> factors ``P_i S_i`` and
  ``a_i Q_i`` (SENG's "low-rank approximation" of the two matrices; the official code uses
  ``torch.svd``, we use the batched ``gesvda`` driver on CUDA and fix the signs). Then ``c``
  of the ``d_out`` rows and ``c`` of the ``d_in`` columns are sampled (each only where the
  dimension exceeds ``c``), ``S`` is their grid, and ``K``, ``w`` are formed on ``S`` from the
  factors.

Here ``m = D / |S|`` and the weight ``omega`` is ``m**2`` with ``col_scaling="seng"`` (what the
official code does: each sampled column is multiplied by ``m`` and so is the sampled
gradient; note that this is the unbiased sketch with the inner damping divided by ``m``), or
``m`` with ``col_scaling="unbiased"`` (``omega U_S U_S^T`` is then an unbiased estimate of
``U U^T``). Without sampling ``m = omega = 1`` and the direction is exactly
``(F + lambda I)^{-1} g``.

For implicit layers the official code replaces ``U^T v = sum_i v_i G_i`` by the rank-``p``
surrogate ``(sum_i sqrt|v_i| g_i) (sum_k v_k a_k)^T / sum_i sqrt|v_i|`` (``implicit_transpose=
"seng"``; cheaper by a factor ``n`` but *not* equal to ``U^T v``); ``implicit_transpose=
"exact"`` computes ``sum_i v_i g_i a_i^T``.

The step (official ``main_seng.py``)
------------------------------------
The preconditioned direction ``d`` then goes through ``torch.optim.SGD`` (dampening 0, not
Nesterov): ``d <- d + weight_decay * p``; ``b <- momentum * b + d`` (``b = d`` at the first
step); ``p <- p - lr * b``. Weight decay is added *after* preconditioning. Parameters of every
other layer (BatchNorm, ...) get the same SGD step on their raw gradient (see the note on
BatchNorm in :class:`SENG`). Damping is constant (the official ``adjust_damping``).

The 'exp' learning-rate scheme (official ``main_seng.py``, ``lr_schedule``, the branch taken
for any scheme other than 'staircase'/'cosine')::

    lr(t) = lr0 * (1 - t / lr_decay_epoch) ** lr_decay_rate,

where ``t`` is the number of epochs completed, fractional: the official loop evaluates it
before every iteration with ``t = epoch0 + (batch_idx + 1) / batches_per_epoch`` (``epoch0``
0-indexed). See :func:`seng_exp_lr` and :meth:`SENG.set_epoch`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.kfac import (
    amp_loss_scale,
    autocast_off,
    check_names,
    check_param_state,
    signature_defaults,
    unscale_gradients,
    warn_once_per_model,
)
from ..optim.timer import PhaseTimer

__all__ = ["SENG", "seng_exp_lr"]

_LR_SCHEMES = (None, "exp")
_REDUCTIONS = ("mean", "sum")
_COL_SCALINGS = ("seng", "unbiased")
_TRANSPOSES = ("seng", "exact")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond, message: str):
    def check(name: str, v) -> None:
        if not cond(v):
            raise ValueError(f"{name} must be {message}, got {v!r}")

    return check


def _check_loader(name: str, v) -> None:
    if v is not None and not hasattr(v, "__len__"):
        raise ValueError(f"{name} must have a length (len(loader) batches per epoch), got {type(v).__name__}")


_SENG_CHECKS = {
    "lr": _check(lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "damping": _check(lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "weight_decay": _check(lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "momentum": _check(lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
    "update_freq": _check(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "col_sample_size": _check(lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
    "lr_scheme": _check(lambda v: v in _LR_SCHEMES, f"one of {_LR_SCHEMES}"),
    "lr_decay_rate": _check(lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "lr_decay_epoch": _check(lambda v: _is_real(v) and v > 0, "a finite number > 0"),
    "loss_reduction": _check(lambda v: v in _REDUCTIONS, f"one of {_REDUCTIONS}"),
    "timer": _check(lambda v: v is None or isinstance(v, (PhaseTimer, bool)), "a PhaseTimer, a bool or None"),
    "sync_timer": _check(lambda v: isinstance(v, bool), "a bool"),
    "steps_per_epoch": _check(lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
    "loader": _check_loader,
    "im_size_threshold": _check(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "svd_rank": _check(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "col_scaling": _check(lambda v: v in _COL_SCALINGS, f"one of {_COL_SCALINGS}"),
    "implicit_transpose": _check(lambda v: v in _TRANSPOSES, f"one of {_TRANSPOSES}"),
    "seed": _check(lambda v: v is None or _is_int(v), "None or an integer"),
}


def seng_exp_lr(epoch: float, *, lr0: float, decay_rate: float, decay_epoch: float) -> float:
    """SENG's 'exp' learning-rate scheme at (1-indexed, possibly fractional) ``epoch``.

    ``lr = lr0 * max(0, 1 - (epoch - 1) / decay_epoch) ** decay_rate`` -- the official
    ``main_seng.py`` schedule with ``t = epoch - 1`` epochs completed. The clamp at 0 is ours:
    the official formula is only used for ``t < decay_epoch`` (Appendix D: 75 > the 50 epochs
    run), and beyond it an even ``decay_rate`` would make the lr grow again.
    """
    if not _is_real(epoch) or epoch < 1:
        raise ValueError(f"epoch must be a finite number >= 1 (1-indexed), got {epoch!r}")
    if not _is_real(decay_epoch) or decay_epoch <= 0:
        raise ValueError(f"decay_epoch must be a positive number, got {decay_epoch!r}")
    if not _is_real(decay_rate) or decay_rate < 0:
        raise ValueError(f"decay_rate must be a non-negative number, got {decay_rate!r}")
    frac = max(0.0, 1.0 - (epoch - 1.0) / decay_epoch)
    return lr0 * frac**decay_rate


def _top_right_singular_vectors(g: Tensor, p: int) -> Tensor:
    """Top-``p`` right singular vectors ``Q_i`` (``n x T x p``) of each ``g_i`` (``d x T``).

    On CUDA the batched approximate driver ``gesvda`` is used (about 250x faster than the
    default on an H100 for 256 matrices of 512 x 128; only the leading triplets are used),
    falling back to the default driver if it fails. Each column's sign is fixed (largest
    entry positive) so that the factors, and hence the official ``implicit_transpose="seng"``
    surrogate, which is not invariant to these signs, do not depend on the SVD backend.
    """
    Q = None
    if g.is_cuda:
        wide = g.shape[1] < g.shape[2]  # gesvda needs rows >= columns
        try:
            if wide:
                U, _, _ = torch.linalg.svd(g.transpose(1, 2), full_matrices=False, driver="gesvda")
                Q = U[:, :, :p]
            else:
                _, _, Vh = torch.linalg.svd(g, full_matrices=False, driver="gesvda")
                Q = Vh[:, :p, :].transpose(1, 2)
            if not bool(torch.isfinite(Q).all()):
                Q = None
        except RuntimeError:
            Q = None
    if Q is None:
        _, _, Vh = torch.linalg.svd(g, full_matrices=False)
        Q = Vh[:, :p, :].transpose(1, 2)
    lead = Q.gather(1, Q.abs().argmax(dim=1, keepdim=True))
    sign = torch.where(lead < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign


class _Layer:
    """A Linear / Conv2d layer preconditioned by SENG, and its captures."""

    def __init__(self, name: str, module: nn.Module, implicit: bool):
        self.name = name
        self.module = module
        self.kind = "linear" if isinstance(module, nn.Linear) else "conv"
        self.weight: Tensor = module.weight
        bias = module.bias
        self.bias: Tensor | None = bias if (bias is not None and bias.requires_grad) else None
        self.d_out = self.weight.shape[0]
        self.d_in = self.weight[0].numel() + (1 if self.bias is not None else 0)
        self.numel = self.d_out * self.d_in
        self.implicit = implicit
        self.records: list[dict[str, Tensor]] = []
        self.handles: list[Any] = []

    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def grad_matrix(self) -> Tensor | None:
        """The batch gradient as a ``d_out x d_in`` matrix (bias last column), or None."""
        if self.weight.grad is None:
            return None
        g = self.weight.grad.reshape(self.d_out, -1)
        if self.bias is not None:
            gb = self.bias.grad
            if gb is None:
                gb = torch.zeros_like(self.bias)
            g = torch.cat([g, gb.reshape(self.d_out, 1)], dim=1)
        return g

    def describe(self) -> str:
        return f"layer '{self.name}' ({type(self.module).__name__})"


class SENG(torch.optim.Optimizer):
    """SENG (Yang et al. 2022), the paper's Sec 6 benchmark, as a ``torch.optim.Optimizer``.

    See the module docstring for the method and where each detail comes from. Usage::

        opt = SENG(model, loader=loader)   # Appendix D defaults (or make_optimizer("seng", ...))
        for epoch in range(1, epochs + 1):
            opt.set_epoch(epoch)          # with the loader's length: lr decays every iteration
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

    Per-sample statistics are captured only in ``model.training`` mode, with gradients
    enabled, and only before a curvature step (every ``update_freq``-th ``step()``, starting
    with the first). The last such forward (and its backward) wins: with gradient
    accumulation, or a layer called several times in one forward, the Fisher is that of
    the last micro-batch / call.

    Args:
        model: the network. Parameters of ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``)
            layers get SENG's preconditioning; all other trainable parameters get the plain
            SGD step (same lr, weight decay and momentum), and their layer types are
            reported with a warning. Note: the official code also preconditions BatchNorm
            (with its own per-sample gradients) and divides any remaining gradient by
            ``1 + damping``; here, as in the rest of bkfac, they get the plain SGD step.
        lr: learning rate (``lr0`` of the 'exp' scheme).
        damping: ``lambda > 0`` of ``(F + lambda I)^{-1}``.
        weight_decay: L2 coefficient added to the preconditioned direction.
        momentum: heavy-ball momentum in ``[0, 1)`` (``torch.optim.SGD`` convention).
        update_freq: curvature refresh period in steps.
        col_sample_size: ``c`` of the column sketch (``None``: no sketching).
        lr_scheme: ``"exp"`` (lr owned by :meth:`set_epoch`) or ``None`` (lr left to the user
            or a ``torch.optim.lr_scheduler``).
        lr_decay_rate, lr_decay_epoch: parameters of the 'exp' scheme.
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss was reduced over the batch
            (sets the per-sample gradient scale ``n`` or ``1`` times ``grad_output``).
        timer: a :class:`~bkfac.optim.timer.PhaseTimer`, or ``True``/``None`` (a new enabled
            one) or ``False`` (a disabled one), as ``optimizer.timer``; phases: statistics
            (per-sample factors, sketch), inverse (Cholesky of the ``n x n`` matrix),
            precondition (Woodbury application), rest (checks and SGD update).
        sync_timer: synchronise CUDA at phase boundaries (for a timer built here).
        steps_per_epoch: with the 'exp' scheme, let ``step()`` advance the lr before every
            iteration as the official loop does, ``t = (epoch - 1) + (k + 1) / steps_per_epoch``
            for the ``k``-th step (0-indexed) since :meth:`set_epoch` (``epoch`` 1 before any
            call); ``None`` (and no ``loader``): the lr changes only in :meth:`set_epoch`.
        loader: the training data loader; when given, ``steps_per_epoch = len(loader)`` (an
            explicit ``steps_per_epoch`` must then agree with it). :meth:`describe_table`
            says which schedule is in force and where its length came from.
        im_size_threshold: layers with more parameters than this use the implicit
            (factored) representation.
        svd_rank: rank of the per-sample low-rank approximation in implicit conv layers.
        col_scaling: ``"seng"`` (official, ``omega = m**2``) or ``"unbiased"`` (``omega = m``).
        implicit_transpose: ``"seng"`` (official rank-p surrogate) or ``"exact"``.
        seed: seed of the optimizer's own generator for column sampling (``None``:
            ``torch.initial_seed()``). Its state is part of :meth:`state_dict`.

    Every argument is checked at construction (:meth:`check_hyper`, also without a model):
    ``ValueError`` naming it.

    Mixed precision: under ``torch.autocast`` the captured inputs and output gradients are
    cast to the parameters' dtype before the curvature is built, and the step itself runs
    with autocast off. With ``torch.amp.GradScaler`` the scaler hands the step its scale
    and overflow flag (:func:`~bkfac.optim.kfac.amp_loss_scale`): an overflowed step changes
    nothing (not even the step count), otherwise the gradients and the captured output
    gradients are unscaled here; do not call ``scaler.unscale_(optimizer)`` before
    ``scaler.step(optimizer)`` (``RuntimeError``).
    """

    algorithm = "seng"
    _unused: dict = {}
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.05,
        damping: float = 2.0,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        update_freq: int = 200,
        col_sample_size: int | None = 128,
        lr_scheme: str | None = "exp",
        lr_decay_rate: float = 6,
        lr_decay_epoch: float = 75,
        loss_reduction: str = "mean",
        timer: PhaseTimer | bool | None = None,
        sync_timer: bool = False,
        steps_per_epoch: int | None = None,
        loader=None,
        im_size_threshold: int = 700_000,
        svd_rank: int = 16,
        col_scaling: str = "seng",
        implicit_transpose: str = "seng",
        seed: int | None = None,
        **unused: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_names(type(self), unused)  # ValueError naming SENG and the argument
        if loader is not None and steps_per_epoch is None and hasattr(loader, "__len__"):
            steps_per_epoch = len(loader)
            self.steps_per_epoch_source = "len(loader)"
        else:
            self.steps_per_epoch_source = None if steps_per_epoch is None else "steps_per_epoch"
        given = {k: v for k, v in locals().items() if k in _SENG_KEYS}
        self.check_hyper(given)
        self.update_freq = update_freq
        self.col_sample_size = col_sample_size
        self.lr_scheme = lr_scheme
        self.lr_decay_rate = float(lr_decay_rate)
        self.lr_decay_epoch = float(lr_decay_epoch)
        self.loss_reduction = loss_reduction
        self.im_size_threshold = im_size_threshold
        self.svd_rank = svd_rank
        self.col_scaling = col_scaling
        self.implicit_transpose = implicit_transpose
        if isinstance(timer, PhaseTimer):
            self.timer = timer
        else:
            self.timer = PhaseTimer(enabled=timer is not False, sync=sync_timer)
        self.steps_per_epoch = steps_per_epoch
        self.epoch: float | None = None
        self._epoch_steps = 0  # steps since the last set_epoch (per-iteration 'exp' lr)
        self._step_count = 0
        self._generator = torch.Generator()
        self._generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self._curvature: dict[str, dict[str, Any]] = {}

        self._layers, other, unsupported = self._discover(model)
        self._unsupported = unsupported
        if unsupported:
            warn_once_per_model(
                model,
                "SENG preconditions only nn.Linear and nn.Conv2d (groups=1) layers; the "
                "parameters of these layers get the plain SGD step: "
                + ", ".join(f"{n} ({why})" for n, why in unsupported),
                stacklevel=2,
            )
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        groups: list[dict[str, Any]] = [
            {"params": layer.params(), "layer": layer.name} for layer in self._layers
        ]
        if other:
            groups.append({"params": other, "layer": None})
        if not groups:
            raise ValueError("model has no trainable parameters")
        defaults = dict(lr=lr, damping=damping, weight_decay=weight_decay, momentum=momentum)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", lr)
        self._by_name = {layer.name: layer for layer in self._layers}
        self._register_hooks()

    # ------------------------------------------------------------------ hyper-parameters
    @classmethod
    def hyper_parameters(cls) -> dict[str, Any]:
        """``{name: class default}`` of every keyword argument SENG uses."""
        return signature_defaults(cls.__init__)

    @classmethod
    def check_hyper(cls, hyper: dict[str, Any]) -> None:
        """Check keyword arguments without a model: ``ValueError`` naming the argument (and
        naming SENG for one it does not use)."""
        check_names(cls, hyper)
        for key, value in hyper.items():
            _SENG_CHECKS[key](key, value)
        loader, spe = hyper.get("loader"), hyper.get("steps_per_epoch")
        if loader is not None and spe is not None and len(loader) != spe:
            raise ValueError(f"steps_per_epoch={spe} differs from len(loader)={len(loader)}")

    def schedule(self) -> str:
        """How the learning rate moves, in words (the 'exp' scheme per iteration or per epoch)."""
        if self.lr_scheme is None:
            return "lr_scheme=None: the learning rate is left to the user (or a torch lr_scheduler)"
        head = f"'exp' scheme lr0 * (1 - t / {self.lr_decay_epoch:g}) ** {self.lr_decay_rate:g}"
        if self.steps_per_epoch is None:
            return f"{head}, t = epochs completed, set by set_epoch() only (no loader or steps_per_epoch given)"
        return (f"{head}, updated before every step with {self.steps_per_epoch} steps per epoch "
                f"(from {self.steps_per_epoch_source})")

    def describe(self, batch_size: int | None = None, *, input_shape=None) -> list[dict[str, Any]]:
        """One row per layer: ``layer``, ``kind``, ``method`` (``'seng explicit'`` /
        ``'seng implicit'`` or ``'SGD'``), ``params`` (number of weights incl. bias) and
        ``why``. SENG's choice needs no batch size (the arguments mirror the K-FAC family's)."""
        rows = [dict(layer=L.name, kind=L.kind, method=f"seng {'implicit' if L.implicit else 'explicit'}",
                     params=L.numel, why=f"{'>' if L.implicit else '<='} im_size_threshold={self.im_size_threshold}")
                for L in self._layers]
        rows += [dict(layer=name, kind="unsupported", method="SGD", params=None, why=why)
                 for name, why in self._unsupported]
        return rows

    def describe_table(self, batch_size: int | None = None, *, input_shape=None) -> str:
        """:meth:`describe` as an aligned table under the learning-rate :meth:`schedule`."""
        rows = self.describe()
        cols = ["layer", "method", "params", "why"]
        body = [[str(r[c]) if r[c] is not None else "" for c in cols] for r in rows]
        widths = [max(len(c), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]
        line = lambda vals: "  ".join(f"{v:<{w}}" if j != 2 else f"{v:>{w}}"  # noqa: E731
                                      for j, (v, w) in enumerate(zip(vals, widths))).rstrip()
        header = line(cols)
        return "\n".join([f"seng, update_freq {self.update_freq}; lr: {self.schedule()}", header,
                          "-" * len(header), *(line(b) for b in body)])

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _discover(model: nn.Module):
        """Split the model's trainable parameters into SENG layers and the rest."""
        owners: dict[int, int] = {}
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        layers: list[_Layer] = []
        claimed: set[int] = set()
        unsupported: list[tuple[str, str]] = []
        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            label = name or "<root>"
            supported = isinstance(mod, nn.Linear) or (
                isinstance(mod, nn.Conv2d) and mod.groups == 1
            )
            if supported and not mod.weight.requires_grad:
                supported = False
                why = "frozen weight"
            elif supported and any(owners[id(p)] > 1 for p in own):
                supported = False
                why = "shares parameters with another module"
            elif isinstance(mod, nn.Conv2d) and not supported:
                why = f"{type(mod).__name__}, groups={mod.groups}"
            else:
                why = type(mod).__name__
            if supported:
                layers.append(_Layer(label, mod, implicit=False))
                claimed.update(id(p) for p in layers[-1].params())
            else:
                unsupported.append((label, why))
        other, seen = [], set(claimed)
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                other.append(p)
        return layers, other, unsupported

    def _register_hooks(self) -> None:
        for layer in self._layers:
            layer.implicit = layer.numel > self.im_size_threshold
            layer.handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))

    def remove_hooks(self) -> None:
        """Remove every hook this optimizer put on the model (no more curvature refreshes)."""
        for layer in self._layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            layer.records.clear()

    def _capture_wanted(self) -> bool:
        return self._step_count % self.update_freq == 0

    def _make_forward_hook(self, layer: _Layer) -> Callable:
        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled() and self._capture_wanted()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            replaced = None
            if output._is_view():
                # (Linear on >2-D input returns a view.) An in-place op on a view (e.g. a
                # following ReLU(inplace=True)) rebases its autograd history and the hook below
                # would never fire; a copy, only on capture steps, is not a view.
                output = replaced = output.clone()
            # The last training forward wins: the Fisher is that of the batch of the last
            # forward/backward before the curvature step (as in the official code).
            record: dict[str, Tensor] = {"input": inputs[0].detach()}
            layer.records[:] = [record]

            def tensor_hook(grad: Tensor) -> None:
                # Registered on the output before any in-place op (e.g. ReLU(inplace=True)),
                # so autograd hands it the gradient w.r.t. the layer's own output.
                record["grad_output"] = grad.detach()

            output.register_hook(tensor_hook)
            return replaced

        return forward_hook

    # ------------------------------------------------------------------ public helpers
    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the SENG-preconditioned layers."""
        return [layer.name for layer in self._layers]

    def curvature_state(self, name: str) -> dict[str, Any]:
        """The stored curvature of layer ``name`` (for inspection; do not modify)."""
        if name not in self._by_name:
            raise ValueError(f"unknown SENG layer {name!r}; known: {self.layer_names}")
        if name not in self._curvature:
            raise ValueError(f"layer {name!r} has no curvature yet (no curvature step ran)")
        return self._curvature[name]

    def per_sample_gradients(self) -> dict[str, Tensor]:
        """Exact per-sample gradients ``G_i`` (``n x d_out x d_in``, bias last column) of
        every layer, from the capture of the last training forward/backward.

        Only available between the backward pass and the ``step()`` of a curvature step.
        """
        out = {}
        for layer in self._layers:
            g, a = self._factors(layer, scale=1.0)
            out[layer.name] = torch.bmm(g, a.transpose(1, 2))
        return out

    def set_epoch(self, epoch: float) -> None:
        """Set the lr of every param group from the 'exp' scheme at 1-indexed ``epoch``.

        ``lr = lr0 * max(0, 1 - (epoch - 1) / lr_decay_epoch) ** lr_decay_rate`` (see
        :func:`seng_exp_lr`). ``epoch`` may be fractional: the official code updates the lr
        before every iteration, which is ``set_epoch(e + (b + 1) / batches_per_epoch)`` for
        1-indexed epoch ``e`` and 0-indexed batch ``b``. With ``lr_scheme=None`` the epoch is
        recorded and the lr is left alone.
        """
        if not _is_real(epoch) or epoch < 1:
            raise ValueError(f"epoch must be a finite number >= 1 (1-indexed), got {epoch!r}")
        self.epoch = float(epoch)
        self._epoch_steps = 0
        self._apply_lr(self.epoch)

    def _apply_lr(self, epoch: float) -> None:
        if self.lr_scheme is None:
            return
        for group in self.param_groups:
            group["lr"] = seng_exp_lr(
                epoch,
                lr0=group["initial_lr"],
                decay_rate=self.lr_decay_rate,
                decay_epoch=self.lr_decay_epoch,
            )

    # ------------------------------------------------------------------ statistics
    def _factors(self, layer: _Layer, scale: float) -> tuple[Tensor, Tensor]:
        """Per-sample factors ``g`` (``n x d_out x T``), ``a`` (``n x d_in x T``) of the
        layer's captured batch: ``G_i = g_i a_i^T``, scaled by ``scale`` times the
        per-sample-loss factor (``n`` for a mean loss)."""
        if not layer.records or "grad_output" not in layer.records[0]:
            raise RuntimeError(
                f"SENG: no training-mode forward/backward was captured for {layer.describe()} "
                "before a curvature step; run the forward in model.train() mode with gradients "
                "enabled, then backward, with the optimizer's hooks in place"
            )
        # Under autocast the records are in the lower precision (bfloat16, float16); the
        # curvature is built in the parameters' dtype.
        dtype = layer.weight.dtype
        x = layer.records[0]["input"].to(dtype)
        gy = layer.records[0]["grad_output"].to(dtype)
        mod = layer.module
        if layer.kind == "linear":
            if x.dim() == 1:
                x, gy = x.unsqueeze(0), gy.unsqueeze(0)
            n = x.shape[0]
            a = x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
            g = gy.reshape(n, -1, gy.shape[-1]).transpose(1, 2)
        else:
            if x.dim() == 3:
                x, gy = x.unsqueeze(0), gy.unsqueeze(0)
            n = x.shape[0]
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                # Reproduce the layer's own padding (string padding, non-zero modes), then
                # unfold without padding.
                mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
                x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            else:
                padding = mod.padding
            a = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
            g = gy.reshape(n, gy.shape[1], -1)
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(n, 1, a.shape[2])], dim=1)
        per_sample = float(n) if self.loss_reduction == "mean" else 1.0
        return g * (per_sample * scale), a

    def _sample(self, size: int, k: int, device: torch.device) -> Tensor:
        idx = torch.randperm(size, generator=self._generator)[:k]
        return idx.sort().values.to(device)

    def _refresh(self, layer: _Layer, damping: float, scale: float = 1.0) -> dict[str, Any] | None:
        """Curvature step: build ``U`` (or its factors) and the sketched ``n x n`` matrix
        (``scale`` divides a GradScaler's loss scale out of the recorded output gradients)."""
        g, a = self._factors(layer, scale=scale)
        n = g.shape[0]
        g = g / math.sqrt(n)  # rows of U are u_i^T / sqrt(n)
        c = self.col_sample_size
        entry: dict[str, Any] = {"damping": float(damping), "implicit": layer.implicit}
        if not layer.implicit:
            U = torch.bmm(g, a.transpose(1, 2)).reshape(n, layer.numel)
            entry["U"] = U
            if c is not None and c * c < layer.numel:
                idx = self._sample(layer.numel, c * c, U.device)
                m = layer.numel / (c * c)
                US = U.index_select(1, idx)
                entry["index"], entry["U_S"] = idx, US
            else:
                m, US = 1.0, U
            omega = m * m if self.col_scaling == "seng" else m
            K = torch.mm(US, US.t())
        else:
            T = g.shape[2]
            if T > self.svd_rank:
                # g_i ~ P_i S_i Q_i^T (top svd_rank): factors g_i Q_i = P_i S_i and a_i Q_i.
                Q = _top_right_singular_vectors(g, min(self.svd_rank, *g.shape[1:]))
                g = torch.bmm(g, Q)
                a = torch.bmm(a, Q)
            entry["g"], entry["a"] = g, a
            m = 1.0
            gs, as_ = g, a
            if c is not None and c < layer.d_out:
                ridx = self._sample(layer.d_out, c, g.device)
                gs = g.index_select(1, ridx)
                entry["row_index"] = ridx
                m *= layer.d_out / c
            if c is not None and c < layer.d_in:
                cidx = self._sample(layer.d_in, c, a.device)
                as_ = a.index_select(1, cidx)
                entry["col_index"] = cidx
                m *= layer.d_in / c
            omega = m * m if self.col_scaling == "seng" else m
            entry["g_s"], entry["a_s"] = gs, as_
            p = g.shape[2]
            gb = gs.permute(1, 0, 2).reshape(gs.shape[1], n * p)
            ab = as_.permute(1, 0, 2).reshape(as_.shape[1], n * p)
            # <G_i, G_j> on the sampled grid = sum_{p,q} (g_ip . g_jq)(a_ip . a_jq)
            K = ((gb.t() @ gb) * (ab.t() @ ab)).reshape(n, p, n, p).sum(dim=(1, 3))
        K = K * omega
        K.diagonal().add_(damping)
        entry["omega"] = float(omega)
        entry["m"] = float(m)
        entry["K"] = K
        return entry

    def _factorize(self, layer: _Layer, entry: dict[str, Any]) -> None:
        K = entry.pop("K")
        if not bool(torch.isfinite(K).all()):
            raise FloatingPointError(
                f"SENG: the curvature of {layer.describe()} is not finite (NaN or inf in the "
                "captured inputs or output gradients); no parameter was updated"
            )
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            # K = omega * Gram + damping I is SPD in exact arithmetic; retry in float64.
            L64, info = torch.linalg.cholesky_ex(K.double())
            if int(info) != 0:
                raise FloatingPointError(
                    f"SENG: Cholesky of the damped n x n matrix of {layer.describe()} failed "
                    "even in float64"
                )
            L = L64.to(K.dtype)
        entry["chol"] = L

    # ------------------------------------------------------------------ precondition
    def _precondition(self, layer: _Layer, G: Tensor, damping_now: float) -> Tensor:
        """``(F + lambda I)^{-1} g`` by Woodbury with the stored (sketched) ``U``."""
        entry = self._curvature.get(layer.name)
        if entry is None:  # layer had no gradient at any curvature step so far: F = 0
            return G / damping_now
        lam = entry["damping"]
        omega = entry["omega"]
        if not entry["implicit"]:
            U = entry["U"]
            gflat = G.reshape(-1)
            if "index" in entry:
                w = entry["U_S"] @ gflat.index_select(0, entry["index"])
            else:
                w = U @ gflat
            v = torch.cholesky_solve((w * omega).unsqueeze(1), entry["chol"]).squeeze(1)
            corr = (U.t() @ v).reshape_as(G)
        else:
            gs, as_ = entry["g_s"], entry["a_s"]
            GS = G
            if "row_index" in entry:
                GS = GS.index_select(0, entry["row_index"])
            if "col_index" in entry:
                GS = GS.index_select(1, entry["col_index"])
            # w_i = <G_i, G> on the sampled grid = sum_p g_ip^T G_S a_ip
            w = (torch.matmul(GS, as_) * gs).sum(dim=(1, 2))
            v = torch.cholesky_solve((w * omega).unsqueeze(1), entry["chol"]).squeeze(1)
            g, a = entry["g"], entry["a"]
            n, p = g.shape[0], g.shape[2]
            if self.implicit_transpose == "exact":
                gv = (g * v[:, None, None]).permute(1, 0, 2).reshape(layer.d_out, n * p)
                corr = gv @ a.permute(1, 0, 2).reshape(layer.d_in, n * p).t()
            else:
                s = v.abs().sqrt()
                total = s.sum()
                if float(total) == 0.0:
                    corr = torch.zeros_like(G)
                else:
                    gy_v = torch.einsum("i,irp->rp", s, g)
                    x_v = torch.einsum("i,icp->cp", v / total, a)
                    corr = gy_v @ x_v.t()
        return (G - corr) / lam

    # ------------------------------------------------------------------ step
    def _check_finite(self) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flags = torch.stack([torch.isfinite(g).all() for g in grads])
        if bool(flags.all()):
            return
        for layer in self._layers:
            for p in layer.params():
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(
                        f"SENG: non-finite gradient (NaN or inf) in {layer.describe()}; check "
                        "the loss and the inputs. No parameter was updated."
                    )
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    name = self._param_names.get(id(p), "<unnamed>")
                    raise FloatingPointError(
                        f"SENG: non-finite gradient (NaN or inf) in parameter '{name}'; check "
                        "the loss and the inputs. No parameter was updated."
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SENG step (curvature refresh first when ``step % update_freq == 0``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, loss_scale = amp_loss_scale(self, "SENG")
        if skip:  # GradScaler: the scaled backward overflowed; this step changes nothing
            for layer in self._layers:
                layer.records.clear()
            return loss
        if loss_scale is not None:
            unscale_gradients(self.param_groups, loss_scale)
        with autocast_off(self.param_groups):
            self._step(1.0 if loss_scale is None else loss_scale)
        return loss

    def _step(self, loss_scale: float) -> None:
        timer = self.timer
        timer.start_step()
        with timer.phase("rest"):
            self._check_finite()
            if self.steps_per_epoch is not None:
                base = 1.0 if self.epoch is None else self.epoch
                self._apply_lr(base + (self._epoch_steps + 1) / self.steps_per_epoch)
        groups = {g["layer"]: g for g in self.param_groups}
        try:
            if self._capture_wanted():
                fresh = {}
                with timer.phase("statistics"):
                    for layer in self._layers:
                        if layer.weight.grad is None:
                            continue
                        fresh[layer.name] = self._refresh(layer, groups[layer.name]["damping"], 1.0 / loss_scale)
                with timer.phase("inverse"):
                    for name, entry in fresh.items():
                        self._factorize(self._by_name[name], entry)
                self._curvature.update(fresh)
            directions: dict[int, Tensor] = {}
            with timer.phase("precondition"):
                for layer in self._layers:
                    G = layer.grad_matrix()
                    if G is None:
                        continue
                    D = self._precondition(layer, G, groups[layer.name]["damping"])
                    if layer.bias is not None:
                        directions[id(layer.bias)] = D[:, -1].reshape_as(layer.bias)
                        D = D[:, :-1]
                    directions[id(layer.weight)] = D.reshape_as(layer.weight)
        finally:
            for layer in self._layers:
                layer.records.clear()
        with timer.phase("rest"):
            for group in self.param_groups:
                lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    d = directions.get(id(p), p.grad)
                    if wd != 0:
                        d = d.add(p, alpha=wd)
                    if mom != 0:
                        state = self.state[p]
                        buf = state.get("momentum_buffer")
                        if buf is None:
                            buf = state["momentum_buffer"] = torch.clone(d).detach()
                        else:
                            buf.mul_(mom).add_(d)
                        d = buf
                    p.add_(d, alpha=-lr)
        self._step_count += 1
        self._epoch_steps += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus SENG's own: step counter, epoch, the generator state of the
        column sampling, and every layer's stored curvature (``U`` or its factors, sample
        indices, Cholesky factor). Tensors are references, as in ``torch.optim``."""
        sd = super().state_dict()
        sd["seng"] = {
            "step": self._step_count,
            "epoch": self.epoch,
            "epoch_steps": self._epoch_steps,
            "rng_state": self._generator.get_state(),
            "curvature": {name: dict(entry) for name, entry in self._curvature.items()},
        }
        return sd

    @staticmethod
    def _check_curvature(layer: _Layer, entry: dict[str, Any]) -> None:
        """The stored curvature of ``layer`` must fit its shapes (``ValueError`` otherwise)."""
        def bad(what: str, got) -> ValueError:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            return ValueError(f"state_dict curvature of {layer.describe()}: {what} has shape {shape}, which does "
                              f"not fit the layer ({layer.d_out} x {layer.d_in}): saved for another model")

        if entry.get("implicit") != layer.implicit:
            raise ValueError(f"state_dict curvature of {layer.describe()}: saved "
                             f"{'implicit' if entry.get('implicit') else 'explicit'}, the layer is "
                             f"{'implicit' if layer.implicit else 'explicit'} here")
        chol = entry.get("chol")
        if not isinstance(chol, Tensor) or chol.dim() != 2 or chol.shape[0] != chol.shape[1]:
            raise bad("chol", chol)
        n = chol.shape[0]
        if not layer.implicit:
            U = entry.get("U")
            if not isinstance(U, Tensor) or tuple(U.shape) != (n, layer.numel):
                raise bad("U", U)
            if "index" in entry:
                idx, US = entry["index"], entry.get("U_S")
                if not isinstance(idx, Tensor) or idx.dim() != 1 or (idx.numel() and int(idx.max()) >= layer.numel):
                    raise bad("index", idx)
                if not isinstance(US, Tensor) or tuple(US.shape) != (n, idx.numel()):
                    raise bad("U_S", US)
        else:
            for key, dim in (("g", layer.d_out), ("a", layer.d_in)):
                t = entry.get(key)
                if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != n or t.shape[1] != dim:
                    raise bad(key, t)
            for key, dim in (("row_index", layer.d_out), ("col_index", layer.d_in)):
                idx = entry.get(key)
                if idx is not None and (not isinstance(idx, Tensor) or (idx.numel() and int(idx.max()) >= dim)):
                    raise bad(key, idx)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the layers, the shapes of every stored curvature tensor
        and of the momentum buffers are checked first (nothing changes on a mismatch)."""
        state_dict = dict(state_dict)
        if "seng" not in state_dict:
            raise ValueError("state_dict has no 'seng' entry: it was not saved by SENG.state_dict()")
        extra = state_dict.pop("seng")
        names = [g.get("layer") for g in state_dict.get("param_groups", [])]
        mine = [g["layer"] for g in self.param_groups]
        if names != mine:
            raise ValueError(f"state_dict layers {names} do not match this optimizer's {mine}")
        unknown = set(extra["curvature"]) - set(self._by_name)
        if unknown:
            raise ValueError(f"state_dict has curvature for unknown layers {sorted(unknown)}")
        for name, entry in extra["curvature"].items():
            self._check_curvature(self._by_name[name], entry)
        rng = extra["rng_state"]
        if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
            raise ValueError("state_dict['seng']['rng_state'] must be a uint8 tensor (a generator state)")
        check_param_state(self, state_dict)
        super().load_state_dict(state_dict)
        self._step_count = int(extra["step"])
        self.epoch = extra["epoch"]
        self._epoch_steps = int(extra.get("epoch_steps", 0))
        self._generator.set_state(extra["rng_state"].cpu())
        self._curvature = {}
        for name, entry in extra["curvature"].items():
            dev = self._by_name[name].weight.device
            self._curvature[name] = {
                k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in entry.items()
            }


_SENG_KEYS = signature_defaults(SENG.__init__)
