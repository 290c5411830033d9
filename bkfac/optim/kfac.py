"""The K-FAC family as ``torch.optim.Optimizer`` classes, named as in the paper.

=================  ==========================  ==================================================
class              paper name                  factor-inverse method (per factor, Sec. 3.5)
=================  ==========================  ==================================================
:class:`KFAC`      k-fac (Martens+Grosse)      ``eigh`` every T_inv
:class:`RKFAC`     r-kfac (rs-kfac, Alg. 1)    ``rsvd`` every T_inv; ``eigh`` if d <= r + r_o
:class:`SREKFAC`   sre-kfac                    ``srevd`` every T_inv; ``eigh`` if d <= r + r_o
:class:`BKFAC`     b-kfac (Alg. 4)             B-updates where d > n_M + r; else as r-kfac
:class:`BRKFAC`    b-r-kfac (Alg. 5)           B-updates + RSVD overwrite where d > n_M + r
:class:`BKFACC`    b-kfac-c (Alg. 6-7)         B-updates + light correction where d > n_M + r
=================  ==========================  ==================================================

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
   ``Mat(g) = scale * G_k A_k^T``); otherwise with Alg. 1 lines 16-17;
4. **rest** -- clipping (the paper's per-layer RMS clip ``nu = min(1, clip / rms(S))``,
   or KL clipping ``nu = min(1, sqrt(kl_clip / (lr^2 sum S . g)))``), weight decay
   added after preconditioning, optional momentum, the update ``p -= lr * d_p``.
   Parameters of unsupported layers (BatchNorm, ...) get the plain SGD step with the same
   learning rate, weight decay and momentum.

Usage::

    opt = bkfac.BKFAC(model, lr=0.1)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_open_unit, check_positive_int
from ..curvature import KFactorCapture, LayerCapture
from ..inverses import (
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

__all__ = ["KFACFamily", "KFAC", "RKFAC", "SREKFAC", "BKFAC", "BRKFAC", "BKFACC", "POLICIES"]

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


@dataclass
class _Layer:
    capture: LayerCapture
    inv_A: FactorInverse | None = None
    inv_G: FactorInverse | None = None
    linear_time: bool = False  # Alg. 8 eligible (A-factor on the B-update path)
    n_M: int | None = None


class KFACFamily(torch.optim.Optimizer):
    """Common machinery of the K-FAC family. Use one of the subclasses.

    Keyword-only hyper-parameters (paper values in :data:`bkfac.optim.factory.PAPER_DEFAULTS`):

    lr: learning rate (group ``lr``; ``torch.optim.lr_scheduler`` works on it), or use
        ``lr_schedule`` (an :class:`EpochSchedule`/callable of the epoch, applied by
        :meth:`set_epoch`).
    damping_phi: ``phi`` of ``lambda = phi * lambda_max`` per factor (number or epoch schedule).
    rho: EA decay of eq. (5), in (0, 1).      t_updt: statistics period T_updt.
    t_inv: period of eigh/RSVD/SREVD recomputations (k-fac, r-kfac, and the r-kfac part of
        the b-variants).
    rank, oversample, power_iters: RSVD/SREVD target rank (also the b-kfac truncation rank),
        oversampling and power iterations; ``rank``/``oversample`` may be epoch schedules.
    weight_decay, momentum: applied after preconditioning and clipping.
    clip: the paper's clip parameter (per-layer RMS of the step); ``clip_mode`` ``'rms'``
        (paper), ``'kl'`` (KL clipping, ``clip`` is then the KL bound), or ``None``.
    fisher: ``'empirical'`` (true labels, default) or ``'mc'`` (eq. 2; call
        ``optimizer.capture.sampled_fisher_backward(logits)`` before ``loss.backward()`` on
        steps where :meth:`wants_statistics` is true).
    loss_reduction: ``'mean'`` (default) or ``'sum'`` over the batch.
    spectrum_continuation: Sec. 3.5 (default on).  linear_time: use Alg. 8 where exact.
    policy: which factors take B-updates: ``'mixed'`` (default, ``d > n_M + r``), ``'first-fc'``
        (the paper's: the first Linear layer only) or ``'all'`` (``d > r``, for studies); see the
        module docstring.  min_damping: absolute floor of lambda.
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
    """

    algorithm = "k-fac-family"

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
        policy: str = "mixed",
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
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        lr_schedule = as_schedule(lr_schedule)
        lr0 = _value(lr_schedule, 1) if lr_schedule is not None else lr
        if not (isinstance(lr0, (int, float)) and lr0 >= 0):
            raise ValueError(f"lr must be a non-negative number, got {lr0!r}")
        damping_phi = as_schedule(damping_phi)
        for phi in (damping_phi.values() if isinstance(damping_phi, EpochSchedule) else [damping_phi]):
            if not (isinstance(phi, (int, float)) and phi > 0):
                raise ValueError(f"damping_phi must be positive (lambda = phi * lambda_max), got {phi!r}")
        check_open_unit("rho", rho)
        check_positive_int("t_updt", t_updt)
        check_positive_int("t_inv", t_inv)
        rank, oversample = as_schedule(rank), as_schedule(oversample)
        for r in (rank.values() if isinstance(rank, EpochSchedule) else [rank]):
            check_positive_int("rank", r)
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if clip_mode not in ("rms", "kl", None):
            raise ValueError(f"clip_mode must be 'rms', 'kl' or None, got {clip_mode!r}")
        if clip_mode is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"clip must be positive when clip_mode={clip_mode!r}, got {clip!r}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if not min_damping > 0:
            raise ValueError(f"min_damping must be positive, got {min_damping!r}")

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
        self.policy = policy
        self.min_damping = min_damping
        self.lr_schedule = lr_schedule
        self.factor_dtype = factor_dtype
        self.check_finite = check_finite
        self.comm = comm if comm is not None else LocalComm()
        self.method_kw = method_kw
        self._validate_method_kw()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.seed = seed
        self.capture = KFactorCapture(model, reduction=loss_reduction, skip=tuple(exclude))
        if self.capture.unsupported:
            names = ", ".join(f"{k} ({v})" for k, v in self.capture.unsupported.items())
            warnings.warn(f"{type(self).__name__}: plain SGD step for parameters of: {names}", stacklevel=2)
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

    # -- method policy (Sec. 3.5) ----------------------------------------------------------------
    def _validate_method_kw(self) -> None:
        for key in self.method_kw:
            if key not in self._method_keys():
                raise ValueError(f"{type(self).__name__} got an unknown hyper-parameter {key!r}")
        for key, value in self.method_kw.items():
            if key.startswith("t_"):
                check_positive_int(key, value)

    @classmethod
    def _method_keys(cls) -> tuple:
        return ()

    def _lowrank_class(self):
        return RSVDInverse

    def _brand_class(self):
        return None

    def _brand_eligible(self, dim: int, n_M: int, first_fc: bool) -> bool:
        """Whether ``policy`` puts a factor of dimension ``dim`` on the B-update path (module
        docstring): ``'mixed'`` where ``d > n_M + r``, ``'first-fc'`` for the first Linear
        layer's factors with ``d > r``, ``'all'`` where ``d > r``."""
        r = _max_value(self.rank)
        if self.policy == "mixed":
            return dim > n_M + r
        if self.policy == "first-fc":
            return first_fc and dim > r
        return dim > r

    def _choose(self, dim: int, n_M: int, first_fc: bool = False) -> type[FactorInverse]:
        """B-updates where the policy says (:meth:`_brand_eligible`); RSVD/SREVD where
        ``d > r + r_o``; exact ``eigh`` for factors too small for a low-rank form."""
        r, ro = _max_value(self.rank), _max_value(self.oversample)
        brand = self._brand_class()
        if brand is not None and self._brand_eligible(dim, n_M, first_fc):
            return brand
        low = self._lowrank_class()
        if low is not None and dim > r + ro:
            return low
        return EighInverse

    def _factor_generator(self, index: int, fac: str) -> torch.Generator:
        """The generator of factor ``fac`` of the ``index``-th layer (model order), seeded from
        ``(seed, index, fac)`` -- independent of layer names (a DDP wrapper prefixes them)."""
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + 2 * index + (fac == "G")) % (2**63 - 1))
        return g

    def _make_inverse(self, cls, dim: int, index: int = 0, fac: str = "A") -> FactorInverse:
        kw = dict(rho=self.rho, t_updt=self.t_updt, dtype=self.factor_dtype,
                  generator=self._factor_generator(index, fac))
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
            L.inv_A = self._make_inverse(self._choose(lc.d_A, n_M, i == first_fc), lc.d_A, i, "A")
            L.inv_G = self._make_inverse(self._choose(lc.d_G, n_M, i == first_fc), lc.d_G, i, "G")
            L.linear_time = self.linear_time and isinstance(L.inv_A, BrandInverse)
        self._initialized = True

    def describe(self) -> list[dict]:
        """Per factor: layer, factor, dimension, n_M, chosen method, rank, state bytes."""
        rows = []
        for L in self.layers:
            for fac, inv, dim in (("A", L.inv_A, L.capture.d_A), ("G", L.inv_G, L.capture.d_G)):
                rows.append(dict(
                    layer=L.capture.name, kind=L.capture.kind, factor=fac, dim=dim, n_M=L.n_M,
                    method=inv.method if inv is not None else "(not initialised: no step yet)",
                    rank=getattr(inv, "rank", dim) if inv is not None else None,
                    alg8=L.linear_time and fac == "A",
                    state_bytes=inv.state_bytes() if inv is not None else 0,
                ))
        for name, why in self.capture.unsupported.items():
            rows.append(dict(layer=name, kind="unsupported", factor="-", dim=None, n_M=None,
                             method=f"SGD ({why})", rank=None, alg8=False, state_bytes=0))
        return rows

    def describe_table(self) -> str:
        rows = self.describe()
        head = f"{'layer':<24}{'factor':>7}{'dim':>8}{'n_M':>8}  {'method':<18}{'rank':>6}{'alg8':>6}{'MiB':>9}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(
                f"{r['layer']:<24}{r['factor']:>7}{str(r['dim']):>8}{str(r['n_M']):>8}  {r['method']:<18}"
                f"{str(r['rank']):>6}{'yes' if r['alg8'] else '':>6}{r['state_bytes'] / 2**20:>9.2f}"
            )
        return "\n".join(lines)

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
        self.capture.remove()

    # -- the step ---------------------------------------------------------------------------------
    def _damped(self, inv: FactorInverse):
        U, d = inv.representation()
        phi = _value(self.damping_phi, self.epoch)
        lam = torch.clamp(d[0] * phi, min=self.min_damping) if d.numel() else torch.tensor(self.min_damping)
        if self.continuation:
            d, lam = spectrum_continuation(d, lam, check=False)
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
        With a ``pending`` list the check is deferred to :meth:`_flush` (no host sync here)."""
        if self.check_finite:
            probe = M.diagonal() if outer else M
            ok = torch.isfinite(probe).all()

            def fail() -> None:
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
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        total = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).sum()
        if pending is not None:
            pending.append((torch.isfinite(total), self._raise_grads))
        elif not bool(torch.isfinite(total)):
            self._raise_grads()

    def _raise_grads(self) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(
                        f"non-finite gradient in parameter '{names.get(id(p), '?')}' at step {self.steps}: "
                        "the loss or the backward pass produced NaN/inf (lower the learning rate?)"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.steps
        timer = self.timer
        timer.start_step()
        updates: dict[int, Tensor] = {}
        with timer.phase("statistics"):
            self.comm.all_reduce_gradients([p for g in self.param_groups for p in g["params"]])
            if not self._initialized:
                self._init_layers()
            # On a step where no factor takes statistics (the Alg. 8 layers still build A_k, G_k)
            # nothing is mutated before the precondition phase, so the finiteness checks of the
            # gradients and of A_k, G_k share one host sync at the end of this phase; a step that
            # feeds a factor checks each batch before it is folded in.
            observing = any(inv is not None and inv.wants_batch(k) for L in self.layers for inv in (L.inv_A, L.inv_G))
            pending: list | None = None if observing else []
            if self.check_finite:
                self._check_grads(pending)
            batches = {}
            for L in self.layers:
                lc = L.capture
                if lc.module.weight.grad is None or L.inv_A is None:
                    continue
                dtype = self.factor_dtype or lc.module.weight.dtype
                use_alg8 = (L.linear_time and self.fisher == "empirical"
                            and lc.forward_calls == 1 and lc.backward_calls == 1)
                A = G = None
                # factors that only need M_k M_k^T get it without M_k (one process: the columns of
                # the other ranks' batches are not here)
                local = self.comm.world_size == 1
                outer_A = local and not use_alg8 and L.inv_A.accepts_outer
                outer_G = local and not use_alg8 and L.inv_G.accepts_outer
                if L.inv_A.wants_batch(k) and outer_A:
                    L.inv_A.observe_outer(k, self._checked(lc.batch_outer_A(dtype), lc, "input activations", k, True))
                elif L.inv_A.wants_batch(k) or use_alg8:
                    A = self._checked(self.comm.gather_columns(lc.batch_A(dtype)), lc, "input activations", k,
                                      pending=pending)
                    if L.inv_A.wants_batch(k) and self.comm.is_owner((lc.name, "A")):
                        L.inv_A.observe(k, A)
                if L.inv_G.wants_batch(k) and outer_G:
                    L.inv_G.observe_outer(k, self._checked(lc.batch_outer_G(self.capture.reduction, dtype), lc,
                                                           "output gradients", k, True))
                elif L.inv_G.wants_batch(k) or use_alg8:
                    G = self._checked(self.comm.gather_columns(lc.batch_G(self.capture.reduction, dtype)), lc,
                                      "output gradients", k, pending=pending)
                    if L.inv_G.wants_batch(k) and self.comm.is_owner((lc.name, "G")):
                        L.inv_G.observe(k, G)
                batches[id(L)] = (A, G, use_alg8)
            if pending:
                self._flush(pending)
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
                    S = (G_hat * scale) @ A_hat.mT
                else:
                    # Alg. 1 lines 16-17; a full-rank method applies its own dense route where it
                    # pays off (k-fac: one GEMM a side with a cached inverse), else (U, d) is applied
                    phi = _value(self.damping_phi, self.epoch)
                    S = self._apply_inverse(L.inv_A, L.capture.grad_matrix(), "right", phi)
                    S = self._apply_inverse(L.inv_G, S, "left", phi)
                updates[id(L)] = S
        with timer.phase("rest"):
            self._clip(updates)
            self._apply(updates)
            for L in self.layers:
                for inv in (L.inv_A, L.inv_G):
                    if inv is not None:
                        inv.end_step()
            self.capture.clear()
            if self.fisher == "mc":
                self.capture.resume_recording()
        self.steps += 1
        return loss

    def _clip(self, updates: dict[int, Tensor]) -> None:
        if self.clip_mode is None or not updates:
            return
        if self.clip_mode == "rms":
            # The paper's clip parameter: per layer, scale the step so its RMS is <= clip.
            for key, S in updates.items():
                rms = torch.linalg.vector_norm(S) / math.sqrt(S.numel())
                S.mul_(torch.clamp(self.clip / torch.clamp(rms, min=1e-30), max=1.0))
            return
        # KL clipping (Ba et al. 2017 style): nu = min(1, sqrt(kl / (lr^2 * sum S.g))).
        vg = 0.0
        for L in self.layers:
            if id(L) in updates:
                lr = self._group_of[id(L.capture.module.weight)]["lr"]
                J = L.capture.grad_matrix().to(updates[id(L)].dtype)
                vg = vg + (updates[id(L)] * J).sum() * lr**2
        vg = torch.as_tensor(vg)
        nu = torch.where(vg > 0, torch.clamp(torch.sqrt(self.clip / vg.clamp(min=1e-30)), max=1.0), torch.ones_like(vg))
        for S in updates.values():
            S.mul_(nu)

    def _apply(self, updates: dict[int, Tensor]) -> None:
        directions: dict[int, Tensor] = {}
        for L in self.layers:
            if id(L) in updates:
                for p, v in zip(L.capture.params, L.capture.set_update(updates[id(L)])):
                    directions[id(p)] = v.to(p.dtype)
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if id(p) in directions:
                    d_p = directions[id(p)]
                elif p.grad is not None:
                    d_p = p.grad
                else:
                    continue
                if wd:
                    d_p = d_p.add(p, alpha=wd)
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
        sd = super().state_dict()
        sd["kfac"] = {
            "algorithm": self.algorithm,
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

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac", None)
        if kfac is None:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by a bkfac K-FAC optimizer")
        if kfac["algorithm"] != self.algorithm:
            raise ValueError(f"state_dict is from {kfac['algorithm']!r}, this optimizer is {self.algorithm!r}")
        super().load_state_dict(state_dict)
        self.steps, self.epoch = kfac["steps"], kfac["epoch"]
        self.generator.set_state(kfac["generator"])
        by_name = {L.capture.name: L for L in self.layers}
        index_of = {L.capture.name: i for i, L in enumerate(self.layers)}
        missing = set(by_name) ^ set(kfac["layers"])
        if missing:
            raise ValueError(f"state_dict layers do not match the model: {sorted(missing)}")
        from ..inverses import INVERSE_METHODS

        for name, st in kfac["layers"].items():
            L = by_name[name]
            L.n_M = st["n_M"]
            for fac in ("A", "G"):
                if st[fac] is None:
                    continue
                method, inv_state = st[fac]
                dim = L.capture.d_A if fac == "A" else L.capture.d_G
                inv = self._make_inverse(INVERSE_METHODS[method], dim, index_of[name], fac)
                inv.load_state_dict(inv_state)
                if fac in st.get("generators", {}):
                    inv.generator.set_state(st["generators"][fac])
                setattr(L, f"inv_{fac}", inv)
            L.linear_time = self.linear_time and isinstance(L.inv_A, BrandInverse)
        self._initialized = kfac["initialized"]
        for L in self.layers:
            for inv in (L.inv_A, L.inv_G):
                if inv is not None:
                    inv.epoch = self.epoch


class KFAC(KFACFamily):
    """k-fac (Martens and Grosse 2015; KFC for convolutions): exact ``eigh`` of every EA factor
    every ``t_inv`` steps (Sec. 2.1).

    ``inverse="cholesky"`` (not in the paper; one process only) replaces ``eigh`` by a
    power-iteration estimate of lambda_max and a Cholesky inverse of the damped factor
    (:class:`~bkfac.inverses.CholeskyInverse`): the same damped inverse up to the power
    iteration's tolerance, at a fraction of ``eigh``'s cost -- what other K-FAC
    implementations do. ``"eigh"`` (default) is the paper's and keeps the spectrum.
    """

    algorithm = "k-fac"

    @classmethod
    def _method_keys(cls):
        return ("inverse",)

    def __init__(self, model, *, inverse: str = "eigh", **kw):
        if inverse not in ("eigh", "cholesky"):
            raise ValueError(f"inverse must be 'eigh' or 'cholesky', got {inverse!r}")
        super().__init__(model, inverse=inverse, **kw)
        if inverse == "cholesky" and self.comm.world_size > 1:
            raise ValueError("KFAC(inverse='cholesky') runs in one process only; use inverse='eigh' "
                             "for data-parallel training")

    def _lowrank_class(self):
        return None

    def _choose(self, dim: int, n_M: int, first_fc: bool = False) -> type[FactorInverse]:
        return CholeskyInverse if self.method_kw["inverse"] == "cholesky" else EighInverse


class RKFAC(KFACFamily):
    """r-kfac (rs-kfac of Puiu 2022a, Algorithm 1): RSVD of each EA factor every ``t_inv`` steps."""

    algorithm = "r-kfac"


class SREKFAC(KFACFamily):
    """sre-kfac (Puiu 2022a): symmetric randomized EVD of each EA factor every ``t_inv`` steps."""

    algorithm = "sre-kfac"

    def _lowrank_class(self):
        return SREVDInverse


class BKFAC(KFACFamily):
    """b-kfac (Algorithm 4): truncate + symmetric Brand update every ``t_brand`` steps for the
    factors the ``policy`` names (module docstring; the paper's is ``'first-fc'``); r-kfac for
    the others. Pure
    b-kfac factors never form a ``d x d`` matrix (low-memory, Sec. 3.5). Alg. 8 for the step."""

    algorithm = "b-kfac"

    @classmethod
    def _method_keys(cls):
        return ("t_brand",)

    def __init__(self, model, *, t_brand: int = 1, **kw):
        super().__init__(model, t_brand=t_brand, **kw)

    def _brand_class(self):
        return BrandInverse


class BRKFAC(BKFAC):
    """b-r-kfac (Algorithm 5): b-kfac plus an RSVD overwrite every ``t_rsvd`` steps."""

    algorithm = "b-r-kfac"

    @classmethod
    def _method_keys(cls):
        return ("t_brand", "t_rsvd")

    def __init__(self, model, *, t_brand: int = 1, t_rsvd: int = 1, **kw):
        KFACFamily.__init__(self, model, t_brand=t_brand, t_rsvd=t_rsvd, **kw)

    def _brand_class(self):
        return BrandRSVDInverse


class BKFACC(BKFAC):
    """b-kfac-c (Algorithm 7): b-kfac plus the light correction (Alg. 6) every ``t_corct`` steps
    on ``phi_crc * r`` randomly chosen modes."""

    algorithm = "b-kfac-c"

    @classmethod
    def _method_keys(cls):
        return ("t_brand", "t_corct", "phi_crc")

    def __init__(self, model, *, t_brand: int = 1, t_corct: int = 1, phi_crc: float = 0.5, **kw):
        KFACFamily.__init__(self, model, t_brand=t_brand, t_corct=t_corct, phi_crc=phi_crc, **kw)

    def _brand_class(self):
        return BrandCorrectedInverse
