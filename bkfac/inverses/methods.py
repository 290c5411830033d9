"""One class per factor-inverse method, behind one interface (:class:`FactorInverse`).

Each instance holds the inverse representation ``(U, d)`` of ONE exponentially averaged
K-factor (the A- or the Gamma-factor of one layer) and, where the method needs it, the
dense EA factor itself (eq. 5):

    M_0 = M_0 M_0^T,    M_k = rho M_{k-1} + (1 - rho) M_k M_k^T.

``identity_start=True`` starts the average from the identity instead (``M_{-1} = I``, so the
first batch enters with weight ``1 - rho``), as the author's code initialises its factors.
The factor is then ``L_u + rho^u I`` after ``u`` updates, and the identity part is carried as
a number beside the data part: ``factor`` holds ``L_u`` and ``ea_identity`` the weight
``rho^u``; a representation ``(U, d)`` of a data part carries its own weight ``identity``
(the EA factor's at the time of an eigh/RSVD, multiplied by ``rho`` at each B-update). The
damped inverse of ``U diag(d) U^T + identity I`` takes ``lambda_max = d_1 + identity`` and adds
``identity`` to ``lambda``, so every route (dense, ``(U, d)``, Algorithm 8) applies the
inverse of the same matrix, and the low-rank methods never sketch a flat identity tail.

The optimizer calls, at every step ``k``:

1. ``wants_batch(k)``; when true, it builds the batch matrix ``M_k`` (d x n_M) and calls
   ``observe(k, M_k)`` (the statistics phase);
2. ``refresh(k)`` (the inverse-update phase);
3. ``representation()`` -> ``(U, d)`` for the damped inverse application.

========================  =====================  ===========================================
class                      paper                  representation update
========================  =====================  ===========================================
:class:`EighInverse`       k-fac                  ``eigh`` of the dense EA factor every T_inv
:class:`CholeskyInverse`   k-fac (option)         ``cholesky`` of the damped factor every T_inv
:class:`RSVDInverse`       r-kfac (Alg. 1 l.13)   ``rsvd`` of the dense EA factor every T_inv
:class:`SREVDInverse`      sre-kfac               ``srevd`` of the dense EA factor every T_inv
:class:`BrandInverse`      b-kfac (Alg. 4)        truncate to r, then B-update, every T_brand
:class:`BrandRSVDInverse`  b-r-kfac (Alg. 5)      B-updates; RSVD overwrite every T_rsvd
:class:`BrandCorrectedInverse` b-kfac-c (Alg. 6-7) B-updates; light correction every T_corct
========================  =====================  ===========================================

:class:`BrandInverse` is the low-memory b-kfac of Sec. 3.5: it never forms a ``d x d``
matrix, also not at start-up (the first representation is the exact EVD of
``M_0 M_0^T`` from a Brand update of an empty representation -- what an RSVD of ``M_0``
gives when its rank fits, at ``O(d n^2)``). b-r-kfac and b-kfac-c need the dense factor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_open_unit, check_positive_int, clamp_rounding_negatives
from ..linalg import brand_update, gram, lambda_max, light_correction, rsvd, safe_eigh, srevd, truncate

__all__ = [
    "FactorInverse",
    "EighInverse",
    "CholeskyInverse",
    "RSVDInverse",
    "SREVDInverse",
    "BrandInverse",
    "BrandRSVDInverse",
    "BrandCorrectedInverse",
    "INVERSE_METHODS",
]


class FactorInverse:
    """Common interface and the dense EA bookkeeping.

    Parameters (keyword-only): ``dim`` of the factor; ``rho`` in (0, 1); ``t_updt`` (period
    of the dense EA statistics); ``rank``/``oversample``/``power_iters`` for the low-rank
    methods (``rank``/``oversample`` may be callables of the epoch, the paper's schedules);
    ``generator`` for the randomized parts; ``dtype``/``device`` of the stored state;
    ``identity_start`` (module docstring: the EA starts from ``I`` instead of the first batch).
    """

    method = "base"
    needs_dense = True

    def __init__(self, dim: int, *, rho: float = 0.95, t_updt: int = 1, dtype=torch.float32,
                 device=None, generator: torch.Generator | None = None, identity_start: bool = False):
        check_positive_int("dim", dim)
        check_open_unit("rho", rho)
        check_positive_int("t_updt", t_updt)
        if not isinstance(identity_start, bool):
            raise ValueError(f"identity_start must be a bool, got {identity_start!r}")
        self.identity_start = identity_start
        #: weight of ``I`` in the dense EA factor (``factor`` holds the rest): ``rho^u`` after
        #: ``u`` updates from the identity start, 0 from the first-batch start
        self.ea_identity = 1.0 if identity_start else 0.0
        #: weight of ``I`` in the factor the representation ``(U, d)`` stands for
        self.identity = 0.0
        self.dim = dim
        self.rho = rho
        self.t_updt = t_updt
        self.dtype = dtype
        self.device = device
        self.generator = generator
        self.factor: Tensor | None = None  # dense EA factor (d x d) when needs_dense
        self.U: Tensor | None = None
        self.d: Tensor | None = None
        self.epoch = 1
        self.updates = 0  # number of representation updates performed (for tests/inspection)
        self._batch: Tensor | None = None
        self._inverse_cache = None  # (key, ...) of a dense route (damped_inverse / damped_apply)

    # -- the three calls of the optimizer ---------------------------------------------------
    def wants_batch(self, k: int) -> bool:
        """Whether step ``k`` needs the batch matrix (dense statistics every ``t_updt`` steps)."""
        return self.needs_dense and k % self.t_updt == 0

    def observe(self, k: int, batch: Tensor) -> None:
        """Receive the batch matrix ``M_k`` (d x n_M) of step ``k``."""
        if batch.shape[0] != self.dim:
            raise ValueError(f"batch matrix has {batch.shape[0]} rows, the factor has dimension {self.dim}")
        self._batch = batch
        self._before_dense_update(k)
        if self.needs_dense and k % self.t_updt == 0:
            self._update_dense(batch)

    #: True for methods that only need ``M_k M_k^T`` (not ``M_k``): the optimizer may then
    #: hand :meth:`observe_outer` the product, built without forming ``M_k`` (the one-copy statistics of commit 4d7939d).
    accepts_outer = False

    def observe_outer(self, k: int, outer: Tensor) -> None:
        """Receive ``M_k M_k^T`` (d x d) of step ``k`` instead of ``M_k``; only where
        :attr:`accepts_outer`."""
        if not self.accepts_outer:
            raise TypeError(f"{type(self).__name__} needs the batch matrix M_k, not M_k M_k^T")
        if outer.shape != (self.dim, self.dim):
            raise ValueError(f"outer product has shape {tuple(outer.shape)}, the factor has dimension {self.dim}")
        self._before_dense_update(k)
        if self.needs_dense and k % self.t_updt == 0:
            self._accumulate(outer)

    def _before_dense_update(self, k: int) -> None:
        """Hook for methods that need the EA factor of step k-1 (b-r-kfac), before it moves on."""

    def _update_dense(self, batch: Tensor) -> None:
        self._accumulate(gram(batch))

    def _accumulate(self, outer: Tensor) -> None:
        """Eq. (5) with the batch factor ``outer = M_k M_k^T`` (from the identity: the identity's
        weight decays by ``rho`` and the first batch enters with ``1 - rho``)."""
        if self.identity_start:
            if self.factor is None:
                self.factor = outer.mul_(1.0 - self.rho)
            else:
                self.factor.mul_(self.rho).add_(outer, alpha=1.0 - self.rho)
            self.ea_identity *= self.rho
        elif self.factor is None:
            self.factor = outer  # kappa(0) = 1 in eq. (5)
        else:
            self.factor.mul_(self.rho).add_(outer, alpha=1.0 - self.rho)

    def refresh(self, k: int) -> None:  # pragma: no cover - abstract
        """Update the representation ``(U, d)`` at step ``k`` if the method's schedule says so."""
        raise NotImplementedError

    def symmetric_factor(self) -> Tensor:
        """The dense EA factor, symmetrised against rounding (``(M + M^T) / 2``)."""
        return 0.5 * (self.factor + self.factor.mT)

    def damped_inverse(self, phi: float, min_damping: float) -> Tensor | None:
        """``(factor + lam I)^{-1}`` as a dense matrix, ``lam = max(phi * lambda_max, min_damping)``,
        where this method keeps a full-rank representation; ``None`` otherwise. (``factor``
        includes the identity part of an identity start.)"""
        return None

    def damped_apply(self, X: Tensor, side: str, phi: float, min_damping: float) -> Tensor | None:
        """``(factor + lam I)^{-1} X`` (``side='left'``) or ``X (factor + lam I)^{-1}`` (``'right'``)
        by this method's own dense route, or ``None``: the optimizer then applies the
        representation ``(U, d)`` (Alg. 1 lines 16-17). Dense routes exist for the full-rank
        methods; they are used where the representation serves several steps (``t_inv > 1``),
        so that forming a dense inverse pays off."""
        return None

    @staticmethod
    def _dense_apply(inv: Tensor, X: Tensor, side: str) -> Tensor:
        """``inv @ X`` (``side='left'``) or ``X @ inv`` (``'right'``) in ``inv``'s dtype."""
        X = X.to(inv.dtype)
        return inv @ X if side == "left" else X @ inv

    def representation(self) -> tuple[Tensor, Tensor]:
        """``(U, d)``: orthonormal columns and non-negative eigenvalues, descending."""
        if self.U is None:
            raise RuntimeError(f"{type(self).__name__}: no representation yet (no statistics observed)")
        return self.U, self.d

    def end_step(self) -> None:
        """Forget the step's batch matrix."""
        self._batch = None

    # -- inspection and checkpoints ------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the tensors this representation keeps between steps."""
        return sum(t.numel() * t.element_size() for t in (self.factor, self.U, self.d) if t is not None)

    def state_dict(self) -> dict:
        """The tensors and counters that define this factor (for checkpoints)."""
        return {"factor": self.factor, "U": self.U, "d": self.d, "updates": self.updates, "epoch": self.epoch,
                "ea_identity": self.ea_identity, "identity": self.identity}

    #: state keys a checkpoint of an earlier version may lack (first-batch start: 0)
    _OPTIONAL_STATE = ("ea_identity", "identity")

    def check_state(self, state: dict, where: str = "factor state") -> None:
        """Check a :meth:`state_dict` against this factor before loading it: its keys, the
        shapes of ``factor`` (``dim x dim``), ``U`` (``dim x w``, ``w <= dim``) and ``d``
        (``w``), floating tensors, integer counters. ``ValueError`` naming ``where`` otherwise."""
        if not isinstance(state, dict):
            raise ValueError(f"{where}: expected a dict, got {type(state).__name__}")
        missing = [k for k in self.state_dict() if k not in state and k not in self._OPTIONAL_STATE]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (saved by another method?)")
        _check_tensor(where, "factor", state["factor"], (self.dim, self.dim))
        U, d = state["U"], state["d"]
        if (U is None) != (d is None):
            raise ValueError(f"{where}: U and d must both be set or both be None")
        if U is not None:
            width = U.shape[-1] if isinstance(U, Tensor) and U.dim() == 2 else -1
            if not 0 <= width <= self.dim:
                raise ValueError(f"{where}: U has shape {_shape(U)}, expected ({self.dim}, w) with w <= {self.dim}")
            _check_tensor(where, "U", U, (self.dim, width))
            _check_tensor(where, "d", d, (width,))
        for key in ("updates", "epoch"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"{where}: {key} must be a non-negative int, got {state[key]!r}")
        for key in self._OPTIONAL_STATE:
            v = state.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}: {key} must be a number in [0, 1], got {v!r}")
            if v and not self.identity_start:
                raise ValueError(f"{where}: saved from an identity start ({key} = {v:g}); this optimizer "
                                 "starts its factors from the first batch (factor_init)")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self.factor, self.U, self.d = state["factor"], state["U"], state["d"]
        self.updates, self.epoch = state["updates"], state["epoch"]
        self.ea_identity = float(state.get("ea_identity", 0.0))
        self.identity = float(state.get("identity", 0.0))
        self._inverse_cache = None

    def _set(self, U: Tensor, d: Tensor, identity: float | None = None) -> None:
        """Install ``(U, d)``; ``identity``: its identity weight (default: the EA factor's, for
        a representation computed from the dense factor)."""
        self.U, self.d = U.contiguous(), d.contiguous()
        self.identity = self.ea_identity if identity is None else identity
        self.updates += 1

    def describe(self) -> str:
        """The method's name."""
        return self.method


def _value(x, epoch: int):
    return x(epoch) if callable(x) else x


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_tensor(where: str, name: str, x, shape: tuple) -> None:
    """``x`` is ``None`` or a floating tensor of ``shape``."""
    if x is None:
        return
    if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {_shape(x)}"
                         f"{'' if not isinstance(x, Tensor) or x.is_floating_point() else f' ({x.dtype})'}, "
                         f"expected a floating tensor of shape {tuple(shape)} (saved for another model?)")


class _Recompute:
    """Mixin: recompute the representation from the dense factor every ``t_inv`` steps."""

    accepts_outer = True

    def __init__(self, dim: int, *, t_inv: int = 1, **kw):
        super().__init__(dim, **kw)
        check_positive_int("t_inv", t_inv)
        self.t_inv = t_inv

    def due(self, k: int) -> bool:
        return k % self.t_inv == 0 and self.factor is not None


class EighInverse(_Recompute, FactorInverse):
    """k-fac: exact ``eigh`` of the dense EA factor every ``t_inv`` steps (Martens and Grosse 2015).

    The representation is full rank, so the damped inverse is also kept as one dense matrix
    ``U diag(1 / (d + lam)) U^T``, formed once per representation and damping: the k-fac
    step is then two GEMMs instead of four (commit 4d7939d). Spectrum continuation
    is the identity on a full-rank representation, so the dense inverse is the same operator.
    """

    method = "eigh"

    def refresh(self, k: int) -> None:
        if self.due(k):
            evals, evecs = safe_eigh(self.symmetric_factor())
            evals = clamp_rounding_negatives(f"eigenvalues of a {self.dim}x{self.dim} K-factor", evals.flip(0), self.dim)
            self._set(evecs.flip(1), evals)

    def damped_inverse(self, phi: float, min_damping: float) -> Tensor | None:
        if self.U is None or self.U.shape[1] != self.dim:
            return None
        s = self.identity
        key = (self.updates, id(self.U), self.U._version, float(phi), float(min_damping), s)
        cache = self._inverse_cache
        if cache is None or cache[0] != key:
            lam = torch.clamp((self.d[0] + s) * phi, min=min_damping)
            inv = (self.U / (self.d + (s + lam))) @ self.U.mT
            self._inverse_cache = cache = (key, inv)
        return cache[1]

    def damped_apply(self, X: Tensor, side: str, phi: float, min_damping: float) -> Tensor | None:
        # with t_inv = 1 the dense inverse (2 d^3 flops) would serve one step: apply (U, d) instead
        if self.t_inv == 1:
            return None
        inv = self.damped_inverse(phi, min_damping)
        return None if inv is None else self._dense_apply(inv, X, side)


class CholeskyInverse(_Recompute, FactorInverse):
    """k-fac with a Cholesky inverse (an option, ``KFAC(inverse="cholesky")``; not in the paper).

    Every ``t_inv`` steps the dense EA factor is frozen (``snapshot``) and its largest
    eigenvalue estimated by warm-started power iteration (:func:`~bkfac.linalg.lambda_max`);
    the damped inverse ``(snapshot + lam I)^{-1}``, ``lam = max(phi * lambda_max, min_damping)``
    as in the paper's k-fac, then comes from ``cholesky`` + ``cholesky_inverse`` at about
    ``d^3`` flops against ``eigh``'s ~``9 d^3`` (commit 4d7939d). It is the same
    operator as :class:`EighInverse`'s up to the power iteration's tolerance on lambda_max
    (``rtol``), which only moves the damping. There is no eigen-representation:
    :meth:`representation` raises, so the error study and the spectrum-based tools use
    :class:`EighInverse`. One process only.
    """

    method = "cholesky"

    def __init__(self, dim: int, *, rtol: float = 1e-4, **kw):
        super().__init__(dim, **kw)
        self.rtol = rtol
        self.snapshot: Tensor | None = None
        self.lam_max: Tensor | None = None
        self._v: Tensor | None = None  # the power iteration's vector, warm start of the next

    def refresh(self, k: int) -> None:
        if self.due(k):
            self.snapshot = self.symmetric_factor()
            self.lam_max, self._v = lambda_max(self.snapshot, self._v, rtol=self.rtol, generator=self.generator)
            self.identity = self.ea_identity
            self.updates += 1

    def representation(self) -> tuple[Tensor, Tensor]:
        raise RuntimeError("CholeskyInverse keeps no eigen-representation (U, d); use damped_inverse() "
                           "or the eigh inverse (KFAC(inverse='eigh'))")

    def _cholesky(self, phi: float, min_damping: float) -> list:
        """``[key, L, explicit inverse or None]`` for the current snapshot and damping (cached)."""
        if self.snapshot is None:
            raise RuntimeError("CholeskyInverse: no inverse yet (no statistics observed)")
        key = (self.updates, float(phi), float(min_damping), self.identity)
        cache = self._inverse_cache
        if cache is None or cache[0] != key:
            lam = torch.clamp((self.lam_max + self.identity) * phi, min=min_damping)
            M = self.snapshot.clone()
            M.diagonal().add_(lam + self.identity)
            L, info = torch.linalg.cholesky_ex(M)
            if bool(info):  # float32 rounding on a nearly singular factor: once more in float64
                L, info = torch.linalg.cholesky_ex(M.double())
                if bool(info):
                    raise RuntimeError(f"Cholesky of a damped {self.dim}x{self.dim} K-factor failed (lam = {float(lam):.3g}); "
                                       "raise the damping or use inverse='eigh'")
                L = L.to(M.dtype)
            self._inverse_cache = cache = [key, L, None]
        return cache

    def damped_inverse(self, phi: float, min_damping: float) -> Tensor | None:
        cache = self._cholesky(phi, min_damping)
        if cache[2] is None:
            cache[2] = torch.cholesky_inverse(cache[1])
        return cache[2]

    def damped_apply(self, X: Tensor, side: str, phi: float, min_damping: float) -> Tensor | None:
        """With ``t_inv > 1``: one GEMM with the explicit inverse (formed once per snapshot and
        damping); with ``t_inv = 1``: two triangular solves with the Cholesky factor, which
        costs less than forming an inverse used once."""
        if self.t_inv > 1:
            return self._dense_apply(self.damped_inverse(phi, min_damping), X, side)
        L = self._cholesky(phi, min_damping)[1]
        X = X.to(L.dtype)
        return torch.cholesky_solve(X, L) if side == "left" else torch.cholesky_solve(X.mT, L).mT

    def state_bytes(self) -> int:
        return super().state_bytes() + sum(t.numel() * t.element_size() for t in (self.snapshot,) if t is not None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "snapshot": self.snapshot, "lam_max": self.lam_max, "v": self._v}

    def check_state(self, state: dict, where: str = "factor state") -> None:
        super().check_state(state, where)
        _check_tensor(where, "snapshot", state["snapshot"], (self.dim, self.dim))
        _check_tensor(where, "lam_max", state["lam_max"], ())
        _check_tensor(where, "v", state["v"], (self.dim,))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.snapshot, self.lam_max, self._v = state["snapshot"], state["lam_max"], state["v"]


class _LowRank(FactorInverse):
    def __init__(self, dim: int, *, rank=220, oversample=10, power_iters: int = 4, **kw):
        super().__init__(dim, **kw)
        self.rank_schedule = rank
        self.oversample_schedule = oversample
        self.power_iters = power_iters
        for name, sched in (("rank", rank), ("oversample", oversample)):
            v = _value(sched, 1)
            if name == "rank":
                check_positive_int("rank", v)
                if v > dim:
                    raise ValueError(f"rank={v} is larger than the factor dimension {dim}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"oversample must be a non-negative integer, got {v!r}")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"power_iters must be a non-negative integer, got {power_iters!r}")

    @property
    def rank(self) -> int:
        return min(_value(self.rank_schedule, self.epoch), self.dim)

    @property
    def oversample(self) -> int:
        return _value(self.oversample_schedule, self.epoch)

    def _randomized(self, fn) -> None:
        U, d = fn(self.symmetric_factor(), self.rank, self.oversample, self.power_iters, self.generator)
        self._set(U, d)


class RSVDInverse(_Recompute, _LowRank):
    """r-kfac (rs-kfac, Alg. 1 line 13): RSVD of the dense EA factor every ``t_inv`` steps."""

    method = "rsvd"

    def refresh(self, k: int) -> None:
        if self.due(k):
            self._randomized(rsvd)


class SREVDInverse(RSVDInverse):
    """sre-kfac: symmetric randomized EVD of the dense EA factor every ``t_inv`` steps."""

    method = "srevd"

    def refresh(self, k: int) -> None:
        if self.due(k):
            self._randomized(srevd)


class BrandInverse(_LowRank):
    """b-kfac (Algorithm 4): every ``t_brand`` steps, truncate to rank r, then B-update.

    ``U, d <- brand_update(U[:, :r], rho * d[:r], sqrt(1 - rho) * M_k)`` with the batch
    matrix ``M_k`` of that step (lines 3-7). The first representation is the exact EVD of
    ``M_0 M_0^T`` (``kappa(0) = 1``). With ``t_brand > t_updt`` the batches in between are not
    seen by the B-process (as in the paper: lines 2-7 run once every T_brand steps). The
    inverse is applied with the width ``r + n_M`` representation (truncation happens just
    before the next update). Never forms a ``d x d`` matrix (``needs_dense = False``).
    """

    method = "brand"
    needs_dense = False

    def __init__(self, dim: int, *, t_brand: int = 1, **kw):
        super().__init__(dim, **kw)
        check_positive_int("t_brand", t_brand)
        self.t_brand = t_brand

    def wants_batch(self, k: int) -> bool:
        return k % self.t_brand == 0 or super().wants_batch(k)

    def _b_update(self, batch: Tensor) -> None:
        if self.U is None:
            empty = batch.new_zeros(self.dim, 0)
            if self.identity_start:  # rho * I + (1 - rho) M_0 M_0^T
                U, d = brand_update(empty, batch.new_zeros(0), math.sqrt(1.0 - self.rho) * batch, check=False)
                self._set(U, d, identity=self.rho)
            else:
                U, d = brand_update(empty, batch.new_zeros(0), batch, check=False)
                self._set(U, d, identity=0.0)
        else:
            U, d = truncate(self.U, self.d, self.rank)
            U, d = brand_update(U, self.rho * d, math.sqrt(1.0 - self.rho) * batch, check=False)
            self._set(U, d, identity=self.rho * self.identity)

    def refresh(self, k: int) -> None:
        if k % self.t_brand == 0 and self._batch is not None:
            self._b_update(self._batch)


class BrandRSVDInverse(BrandInverse):
    """b-r-kfac (Algorithm 5): B-updates every ``t_brand``; every ``t_rsvd`` steps the
    truncated representation is first overwritten by ``rsvd`` of the EA factor of step k-1
    (lines 2-4), then B-updated with the batch of step k (line 7). Needs the dense factor."""

    method = "brand+rsvd"
    needs_dense = True

    def __init__(self, dim: int, *, t_rsvd: int = 1, **kw):
        super().__init__(dim, **kw)
        check_positive_int("t_rsvd", t_rsvd)
        if t_rsvd % self.t_brand:
            raise ValueError(f"t_rsvd={t_rsvd} must be a multiple of t_brand={self.t_brand}")
        self.t_rsvd = t_rsvd
        self._overwrite: tuple[Tensor, Tensor, float] | None = None

    def _before_dense_update(self, k: int) -> None:
        if k % self.t_rsvd == 0 and k > 0 and self.factor is not None:
            U, d = rsvd(self.symmetric_factor(), self.rank, self.oversample, self.power_iters, self.generator)
            self._overwrite = (U, d, self.ea_identity)

    def wants_batch(self, k: int) -> bool:
        return k % self.t_brand == 0 or k % self.t_updt == 0

    def refresh(self, k: int) -> None:
        if k % self.t_brand == 0 and self._batch is not None:
            if self._overwrite is not None:
                U, d, identity = self._overwrite
                self._overwrite = None
                U, d = brand_update(U, self.rho * d, math.sqrt(1.0 - self.rho) * self._batch, check=False)
                self._set(U, d, identity=self.rho * identity)
            else:
                self._b_update(self._batch)


class BrandCorrectedInverse(BrandInverse):
    """b-kfac-c (Algorithm 7): B-updates every ``t_brand``; every ``t_corct`` steps, after
    the B-update, the light correction of Algorithm 6 on ``n_crc = round(phi_crc * r)``
    modes chosen among the leading ``r``, against the dense EA factor of step k."""

    method = "brand+correction"
    needs_dense = True

    def __init__(self, dim: int, *, t_corct: int = 1, phi_crc: float = 0.5, **kw):
        super().__init__(dim, **kw)
        check_positive_int("t_corct", t_corct)
        if t_corct % self.t_brand:
            raise ValueError(f"t_corct={t_corct} must be a multiple of t_brand={self.t_brand}")
        if not (0.0 < phi_crc <= 1.0):
            raise ValueError(f"phi_crc must lie in (0, 1], got {phi_crc!r}")
        self.t_corct = t_corct
        self.phi_crc = phi_crc

    def wants_batch(self, k: int) -> bool:
        return k % self.t_brand == 0 or k % self.t_updt == 0

    def refresh(self, k: int) -> None:
        super().refresh(k)
        if k % self.t_corct == 0 and k > 0 and self.factor is not None and self.U is not None:
            r = min(self.rank, self.U.shape[1])
            n_crc = max(1, round(self.phi_crc * r))
            U, d = light_correction(self.U, self.d, self.symmetric_factor(), n_crc, self.generator, among=r)
            self._set(U, d, identity=self.identity)


INVERSE_METHODS = {
    cls.method: cls
    for cls in (EighInverse, CholeskyInverse, RSVDInverse, SREVDInverse, BrandInverse, BrandRSVDInverse, BrandCorrectedInverse)
}
