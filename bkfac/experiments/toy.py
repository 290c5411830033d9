"""Toy exponential-average (EA) K-factor processes and the paper's reference estimates.

Sec. 3.2 and 4.1 of Puiu (arXiv:2210.08494) reason about one EA K-factor ``M_k`` built from
incoming low-rank PSD updates ``M_k M_k^T`` (``M_k`` is ``d x n``: ``d`` the factor dimension,
``n`` the batch size, ``n_BS`` in the paper), eq. (8):

    M_0 = M_0 M_0^T,    M_j = rho M_{j-1} + (1 - rho) M_j M_j^T   (j >= 1),

i.e. ``M_k = sum_{i=0}^k kappa(i) rho^(k-i) M_i M_i^T`` with ``kappa(i) = 1 - rho [i > 0]``
(eq. 5). This module generates such update streams with a controllable spectrum
(:class:`ToyEA`) and computes, as plain functions of the stream, every estimate of ``M_k``
the propositions talk about:

==============================================  ==========================================
paper                                           function
==============================================  ==========================================
eq. (8): the exact EA K-factor ``M_k``          :func:`ea_process`
eq. (9): r-kfac ``M~_{R;k,r}`` (no rsvd error)  :func:`optimal_truncation`, :func:`rkfac_process`
eq. (10): b-kfac ``M~_{B,k}`` and ``B_k``       :func:`bkfac_process` (Brand, Alg. 3, + truncation)
Prop. 3.2: overwritten ``M~^{R@i}``, ``B^{R@i}``  :func:`bkfac_process` with ``overwrite_at={i}``
Prop. 4.1: rsvd at 0, then no update            :func:`rsvd_then_no_update`
Prop. 4.1: rsvd at 0, then B-updates            :func:`rsvd_then_bupdates`
eq. (14): ``sum_i kappa(i) rho^(k-i) E_i``      :func:`ea_sum`
eq. (15), (16): the error terms ``E_i``         :func:`no_update_error_terms`, :func:`bupdate_error_terms`
eq. (17): the worst case of no update           :func:`orthogonal_no_update_case`
the optimizer's factor-inverse classes          :func:`track_inverses`
==============================================  ==========================================

"rsvd" means the exact optimal rank-``r`` truncation throughout, as in the paper ("ignoring
the projection error of rsvd", Sec. 3.2): it is computed with ``eigh``. The b-kfac process is
computed the way the optimizer computes it, with :func:`bkfac.linalg.brand_update` and
:func:`bkfac.linalg.truncate` on low-rank factors; the tests check it against a brute-force
``eigh`` of the explicitly formed matrices.

Everything is float64 by default and deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._checks import check_matrix, check_open_unit, check_positive_int, check_rank
from ..linalg import brand_update, safe_eigh, truncate

__all__ = [
    "ToyEA",
    "decay_profile",
    "ea_process",
    "optimal_truncation",
    "top_eigenpairs",
    "rkfac_process",
    "BKFACProcess",
    "bkfac_process",
    "rsvd_then_no_update",
    "rsvd_then_bupdates",
    "kappa",
    "ea_sum",
    "no_update_error_terms",
    "bupdate_error_terms",
    "orthogonal_no_update_case",
    "track_inverses",
    "mean_error_below",
]

DECAYS = ("power", "exp", "flat")


def decay_profile(dim: int, decay: str = "power", rate: float = 1.0, dtype=torch.float64) -> Tensor:
    """Eigenvalue profile ``s`` (dim,) of the expected update, descending, ``s[0] = 1``.

    * ``'power'``: ``s_i = (i + 1)^(-rate)`` (power-law decay, the typical K-factor shape);
    * ``'exp'``: ``s_i = exp(-rate * i)``;
    * ``'flat'``: ``s_i = 1`` (no decay: the hardest case for any low-rank estimate).
    """
    check_positive_int("dim", dim)
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be a finite non-negative number, got {rate!r}")
    i = torch.arange(dim, dtype=dtype)
    if decay == "power":
        return (i + 1.0).pow(-float(rate))
    if decay == "exp":
        return torch.exp(-float(rate) * i)
    return torch.ones(dim, dtype=dtype)


def _random_orthogonal(dim: int, generator: torch.Generator | None, dtype) -> Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri)."""
    G = torch.randn(dim, dim, generator=generator, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones((), dtype=dtype))


@dataclass(frozen=True)
class ToyEA:
    """Generator of the incoming batch matrices ``M_k`` (``dim x batch``) of process (8).

    ``M_k = Q_k diag(sqrt(s)) Z_k / sqrt(n) + noise * N_k / sqrt(n)`` with ``Z_k, N_k`` i.i.d.
    standard Gaussian ``dim x n`` matrices, ``s = decay_profile(dim, decay, rate)`` and an
    orthonormal basis ``Q_k`` that is random at ``k = 0`` and then rotates slowly:
    ``Q_k = Q_{k-1} expm(rotation * S_k)`` with ``S_k`` a random skew-symmetric matrix of
    unit spectral scale (``rotation = 0``: a fixed basis). Hence
    ``E[M_k M_k^T] = Q_k diag(s) Q_k^T + noise^2 I`` and the EA K-factor (8) has the decaying
    spectrum the paper's Sec. 3 relies on, while each update has rank ``min(n, dim)``.

    ``rho`` is carried along so that one object describes a whole toy EA process; the
    update stream itself does not depend on it.
    """

    dim: int
    batch: int
    rho: float = 0.95
    decay: str = "power"
    rate: float = 1.0
    noise: float = 0.0
    rotation: float = 0.0
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        check_positive_int("dim", self.dim)
        check_positive_int("batch", self.batch)
        check_open_unit("rho", self.rho)
        decay_profile(1, self.decay, self.rate)  # validates decay and rate
        for name in ("noise", "rotation"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")

    def profile(self) -> Tensor:
        """The decay profile ``s`` of the expected update (see :func:`decay_profile`)."""
        return decay_profile(self.dim, self.decay, self.rate, self.dtype)

    def sample(self, steps: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Draw the batch matrices ``[M_0, ..., M_{steps-1}]`` (each ``dim x batch``)."""
        check_positive_int("steps", steps)
        d, n, dt = self.dim, self.batch, self.dtype
        root = self.profile().sqrt()
        Q = _random_orthogonal(d, generator, dt)
        out = []
        for k in range(steps):
            if k > 0 and self.rotation > 0:
                G = torch.randn(d, d, generator=generator, dtype=dt)
                S = (G - G.mT) / (2.0 * math.sqrt(d))  # spectral norm ~ 1
                Q = Q @ torch.linalg.matrix_exp(self.rotation * S)
            Z = torch.randn(d, n, generator=generator, dtype=dt)
            M = (Q * root) @ Z
            if self.noise > 0:
                M = M + self.noise * torch.randn(d, n, generator=generator, dtype=dt)
            out.append(M / math.sqrt(n))
        return out


# --------------------------------------------------------------------------------------------
# Exact EA and r-kfac (eq. 8, 9)
# --------------------------------------------------------------------------------------------


def _check_batches(batches: Sequence[Tensor]) -> None:
    if len(batches) == 0:
        raise ValueError("batches must hold at least one matrix M_0")
    dim = batches[0].shape[0] if isinstance(batches[0], Tensor) and batches[0].dim() == 2 else None
    for k, M in enumerate(batches):
        check_matrix(f"batches[{k}]", M, rows=dim)


def kappa(i: int, rho: float) -> float:
    """``kappa(i) = 1 - rho * [i > 0]`` (Sec. 2.1): the EA weight of the update at step ``i``."""
    return 1.0 - rho if i > 0 else 1.0


def ea_process(batches: Sequence[Tensor], rho: float) -> list[Tensor]:
    """The exact EA K-factors ``[M_0, ..., M_{K-1}]`` of eq. (8) (dense ``d x d``)."""
    _check_batches(batches)
    check_open_unit("rho", rho)
    out = [batches[0] @ batches[0].mT]
    for M in batches[1:]:
        out.append(rho * out[-1] + (1.0 - rho) * (M @ M.mT))
    return out


def top_eigenpairs(M: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The ``r`` leading eigenpairs ``(U_{M,r}, d_{M,r})`` of a symmetric ``M`` (``eigh``), descending."""
    check_matrix("M", M, cols=M.shape[0] if M.dim() == 2 else None)
    check_rank("r", r, M.shape[0])
    evals, evecs = safe_eigh(0.5 * (M + M.mT))
    return evecs.flip(1)[:, :r], evals.flip(0)[:r]


def optimal_truncation(M: Tensor, r: int) -> Tensor:
    """``U_{M,r} U_{M,r}^T M U_{M,r} U_{M,r}^T``: the optimal rank-``r`` truncation (eq. 9).

    For a symmetric PSD ``M`` this is the best rank-``r`` approximation in every unitarily
    invariant norm (Eckart-Young-Mirsky), i.e. r-kfac's estimate ``M~_{R;k,r}`` when the
    rsvd projection error is ignored, and also the ``B_i`` of eq. (10) when applied to
    ``M~_{B,i}``.
    """
    U, d = top_eigenpairs(M, r)
    return (U * d) @ U.mT


def rkfac_process(batches: Sequence[Tensor], rho: float, r: int) -> list[Tensor]:
    """r-kfac's estimates ``[M~_{R;0,r}, ..., M~_{R;K-1,r}]`` of eq. (9) (exact truncations)."""
    return [optimal_truncation(M, r) for M in ea_process(batches, rho)]


# --------------------------------------------------------------------------------------------
# b-kfac (eq. 10) and its overwritten variants (Prop. 3.2, Alg. 5)
# --------------------------------------------------------------------------------------------


@dataclass
class BKFACProcess:
    """The b-kfac process of eq. (10), kept both as low-rank factors and dense matrices.

    ``mtilde[k]`` is ``M~_{B,k}`` and ``b[k]`` is ``B_k`` (dense ``d x d``); ``factors[k]`` and
    ``b_factors[k]`` are their ``(U, d)`` representations (``U`` orthonormal, ``d``
    descending). ``overwrite_at`` lists the steps ``i`` at which ``B_i`` was overwritten by
    ``M~_{R;i,r}`` (Prop. 3.2; with an overwrite every ``T_rsvd`` steps this is b-r-kfac,
    Alg. 5). ``exact[k]`` is the exact EA K-factor ``M_k`` when the process needed it (it is
    formed only for overwrites), else ``None``.
    """

    rho: float
    rank: int
    mtilde: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)
    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    b_factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    overwrite_at: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.mtilde)


def _dense(U: Tensor, d: Tensor) -> Tensor:
    X = (U * d) @ U.mT
    return 0.5 * (X + X.mT)


def bkfac_process(
    batches: Sequence[Tensor],
    rho: float,
    r: int,
    overwrite_at: Iterable[int] = (),
) -> BKFACProcess:
    """The b-kfac process ``M~_{B,k}``, ``B_k`` of eq. (10), computed with Brand (Alg. 3, 4).

    ``M~_{B,0} = M_0 M_0^T`` (an EVD from scratch, Brand with an empty basis), then for
    ``i >= 0``

        B_i = truncate(M~_{B,i}, r)                                   (Alg. 4, lines 3-4)
        M~_{B,i+1} = Brand(U_{B_i}, rho d_{B_i}, sqrt(1 - rho) M_{i+1})  (Alg. 4, line 6)
                   = rho B_i + (1 - rho) M_{i+1} M_{i+1}^T.

    For ``i`` in ``overwrite_at`` the truncation is replaced by the exact rank-``r`` estimate
    of the true EA factor, ``B_i := M~_{R;i,r}`` (the over-written process
    ``M~^{R@i}_{B,i+j}``, ``B^{R@i}_{i+j}`` of Prop. 3.2; overwriting every ``T_rsvd`` steps
    is b-r-kfac, Alg. 5). ``M~_{B,i}`` itself is left as it was at an overwritten step.

    Requires ``r + n < d`` so that every Brand update takes the linear-time path (the paper's
    regime; ``n`` the batch width). Cost ``O(K d (r + n)^2)`` plus ``O(d^3)`` per overwrite.
    """
    _check_batches(batches)
    check_open_unit("rho", rho)
    dim, n = batches[0].shape
    check_rank("r", r, dim)
    if r + n >= dim:
        raise ValueError(f"r + n must be smaller than the dimension d (the b-update regime), got r={r}, n={n}, d={dim}")
    overwrite = frozenset(int(i) for i in overwrite_at)
    bad = [i for i in overwrite if not 0 <= i < len(batches)]
    if bad:
        raise ValueError(f"overwrite_at holds steps outside 0..{len(batches) - 1}: {sorted(bad)}")
    proc = BKFACProcess(rho=rho, rank=r, overwrite_at=overwrite)
    U, d = brand_update(batches[0].new_zeros(dim, 0), batches[0].new_zeros(0), batches[0])
    exact = batches[0] @ batches[0].mT if overwrite else None
    for k in range(len(batches)):
        if k > 0:
            Ub, db = proc.b_factors[-1]
            U, d = brand_update(Ub, rho * db, math.sqrt(1.0 - rho) * batches[k])
            if exact is not None:
                exact = rho * exact + (1.0 - rho) * (batches[k] @ batches[k].mT)
        proc.factors.append((U, d))
        proc.mtilde.append(_dense(U, d))
        if k in overwrite:
            Ub, db = top_eigenpairs(exact, r)
            db = db.clamp_min(0.0)
        else:
            Ub, db = truncate(U, d, min(r, U.shape[1]))
        proc.b_factors.append((Ub, db))
        proc.b.append(_dense(Ub, db))
    return proc


def rsvd_then_no_update(batches: Sequence[Tensor], rho: float, r: int) -> list[Tensor]:
    """Prop. 4.1, first case: ``M~_k = M~_{R;0,r}`` for every ``k`` (rsvd at 0, nothing after).

    This is r-kfac between two inverse computations (``T_inv = R_nu``, ``T_updt = 1``).
    """
    _check_batches(batches)
    check_open_unit("rho", rho)
    est = optimal_truncation(batches[0] @ batches[0].mT, r)
    return [est for _ in batches]


def rsvd_then_bupdates(batches: Sequence[Tensor], rho: float, r: int) -> list[Tensor]:
    """Prop. 4.1, second case: rsvd at ``k = 0``, then a B-update at every step.

    ``M~_0 = M~_{R;0,r}`` and ``M~_k = M~_{B,k}`` for ``k >= 1``: by (S.18)
    ``M~_{R;0,r} = B_0``, so this is the pure b-kfac process of eq. (10) read with ``B_0`` at
    ``k = 0`` (b-r-kfac between two overwrites).
    """
    proc = bkfac_process(batches, rho, r, overwrite_at=(0,))
    return [proc.b[0]] + proc.mtilde[1:]


# --------------------------------------------------------------------------------------------
# Error terms of Prop. 4.1 and the worst case of Prop. 4.2
# --------------------------------------------------------------------------------------------


def ea_sum(E: Sequence[Tensor], rho: float) -> Tensor:
    """``sum_{i=0}^{k} kappa(i) rho^(k-i) E_i`` with ``k = len(E) - 1`` (the right side of eq. 14)."""
    if len(E) == 0:
        raise ValueError("E must hold at least E_0")
    k = len(E) - 1
    out = torch.zeros_like(E[0])
    for i, Ei in enumerate(E):
        out = out + kappa(i, rho) * rho ** (k - i) * Ei
    return out


def no_update_error_terms(batches: Sequence[Tensor], r: int) -> list[Tensor]:
    """``E_j = M_j M_j^T - M~_{R;0,r}`` for ``j = 0..K-1`` (eq. 15; ``E_0 = M_0 - M~_{R;0,r}``)."""
    _check_batches(batches)
    est = optimal_truncation(batches[0] @ batches[0].mT, r)
    return [M @ M.mT - est for M in batches]


def bupdate_error_terms(proc: BKFACProcess, k: int) -> list[Tensor]:
    """``E_0, ..., E_k`` of eq. (16) for the error at step ``k`` of "rsvd at 0, then B-updates".

    Reading of (16) used here (and checked in :mod:`bkfac.experiments.propositions`): the
    ``M~_j`` in (16) is ``M~_{B,j}`` (the paper's "``M~_i = M~_{B,i}``", with ``j`` a typo for
    ``i``), and the terms belong to one fixed ``k``: ``E_0 = M_0 - M~_{R;0,r}``,
    ``E_i = (M~_{B,i} - B_i) / (1 - rho)`` for ``1 <= i <= k - 1`` and ``E_k = 0``. The last
    term depends on ``k`` -- at a later step ``k' > k`` the term of index ``k`` is
    ``(M~_{B,k} - B_k) / (1 - rho)``, not ``0`` -- so ``E`` is a family indexed by ``k``, not one
    sequence.
    """
    if not 0 <= k < len(proc):
        raise ValueError(f"k must lie in 0..{len(proc) - 1}, got {k}")
    M0 = proc.mtilde[0]  # = M_0 M_0^T = M_0 (eq. 10)
    E = [M0 - optimal_truncation(M0, proc.rank)]
    for i in range(1, k):
        E.append((proc.mtilde[i] - proc.b[i]) / (1.0 - proc.rho))
    if k >= 1:
        E.append(torch.zeros_like(M0))
    return E


def orthogonal_no_update_case(
    dim: int,
    batch: int,
    r: int,
    steps: int,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> list[Tensor]:
    """Batches ``M_0, ..., M_{steps-1}`` realising the worst case (17) of Prop. 4.2.

    ``M_0`` is Gaussian; every later ``M_j`` is Gaussian projected onto the orthogonal
    complement of ``U_{M_0,r}`` (the ``r`` leading eigenvectors of ``M_0 M_0^T``), so that
    ``V_{M_j}^T U_{M_0,r} = 0`` as in (S.25). Possible because ``r + n < d`` (the paper's
    "``r + c < n``"). Then ``||E_j||_F^2 = ||M_j M_j^T||_F^2 + ||M~_{R;0,r}||_F^2`` exactly.
    """
    check_positive_int("dim", dim)
    check_positive_int("batch", batch)
    check_rank("r", r, dim)
    check_positive_int("steps", steps)
    if r + batch >= dim:
        raise ValueError(f"r + batch must be smaller than dim, got r={r}, batch={batch}, dim={dim}")
    M0 = torch.randn(dim, batch, generator=generator, dtype=dtype) / math.sqrt(batch)
    U, _ = top_eigenpairs(M0 @ M0.mT, r)
    out = [M0]
    for _ in range(1, steps):
        G = torch.randn(dim, batch, generator=generator, dtype=dtype) / math.sqrt(batch)
        for _ in range(2):  # twice is enough: orthogonal to U to working precision
            G = G - U @ (U.mT @ G)
        out.append(G)
    return out



def track_inverses(batches: Sequence[Tensor], inverses: dict) -> dict[str, dict[str, list]]:
    """Feed a toy update stream to the optimizer's factor-inverse objects, step by step.

    ``inverses`` maps a name to a :class:`bkfac.inverses.FactorInverse` (built with the same
    ``rho`` and ``t_updt = 1`` as the stream's EA). At every step ``k`` each object gets the
    optimizer's three calls -- ``observe(k, M_k)`` when it ``wants_batch(k)``, ``refresh(k)``,
    ``representation()`` -- and the relative Frobenius error of its representation against
    the exact EA factor (8), ``||M_k - U diag(d) U^T||_F / ||M_k||_F``, is recorded together
    with the representation's width. Returns ``{name: {"error": [...], "width": [...]}}``.
    """
    _check_batches(batches)
    if not inverses:
        raise ValueError("inverses must name at least one factor-inverse object")
    rho = next(iter(inverses.values())).rho
    for name, inv in inverses.items():
        if abs(inv.rho - rho) > 0 or inv.dim != batches[0].shape[0]:
            raise ValueError(f"inverses[{name!r}] must share rho and the stream's dimension")
    out = {name: {"error": [], "width": []} for name in inverses}
    exact = None
    for k, M in enumerate(batches):
        outer = M @ M.mT
        exact = outer if exact is None else rho * exact + (1.0 - rho) * outer
        scale = float(torch.linalg.matrix_norm(exact))
        for name, inv in inverses.items():
            if inv.wants_batch(k):
                inv.observe(k, M)
            inv.refresh(k)
            U, d = inv.representation()
            out[name]["error"].append(float(torch.linalg.matrix_norm(exact - _dense(U, d))) / scale)
            out[name]["width"].append(int(U.shape[1]))
            inv.end_step()
    return out


def mean_error_below(tracked: dict[str, dict[str, list]], a: str, b: str) -> bool:
    """Whether representation ``a`` of :func:`track_inverses`' output has the smaller mean
    relative error over the stream than ``b`` (the toy figure's claims of chapter 3: B-updates
    between two RSVDs beat no update)."""
    for name in (a, b):
        if name not in tracked or not tracked[name]["error"]:
            raise ValueError(f"tracked holds no errors for {name!r}; it has {sorted(tracked)}")
    mean = lambda e: sum(e) / len(e)  # noqa: E731
    return mean(tracked[a]["error"]) < mean(tracked[b]["error"])
