"""The K-factor error study of Sec. 4.2-4.3 (Figures 1-2, Table 1 of Puiu, arXiv:2210.08494).

What the paper measures
-----------------------
Fix the period ``T_updt = t`` at which new K-factor data arrives (the paper: ``t = 10``).
k-fac with ``T_inv = T_updt`` holds the *exact* inverse of the current EA K-factors at every
step; it is the benchmark ("ref"). For an algorithm that does not (b-kfac, b-r-kfac,
b-kfac-c, r-kfac, k-fac with ``T_inv > T_updt``) the paper records, on the first FC layer
("FC layer 0") only and for 300 consecutive steps starting at epochs 15 and 30:

1. ``||A~^{-1} - A_ref^{-1}||_F / ||A_ref^{-1}||_F`` (Fig. 1, left),
2. the same for ``Gamma`` (Fig. 1, right),
3. ``||s~ - s_ref||_F / ||s_ref||_F`` for the FC0 "subspace step"
   ``s = Gamma^{-1} Mat(g) A^{-1}`` with the current gradient (Fig. 2, left),
4. ``1 - cos(angle(s~, s_ref))`` (Fig. 2, right),

where the inverses are *damped* with ``lambda = phi * lambda_max`` of the respective
representation and, for the low-rank ones, spectrum continuation (Sec. 3.5). Metrics (1)-(2)
change only when new data arrives (every ``t`` steps); (3)-(4) change every step with the
gradient; Fig. 2 shows their average over the ``t`` samples of each block (its caption).
Table 1 averages each curve of the epoch-30 window.

How we measure it: shadows on one trajectory
--------------------------------------------
We drive ONE training trajectory (by default k-fac with ``T_inv = T_updt = t``, the benchmark
itself; see ``drive`` below) and, along it, keep the FC0 EA factors ``A``, ``Gamma`` of
eq. (5) with period ``t`` ourselves from step 0 (:class:`StudyStream`). Each of the seven
compared algorithms has a **shadow**: that algorithm's factor-inverse objects
(:mod:`bkfac.inverses`, the same classes the optimizers use) for FC0's two factors. The
shadows receive exactly the batch matrices ``A_k``, ``G_k`` the reference receives, every
``t`` steps, and update their representations on their own schedule; they never touch the
model. At every step of a window we compare each shadow's damped inverses, and the step it
would take with the *current* gradient, with the reference's.

Why this measures what the paper measures: the representation an algorithm holds at step
``k`` is a function of the K-factor data it received and of its own update schedule only.
The paper's question is how far that representation is from the exact one *given the same
incoming data* ("for all these algorithms, new K-factor data is incoming with period
T_updt"), i.e. the error of the approximation itself. Shadows answer exactly that: each is
that algorithm's inverse-representation process run on the benchmark's data, so its
distance to the benchmark is pure approximation error. Letting each algorithm drive its own
training would instead mix in the divergence of the trajectories (different weights,
different gradients), which is not an approximation error and makes steps incomparable. It
is also seven times cheaper: one forward/backward per step serves all seven algorithms.

Every algorithm runs from the start of training. The paper's periods are multiples of ``t``:
(1) b-kfac ``T_brand = t``; (2) b-r-kfac ``T_brand = t``, ``T_rsvd = 5t``; (3) b-kfac-c
``T_brand = t``, ``T_corct = 5t``, ``phi_corct = 0.5``; (4) r-kfac ``T_inv = 5t``; (5) r-kfac
``T_inv = t``; (6) r-kfac ``T_inv = 30t`` ("no reset"); (7) k-fac ``T_inv = 5t``
(:data:`PAPER_ALGORITHMS`). Rank, oversampling and power iterations are the profile's r-kfac
ones. Each window starts "exactly when the heaviest update of the algorithm at hand is
performed" (Sec. 4.2). b-kfac never overwrites and b-kfac-c only corrects: their state is their
own accumulated history, so their shadows run from step 0 (:class:`HistoryShadows`, B-updates
every ``T_brand`` and corrections every ``T_corct`` from the first batch, exactly as the
optimizers run them -- a test checks them against :class:`~bkfac.BKFAC`/:class:`~bkfac.BKFACC`
to 1e-12) and a window starts at a step that is a multiple of their heaviest periods (the
least common multiple of ``T_brand`` and ``T_corct``: ``5t``; :meth:`StudyStream.next_start`).
The other algorithms' heaviest update rebuilds their state from the EA factor alone, so their
shadows are created at the window start with it: k-fac with ``eigh`` of the EA factor of that
step, r-kfac with its RSVD, b-r-kfac with its overwrite step (Alg. 5, lines 2-7: RSVD of the EA
factor of the previous step, then the B-update with this step's batch). (The paper starts
r-kfac ``T_inv = 300`` "slightly later in the epoch"; here it starts with the others, which the
paper notes is immaterial.) Window-relative step numbers ``j = k - k0`` drive the seeded
shadows' schedules, so ``j % T == 0`` fires their periodic updates; the history shadows follow
the global step ``k``, which agrees on every period because ``k0`` is a multiple of ``5t``.

The study's EA factor is eq. (5)'s, started from the first batch, and every shadow starts
there: the algorithms are compared on the paper's definition of the factor. A profile whose
K-FACs start from the identity (``factor_init='identity'``) trains the driver that way, so the
start shapes the trajectory (the batches the factors see), not the factors compared. After
``u`` updates the driver's data part (``factor``, the identity weight ``rho^u`` aside) is the
study's factor less ``rho^u M_0 M_0^T``; the check at each window start allows exactly that gap
(``max |M_0 M_0^T|`` is recorded at step 0, ``diag['first_outer_max']``).

FC0 only, as the paper ("it only makes sense to perform B-updates for the first FC layer").
The shadows apply the compared algorithm to both FC0 factors whatever their size (a B-update
whose ``r + n_M`` reaches the dimension is exact, see :func:`bkfac.linalg.brand_update`).

Along the reference trajectory the study also records how far FC0's spectrum has decayed
(``seed<k>/spectrum.csv``: the fraction of the trace held by the top ``r`` eigenvalues and
``lambda_r / lambda_1`` of both factors every 50 steps, from the reference's own ``eigh``): the
paper places its windows where the decay has set in (its footnote 16), and chapter 4 shows ours.

The reference. Its EA factors are ours (same rule and data as the benchmark optimizer; with
the default ``drive`` they are checked against the optimizer's at each window start). Its
damped inverse is computed without ``eigh``: ``lambda_max`` by Lanczos with full
reorthogonalisation (:func:`lanczos_lambda_max`, relative accuracy ~1e-10; ``eigvalsh`` for
small factors), then the Cholesky factor ``L`` of ``M + lambda I`` in float64 and
``(M + lambda I)^{-1} = L^{-T} L^{-1}`` (a triangular solve and one product; LAPACK's
``potri`` is far slower in torch on CPU). Damping follows the optimizer's rule for every
party: ``lambda = max(phi * lambda_max, min_damping)``, spectrum continuation for the
shadows (an identity transformation for full-width representations).

Cost and precision of the metrics. Metrics (1)-(2) need dense ``d x d`` differences,
``O(d^2 w)`` per shadow of width ``w``, every ``t`` steps (cached for full-width representations
between their refreshes), in float64. For (3)-(4) we use the factored gradient of a Linear
layer, ``Mat(g) = scale * G_k A_k^T`` (eq. (20), the identity behind Alg. 8; checked against
autograd's gradient at each window start, with a dense fallback): each step is
``s = (Gamma^{-1} G_k)(A^{-1} A_k)^T``, ``O(d w n)`` per shadow plus one ``d_G x d_A`` product of
inner size ``n``, formed in the dtype of the statistics (``step_dtype``; float32 in training,
as the optimizers) and compared by direct differences -- ``1 - cos = ||s/|s| - s_ref/|s_ref|||^2 / 2``
-- so float32 rounding (~1e-7 relative) stays far below the metrics' values (>= 1e-4 in the
paper). Shadows work in the dtype of the statistics too.

The trajectory (``drive``). ``"reference"`` (default, the paper): k-fac with the profile's
k-fac hyper-parameters and ``T_updt = T_inv = t``. Another K-FAC-family run of the profile
(e.g. ``"k-fac"``, its own ``T_updt``/``T_inv``) may drive instead, to save CPU: the FC0
statistics stream, the shadows, the reference and the metrics are then exactly as above (our
own EA with period ``t`` from step 0); only the data-generating trajectory differs (its FC0
step does not always use the exact inverse). ``config.json`` records which drove a run.

Outputs under ``data/results/<profile>/error_study/`` (atomic writes): per seed ``seed<k>/rows.csv``,
``seed<k>/run.json`` (diagnostics, inputs hash, provenance) and ``seed<k>/spectrum.csv``; combined
over the complete seeds: ``metrics.csv``
(window_epoch, step, algorithm, label, metric1..4, metric3_block, metric4_block -- the mean
over the runs), ``metrics_runs.csv`` (per run, with its seed and global step),
``table1.csv`` (:func:`table1`), ``orderings.json`` (:func:`check_orderings`),
``config.json``. :func:`plot_error_study` draws Figures 1 and 2 from the rows.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inverses import (
    INVERSE_METHODS,
    BrandInverse,
    EighInverse,
    FactorInverse,
)
from ..linalg import brand_update, rsvd, spectrum_continuation
from ..optim.factory import make_optimizer, resolve_hyper
from ..optim.schedules import as_schedule
from .data import load_cifar10, make_loaders, subset
from .models import build_model
from .profiles import Profile
from .results import read_csv, results_dir, write_csv, write_json

__all__ = [
    "ShadowSpec",
    "PAPER_ALGORITHMS",
    "PAPER_TABLE1",
    "METRIC_NAMES",
    "lanczos_lambda_max",
    "damped_dense_inverse",
    "inverse_error",
    "step_errors",
    "ReferenceInverse",
    "ErrorWindow",
    "HistoryShadows",
    "StudyStream",
    "HISTORY_METHODS",
    "make_shadow",
    "advance_shadow",
    "stream_error_metrics",
    "error_window_metrics",
    "add_block_averages",
    "average_runs",
    "table1",
    "check_orderings",
    "SEC43_CLAIMS",
    "sec43_claims",
    "format_orderings",
    "plot_error_study",
    "plot_spectrum_decay",
    "run_error_study",
    "load_error_study",
    "ErrorStudyResult",
]

METRIC_NAMES = {
    1: "norm error in A^-1",
    2: "norm error in Gamma^-1",
    3: "norm error in subspace step",
    4: "angle error in subspace step (1 - cos)",
}


# ----------------------------------------------------------------------------------------------
# the compared algorithms
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowSpec:
    """One compared algorithm of Sec. 4.2: a factor-inverse ``method`` of
    :data:`bkfac.inverses.INVERSE_METHODS` (``"eigh"``, ``"rsvd"``, ``"brand"``, ``"brand+rsvd"``,
    ``"brand+correction"``) with its periods in multiples of ``t_updt`` (e.g.
    ``(("t_brand", 1), ("t_rsvd", 5))``) and, for b-kfac-c, ``phi_crc``."""

    key: str
    method: str
    periods: tuple[tuple[str, int], ...]
    phi_crc: float | None = None

    def __post_init__(self) -> None:
        if self.method not in INVERSE_METHODS:
            raise ValueError(f"ShadowSpec {self.key!r}: unknown method {self.method!r}; "
                             f"choose one of {sorted(INVERSE_METHODS)}")
        for name, mult in self.periods:
            if isinstance(mult, bool) or not isinstance(mult, int) or mult < 1:
                raise ValueError(f"ShadowSpec {self.key!r}: period {name} must be a positive multiple of "
                                 f"t_updt, got {mult!r}")

    @property
    def carries_history(self) -> bool:
        """Whether the algorithm's state at any step is its own accumulated history: b-kfac never
        overwrites and b-kfac-c only corrects, so their shadows must run from step 0
        (:class:`HistoryShadows`); every other method's heaviest update rebuilds its state from
        the EA factor alone."""
        return self.method in HISTORY_METHODS

    def heaviest_period(self, t_updt: int) -> int:
        """Period of the algorithm's heaviest update (where its window starts, Sec. 4.2): the
        correction for b-kfac-c, the RSVD overwrite for b-r-kfac, the B-update for b-kfac,
        the recomputation (``t_inv``) otherwise."""
        kw = self.kwargs(t_updt)
        for name in ("t_corct", "t_rsvd", "t_brand", "t_inv"):
            if name in kw:
                return kw[name]
        return t_updt

    def kwargs(self, t_updt: int) -> dict:
        kw = {name: mult * t_updt for name, mult in self.periods}
        if self.phi_crc is not None:
            kw["phi_crc"] = self.phi_crc
        return kw

    def label(self, t_updt: int) -> str:
        names = {"t_brand": "T_brand", "t_rsvd": "T_rsvd", "t_corct": "T_corct", "t_inv": "T_inv"}
        base = {"eigh": "k-fac", "rsvd": "r-kfac", "srevd": "sre-kfac", "brand": "b-kfac",
                "brand+rsvd": "b-r-kfac", "brand+correction": "b-kfac-c"}[self.method]
        parts = [f"{names.get(n, n)}={m * t_updt}" for n, m in self.periods]
        if self.phi_crc is not None:
            parts.append(f"phi_corct={self.phi_crc:g}")
        return f"{base} {', '.join(parts)}"


#: Methods whose state is their own history (:attr:`ShadowSpec.carries_history`).
HISTORY_METHODS = ("brand", "brand+correction")

#: The seven algorithms of Sec. 4.2, in the paper's order (periods in multiples of T_updt).
PAPER_ALGORITHMS: tuple[ShadowSpec, ...] = (
    ShadowSpec("b-kfac", "brand", (("t_brand", 1),)),
    ShadowSpec("b-r-kfac", "brand+rsvd", (("t_brand", 1), ("t_rsvd", 5))),
    ShadowSpec("b-kfac-c", "brand+correction", (("t_brand", 1), ("t_corct", 5)), phi_crc=0.5),
    ShadowSpec("r-kfac-5t", "rsvd", (("t_inv", 5),)),
    ShadowSpec("r-kfac-1t", "rsvd", (("t_inv", 1),)),
    ShadowSpec("r-kfac-30t", "rsvd", (("t_inv", 30),)),
    ShadowSpec("k-fac-5t", "eigh", (("t_inv", 5),)),
)

#: The paper's Table 1 (epoch-30 window, T_updt = 10): average metrics 1-4 and t_epoch (s).
#: r-kfac T_inv = 300 has no row there. Published values, for side-by-side display.
PAPER_TABLE1: dict[str, dict] = {
    "k-fac-5t": dict(metric1=1.51e-03, metric2=8.42e-02, metric3=2.69e-01, metric4=14.4e-02, t_epoch="169 ± 5.6"),
    "r-kfac-5t": dict(metric1=4.65e-03, metric2=10.4e-02, metric3=2.96e-01, metric4=14.6e-02, t_epoch="58.5 ± 0.6"),
    "r-kfac-1t": dict(metric1=4.8e-03, metric2=4.9e-02, metric3=0.43e-01, metric4=0.02e-02, t_epoch="71.2 ± 1.0"),
    "b-kfac": dict(metric1=48.6e-03, metric2=1.02e-02, metric3=2.40e-01, metric4=29.0e-02, t_epoch="59.2 ± 0.6"),
    "b-kfac-c": dict(metric1=11.9e-03, metric2=1.04e-02, metric3=1.22e-01, metric4=0.77e-02, t_epoch="59.4 ± 0.6"),
    "b-r-kfac": dict(metric1=3.40e-03, metric2=1.81e-02, metric3=0.40e-01, metric4=0.74e-02, t_epoch="59.5 ± 0.6"),
}


# ----------------------------------------------------------------------------------------------
# metric building blocks (float64 by default)
# ----------------------------------------------------------------------------------------------
def lanczos_lambda_max(M: Tensor, *, tol: float = 1e-11, max_iter: int = 120,
                       generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of a symmetric PSD matrix ``M`` by Lanczos with full
    reorthogonalisation (hand-written: torch has no ARPACK, ``torch.lobpcg`` was ~50x slower
    here, and ``eigvalsh`` costs a full ``O(d^3)`` tridiagonalisation).

    Stops when the Ritz residual ``beta_j |e_j^T y|`` falls below ``tol * theta`` (then
    ``|lambda - theta| <= tol * theta`` for an eigenvalue ``lambda``, and ``theta <= lambda_max``),
    when the Krylov space is exhausted, or after ``max_iter`` steps. Computed in float64.
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    d = M.shape[0]
    M = M.to(torch.float64)
    if d <= 256:
        return float(torch.linalg.eigvalsh(0.5 * (M + M.mT))[-1])
    m = min(max_iter, d)
    g = generator if generator is not None else torch.Generator().manual_seed(12345)
    q = torch.randn(d, 1, generator=g, dtype=torch.float64).to(M.device)
    q = q / torch.linalg.vector_norm(q)
    Q = M.new_zeros(d, m)
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for j in range(m):
        Q[:, j : j + 1] = q
        w = M @ q
        a = float((q.mT @ w).squeeze())
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].mT @ w)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].mT @ w)  # twice is enough (Parlett)
        b = float(torch.linalg.vector_norm(w))
        alphas.append(a)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta = float(evals[-1])
        if theta <= 0.0:
            if b == 0.0:
                return 0.0
        elif b * abs(float(evecs[-1, -1])) <= tol * theta or b <= 1e-14 * theta:
            return theta
        betas.append(b)
        q = w / b
    return theta


def _damping(d: Tensor, phi: float, min_damping: float, continuation: bool = True) -> tuple[Tensor, float]:
    """The optimizer's rule (``KFACFamily._damped``): ``lam = max(phi * d_max, min_damping)``,
    then spectrum continuation (Sec. 3.5)."""
    lam = max(phi * float(d[0]), min_damping) if d.numel() else min_damping
    if continuation:
        d, lam = spectrum_continuation(d, lam)
        lam = float(lam)
    return d, lam


def damped_dense_inverse(U: Tensor, d: Tensor, lam: float) -> Tensor:
    """``(U diag(d) U^T + lam I)^{-1}`` as a dense matrix, for an orthonormal ``U`` of any width
    (``U [diag(1/(d+lam)) - I/lam] U^T + I/lam``, the formula behind Alg. 1 l.16-17)."""
    coef = 1.0 / (d + lam) - 1.0 / lam
    X = (U * coef) @ U.mT
    X.diagonal().add_(1.0 / lam)
    return X


def inverse_error(X: Tensor, Y: Tensor) -> float:
    """Metrics (1)-(2): ``||X - Y||_F / ||Y||_F`` (``Y`` the reference inverse)."""
    return float(torch.linalg.matrix_norm(X - Y) / torch.linalg.matrix_norm(Y))


def step_errors(s: Tensor, s_ref: Tensor) -> tuple[float, float]:
    """Metrics (3)-(4) for dense steps: ``||s - s_ref||_F / ||s_ref||_F`` and
    ``1 - cos(angle) = ||s/|s| - s_ref/|s_ref|||_F^2 / 2`` (no cancellation near 0)."""
    ns, nr = torch.linalg.matrix_norm(s), torch.linalg.matrix_norm(s_ref)
    m3 = float(torch.linalg.matrix_norm(s - s_ref) / nr)
    m4 = float(0.5 * torch.linalg.matrix_norm(s / ns - s_ref / nr) ** 2)
    return m3, m4


class ReferenceInverse:
    """The benchmark's damped inverse of one EA factor ``M`` (k-fac with ``T_inv = T_updt``):
    ``lam = max(phi * lambda_max(M), min_damping)`` (Lanczos), ``Y = (M + lam I)^{-1}`` from the
    Cholesky factor (float64 by default). ``apply(X) = Y X``."""

    def __init__(self, M: Tensor, phi: float, *, min_damping: float = 1e-8, dtype=torch.float64,
                 generator: torch.Generator | None = None):
        M = M.to(dtype)
        M = 0.5 * (M + M.mT)
        self.lambda_max = lanczos_lambda_max(M, generator=generator)
        self.lam = max(phi * self.lambda_max, min_damping)
        K = M.clone()
        K.diagonal().add_(self.lam)
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            raise FloatingPointError(
                f"reference factor + lambda I (dim {M.shape[0]}, lambda {self.lam:.3e}) is not positive "
                "definite in the Cholesky factorisation: the EA factor is corrupted")
        eye = torch.eye(M.shape[0], dtype=dtype, device=M.device)
        W = torch.linalg.solve_triangular(L, eye, upper=False)  # L^{-1}
        self.Y = W.mT @ W
        self.Y = 0.5 * (self.Y + self.Y.mT)
        self.norm = float(torch.linalg.matrix_norm(self.Y))

    def apply(self, X: Tensor) -> Tensor:
        """``Y X`` in the dtype of ``X`` (a float32 ``X`` uses a float32 copy of ``Y``)."""
        if X.dtype == self.Y.dtype:
            return self.Y @ X
        if getattr(self, "_Y_low", None) is None or self._Y_low.dtype != X.dtype:
            self._Y_low = self.Y.to(X.dtype)
        return self._Y_low @ X


# ----------------------------------------------------------------------------------------------
# shadows
# ----------------------------------------------------------------------------------------------
class _SharedEA:
    """Mixin for a shadow: its dense EA factor is the window's (all parties receive the same
    batches under the same rule, eq. (5)), set before each ``observe`` -- not a private copy
    updated seven times. Never mutated in place by the inverse classes."""

    _next_factor: Tensor | None = None

    def _update_dense(self, batch: Tensor) -> None:  # noqa: ARG002 - the window did the update
        self.factor = self._next_factor


_SHADOW_CLASSES: dict[type, type] = {}


def _shadow_class(cls: type[FactorInverse]) -> type[FactorInverse]:
    if cls not in _SHADOW_CLASSES:
        _SHADOW_CLASSES[cls] = type(f"Shadow{cls.__name__}", (_SharedEA, cls), {})
    return _SHADOW_CLASSES[cls]


def _sym(M: Tensor) -> Tensor:
    return 0.5 * (M + M.mT)


def _ea_update(M_prev: Tensor | None, batch: Tensor, rho: float) -> Tensor:
    """Eq. (5) as the optimizer computes it (``FactorInverse._update_dense``), out of place."""
    outer = batch @ batch.mT
    if M_prev is None:
        return outer
    return M_prev.mul(rho).add_(outer, alpha=1.0 - rho)


@dataclass
class _ShadowFactor:
    inv: FactorInverse
    dim: int
    cache_key: tuple | None = None
    U: Tensor | None = None  # metric dtype, of the current representation
    d: Tensor | None = None  # continued spectrum
    lam: float = 0.0
    dense: Tensor | None = None  # dense damped inverse (full-width representations only)
    U_step: Tensor | None = None  # step dtype copies for the per-step products
    coef_step: Tensor | None = None
    dense_step: Tensor | None = None

    def prepare(self, phi: float, min_damping: float, dtype, step_dtype) -> bool:
        """Refresh the metric-dtype copy of the damped representation; True when it changed."""
        U, d = self.inv.representation()
        # the key holds the tensors themselves: compared by identity, never a recycled id()
        if self.cache_key is not None and self.cache_key[0] is U and self.cache_key[1] is d \
                and self.cache_key[2] == phi:
            return False
        self.cache_key = (U, d, phi)
        self.U = U.to(dtype)
        self.d, self.lam = _damping(d.to(dtype), phi, min_damping)
        self.U_step = U.to(step_dtype)
        self.coef_step = (1.0 / (self.d + self.lam) - 1.0 / self.lam).to(step_dtype)
        self.dense = self.dense_step = None
        return True

    def dense_inverse(self) -> Tensor:
        return damped_dense_inverse(self.U, self.d, self.lam)

    def apply(self, X: Tensor) -> Tensor:
        """``(U diag(d) U^T + lam I)^{-1} X`` (continued, damped) in the step dtype."""
        X = X.to(self.U_step.dtype)
        if self.dense_step is not None:
            return self.dense_step @ X
        return self.U_step @ (self.coef_step[:, None] * (self.U_step.mT @ X)) + X / self.lam


def make_shadow(spec: ShadowSpec, dim: int, *, t_updt: int, rho: float, rank, oversample, power_iters: int,
                epoch: int = 1, dtype=torch.float32, device=None, generator: torch.Generator) -> FactorInverse:
    """A shadow of ``spec`` for one factor of dimension ``dim``: the optimizers' own inverse class
    (:data:`bkfac.inverses.INVERSE_METHODS`) whose dense EA factor is the study's (``_SharedEA``)."""
    cls = INVERSE_METHODS[spec.method]
    kw = dict(rho=rho, t_updt=t_updt, dtype=dtype, device=device, generator=generator, **spec.kwargs(t_updt))
    if cls is not EighInverse:
        r = rank(epoch) if callable(rank) else rank
        ro = oversample(epoch) if callable(oversample) else oversample
        if dim <= r + ro:
            raise ValueError(
                f"{spec.key}: a factor of dimension {dim} is too small for rank {r} + oversampling {ro}; "
                "the low-rank methods need dim > rank + oversample")
        kw.update(rank=rank, oversample=oversample, power_iters=power_iters)
    inv = _shadow_class(cls)(dim, **kw)
    inv.epoch = epoch
    return inv


def advance_shadow(inv: FactorInverse, k: int, batch: Tensor, factor: Tensor) -> None:
    """One statistics step ``k`` of a shadow, as the optimizer drives its inverses: the batch
    matrix where the method wants it, the shared EA factor ``factor`` of step ``k``, then the
    method's own refresh."""
    inv._next_factor = factor
    if inv.wants_batch(k):
        inv.observe(k, batch)
    elif inv.needs_dense:
        inv.factor = factor
    inv.refresh(k)
    inv.end_step()


class HistoryShadows:
    """The shadows whose state is their own history (b-kfac, b-kfac-c: :attr:`ShadowSpec.carries_history`),
    run from step 0 of the trajectory on the study's statistics stream, exactly as the optimizer
    runs them: b-kfac's first representation is the exact EVD of ``M_0 M_0^T`` and every later one
    a truncation and a B-update (Alg. 4); b-kfac-c adds its light corrections (Alg. 7) on its own
    period. At a window start they are handed to :class:`ErrorWindow` as they are (``carried``):
    the paper's b-kfac "never overwrites", so its error at epoch 15 is that of 15 epochs of
    B-updates, not of a fresh RSVD.

    Costs what the algorithms cost in training: one B-update every ``T_brand`` steps per factor,
    plus b-kfac-c's correction every ``T_corct``; no ``d x d`` work for b-kfac (low-memory).

    ``generators`` maps ``(key, factor)`` to a generator (default: seeded from ``(seed, key, factor)``);
    give the optimizer's own generators to reproduce an optimizer's b-kfac-c bit for bit.
    Call :meth:`advance` at every statistics step ``k`` (``k % t_updt == 0``) from ``k = 0``.
    """

    def __init__(self, algorithms: Sequence[ShadowSpec], dim_A: int, dim_G: int, *, t_updt: int, rho: float,
                 rank, oversample, power_iters: int, epoch: int = 1, seed: int = 0, dtype=torch.float32,
                 device=None, generators: dict | None = None):
        self.t = t_updt
        self.specs = tuple(a for a in algorithms if a.carries_history)
        self.inverses: dict[str, dict[str, FactorInverse]] = {}
        self.step = -1
        for i, spec in enumerate(self.specs):
            self.inverses[spec.key] = {}
            for f, dim in (("A", dim_A), ("G", dim_G)):
                gen = (generators or {}).get((spec.key, f))
                if gen is None:
                    gen = torch.Generator(device="cpu" if device is None else device)
                    gen.manual_seed((seed * 1_000_003 + 7919 * i + 104729 + (f == "G")) % (2**63 - 1))
                self.inverses[spec.key][f] = make_shadow(
                    spec, dim, t_updt=t_updt, rho=rho, rank=rank, oversample=oversample,
                    power_iters=power_iters, epoch=epoch, dtype=dtype, device=device, generator=gen)

    def advance(self, k: int, batch: dict[str, Tensor], factors: dict[str, Tensor], epoch: int | None = None
                ) -> dict[str, float]:
        """Statistics step ``k``: every history shadow receives the batch matrices ``batch`` and
        the EA factors ``factors`` of step ``k``. Returns the seconds each algorithm spent."""
        if k % self.t:
            raise ValueError(f"step {k} is not a statistics step (t_updt={self.t})")
        if k <= self.step:
            raise ValueError(f"steps must increase: got {k} after {self.step}")
        self.step = k
        seconds = {}
        for key, invs in self.inverses.items():
            t0 = time.perf_counter()
            for f, inv in invs.items():
                if epoch is not None:
                    inv.epoch = epoch
                advance_shadow(inv, k, batch[f], factors[f])
            if factors["A"].is_cuda:
                torch.cuda.synchronize(factors["A"].device)
            seconds[key] = time.perf_counter() - t0
        return seconds

    def state_dict(self) -> dict:
        return {"step": self.step, "inverses": {key: {f: (inv.state_dict(), inv.generator.get_state())
                                                      for f, inv in invs.items()}
                                                for key, invs in self.inverses.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for key, invs in state["inverses"].items():
            for f, (inv_state, gen_state) in invs.items():
                self.inverses[key][f].load_state_dict(inv_state)
                self.inverses[key][f].generator.set_state(gen_state)


def _as_stream_j(J):
    """``J`` is a dense ``d_G x d_A`` matrix or a pair ``(L, R)`` with ``J = L R^T``."""
    if isinstance(J, (tuple, list)):
        if len(J) != 2:
            raise ValueError("J given as a factorisation must be a pair (L, R) with Mat(g) = L R^T")
        return tuple(J)
    if isinstance(J, Tensor) and J.dim() == 2:
        return J
    raise ValueError(f"J must be a matrix or a pair (L, R), got {type(J).__name__}")


class ErrorWindow:
    """One window of the error study on one layer (Sec. 4.2), fed step by step.

    ``ErrorWindow(ea_A_prev, ea_G_prev, A0, G0, ...)`` starts the window at a step ``k0`` with
    ``k0 % t_updt == 0``: ``ea_*_prev`` are the EA factors before that step's update (``None``
    when ``k0 = 0``: then ``M_0 = A_0 A_0^T``, kappa(0) = 1 in eq. (5)) and ``A0``, ``G0`` the
    batch matrices of step ``k0`` (``d x n_M``, ``A_k A_k^T`` = the batch factor). The window
    forms the EA factors of step ``k0`` and seeds every shadow with its heaviest update (see
    the module docstring). Then call :meth:`step` for ``j = 0, 1, 2, ...`` (window-relative):
    at ``j > 0`` with ``j % t_updt == 0`` pass that step's ``A``, ``G``; at every step pass the
    gradient ``J`` of the layer (dense ``d_G x d_A`` or ``(L, R)`` with ``J = L R^T``). Each call
    returns one row per algorithm: ``step, algorithm, label, metric1..4``.

    ``phi`` (damping factor) and ``epoch`` (for rank/oversampling schedules) may change per
    step. ``rank``/``oversample`` may be epoch schedules (dicts or callables). Shadow state
    lives in the dtype and device of the statistics; the metrics in ``metric_dtype``.
    ``update_seconds[key]`` accumulates the time of each shadow's updates for ``j > 0``.

    The algorithms whose state is their own history (b-kfac, b-kfac-c) are not seeded here:
    ``carried`` hands the window their shadows as run from step 0 (:attr:`HistoryShadows.inverses`),
    ``k0`` (the window's global start step) must then be a multiple of their heaviest period, and
    the caller keeps advancing them (:meth:`HistoryShadows.advance`) before each :meth:`step`. At
    ``k0 = 0`` (``ea_*_prev`` None) they may be built here instead: their history is then empty.
    """

    def __init__(
        self,
        ea_A_prev: Tensor | None,
        ea_G_prev: Tensor | None,
        A0: Tensor,
        G0: Tensor,
        *,
        t_updt: int,
        rho: float,
        rank,
        oversample,
        power_iters: int,
        phi: float,
        epoch: int = 1,
        algorithms: Sequence[ShadowSpec] = PAPER_ALGORITHMS,
        seed: int = 0,
        min_damping: float = 1e-8,
        metric_dtype: torch.dtype = torch.float64,
        step_dtype: torch.dtype | None = None,
        carried: dict | None = None,
        k0: int = 0,
    ):
        if isinstance(t_updt, bool) or not isinstance(t_updt, int) or t_updt < 1:
            raise ValueError(f"t_updt must be a positive integer, got {t_updt!r}")
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must lie in (0, 1), got {rho!r}")
        if not phi > 0:
            raise ValueError(f"phi must be positive (lambda = phi * lambda_max), got {phi!r}")
        if not algorithms:
            raise ValueError("algorithms must list at least one ShadowSpec")
        keys = [a.key for a in algorithms]
        if len(set(keys)) != len(keys):
            raise ValueError(f"algorithm keys must be unique, got {keys}")
        for name, M, batch in (("A", ea_A_prev, A0), ("G", ea_G_prev, G0)):
            if not isinstance(batch, Tensor) or batch.dim() != 2:
                raise ValueError(f"{name}0 must be a d x n_M batch matrix")
            if M is not None and tuple(M.shape) != (batch.shape[0], batch.shape[0]):
                raise ValueError(f"ea_{name}_prev has shape {tuple(M.shape)}, expected "
                                 f"{(batch.shape[0], batch.shape[0])} from {name}0")
        self.t = t_updt
        self.rho = rho
        self.rank = as_schedule(rank)
        self.oversample = as_schedule(oversample)
        self.power_iters = power_iters
        self.algorithms = tuple(algorithms)
        self.min_damping = min_damping
        self.metric_dtype = metric_dtype
        self.step_dtype = step_dtype if step_dtype is not None else A0.dtype
        self.epoch = epoch
        self.phi = phi
        self.seed = seed
        self.j = -1
        self.ea = {"A": _ea_update(ea_A_prev, A0, rho), "G": _ea_update(ea_G_prev, G0, rho)}
        self.update_seconds = dict.fromkeys(keys, 0.0)
        self.ref: dict[str, ReferenceInverse] = {}
        self._ref_phi: float | None = None
        self._factor_metrics: dict[str, tuple[float, float]] = {}
        self.shadows: dict[str, dict[str, _ShadowFactor]] = {}
        prev = {"A": ea_A_prev, "G": ea_G_prev}
        first = {"A": A0, "G": G0}
        carried = dict(carried or {})
        self.carried = frozenset(carried)
        for key in carried:
            if key not in keys:
                raise ValueError(f"carried shadow {key!r} is not among the algorithms {keys}")
        for i, spec in enumerate(self.algorithms):
            self.shadows[spec.key] = {}
            if spec.key in carried:
                period = spec.heaviest_period(self.t)
                if k0 % period:
                    raise ValueError(f"{spec.key}: a window must start at its heaviest update, a multiple of "
                                     f"{period} steps; got k0={k0}")
                for f in ("A", "G"):
                    inv = carried[spec.key][f]
                    if inv.dim != first[f].shape[0]:
                        raise ValueError(f"carried {spec.key} factor {f} has dimension {inv.dim}, the window's "
                                         f"{first[f].shape[0]}")
                    self.shadows[spec.key][f] = _ShadowFactor(inv, inv.dim)
                continue
            if spec.carries_history and (ea_A_prev is not None or ea_G_prev is not None):
                raise ValueError(
                    f"{spec.key}: its state at a window start is its own history since step 0 (it never "
                    "overwrites); run it with HistoryShadows from step 0 and pass carried=HistoryShadows.inverses")
            for f in ("A", "G"):
                gen = torch.Generator(device="cpu" if first[f].device is None else first[f].device)
                gen.manual_seed((self.seed * 1_000_003 + 7919 * i + (f == "G")) % (2**63 - 1))
                inv = make_shadow(spec, first[f].shape[0], t_updt=self.t, rho=rho, rank=self.rank,
                                  oversample=self.oversample, power_iters=power_iters, epoch=self.epoch,
                                  dtype=first[f].dtype, device=first[f].device, generator=gen)
                self._seed(inv, prev[f], first[f], self.ea[f])
                self.shadows[spec.key][f] = _ShadowFactor(inv, first[f].shape[0])

    # -- construction -----------------------------------------------------------------------
    def _seed(self, inv: FactorInverse, M_prev: Tensor | None, batch: Tensor, M0: Tensor) -> None:
        """The heaviest update of a history-free algorithm at the window start (module docstring)."""
        if M_prev is None or not isinstance(inv, BrandInverse):
            # k0 = 0 (every method's first update, a B-update of an empty representation for the
            # b-variants), or eigh / rsvd / srevd: the class's own update at window-relative step 0
            advance_shadow(inv, 0, batch, M0)
            if inv.U is None:
                raise RuntimeError(f"{type(inv).__name__} produced no representation at the window start")
        else:  # b-r-kfac's heavy step (Alg. 5 lines 2-7): RSVD of M_{k0-1}, then the B-update
            U, d = rsvd(_sym(M_prev), inv.rank, inv.oversample, inv.power_iters, inv.generator)
            inv._set(*brand_update(U, inv.rho * d, math.sqrt(1.0 - inv.rho) * batch))
            inv.factor = M0

    # -- stepping ---------------------------------------------------------------------------
    def step(self, j: int, A: Tensor | None = None, G: Tensor | None = None, J=None, *,
             phi: float | None = None, epoch: int | None = None) -> list[dict]:
        """Advance to window-relative step ``j`` (``j = 0`` first, then consecutive) and return
        the metric rows of that step (see the class docstring)."""
        if j != self.j + 1:
            raise ValueError(f"steps must be consecutive: expected j={self.j + 1}, got {j}")
        if J is None:
            raise ValueError("J (the layer's gradient, dense or (L, R)) is required at every step")
        J = _as_stream_j(J)
        if phi is not None:
            if not phi > 0:
                raise ValueError(f"phi must be positive, got {phi!r}")
            self.phi = phi
        if epoch is not None:
            self.epoch = epoch
        self.j = j
        for spec in self.algorithms:
            for sh in self.shadows[spec.key].values():
                sh.inv.epoch = self.epoch
        changed = j == 0
        if j > 0 and j % self.t == 0:
            if A is None or G is None:
                raise ValueError(f"step j={j} is a statistics step (multiple of t_updt={self.t}): A and G are required")
            self._advance(j, {"A": A, "G": G})
            changed = True
        if changed or self._ref_phi != self.phi:
            self._refresh_factor_metrics()
        return self._measure(J)

    def _advance(self, j: int, batch: dict[str, Tensor]) -> None:
        new = {f: _ea_update(self.ea[f], batch[f], self.rho) for f in ("A", "G")}
        for spec in self.algorithms:
            if spec.key in self.carried:  # advanced by their HistoryShadows, on the global step
                continue
            t0 = time.perf_counter()
            for sh_f, sh in self.shadows[spec.key].items():
                advance_shadow(sh.inv, j, batch[sh_f], new[sh_f])
            if new["A"].is_cuda:
                torch.cuda.synchronize(new["A"].device)
            self.update_seconds[spec.key] += time.perf_counter() - t0
        self.ea = new

    def _refresh_factor_metrics(self) -> None:
        dt = self.metric_dtype
        self.ref = {f: ReferenceInverse(self.ea[f], self.phi, min_damping=self.min_damping, dtype=dt)
                    for f in ("A", "G")}
        self._ref_phi = self.phi
        for spec in self.algorithms:
            errs = []
            for f, sh in self.shadows[spec.key].items():
                sh.prepare(self.phi, self.min_damping, dt, self.step_dtype)
                ref = self.ref[f]
                if sh.U.shape[1] * 2 >= sh.dim:  # full width: keep the dense inverse until it changes
                    if sh.dense is None:
                        sh.dense = sh.dense_inverse()
                        sh.dense_step = sh.dense.to(self.step_dtype)
                    D = sh.dense - ref.Y
                else:  # D = U C U^T + I/lam - Y without keeping a d x d matrix per shadow
                    coef = 1.0 / (sh.d + sh.lam) - 1.0 / sh.lam
                    D = torch.addmm(-ref.Y, sh.U * coef, sh.U.mT)
                    D.diagonal().add_(1.0 / sh.lam)
                errs.append(float(torch.linalg.matrix_norm(D)) / ref.norm)
            self._factor_metrics[spec.key] = (errs[0], errs[1])

    def _measure(self, J) -> list[dict]:
        # The steps s = Gamma^-1 Mat(g) A^-1 are formed and compared in the step dtype (one GEMM
        # of inner size n per party for a factored gradient): direct differences, no
        # difference-of-squares cancellation, so float32 rounding (~1e-7 relative) stays far
        # below the metrics' values.
        st = self.step_dtype
        rows = []
        if isinstance(J, tuple):
            Lg, Ra = J[0].to(st), J[1].to(st)
            s_ref = self.ref["G"].apply(Lg) @ self.ref["A"].apply(Ra).mT
        else:
            Jd = J.to(st)
            s_ref = self.ref["G"].apply(self.ref["A"].apply(Jd.mT).mT)
        for spec in self.algorithms:
            shA, shG = self.shadows[spec.key]["A"], self.shadows[spec.key]["G"]
            if isinstance(J, tuple):
                s = shG.apply(Lg) @ shA.apply(Ra).mT
            else:
                s = shG.apply(shA.apply(Jd.mT).mT)
            m3, m4 = step_errors(s, s_ref)
            m1, m2 = self._factor_metrics[spec.key]
            rows.append(dict(step=self.j, algorithm=spec.key, label=spec.label(self.t), phi=self.phi,
                             metric1=m1, metric2=m2, metric3=m3, metric4=m4))
        return rows

    def representation(self, key: str, factor: str) -> tuple[Tensor, Tensor]:
        """The current (undamped) representation ``(U, d)`` of shadow ``key``'s ``factor``."""
        return self.shadows[key][factor].inv.representation()


class StudyStream:
    """The error study along one statistics stream from step 0: the EA factors of eq. (5) with
    period ``t_updt``, the :class:`HistoryShadows` (b-kfac, b-kfac-c from step 0) and the open
    windows (:class:`ErrorWindow`), each closed after ``window`` steps. :func:`_trajectory` feeds
    it from a training run; :func:`stream_error_metrics` from given matrices.

    A window may start at a step ``k`` that is a multiple of :attr:`start_period`, the least
    common multiple of ``t_updt`` and the history algorithms' heaviest periods (Sec. 4.2: every
    algorithm's window starts at its heaviest update; the history-free ones are seeded with it).
    ``window_kw`` are :class:`ErrorWindow`'s (``rho``, ``rank``, ``oversample``, ``power_iters``,
    ``min_damping``, ``metric_dtype``, ...); ``generators`` go to :class:`HistoryShadows`.
    """

    def __init__(self, *, t_updt: int, window: int, algorithms: Sequence[ShadowSpec] = PAPER_ALGORITHMS,
                 seed: int = 0, generators: dict | None = None, **window_kw):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if "rho" not in window_kw:
            raise ValueError("rho (the EA decay of eq. 5) is required")
        self.t = t_updt
        self.window = window
        self.algorithms = tuple(algorithms)
        self.seed = seed
        self.generators = generators
        self.window_kw = window_kw
        self.start_period = math.lcm(t_updt, *(a.heaviest_period(t_updt) for a in self.algorithms
                                               if a.carries_history))
        self.ea: dict[str, Tensor | None] = {"A": None, "G": None}
        self.history: HistoryShadows | None = None
        self.active: dict = {}
        self.k = -1

    def next_start(self, k: int) -> int:
        """The first step ``>= k`` at which a window may start."""
        return -(-k // self.start_period) * self.start_period

    def step(self, k: int, A: Tensor | None, G: Tensor | None, J=None, *, phi: float, epoch: int = 1,
             start=None) -> tuple[list[dict], list[ErrorWindow]]:
        """Step ``k`` (consecutive from 0): ``A``, ``G`` are required on statistics steps, ``J``
        (dense or ``(L, R)``) while a window is open; ``start`` opens a window labelled ``start``
        here. Returns this step's metric rows (tagged ``window_epoch`` = the label and
        ``global_step``) and the windows that closed."""
        if k != self.k + 1:
            raise ValueError(f"steps must be consecutive from 0: expected {self.k + 1}, got {k}")
        stats = k % self.t == 0
        if (stats or start is not None) and (A is None or G is None):
            raise ValueError(f"step {k} is a statistics step (t_updt={self.t}) or opens a window: A and G are required")
        if start is not None and k % self.start_period:
            raise ValueError(f"a window starts at a multiple of {self.start_period} steps (every algorithm's "
                             f"heaviest update); got step {k}")
        self.k = k
        seconds: dict[str, float] = {}
        new = None
        if stats:
            new = {f: _ea_update(self.ea[f], X, self.window_kw["rho"]) for f, X in (("A", A), ("G", G))}
            if self.history is None:
                self.history = self._new_history((A.shape[0], G.shape[0]), A.dtype, A.device, epoch)
            seconds = self.history.advance(k, {"A": A, "G": G}, new, epoch)
        if start is not None:
            if start in self.active:
                raise ValueError(f"a window labelled {start!r} is already open")
            win = ErrorWindow(self.ea["A"], self.ea["G"], A, G, t_updt=self.t, phi=phi, epoch=epoch,
                              algorithms=self.algorithms, seed=self.seed * 101 + k, k0=k,
                              carried=self.history.inverses if self.history else None, **self.window_kw)
            win.k0, win.label = k, start
            self.active[start] = win
        rows: list[dict] = []
        closed = []
        for label, win in list(self.active.items()):
            j = k - win.k0
            if j > 0:
                for key in win.carried:
                    win.update_seconds[key] += seconds.get(key, 0.0)
            new_rows = win.step(j, A if j % self.t == 0 else None, G if j % self.t == 0 else None, J,
                                phi=phi, epoch=epoch)
            for r in new_rows:
                r.update(window_epoch=label, global_step=k)
            rows += new_rows
            if j == self.window - 1:
                closed.append(self.active.pop(label))
        if stats:
            self.ea = new
        return rows, closed

    def state_dict(self) -> dict:
        """The stream's state between windows (for a resumable trajectory)."""
        if self.active:
            raise RuntimeError("the stream's state is saved between windows only")
        return {"k": self.k, "ea": self.ea, "history": None if self.history is None else self.history.state_dict()}

    def _new_history(self, dims: tuple[int, int], dtype, device, epoch: int) -> HistoryShadows:
        kw = {n: self.window_kw[n] for n in ("rho", "rank", "oversample", "power_iters")}
        return HistoryShadows(self.algorithms, *dims, t_updt=self.t, epoch=epoch, seed=self.seed, dtype=dtype,
                              device=device, generators=self.generators, **kw)

    def load_state_dict(self, state: dict, dims: tuple[int, int], dtype, device=None, epoch: int = 1) -> None:
        self.k, self.ea = state["k"], state["ea"]
        if state["history"] is not None:
            self.history = self._new_history(dims, dtype, device, epoch)
            self.history.load_state_dict(state["history"])


def stream_error_metrics(stream: Sequence, starts: Sequence[int], *, t_updt: int, window: int,
                         phi: float, **kw) -> list[dict]:
    """The study on a given stream of ``(A_k, G_k, J_k)`` for ``k = 0, 1, ...`` (the data-only
    core: no model, no CIFAR): every party runs from step 0, one window of ``window`` steps opens
    at each step of ``starts`` (labelled by that step), and the rows come back with block
    averages. ``kw`` are :class:`StudyStream`'s (``rho``, ``rank``, ``oversample``,
    ``power_iters``, ``algorithms``, ...)."""
    ss = StudyStream(t_updt=t_updt, window=window, **kw)
    starts = set(starts)
    last = max(starts) + window - 1
    if last >= len(stream):
        raise ValueError(f"the stream has {len(stream)} steps; the last window ends at step {last}")
    rows: list[dict] = []
    for k, (A, G, J) in enumerate(stream[: last + 1]):
        r, _ = ss.step(k, A, G, J, phi=phi, start=k if k in starts else None)
        rows += r
    return add_block_averages(rows, t_updt, group=("window_epoch", "algorithm"))


def add_block_averages(rows: list[dict], t_updt: int, group: Sequence[str] = ("algorithm",)) -> list[dict]:
    """Add ``metric3_block``/``metric4_block``: the mean of metrics (3)-(4) over the ``t_updt``
    steps of each block ``step // t_updt`` (the paper's 10-sample average, Fig. 2 caption),
    per group (algorithm, and window/run where rows carry them). Returns the rows (updated)."""
    acc: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        acc[tuple(r.get(g) for g in group) + (int(r["step"]) // t_updt,)].append(r)
    for members in acc.values():
        for m in (3, 4):
            mean = sum(float(r[f"metric{m}"]) for r in members) / len(members)
            for r in members:
                r[f"metric{m}_block"] = mean
    return rows


def error_window_metrics(
    ea_A_prev: Tensor | None,
    ea_G_prev: Tensor | None,
    stream: Iterable,
    **window_kw,
) -> list[dict]:
    """Run one window on a stream of ``(A_j, G_j, J_j)`` for ``j = 0, 1, ...`` and return the
    metric rows (with block averages). ``A_j``/``G_j`` are read at ``j % t_updt == 0`` (may be
    ``None`` otherwise); ``J_j`` is the gradient (dense or ``(L, R)``). ``window_kw`` are those of
    :class:`ErrorWindow` (``t_updt``, ``rho``, ``rank``, ``oversample``, ``power_iters``, ``phi``,
    ...). The data-only core of the study: no model, no CIFAR."""
    it = iter(stream)
    try:
        A0, G0, J0 = next(it)
    except StopIteration:
        raise ValueError("stream is empty: it needs at least the window's first step") from None
    win = ErrorWindow(ea_A_prev, ea_G_prev, A0, G0, **window_kw)
    rows = win.step(0, J=J0)
    for j, (A, G, J) in enumerate(it, start=1):
        rows += win.step(j, A, G, J)
    return add_block_averages(rows, win.t)


# ----------------------------------------------------------------------------------------------
# summaries: runs -> mean curves, Table 1, orderings
# ----------------------------------------------------------------------------------------------
_METRIC_COLS = ("metric1", "metric2", "metric3", "metric4", "metric3_block", "metric4_block")


def _num(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        q = dict(r)
        for k in ("window_epoch", "step", "global_step", "seed", "n_runs"):
            if k in q and q[k] not in (None, ""):
                q[k] = int(float(q[k]))
        for k in _METRIC_COLS + ("phi",):
            if k in q and q[k] not in (None, ""):
                q[k] = float(q[k])
        out.append(q)
    return out


def average_runs(rows: list[dict]) -> list[dict]:
    """Mean over runs (seeds) of every metric per (window_epoch, step, algorithm) -- "each curve
    is the average over 5 runs" (Fig. 1) -- with ``n_runs``."""
    rows = _num(rows)
    acc: dict[tuple, list[dict]] = defaultdict(list)
    order = []
    for r in rows:
        key = (r["window_epoch"], r["step"], r["algorithm"])
        if key not in acc:
            order.append(key)
        acc[key].append(r)
    out = []
    for key in order:
        members = acc[key]
        row = dict(window_epoch=key[0], step=key[1], algorithm=key[2], label=members[0]["label"])
        if "phi" in members[0]:
            row["phi"] = members[0]["phi"]
        for c in _METRIC_COLS:
            if c in members[0]:
                row[c] = sum(m[c] for m in members) / len(members)
        row["n_runs"] = len(members)
        out.append(row)
    return out


def _series(rows: list[dict], epoch: int, algorithm: str, col: str) -> list[float]:
    sel = sorted((r for r in rows if r["window_epoch"] == epoch and r["algorithm"] == algorithm),
                 key=lambda r: r["step"])
    return [r[col] for r in sel]


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def table1(rows: list[dict], *, epoch: int | None = None, update_ms: dict | None = None) -> list[dict]:
    """Table 1: per algorithm, the average of each metric over the window of ``epoch`` (default:
    the last window epoch; the paper's Table 1 uses epoch 30), beside the paper's values.

    ``t_epoch`` is left empty: the error study runs one trajectory, so it measures no time per
    epoch of the compared optimizers (Table 2's runs do). ``fc0_update_ms_per_step`` (when
    given) is what we do measure: the shadows' FC0 representation updates per window step
    (excluding the start), in ms."""
    rows = _num(rows)
    if epoch is None:
        epoch = max(r["window_epoch"] for r in rows)
    algos = list(dict.fromkeys(r["algorithm"] for r in rows if r["window_epoch"] == epoch))
    if not algos:
        raise ValueError(f"no rows for window epoch {epoch}")
    out = []
    for a in algos:
        label = next(r["label"] for r in rows if r["algorithm"] == a)
        row = dict(algorithm=a, label=label, window_epoch=epoch)
        for m in (1, 2, 3, 4):
            row[f"avg_metric{m}"] = _mean(_series(rows, epoch, a, f"metric{m}"))
        row["t_epoch"] = ""
        row["fc0_update_ms_per_step"] = "" if not update_ms or a not in update_ms else update_ms[a]
        paper = PAPER_TABLE1.get(a, {})
        for m in (1, 2, 3, 4):
            row[f"paper_metric{m}"] = paper.get(f"metric{m}", "")
        row["paper_t_epoch"] = paper.get("t_epoch", "")
        out.append(row)
    return out


def _first_exceed(series: list[float], level: float) -> int | None:
    """First step from which the block-averaged series stays above ``level`` to the end."""
    for i in range(len(series)):
        if all(v > level for v in series[i:]):
            return i
    return None


def check_orderings(rows: list[dict], t_updt: int) -> dict:
    """The claims of Sec. 4.3, checked per window epoch on the (run-averaged) rows, with the
    numbers behind each boolean and, where Table 1 allows, the paper's own verdict.

    Claims (per metric m = 1..4 unless said; averages are over the window):

    * ``b_r_below_r5``: b-r-kfac's average < r-kfac ``T_inv = 5t``'s ("performing a b-update is
      almost always better than performing no update in terms of all error metrics").
    * ``b_r_below_b``: b-r-kfac's average < b-kfac's, plus the fraction of steps where it is
      below ("the error is better for all iterations", Prop. 3.2).
    * ``bc_between``: b-r-kfac <= b-kfac-c <= b-kfac ("lies in between").
    * ``r5_close_to_k5``: r-kfac ``5t`` close to k-fac ``5t``: ratio of averages in [0.8, 3.5]
      (3.5 admits the paper's own largest ratio, 3.1 on metric 1: "only mildly larger").
    * ``r30_grows``: r-kfac ``30t``'s mean over the last third of the window exceeds that over
      the first third.
    * ``r30_exceeds_b_steady``: r-kfac ``30t``'s block-averaged curve rises above b-kfac's steady
      level (its mean over the second half of the window) and stays there; ``step`` says from
      when (and ``skipped_updates = step / t``: "it took only 10-15 skipped inverse-updates").
      The headline claim is on the step metrics (3)-(4).
    * ``b_constant``: b-kfac roughly constant: its mean over the last third of the window is
      within a factor 1.5 of that over the middle third (after the start-up transient), while
      r-kfac ``30t``'s ratio is shown for contrast.

    The three time-shape claims (``r30_*``, ``b_constant``) use the steps before the first change
    of the damping factor ``phi`` inside the window, when rows carry ``phi`` (``segment``).
    """
    rows = _num(rows)
    if not rows:
        raise ValueError("no rows")
    out: dict = {}
    algos = set(r["algorithm"] for r in rows)
    need = {"b-kfac", "b-r-kfac", "b-kfac-c", "r-kfac-5t", "r-kfac-30t", "k-fac-5t"}
    missing = need - algos
    if missing:
        raise ValueError(f"rows lack the algorithm(s) {sorted(missing)} needed by the orderings")
    for epoch in sorted(set(r["window_epoch"] for r in rows)):
        col = {m: ("metric%d_block" % m if m in (3, 4) and "metric3_block" in rows[0] else f"metric{m}")
               for m in (1, 2, 3, 4)}
        # time-shape claims on the steps before the first change of the damping factor phi (an
        # epoch schedule: a window can cross it, e.g. the cpu profile's epoch-4 window): a jump of
        # every curve there says nothing about growth. The paper's windows cross no change.
        phis = _series(rows, epoch, "b-kfac", "phi") if "phi" in rows[0] else []
        seg = next((i for i, v in enumerate(phis) if v != phis[0]), len(phis)) if phis else None

        def shape(a, c, seg=seg):
            x = _series(rows, epoch, a, c)
            return x[:seg] if seg else x
        avg = {a: {m: _mean(_series(rows, epoch, a, f"metric{m}")) for m in (1, 2, 3, 4)} for a in algos}
        res: dict = {}

        def paper(a, m):
            return PAPER_TABLE1.get(a, {}).get(f"metric{m}")

        c = {}
        for m in (1, 2, 3, 4):
            x, y = avg["b-r-kfac"][m], avg["r-kfac-5t"][m]
            c[f"metric{m}"] = dict(holds=x < y, b_r_kfac=x, r_kfac_5t=y, paper_holds=paper("b-r-kfac", m) < paper("r-kfac-5t", m))
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        res["b_r_below_r5"] = c

        c = {}
        for m in (1, 2, 3, 4):
            br, b = _series(rows, epoch, "b-r-kfac", f"metric{m}"), _series(rows, epoch, "b-kfac", f"metric{m}")
            frac = sum(1 for u, v in zip(br, b) if u < v) / len(br)
            c[f"metric{m}"] = dict(holds=avg["b-r-kfac"][m] < avg["b-kfac"][m], fraction_of_steps_below=frac,
                                   b_r_kfac=avg["b-r-kfac"][m], b_kfac=avg["b-kfac"][m],
                                   paper_holds=paper("b-r-kfac", m) < paper("b-kfac", m))
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        res["b_r_below_b"] = c

        c = {}
        for m in (1, 2, 3, 4):
            br, bc, b = avg["b-r-kfac"][m], avg["b-kfac-c"][m], avg["b-kfac"][m]
            pb = (paper("b-r-kfac", m), paper("b-kfac-c", m), paper("b-kfac", m))
            c[f"metric{m}"] = dict(holds=br <= bc <= b, b_r_kfac=br, b_kfac_c=bc, b_kfac=b,
                                   paper_holds=pb[0] <= pb[1] <= pb[2])
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        res["bc_between"] = c

        c = {}
        for m in (1, 2, 3, 4):
            ratio = avg["r-kfac-5t"][m] / avg["k-fac-5t"][m] if avg["k-fac-5t"][m] > 0 else float("inf")
            pr = paper("r-kfac-5t", m) / paper("k-fac-5t", m)
            c[f"metric{m}"] = dict(holds=0.8 <= ratio <= 3.5, ratio=ratio, r_kfac_5t=avg["r-kfac-5t"][m],
                                   k_fac_5t=avg["k-fac-5t"][m], paper_ratio=pr)
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        c["criterion"] = "0.8 <= avg(r-kfac 5t) / avg(k-fac 5t) <= 3.5 on each metric"
        res["r5_close_to_k5"] = c

        c = {}
        for m in (1, 2, 3, 4):
            s = shape("r-kfac-30t", col[m])
            third = max(len(s) // 3, 1)
            first, last = _mean(s[:third]), _mean(s[-third:])
            c[f"metric{m}"] = dict(holds=last > first, first_third=first, last_third=last,
                                   growth=last / first if first > 0 else float("inf"))
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        res["r30_grows"] = c

        c = {}
        for m in (1, 2, 3, 4):
            b = shape("b-kfac", col[m])
            r30 = shape("r-kfac-30t", col[m])
            level = _mean(b[len(b) // 2:])
            i = _first_exceed(r30, level)
            c[f"metric{m}"] = dict(holds=i is not None, b_kfac_steady=level, step=i,
                                   skipped_updates=None if i is None else i / t_updt,
                                   r_kfac_30t_end=r30[-1] if r30 else None)
        c["holds"] = c["metric3"]["holds"] and c["metric4"]["holds"]
        c["criterion"] = ("r-kfac 30t's block-averaged curve rises above b-kfac's mean over the second half of "
                          "the window and stays above (holds: on both step metrics 3 and 4)")
        res["r30_exceeds_b_steady"] = c

        c = {}
        for m in (1, 2, 3, 4):
            out_m = {}
            for a in ("b-kfac", "r-kfac-30t"):
                s = shape(a, col[m])
                third = max(len(s) // 3, 1)
                mid, last = _mean(s[third:2 * third]), _mean(s[-third:])
                out_m[a] = last / mid if mid > 0 else float("inf")
            c[f"metric{m}"] = dict(holds=1 / 1.5 <= out_m["b-kfac"] <= 1.5,
                                   b_kfac_last_over_middle=out_m["b-kfac"],
                                   r_kfac_30t_last_over_middle=out_m["r-kfac-30t"])
        c["holds"] = all(v["holds"] for k, v in c.items() if k.startswith("metric"))
        c["criterion"] = "mean over the last third / mean over the middle third of b-kfac's curve in [1/1.5, 1.5]"
        res["b_constant"] = c
        n = len(_series(rows, epoch, "b-kfac", "metric1"))
        res["segment"] = dict(steps=[0, seg if seg else n], window=n,
                              phi_change_step=seg if seg and seg < n else None,
                              note="r30_grows, r30_exceeds_b_steady and b_constant use these steps (constant phi)")
        out[f"epoch_{epoch}"] = res
    return out


def format_orderings(orderings: dict) -> str:
    """A short text report of :func:`check_orderings` (one line per claim and window)."""
    lines = []
    for ep, res in orderings.items():
        if not ep.startswith("epoch_"):
            continue
        lines.append(f"window at {ep.replace('_', ' ')}:")
        for claim, c in res.items():
            if claim == "segment":
                if c.get("phi_change_step") is not None:
                    lines.append(f"  (phi changes at step {c['phi_change_step']}: growth/constancy claims use steps "
                                 f"0-{c['phi_change_step'] - 1})")
                continue
            per = []
            for m in (1, 2, 3, 4):
                v = c.get(f"metric{m}")
                if v is None:
                    continue
                extra = ""
                if claim == "r30_exceeds_b_steady" and v["step"] is not None:
                    extra = f"@{v['step']}"
                elif claim == "r5_close_to_k5":
                    extra = f"({v['ratio']:.2f})"
                elif claim == "r30_grows":
                    extra = f"(x{v['growth']:.2f})"
                per.append(f"m{m}={'T' if v['holds'] else 'F'}{extra}")
            lines.append(f"  {claim:<22} {'HOLDS' if c['holds'] else 'fails':<6} " + " ".join(per))
    return "\n".join(lines)


#: The observations of Sec. 4.3 that :func:`check_orderings` decides, in the paper's words.
SEC43_CLAIMS: dict[str, str] = {
    "b_r_below_r5": "performing a b-update is almost always better than performing no update in terms of all "
                    "error metrics (b-r-kfac below r-kfac T_inv = 5t)",
    "b_r_below_b": "when adding periodic rsvd overwritings to a b-kfac algorithm, the error is better "
                   "(b-r-kfac below b-kfac)",
    "bc_between": "the error of b-kfac-c lies in between the one of b-r-kfac and b-kfac",
    "r5_close_to_k5": "the error of r-kfac (T_inv = 5t) is only mildly larger than the one of k-fac (T_inv = 5t)",
    "r30_grows": "the error of r-kfac T_inv = 300 (no reset) grows fast",
    "r30_exceeds_b_steady": "the step-related errors of no-reset r-kfac rapidly increase past the steady-state "
                            "error of b-kfac",
    "b_constant": "the error of b-kfac is fairly constant",
}


def sec43_claims(orderings: dict) -> list[dict]:
    """One row per observation of Sec. 4.3 (:data:`SEC43_CLAIMS`) from :func:`check_orderings`'s
    output: where it holds (``window: metrics``), and a verdict -- ``reproduced`` where it holds
    in every window (on the metrics the claim is about), ``partly`` where in some, ``not
    reproduced`` where in none."""
    windows = [k for k in orderings if k.startswith("epoch_")]
    if not windows:
        raise ValueError("orderings hold no window (keys 'epoch_<e>')")
    rows = []
    for claim, text in SEC43_CLAIMS.items():
        held, where, fails = [], [], []
        for w in windows:
            c = orderings[w].get(claim)
            if c is None:
                continue
            held.append(bool(c["holds"]))
            ms = [m for m in (1, 2, 3, 4) if f"metric{m}" in c and c[f"metric{m}"]["holds"]]
            bad = [m for m in (1, 2, 3, 4) if f"metric{m}" in c and not c[f"metric{m}"]["holds"]]
            label = w.replace("epoch_", "epoch ")
            where.append(f"{label}: {','.join(map(str, ms)) or '-'}")
            if bad:
                fails.append(f"{label}: {','.join(map(str, bad))}")
        if not held:
            continue
        verdict = "reproduced" if all(held) else ("partly" if any(held) else "not reproduced")
        rows.append(dict(claim=claim, section="4.3", statement=text, holds_on_metrics="; ".join(where),
                         fails_on_metrics="; ".join(fails) or "-", verdict=verdict))
    return rows


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
#: Line style and marker per algorithm: overlapping curves stay distinguishable in grey scale.
_STYLES = {
    "b-kfac": ("-", "o"), "b-r-kfac": ("--", "s"), "b-kfac-c": (":", "^"), "r-kfac-5t": ("-.", "v"),
    "r-kfac-1t": ((0, (5, 1)), "D"), "r-kfac-30t": ((0, (3, 1, 1, 1)), "x"), "k-fac-5t": ((0, (1, 1)), "+"),
}


def _log_range(values: Sequence[float], spread: float = 1e4) -> tuple[float, float]:
    """A log-scale y-range that shows the bulk of ``values``: from the 5th percentile (but at most
    ``spread`` below the maximum) to a margin above the maximum, so that rare deep dips (k-fac's
    refreshes, which reach the reference at 1e-7) do not squash every other curve."""
    v = sorted(x for x in values if x > 0 and math.isfinite(x))
    if not v:
        return 1e-16, 1.0
    lo = max(v[int(0.05 * (len(v) - 1))], v[-1] / spread)
    return lo / 1.5, v[-1] * 1.5


#: y-axis labels of the four metrics (all are ratios: dimensionless).
_METRIC_YLABELS = {
    1: r"$\|\tilde A^{-1}-A^{-1}_{ref}\|_F\,/\,\|A^{-1}_{ref}\|_F$",
    2: r"$\|\tilde\Gamma^{-1}-\Gamma^{-1}_{ref}\|_F\,/\,\|\Gamma^{-1}_{ref}\|_F$",
    3: r"$\|s-s_{ref}\|_F\,/\,\|s_{ref}\|_F$",
    4: r"$1-\cos\angle(s, s_{ref})$",
}


def plot_error_study(metrics_rows: list[dict], path=None, *, metrics: Sequence[int] = (1, 2),
                     block_average: bool = True, width: float = 7.0, run_rows: list[dict] | None = None):
    """Figure 1 (``metrics=(1, 2)``) or Figure 2 (``metrics=(3, 4)``): one row per window epoch,
    one column per metric, one curve per algorithm, log-scale y, FC layer 0.

    ``metrics_rows`` are the run-averaged rows (``metrics.csv``: the mean over seeds, as the
    paper's "each curve is the average over 5 runs"); each panel's title says over how many.
    With ``run_rows`` (``metrics_runs.csv``) holding two or more seeds, each seed is drawn as a
    faint line under the mean. Every algorithm has its own line style and marker, the markers
    of different algorithms at staggered steps so that coinciding curves (b-kfac and b-kfac-c)
    stay visible. Step metrics use the ``t_updt``-block averages when ``block_average`` (Fig. 2
    caption). The y-range shows the bulk of the non-k-fac curves (:func:`_log_range`): k-fac's
    refresh dips run off the bottom, which the panel says. A change of the damping factor
    inside a window is marked with a vertical line. The y-labels are the metrics' formulas
    (ratios, no unit); the legend sits below the panels. Saves to ``path`` when given; returns
    the :class:`matplotlib.figure.Figure`."""
    import matplotlib.pyplot as plt

    rows = _num(metrics_rows)
    if not rows:
        raise ValueError("metrics_rows is empty")
    for m in metrics:
        if m not in METRIC_NAMES:
            raise ValueError(f"metrics must be among 1..4, got {m!r}")
    runs = _num(run_rows) if run_rows else []
    seeds = sorted({r["seed"] for r in runs if "seed" in r})
    epochs = sorted(set(r["window_epoch"] for r in rows))
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    labels = {r["algorithm"]: r["label"] for r in rows}
    fig, axes = plt.subplots(len(epochs), len(metrics), figsize=(width, 2.7 * len(epochs) + 0.9),
                             squeeze=False, sharex=True)
    cmap = plt.get_cmap("tab10")
    for i, ep in enumerate(epochs):
        for jx, m in enumerate(metrics):
            ax = axes[i][jx]
            col = f"metric{m}_block" if (block_average and m in (3, 4) and "metric3_block" in rows[0]) else f"metric{m}"
            shown, kfac_low = [], []
            phi_change = None
            n_runs = set()
            for c, a in enumerate(algos):
                sel = sorted((r for r in rows if r["window_epoch"] == ep and r["algorithm"] == a), key=lambda r: r["step"])
                if not sel:
                    continue
                n_runs |= {r.get("n_runs", 1) for r in sel}
                y = [max(r[col], 1e-16) for r in sel]
                if a.startswith("k-fac"):
                    kfac_low += y
                else:
                    shown += y
                ls, mk = _STYLES.get(a, ("-", None))
                every = max(len(sel) // 6, 1)
                if len(seeds) > 1:
                    for sd in seeds:
                        ss = sorted((r for r in runs if r["seed"] == sd and r["window_epoch"] == ep and r["algorithm"] == a
                                     and col in r), key=lambda r: r["step"])
                        ax.plot([r["step"] for r in ss], [max(r[col], 1e-16) for r in ss], color=cmap(c % 10), lw=0.6,
                                ls=ls, alpha=0.25)
                ax.plot([r["step"] for r in sel], y, label=labels[a], color=cmap(c % 10), lw=1.1, ls=ls,
                        marker=mk, markevery=((c * every) // max(len(algos), 1), every), ms=3.5)
                if phi_change is None and "phi" in sel[0]:
                    phi_change = next((r["step"] for r in sel if r["phi"] != sel[0]["phi"]), None)
            ax.set_yscale("log")
            lo, hi = _log_range(shown or [1.0])
            ax.set_ylim(lo, hi)
            if any(v < lo for v in kfac_low):
                ax.text(0.99, 0.02, "k-fac's refresh dips run below the axis", transform=ax.transAxes, fontsize=6.5,
                        ha="right", va="bottom", color="0.35")
            if phi_change is not None:
                ax.axvline(phi_change, color="0.4", lw=0.8, ls="--")
                ax.text(phi_change, hi, " damping changes", fontsize=7, va="top", color="0.3")
            runs_note = "/".join(str(n) for n in sorted(n_runs)) or "1"
            ax.set_title(f"epoch {ep}: ({m}) {METRIC_NAMES[m]}\nmean of {runs_note} seed(s)", fontsize=8)
            ax.set_ylabel(_METRIC_YLABELS[m], fontsize=8)
            ax.tick_params(which="both", labelsize=7)
            if i == len(epochs) - 1:
                ax.set_xlabel("step in window (FC layer 0)", fontsize=8)
            ax.grid(True, which="both", alpha=0.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    ncol = 2 if width < 9 else 3
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * (-(-len(names) // ncol)) + 0.02, 1, 1))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    return fig


def plot_spectrum_decay(spectrum_rows: list[dict], window_starts: dict | None = None, window: int | None = None,
                        path=None, *, width: float = 7.0):
    """FC0's spectrum decay along the reference trajectory (``seed<k>/spectrum.csv``): the
    fraction of the trace held by the top ``r`` eigenvalues and ``lambda_r / lambda_1`` per
    factor against the training step (each factor its own line style and marker), with the
    error study's windows shaded and the legend below the panels."""
    import matplotlib.pyplot as plt

    if not spectrum_rows:
        raise ValueError("spectrum_rows is empty")
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.1), squeeze=False)
    for ax, col, name, ylabel in ((axes[0][0], "top_r_trace_fraction", "trace held by the top r eigenvalues",
                                   "fraction of the trace"),
                                  (axes[0][1], "lam_r_over_lam_1", "lambda_r / lambda_1",
                                   r"$\lambda_r / \lambda_1$ (ratio)")):
        for fac, ls, mk in (("A", "-", "o"), ("G", "--", "s")):
            sel = sorted((r for r in spectrum_rows if r["factor"] == fac), key=lambda r: int(float(r["step"])))
            ax.plot([int(float(r["step"])) for r in sel], [float(r[col]) for r in sel], ls=ls, marker=mk, ms=3,
                    markevery=max(len(sel) // 8, 1), label="A (input)" if fac == "A" else "Gamma (output gradient)")
        for e, k0 in (window_starts or {}).items():
            ax.axvspan(int(k0), int(k0) + (window or 0), color="0.85", zorder=0)
            ax.text(int(k0), ax.get_ylim()[1], f" window, epoch {e}", fontsize=7, va="top")
        if col == "lam_r_over_lam_1":
            ax.set_yscale("log")
        ax.set_title(f"FC0: {name}", fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    return fig


def table1_over_seeds(run_rows: list[dict], runs: Sequence[dict] = (), *, epoch: int | None = None) -> list[dict]:
    """Table 1 over the seeds of the study: per algorithm, each metric's window average
    (:func:`table1` on each seed's rows of ``metrics_runs.csv``) as mean and sd over the seeds,
    and the FC0 update cost per window step (``runs``: ``config.json``'s per-seed diagnostics,
    their ``update_ms_per_step``) likewise, with ``n_seeds``; beside the paper's values
    (:data:`PAPER_TABLE1`: its metric averages and ``t_epoch``). ``epoch`` defaults to the last
    window epoch. Spreads are NaN below two seeds."""
    from .verdicts import mean_sd

    rows = _num(run_rows)
    if not rows:
        raise ValueError("run_rows is empty")
    if epoch is None:
        epoch = max(r["window_epoch"] for r in rows)
    seeds = sorted({r.get("seed", 0) for r in rows})
    ms = {int(d.get("seed", 0)): d.get("update_ms_per_step", {}).get(str(epoch), {}) for d in runs}
    per_seed = {sd: {t["algorithm"]: t for t in table1([r for r in rows if r.get("seed", 0) == sd], epoch=epoch,
                                                          update_ms=ms.get(sd))}
                for sd in seeds}
    algos = list(dict.fromkeys(a for t in per_seed.values() for a in t))
    out = []
    for a in algos:
        have = [per_seed[sd][a] for sd in seeds if a in per_seed[sd]]
        row = dict(algorithm=a, label=have[0]["label"], window_epoch=epoch, n_seeds=len(have))
        for m in (1, 2, 3, 4):
            row[f"metric{m}_mean"], row[f"metric{m}_sd"], _ = mean_sd([h[f"avg_metric{m}"] for h in have])
        upd = [h["fc0_update_ms_per_step"] for h in have if h["fc0_update_ms_per_step"] != ""]
        row["update_ms_mean"], row["update_ms_sd"], row["update_ms_n"] = mean_sd(upd)
        row.update({k: v for k, v in have[0].items() if k.startswith("paper_")})  # table1's paper columns
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# the study on the network
# ----------------------------------------------------------------------------------------------
@dataclass
class ErrorStudyResult:
    profile: str
    rows: list[dict]  # run-averaged metrics.csv rows
    run_rows: list[dict]
    table: list[dict]
    orderings: dict
    config: dict
    out_dir: Path | None = None
    files: dict = field(default_factory=dict)


def _kfac_hyper(profile: Profile, name: str) -> dict:
    """Run ``name``'s hyper-parameters as the optimizer is built with them."""
    opt, hyper, _ = profile.resolve_run(name)
    return resolve_hyper(opt, hyper)


def _window_starts(window_epochs: Sequence[int], batches: int, stream: StudyStream) -> dict[int, int]:
    """Each window's first step: the first step of its epoch at which every algorithm's heaviest
    update falls (:meth:`StudyStream.next_start`)."""
    return {e: stream.next_start((e - 1) * batches) for e in window_epochs}


def _spectrum_row(k: int, epoch: int, fac: str, d: Tensor, r: int) -> dict:
    """How far FC0's spectrum has decayed: the fraction of the trace held by the top ``r``
    eigenvalues and ``lambda_r / lambda_1`` (from the reference's exact ``eigh``)."""
    d = d.double().clamp(min=0)
    total = float(d.sum())
    return dict(step=k, epoch=epoch, factor=fac, rank=r, top_r_trace_fraction=float(d[:r].sum()) / total if total else 0.0,
                lam_r_over_lam_1=float(d[r - 1] / d[0]) if d.numel() >= r and float(d[0]) > 0 else 0.0)


def _trajectory(profile: Profile, seed: int, *, dev: torch.device, data_dir, drive: str, t: int,
                window: int, window_epochs: Sequence[int], layer: str, progress: bool,
                algorithms: Sequence[ShadowSpec], checkpoint: Path | None = None, inputs_key: str = "",
                spectrum_every: int = 50) -> tuple[list[dict], dict]:
    """One training trajectory with the study's stream (:class:`StudyStream`); returns (rows, diagnostics).

    With ``checkpoint``, the trajectory's state (model, driver, stream, rows so far) is saved
    atomically at each epoch boundary where no window is open, and a matching checkpoint
    (same ``inputs_key``) is resumed from: the rows are those of the uninterrupted run."""
    from tqdm import tqdm  # plain text progress: the same in a terminal and a notebook's output

    from .results import atomic_torch_save

    tr = profile.train
    arrays = load_cifar10(data_dir)
    if profile.data["n_train"] is not None or profile.data["n_test"] is not None:
        arrays = subset(arrays, profile.data["n_train"] or arrays.n_train, profile.data["n_test"] or arrays.n_test, seed=0)
    train_loader, _ = make_loaders(arrays, batch_size=tr["batch_size"], test_batch_size=tr["test_batch_size"],
                                   seed=seed, device=dev)
    torch.manual_seed(seed)
    model = build_model(profile.model).to(dev)
    module = getattr(model, layer, None)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"error_study.layer={layer!r} is not a Linear layer of the profile's model")

    if drive == "reference":
        opt_name, hyper = "k-fac", _kfac_hyper(profile, "k-fac")
        hyper.update(t_updt=t, t_inv=t)
    else:
        opt_name, _, _ = profile.resolve_run(drive)
        hyper = _kfac_hyper(profile, drive)
    if opt_name not in ("k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c"):
        raise ValueError(f"drive={drive!r} resolves to {opt_name!r}; the error study needs a K-FAC-family driver")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm gets SGD (listed by describe())
        opt = make_optimizer(opt_name, model, **hyper)
    lc = next((L.capture for L in opt.layers if L.capture.module is module), None)
    if lc is None:
        raise ValueError(f"layer {layer!r} is not captured by the driver")
    ref_layer = next(L for L in opt.layers if L.capture is lc)
    shadow_hyper = _kfac_hyper(profile, "r-kfac")
    rho = hyper["rho"]
    phi_sched = as_schedule(hyper["damping_phi"])
    rank_sched = as_schedule(shadow_hyper["rank"])
    min_damping = hyper.get("min_damping", 1e-8)
    dtype = hyper.get("factor_dtype") or module.weight.dtype
    reduction = opt.capture.reduction
    stream = StudyStream(t_updt=t, window=window, algorithms=algorithms, seed=seed, rho=rho,
                         rank=shadow_hyper["rank"], oversample=shadow_hyper["oversample"],
                         power_iters=shadow_hyper["power_iters"], min_damping=min_damping)

    batches = len(train_loader)
    if tr["max_batches_per_epoch"]:
        batches = min(batches, tr["max_batches_per_epoch"])
    starts = _window_starts(window_epochs, batches, stream)
    start_at = {k0: e for e, k0 in starts.items()}
    last = max(starts.values()) + window - 1
    diag: dict = dict(seed=seed, batches_per_epoch=batches, window_starts={str(e): k for e, k in starts.items()},
                      last_step=last, ea_check={}, J_form={}, update_ms_per_step={}, seconds={}, resumed_at=None)
    rows: list[dict] = []
    spectrum: list[dict] = []
    factored: dict[int, bool] = {}
    k, epoch = 0, 1
    elapsed = 0.0
    if checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, map_location=dev, weights_only=True)
        if ck.get("inputs_key") == inputs_key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["rng"])
            stream.load_state_dict(ck["stream"], (lc.d_A, lc.d_G), dtype, dev, ck["epoch"])
            rows, spectrum, diag, k, epoch, elapsed = (ck["rows"], ck["spectrum"], ck["diag"], ck["k"], ck["epoch"],
                                                       ck["elapsed"])
            diag["resumed_at"] = k
        elif progress:
            print(f"error study: {checkpoint} is from other inputs; starting seed {seed} from step 0", flush=True)
    t_start = time.perf_counter() - elapsed
    bar = tqdm(total=last + 1, initial=k, desc=f"error study {profile.name} seed {seed}", disable=not progress,
               mininterval=10.0)
    model.train()
    while k <= last:
        if checkpoint is not None and epoch > 1 and not stream.active and k == (epoch - 1) * batches:
            diag["seconds"] = dict(so_far=time.perf_counter() - t_start)
            atomic_torch_save(dict(inputs_key=inputs_key, model=model.state_dict(), optimizer=opt.state_dict(),
                                   rng=torch.get_rng_state(), stream=stream.state_dict(), rows=rows,
                                   spectrum=spectrum, diag=diag, k=k, epoch=epoch,
                                   elapsed=time.perf_counter() - t_start), checkpoint)
        opt.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        it = train_loader.iter_from(k - (epoch - 1) * batches)
        for _ in range(k - (epoch - 1) * batches, batches):
            if k > last:
                break
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"error study: non-finite training loss at step {k}")
            loss.backward()
            start = start_at.get(k)
            A = G = J = None
            if k % t == 0 or stream.active or start is not None:
                A, G, scale = lc.batch_matrices(reduction, dtype)
            if start is not None:
                Jd = lc.grad_matrix().to(dtype)
                err = float(torch.linalg.matrix_norm(Jd - scale * (G @ A.mT)) / torch.linalg.matrix_norm(Jd))
                factored[start] = err < 1e-4
                diag["J_form"][str(start)] = dict(factored=factored[start], rel_diff=err)
            if stream.active or start is not None:
                use_factored = all(factored[e] for e in [*stream.active, *([start] if start is not None else [])])
                J = (scale * G, A) if use_factored else lc.grad_matrix().to(dtype)
            phi = float(phi_sched(epoch)) if callable(phi_sched) else float(phi_sched)
            new_rows, closed = stream.step(k, A, G, J, phi=phi, epoch=epoch, start=start)
            for r in new_rows:
                r["seed"] = seed
            rows += new_rows
            for win in closed:
                diag["update_ms_per_step"][str(win.label)] = {a: 1000.0 * sec / max(window - 1, 1)
                                                              for a, sec in win.update_seconds.items()}
            if k == 0:  # max |M_0 M_0^T|: what separates an identity-started driver's factor from eq. (5)
                diag["first_outer_max"] = {f: float(stream.ea[f].abs().max()) for f in ("A", "G")}
            opt.step()
            if drive == "reference" and k % t == 0:  # our statistics stream is the benchmark's
                for f, inv in (("A", ref_layer.inv_A), ("G", ref_layer.inv_G)):
                    if inv is None or inv.factor is None:
                        continue
                    if start is not None:
                        # from the first batch the factors agree; from the identity the driver's data
                        # part is eq. (5)'s less ea_identity * M_0 M_0^T (module docstring)
                        gap = (inv.factor - stream.ea[f]).abs().max()
                        expected = inv.ea_identity * diag["first_outer_max"][f]
                        diff = float((gap - expected).abs() / stream.ea[f].abs().max())
                        diag["ea_check"].setdefault(str(k), {})[f] = diff
                        if diff > 1e-5:
                            raise RuntimeError(f"error study: our EA factor {f} differs from the driver's at step {k} "
                                               f"(relative {diff:.2e}); the statistics streams disagree")
                    if k % spectrum_every == 0 and inv.U is not None:
                        r = int(rank_sched(epoch)) if callable(rank_sched) else int(rank_sched)
                        spectrum.append(_spectrum_row(k, epoch, f, inv.d, min(r, inv.dim)))
            k += 1
            bar.update(1)
        epoch += 1
    bar.close()
    diag["seconds"] = dict(total=time.perf_counter() - t_start)
    diag["spectrum"] = spectrum
    opt.remove_hooks()
    return rows, diag


def run_error_study(
    profile: Profile,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    out_root: str | None = None,
    progress: bool = True,
    drive: str = "reference",
    repeats: int | None = None,
    window: int | None = None,
    window_epochs: Sequence[int] | None = None,
    algorithms: Sequence[ShadowSpec] = PAPER_ALGORITHMS,
    resume: bool = False,
) -> ErrorStudyResult:
    """The error study of Sec. 4.2-4.3 with ``profile.error_study`` (see the module docstring).

    Seeds: ``seeds``, else ``repeats`` seeds from ``seed`` (defaults: the profile's ``seeds`` or
    ``repeats`` from its first training seed). Each seed's trajectory writes
    ``seed<k>/rows.csv`` and ``seed<k>/run.json`` when it completes; with ``resume`` a seed
    already complete with the same inputs (as :func:`~bkfac.experiments.manifest.comparable_inputs`
    compares them) is kept, and an interrupted one continues from its
    last checkpoint (``seed<k>/checkpoint.pt``, saved at epoch boundaries between windows).
    The combined files (module docstring) are written from every complete seed, ``config.json``
    saying which. ``window``/``window_epochs`` override the profile's (recorded); ``drive``
    picks the trajectory (``"reference"`` = k-fac with ``T_inv = T_updt``, the paper's)."""
    import json

    from .manifest import comparable_inputs, error_study_inputs, inputs_hash, provenance
    from .train import resolve_device

    es = profile.error_study
    t = es["t_updt"]
    window = window if window is not None else es["window"]
    window_epochs = list(window_epochs if window_epochs is not None else es["window_epochs"])
    if seeds is None:
        repeats = repeats if repeats is not None else es["repeats"]
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"error_study repeats must be a positive integer, got {repeats!r}")
        first = seed if seed is not None else profile.train["seeds"][0]
        seeds = [first + i for i in range(repeats)]
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {seeds!r}")
    for name, v in (("t_updt", t), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"error_study {name} must be a positive integer, got {v!r}")
    if not window_epochs or not all(isinstance(e, int) and e >= 1 for e in window_epochs):
        raise ValueError(f"window_epochs must be positive integers (1-indexed epochs), got {window_epochs!r}")
    dev = resolve_device(device, profile)
    out_dir = results_dir(profile.name, out_root) / "error_study"
    algos = {a.key: a.label(t) for a in algorithms}
    inputs = error_study_inputs(profile, seeds, drive=drive, window=window, window_epochs=window_epochs,
                                algorithms=algos)
    config = dict(profile=profile.name, seeds=seeds, drive=drive, t_updt=t, window=window,
                  window_epochs=window_epochs, layer=es["layer"], device=str(dev),
                  overrides={k: v for k, v in (("window", window), ("window_epochs", window_epochs))
                             if v != es[k]},
                  algorithms=algos, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  inputs=inputs, inputs_hash=inputs_hash(inputs))
    all_rows: list[dict] = []
    diags: list[dict] = []
    for s in seeds:
        seed_inputs = dict(inputs, seeds=[s])
        key = inputs_hash(seed_inputs)
        sdir = out_dir / f"seed{s}"
        run_file = sdir / "run.json"
        if resume and run_file.exists():
            done = json.loads(run_file.read_text())
            # kept when its inputs are today's, or differ only where no result can change
            # (manifest.comparable_inputs: the number of seeds, hyper-parameters a method ignores)
            same = done.get("inputs_hash") == key or (
                isinstance(done.get("inputs"), dict)
                and inputs_hash(comparable_inputs(done["inputs"])) == inputs_hash(comparable_inputs(seed_inputs)))
            if same:
                all_rows += _num(read_csv(sdir / "rows.csv"))
                diags.append(done["diag"])
                if progress:
                    print(f"[{profile.name}] error study seed {s}: complete, kept", flush=True)
                continue
        rows, diag = _trajectory(profile, s, dev=dev, data_dir=data_dir, drive=drive, t=t, window=window,
                                 window_epochs=window_epochs, layer=es["layer"], progress=progress,
                                 algorithms=algorithms, checkpoint=sdir / "checkpoint.pt" if resume else None,
                                 inputs_key=key)
        write_csv(sdir / "rows.csv", rows, _RUN_COLS)
        if diag.get("spectrum"):
            write_csv(sdir / "spectrum.csv", diag.pop("spectrum"))
        write_json(run_file, dict(inputs=seed_inputs, inputs_hash=key, seed=s, diag=diag, provenance=provenance(dev)))
        (sdir / "checkpoint.pt").unlink(missing_ok=True)
        all_rows += rows
        diags.append(diag)
        if progress:
            print(f"[{profile.name}] error study seed {s}: {diag['seconds']['total']:.0f} s", flush=True)
        if len(diags) < len(seeds):  # what the complete seeds give so far, marked incomplete
            _write_outputs(out_dir, all_rows, diags, dict(config, complete=False), t, echo=False)
    return _write_outputs(out_dir, all_rows, diags, dict(config, complete=True), t, echo=True)


_RUN_COLS = ["seed", "window_epoch", "step", "global_step", "algorithm", "label", "phi", "metric1", "metric2",
             "metric3", "metric4"]


def _write_outputs(out_dir: Path, all_rows: list[dict], diags: list[dict], config: dict, t: int,
                   echo: bool) -> ErrorStudyResult:
    all_rows = [dict(r) for r in all_rows]
    add_block_averages(all_rows, t, group=("seed", "window_epoch", "algorithm"))
    mean_rows = average_runs(all_rows)
    last_epoch = max(r["window_epoch"] for r in mean_rows)
    upd = defaultdict(list)
    for dg in diags:
        for a, v in dg["update_ms_per_step"].get(str(last_epoch), {}).items():
            upd[a].append(v)
    update_ms = {a: sum(v) / len(v) for a, v in upd.items()}
    tab = table1(mean_rows, epoch=last_epoch, update_ms=update_ms)
    orderings = check_orderings(mean_rows, t)
    config = dict(config, runs=diags)
    cols = ["window_epoch", "step", "algorithm", "label", "phi", "metric1", "metric2", "metric3", "metric4",
            "metric3_block", "metric4_block", "n_runs"]
    files = dict(
        metrics=write_csv(out_dir / "metrics.csv", mean_rows, cols),
        metrics_runs=write_csv(out_dir / "metrics_runs.csv", all_rows, _RUN_COLS + ["metric3_block", "metric4_block"]),
        table1=write_csv(out_dir / "table1.csv", tab),
        orderings=write_json(out_dir / "orderings.json", orderings),
        config=write_json(out_dir / "config.json", config),
    )
    if echo:
        print(format_orderings(orderings), flush=True)
    return ErrorStudyResult(config["profile"], mean_rows, all_rows, tab, orderings, config, out_dir, files)


def load_error_study(profile: str, out_root: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """Read a written study back: ``(metrics rows, table1 rows, orderings)`` (numbers converted)."""
    import json

    d = results_dir(profile, out_root) / "error_study"
    rows = _num(read_csv(d / "metrics.csv"))
    tab = read_csv(d / "table1.csv")
    with open(d / "orderings.json") as f:
        orderings = json.load(f)
    return rows, tab, orderings
