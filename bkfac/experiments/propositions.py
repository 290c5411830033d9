"""Numerical verification of Propositions 3.1, 3.2, 4.1 and 4.2 of Puiu (arXiv:2210.08494).

Each ``check_prop_*`` function draws ``n_instances`` random toy EA processes
(:class:`bkfac.experiments.toy.ToyEA`) of *varied* shape, computes the processes of
eqs. (8)-(10) with the package's own code (Brand updates + truncation), evaluates every
statement of the proposition -- and the intermediate steps of its proof in the Appendix --
and counts the violations. A result is a :class:`PropositionCheck`.

Random instances (:func:`sample_instances`; the ranges are also returned in ``ranges``):

* dimension ``d`` uniform in ``dims`` (default 6..40), batch width ``n`` uniform in
  ``batches`` (default 1..8) and rank ``r`` uniform in ``ranks`` (default 1..12), always with
  ``r + n < d`` (the b-update regime the paper assumes; ``n <= d - 2``,
  ``r <= d - n - 1``);
* ``rho`` uniform in ``rhos`` (default 0.5..0.99), number of steps ``K`` uniform in ``steps``
  (default 2..8);
* spectrum: power-law decay (exponent 0.5..3), exponential decay (rate 0.05..1) or flat,
  with probability 1/2 isotropic noise (std 0..0.2) and with probability 1/2 a slowly
  rotating eigenbasis (rotation 0..0.3 per step).

How a statement is scored. Every scalar check has a *defect*, normalised by a scale of the
EA K-factor (its norm in the norm at hand): for an identity ``L = R`` it is
``||L - R||_F / ||M_k||_F``; for an inequality ``a >= b`` it is ``(b - a) / ||M_k||``
(negative when the inequality holds with room to spare); for "``X`` is symmetric PSD" it is
``max(-lambda_min(X), ||X - X^T||_F) / ||M_k||_2``. A check is *violated* when its defect
exceeds ``tol`` (default ``1e-10``: float64 rounding of these computations is ~1e-14).
``worst`` is the largest defect met.

Readings and errata. Where the paper needs a reading we state it in the docstring and test
what is mathematically true. Where the paper's text is false as written, the false version
is evaluated too and reported in ``errata`` with the number of instances that refute it
(``refuted``): those are *not* violations of the proposition.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..linalg import light_correction
from .toy import (
    ToyEA,
    bkfac_process,
    bupdate_error_terms,
    ea_process,
    ea_sum,
    kappa,
    no_update_error_terms,
    orthogonal_no_update_case,
    rsvd_then_no_update,
    top_eigenpairs,
)

__all__ = [
    "Statement",
    "PropositionCheck",
    "Instance",
    "sample_instances",
    "check_prop_3_1",
    "check_prop_3_2",
    "check_prop_4_1",
    "check_prop_4_2",
    "check_light_correction",
    "DEFAULT_TOL",
]

DEFAULT_TOL = 1e-10
#: an erratum counts as refuted on an instance when its defect exceeds this (far above rounding)
REFUTE_TOL = 1e-6
NORMS = ("fro", "spectral", "nuclear")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Statement:
    """Tally of one statement over all instances.

    ``kind`` is ``'claim'`` (a statement of the proposition), ``'proof'`` (a step of its proof
    in the Appendix), or ``'erratum'`` (the paper's text as written, shown to be false:
    ``refuted`` counts the instances where it fails).
    """

    name: str
    kind: str = "claim"
    checks: int = 0
    violations: int = 0
    worst: float = -math.inf
    refuted: int = 0
    instances: int = 0
    _last_instance: int = -1

    def add(self, defect: float, tol: float, instance: int) -> None:
        defect = float(defect)
        if not math.isfinite(defect):
            defect = math.inf
        self.checks += 1
        self.worst = max(self.worst, defect)
        if self.kind == "erratum":
            if defect > REFUTE_TOL and self._last_instance != instance:
                self.refuted += 1
                self._last_instance = instance
        elif defect > tol:
            self.violations += 1

    def row(self) -> dict:
        return {
            "statement": self.name,
            "kind": self.kind,
            "checks": self.checks,
            "violations": self.violations,
            "refuted": self.refuted,
            "worst": self.worst,
        }


@dataclass
class PropositionCheck:
    """Outcome of a ``check_prop_*`` run.

    ``instances`` random toy processes were drawn from ``ranges``; ``statements`` are the
    claims and proof steps (each with its checks, violations and worst defect), ``errata``
    the paper's text where it is false as written (with the number of instances refuting
    it), ``observations`` informational numbers that are not claims. ``violations`` and
    ``worst`` aggregate the claims and proof steps; ``holds`` is ``violations == 0``.
    """

    proposition: str
    instances: int
    tol: float
    ranges: dict
    statements: list[Statement] = field(default_factory=list)
    errata: list[Statement] = field(default_factory=list)
    observations: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def checks(self) -> int:
        return sum(s.checks for s in self.statements)

    @property
    def violations(self) -> int:
        return sum(s.violations for s in self.statements)

    @property
    def worst(self) -> float:
        return max((s.worst for s in self.statements), default=-math.inf)

    @property
    def holds(self) -> bool:
        return self.violations == 0 and self.checks > 0

    def statement(self, name: str) -> Statement:
        for s in self.statements + self.errata:
            if s.name == name:
                return s
        raise KeyError(name)

    def rows(self) -> list[dict]:
        return [s.row() for s in self.statements + self.errata]

    def table(self, kinds: Sequence[str] = ("claim", "proof", "erratum")) -> str:
        """A Markdown table of the statements of the given ``kinds`` (for the book), escaped by
        :func:`bkfac.book.markdown_table` so that statements such as ``||M_k - B_k||`` stay in
        their cell. ``violations`` is ``-`` for errata, ``refuted`` ``-`` for the others."""
        from ..book import markdown_table

        rows = [{"statement": s.name, "kind": s.kind, "checks": s.checks,
                 "violations": "-" if s.kind == "erratum" else s.violations,
                 "refuted": s.refuted if s.kind == "erratum" else "-", "worst defect": s.worst}
                for s in self.statements + self.errata if s.kind in kinds]
        columns = ["statement", "kind", "checks", "violations", "refuted", "worst defect"]
        return markdown_table(rows, columns, floatfmt=".2e")

    def __str__(self) -> str:
        """Two lines (each under 100 characters for the book's output cells)."""
        return (
            f"{self.proposition}: {self.instances} instances, {self.checks} checks, "
            f"{self.violations} violations (tol {self.tol:g})\n"
            f"  worst defect {self.worst:.2e}, {self.seconds:.1f} s"
        )


class _Tally:
    def __init__(self, proposition: str, tol: float, ranges: dict):
        self.result = PropositionCheck(proposition=proposition, instances=0, tol=tol, ranges=ranges)
        self._by_name: dict[str, Statement] = {}

    def add(self, name: str, defect: float, instance: int, kind: str = "claim") -> None:
        st = self._by_name.get(name)
        if st is None:
            st = Statement(name=name, kind=kind)
            self._by_name[name] = st
            (self.result.errata if kind == "erratum" else self.result.statements).append(st)
        st.add(defect, self.result.tol, instance)


# --------------------------------------------------------------------------------------------
# Random instances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One random toy problem: the update generator, the rank, the number of steps, a seed."""

    toy: ToyEA
    rank: int
    steps: int
    seed: int

    def batches(self) -> list[Tensor]:
        return self.toy.sample(self.steps, torch.Generator().manual_seed(self.seed))


def _check_range(name: str, rng: tuple, lo: float) -> tuple:
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2 and rng[0] <= rng[1] and rng[0] >= lo):
        raise ValueError(f"{name} must be a pair (low, high) with {lo} <= low <= high, got {rng!r}")
    return tuple(rng)


def _ranges(dims, batches, ranks, steps, rhos) -> dict:
    dims = _check_range("dims", dims, 3)
    batches = _check_range("batches", batches, 1)
    ranks = _check_range("ranks", ranks, 1)
    steps = _check_range("steps", steps, 2)
    rhos = _check_range("rhos", rhos, 0.0)
    if not rhos[1] < 1.0 or not rhos[0] > 0.0:
        raise ValueError(f"rhos must lie inside (0, 1), got {rhos!r}")
    if batches[0] + ranks[0] >= dims[1]:
        raise ValueError("the ranges leave no instance with r + n < d: enlarge dims or lower batches/ranks")
    return {
        "d": dims,
        "n": batches,
        "r": ranks,
        "K": steps,
        "rho": rhos,
        "constraint": "r + n < d",
        "spectrum": "power (exponent 0.5-3) | exp (rate 0.05-1) | flat; noise 0-0.2 w.p. 1/2; rotation 0-0.3 w.p. 1/2",
    }


def sample_instances(
    n_instances: int,
    seed: int = 0,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (1, 12),
    steps: tuple[int, int] = (2, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> Iterator[Instance]:
    """Yield ``n_instances`` random :class:`Instance` s (see the module docstring for the laws).

    Deterministic in ``seed``; instance ``i`` draws its update stream from its own seed, so
    any single instance can be rebuilt from ``Instance.seed``.
    """
    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or n_instances < 1:
        raise ValueError(f"n_instances must be an integer >= 1, got {n_instances!r}")
    _ranges(dims, batches, ranks, steps, rhos)
    g = torch.Generator().manual_seed(int(seed))

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(int(lo), int(hi) + 1, (1,), generator=g))

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))

    produced = 0
    while produced < n_instances:
        d = randint(*dims)
        n_hi = min(batches[1], d - 1 - ranks[0])
        if n_hi < batches[0]:
            continue
        n = randint(batches[0], n_hi)
        r = randint(ranks[0], min(ranks[1], d - n - 1))
        rho = uniform(*rhos)
        decay = ("power", "exp", "flat")[randint(0, 2)]
        rate = uniform(0.5, 3.0) if decay == "power" else uniform(0.05, 1.0) if decay == "exp" else 0.0
        noise = uniform(0.0, 0.2) if randint(0, 1) else 0.0
        rotation = uniform(0.0, 0.3) if randint(0, 1) else 0.0
        K = randint(*steps)
        toy = ToyEA(dim=d, batch=n, rho=rho, decay=decay, rate=rate, noise=noise, rotation=rotation)
        yield Instance(toy=toy, rank=r, steps=K, seed=int(seed) * 1_000_003 + produced)
        produced += 1


# --------------------------------------------------------------------------------------------
# Helpers: per-instance batched evaluation
# --------------------------------------------------------------------------------------------


@contextmanager
def _single_thread():
    """Run with one intra-op thread (restored afterwards).

    The toy matrices are at most 40 x 40: LAPACK on several threads only adds contention
    (on a loaded 2-core machine ``eigh`` of a 30 x 30 matrix took 20x longer on 2 threads).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.mT)


class _Batch:
    """Collect the checks of one instance, then evaluate them with two batched calls.

    Every matrix whose eigenvalues are needed is stacked into one ``eigvalsh`` call and every
    difference whose Frobenius norm is needed into one ``matrix_norm`` call (Python overhead
    dominates for matrices this small). Checks are tallied in registration order.
    """

    def __init__(self, tally: "_Tally", instance: int):
        self.tally = tally
        self.instance = instance
        self._eig: list[Tensor] = []
        self._fro: list[Tensor] = []
        self._jobs: list[tuple] = []

    def _e(self, X: Tensor) -> int:
        self._eig.append(_sym(X))
        return len(self._eig) - 1

    def _f(self, X: Tensor) -> int:
        self._fro.append(X)
        return len(self._fro) - 1

    def identity(self, name: str, L: Tensor, R: Tensor, scale: Tensor, kind: str = "claim") -> None:
        """``L = R``: defect ``||L - R||_F / ||scale||_F``."""
        self._jobs.append(("id", name, kind, self._f(L - R), self._f(scale)))

    def psd(self, name: str, X: Tensor, scale: Tensor, kind: str = "claim") -> None:
        """``X`` symmetric PSD: defect ``max(-lambda_min(X), ||X - X^T||_F) / ||scale||_2``."""
        self._jobs.append(("psd", name, kind, self._e(X), self._f(X - X.mT), self._e(scale)))

    def norm_geq(self, name: str, A: Tensor, B: Tensor, scale: Tensor, kind: str = "claim") -> None:
        """``||A|| >= ||B||`` in the Frobenius, spectral and nuclear norms (symmetric ``A``, ``B``):
        defect ``(||B|| - ||A||) / ||scale||`` in the same norm."""
        self._jobs.append(("geq", name, kind, self._e(A), self._e(B), self._e(scale)))

    def rank_le(self, name: str, X: Tensor, bound: int, scale: Tensor, kind: str = "claim") -> None:
        """``rank(X) <= bound`` (eigenvalues above ``1e-9 ||scale||_2`` count): defect ``rank - bound``."""
        self._jobs.append(("rank", name, kind, self._e(X), bound, self._e(scale)))

    def scalar(self, name: str, defect: float, kind: str = "claim") -> None:
        self._jobs.append(("scalar", name, kind, float(defect)))

    def flush(self) -> None:
        ev = torch.linalg.eigvalsh(torch.stack(self._eig)) if self._eig else None
        fro = torch.linalg.matrix_norm(torch.stack(self._fro)).tolist() if self._fro else []
        if ev is not None:
            aev = ev.abs()
            n_fro = torch.linalg.vector_norm(aev, dim=-1).tolist()
            n_spec = aev.max(dim=-1).values.tolist()
            n_nuc = aev.sum(dim=-1).tolist()
            lam_min = ev.min(dim=-1).values.tolist()
            n_all = {"fro": n_fro, "spectral": n_spec, "nuclear": n_nuc}
            rank_ok = ev.abs()
        add = self.tally.add
        for job in self._jobs:
            typ, name, kind = job[:3]
            if typ == "id":
                add(name, _relative(fro[job[3]], fro[job[4]]), self.instance, kind)
            elif typ == "psd":
                add(name, _relative(max(-lam_min[job[3]], fro[job[4]]), n_spec[job[5]]), self.instance, kind)
            elif typ == "geq":
                for norm in NORMS:
                    a, b, sc = (n_all[norm][j] for j in job[3:6])
                    add(f"{name} [{norm}]", _relative(b - a, sc), self.instance, kind)
            elif typ == "rank":
                rank = int((rank_ok[job[3]] > 1e-9 * n_spec[job[5]]).sum())
                add(name, float(rank - job[4]), self.instance, kind)
            else:
                add(name, job[3], self.instance, kind)
        self._eig, self._fro, self._jobs = [], [], []


def _relative(defect: float, scale: float) -> float:
    """``defect / scale``; a zero scale (e.g. a zero process) gives 0 for no defect, else
    ``+inf`` -- a violation, never a ``ZeroDivisionError``."""
    if scale > 0:
        return defect / scale
    return 0.0 if defect <= 0 else math.inf


ProcessFn = Callable[..., object]


def _finish(tally: "_Tally", instances: int, t0: float) -> PropositionCheck:
    tally.result.instances = instances
    tally.result.seconds = time.perf_counter() - t0
    return tally.result


def _truncations(Ms: Sequence[Tensor], ranks: Sequence[int]) -> dict[int, list[Tensor]]:
    """Optimal rank-``r`` truncations (eq. 9) of each matrix, for each ``r``, from one batched ``eigh``."""
    evals, evecs = torch.linalg.eigh(_sym(torch.stack(list(Ms))))
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    out = {}
    for r in ranks:
        U = evecs[..., :r]
        out[r] = list((U * evals[..., None, :r]) @ U.mT)
    return out


# --------------------------------------------------------------------------------------------
# Proposition 3.1
# --------------------------------------------------------------------------------------------


def check_prop_3_1(
    n_instances: int = 1000,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    *,
    process: ProcessFn = bkfac_process,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (1, 12),
    steps: tuple[int, int] = (2, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> PropositionCheck:
    """Proposition 3.1 (eq. 11): b-kfac's error is bounded below by r-kfac's, at every ``k``.

    For every instance and every step ``k`` the two inequalities of (11),

        ||M_k - B_k|| >= ||M_k - M~_{R;k,r}||   and   ||M_k - M~_{B,k}|| >= ||M_k - M~_{R;k,r+n}||,

    are checked in the Frobenius, spectral and nuclear norms (all unitarily invariant, as the
    proposition requires). Also checked: the facts the proof rests on, ``rank(B_k) <= r`` and
    ``rank(M~_{B,k}) <= r + n``, and the remark of Sec. 3.3 ("Why use ``M~_{B,k}``, not
    ``B_k``?"), ``||M_k - B_k|| >= ||M_k - M~_{B,k}||``.

    The inequalities (11) hold for *any* estimate of rank at most ``r`` (resp. ``r + n``) by
    Eckart-Young-Mirsky, so on their own they cannot tell b-kfac from, say, the zero process.
    The check therefore also verifies that the process under test is the b-kfac process of
    eq. (10) it claims to be: ``M~_{B,0} = M_0 M_0^T``,
    ``M~_{B,k} = rho B_{k-1} + (1 - rho) M_k M_k^T`` and ``B_k`` the optimal rank-``r``
    truncation of ``M~_{B,k}`` (Alg. 4 lines 3-4), each to relative ``tol``.

    ``process`` computes the b-kfac process (default :func:`bkfac.experiments.toy.bkfac_process`;
    the tests pass deliberately wrong ones to show the check can fail).
    """
    ranges = _ranges(dims, batches, ranks, steps, rhos)
    tally = _Tally("Proposition 3.1", tol, ranges)
    t0 = time.perf_counter()
    count = 0
    with _single_thread():
        for idx, inst in enumerate(sample_instances(n_instances, seed, dims, batches, ranks, steps, rhos)):
            Bt = inst.batches()
            rho, r, n = inst.toy.rho, inst.rank, inst.toy.batch
            Ms = ea_process(Bt, rho)
            proc = process(Bt, rho, r)
            tr = _truncations(Ms, (r, r + n))
            tb = _truncations(proc.mtilde, (r,))[r]
            batch = _Batch(tally, idx)
            for k, Mk in enumerate(Ms):
                MM = Bt[k] @ Bt[k].mT
                carried = MM if k == 0 else rho * proc.b[k - 1] + (1.0 - rho) * MM
                batch.identity("(10) M~_B,0 = M_0 M_0^T; M~_B,k = rho B_k-1 + (1-rho) M_k M_k^T",
                               proc.mtilde[k], carried, Mk, kind="proof")
                batch.identity("Alg. 4 l.3-4: B_k = rank-r truncation of M~_B,k", proc.b[k], tb[k], Mk, kind="proof")
                batch.norm_geq("(11) ||M_k - B_k|| >= ||M_k - M~_R;k,r||", Mk - proc.b[k], Mk - tr[r][k], Mk)
                batch.norm_geq("(11) ||M_k - M~_B,k|| >= ||M_k - M~_R;k,r+n||", Mk - proc.mtilde[k], Mk - tr[r + n][k], Mk)
                batch.norm_geq("Sec. 3.3: ||M_k - B_k|| >= ||M_k - M~_B,k||", Mk - proc.b[k], Mk - proc.mtilde[k], Mk)
                batch.rank_le("proof: rank(B_k) <= r", proc.b[k], r, Mk, kind="proof")
                batch.rank_le("proof: rank(M~_B,k) <= r + n", proc.mtilde[k], r + n, Mk, kind="proof")
            batch.flush()
            count += 1
    return _finish(tally, count, t0)


# --------------------------------------------------------------------------------------------
# Proposition 3.2
# --------------------------------------------------------------------------------------------


def check_prop_3_2(
    n_instances: int = 1000,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    *,
    process: ProcessFn = bkfac_process,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (1, 12),
    steps: tuple[int, int] = (3, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> PropositionCheck:
    """Proposition 3.2 (eqs. 12, 13): error of b-kfac with and without one overwrite.

    Per instance an overwrite step ``i`` is drawn uniformly in ``0..K-2`` (the statement says
    ``i > 0``, its proof ``i >= 0``; both are covered). With ``M~^{R@i}``, ``B^{R@i}`` the
    process (10) after overwriting ``B_i = M~_{R;i,r}`` and ``M~_B``, ``B`` the pure process,
    for every ``q = 1..K-1-i``:

    * (12) ``M_{i+q} - M~^{R@i}_{B,i+q} = rho^q (M_i - M~_{R;i,r}) + sum_{j=1}^{q-1} rho^{q-j} (M~^{R@i}_{B,i+j} - B^{R@i}_{i+j})``;
    * (13) ``M_{i+q} - M~_{B,i+q} = rho^q (M_i - B_i) + sum_{j=1}^{q-1} rho^{q-j} (M~_{B,i+j} - B_{i+j})``;

    both as identities (relative error ``<= tol``), and every bracketed matrix and both
    left-hand sides are symmetric PSD. Proof steps checked: (S.7), (S.8), (S.11), (S.12).
    The consequence drawn after the proposition, ``||E^{R@i}_{i+1}|| <= ||E^{pure}_{i+1}||``,
    is checked in the three norms.

    Erratum: the proof obtains (13) from (S.9) "with ``X_i <- M~_{B,i}``", which would give
    ``rho^q (M_i - M~_{B,i})`` as first term instead of ``rho^q (M_i - B_i)``; that version is
    false whenever the truncation at ``i`` is not exact (the statement (13) is right: the
    initial condition that enters is the truncated ``B_i``).

    ``observations['overwrite_worse_q>=2']``: among the pairs ``(instance, q >= 2)`` where the
    two processes differ (``pairs_q>=2_distinct``; they coincide when the truncation at ``i``
    already was optimal), the fraction where the overwritten process has the larger
    Frobenius error -- the paper remarks that either process can be ahead for ``q >= 2``.
    """
    ranges = _ranges(dims, batches, ranks, steps, rhos)
    ranges["i"] = "uniform in 0..K-2"
    tally = _Tally("Proposition 3.2", tol, ranges)
    t0 = time.perf_counter()
    count = 0
    worse, pairs = 0, 0
    gi = torch.Generator().manual_seed(int(seed) + 7919)
    with _single_thread():
        for idx, inst in enumerate(sample_instances(n_instances, seed, dims, batches, ranks, steps, rhos)):
            Bt = inst.batches()
            rho, r, K = inst.toy.rho, inst.rank, inst.steps
            i = int(torch.randint(0, K - 1, (1,), generator=gi))
            Ms = ea_process(Bt, rho)
            pure = process(Bt, rho, r)
            over = process(Bt, rho, r, overwrite_at=(i,))
            MR_i = _truncations(Ms[i : i + 1], (r,))[r][0]
            batch = _Batch(tally, idx)
            batch.psd("(12) M_i - M~_R;i,r is sym. PSD", Ms[i] - MR_i, Ms[i])
            batch.psd("(13) M_i - B_i is sym. PSD", Ms[i] - pure.b[i], Ms[i])
            batch.identity("overwrite sets B^R@i_i = M~_R;i,r", over.b[i], MR_i, Ms[i], kind="proof")
            for q in range(1, K - i):
                m = i + q
                E_over = Ms[m] - over.mtilde[m]
                E_pure = Ms[m] - pure.mtilde[m]
                rhs_over = rho**q * (Ms[i] - MR_i)
                rhs_pure = rho**q * (Ms[i] - pure.b[i])
                rhs_wrong = rho**q * (Ms[i] - pure.mtilde[i])
                for j in range(1, q):
                    rhs_over = rhs_over + rho ** (q - j) * (over.mtilde[i + j] - over.b[i + j])
                    tail = rho ** (q - j) * (pure.mtilde[i + j] - pure.b[i + j])
                    rhs_pure = rhs_pure + tail
                    rhs_wrong = rhs_wrong + tail
                batch.identity("(12) identity (overwritten at i)", E_over, rhs_over, Ms[m])
                batch.identity("(13) identity (pure b-kfac)", E_pure, rhs_pure, Ms[m])
                batch.psd("(12) E^R@i_i+q is sym. PSD", E_over, Ms[m])
                batch.psd("(13) E^pure_i+q is sym. PSD", E_pure, Ms[m])
                if q >= 2:
                    batch.psd("(12) M~^R@i_B,i+j - B^R@i_i+j is sym. PSD", over.mtilde[m - 1] - over.b[m - 1], Ms[m - 1])
                    batch.psd("(13) M~_B,i+j - B_i+j is sym. PSD", pure.mtilde[m - 1] - pure.b[m - 1], Ms[m - 1])
                batch.identity(
                    "erratum (S.9) with X_i <- M~_B,i: first term rho^q (M_i - M~_B,i)", E_pure, rhs_wrong, Ms[m], kind="erratum"
                )
                for name, P in (("pure", pure), ("R@i", over)):
                    batch.identity(
                        f"(S.7) M_m - M~_B,m = rho (M_m-1 - B_m-1) [{name}]",
                        Ms[m] - P.mtilde[m],
                        rho * (Ms[m - 1] - P.b[m - 1]),
                        Ms[m],
                        kind="proof",
                    )
                    batch.identity(
                        f"(S.8) M_m - M~_B,m = rho (M_m-1 - M~_B,m-1) + rho (M~_B,m-1 - B_m-1) [{name}]",
                        Ms[m] - P.mtilde[m],
                        rho * (Ms[m - 1] - P.mtilde[m - 1]) + rho * (P.mtilde[m - 1] - P.b[m - 1]),
                        Ms[m],
                        kind="proof",
                    )
                if q == 1:
                    batch.norm_geq("after Prop. 3.2: ||E^pure_i+1|| >= ||E^R@i_i+1||", E_pure, E_over, Ms[m])
                else:
                    n_over, n_pure = float(torch.linalg.matrix_norm(E_over)), float(torch.linalg.matrix_norm(E_pure))
                    if abs(n_over - n_pure) > 1e-8 * float(torch.linalg.matrix_norm(Ms[m])):  # else: same process
                        pairs += 1
                        worse += int(n_over > n_pure)
            # (S.11), (S.12) on the pure process at every step
            for k in range(len(Ms)):
                rhs = rho**k * (Ms[0] - pure.b[0])
                for qq in range(1, k + 1):
                    rhs = rhs + rho ** (k - qq) * (pure.mtilde[qq] - pure.b[qq])
                batch.identity(
                    "(S.12) M_i - B_i = rho^i (M_0 - B_0) + sum_q rho^(i-q) (M~_B,q - B_q)", Ms[k] - pure.b[k], rhs, Ms[k], kind="proof"
                )
                if k >= 1:
                    batch.identity(
                        "(S.11) M_i - B_i = rho (M_i-1 - B_i-1) + (M~_B,i - B_i)",
                        Ms[k] - pure.b[k],
                        rho * (Ms[k - 1] - pure.b[k - 1]) + pure.mtilde[k] - pure.b[k],
                        Ms[k],
                        kind="proof",
                    )
            batch.flush()
            count += 1
    tally.result.observations["overwrite_worse_q>=2"] = worse / pairs if pairs else float("nan")
    tally.result.observations["pairs_q>=2_distinct"] = pairs
    return _finish(tally, count, t0)


# --------------------------------------------------------------------------------------------
# Proposition 4.1
# --------------------------------------------------------------------------------------------


def check_prop_4_1(
    n_instances: int = 1000,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    *,
    process: ProcessFn = bkfac_process,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (1, 12),
    steps: tuple[int, int] = (2, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> PropositionCheck:
    """Proposition 4.1 (eqs. 14-16): the error decompositions of no update and B-updates.

    For every instance and every ``k = 0..K-1``:

    * (14)+(15): with ``M~_k = M~_{R;0,r}`` (rsvd at 0, no update),
      ``M_k - M~_k = sum_{i=0}^k kappa(i) rho^(k-i) E_i``, ``E_j = M_j M_j^T - M~_{R;0,r}``;
    * (14)+(16): with ``M~_0 = M~_{R;0,r}`` and ``M~_k = M~_{B,k}`` for ``k >= 1`` (rsvd at 0,
      then B-updates), the same sum with ``E_0 = M_0 - M~_{R;0,r}``,
      ``E_i = (M~_{B,i} - B_i) / (1 - rho)`` for ``1 <= i <= k-1`` and ``E_k = 0``.

    Reading of (16) (see :func:`bkfac.experiments.toy.bupdate_error_terms`): the paper's
    ``M~_j`` is ``M~_{B,i}`` (``j`` a typo, and "``M~_i = M~_{B,i}``" as the paper says), and
    ``E_k = 0`` refers to the last term of the error *at step k*: the terms form a family
    indexed by ``k``. Read as one ``k``-independent sequence (``E_k = (M~_{B,k} - B_k)/(1-rho)``
    like the others) the sum is ``M_k - B_k``, not ``M_k - M~_{B,k}``: both facts are checked,
    the first being the error of the estimate ``B_k`` (an identity the paper does not state),
    the second reported as an erratum-type row (it fails whenever the truncation at ``k`` is
    not exact).

    Proof steps: the weights of (S.16) sum to one, (S.18) ``M~_{R;0,r} = B_0`` and hence the
    process overwritten at 0 is pure b-kfac, and (S.19)/(S.20).
    """
    ranges = _ranges(dims, batches, ranks, steps, rhos)
    tally = _Tally("Proposition 4.1", tol, ranges)
    t0 = time.perf_counter()
    count = 0
    with _single_thread():
        for idx, inst in enumerate(sample_instances(n_instances, seed, dims, batches, ranks, steps, rhos)):
            Bt = inst.batches()
            rho, r = inst.toy.rho, inst.rank
            Ms = ea_process(Bt, rho)
            none = rsvd_then_no_update(Bt, rho, r)
            proc = process(Bt, rho, r, overwrite_at=(0,))
            pure = process(Bt, rho, r)
            bupd = [proc.b[0]] + proc.mtilde[1:]
            E_none = no_update_error_terms(Bt, r)
            MR0 = _truncations(Ms[:1], (r,))[r][0]
            batch = _Batch(tally, idx)
            batch.identity("(S.18) M~_R;0,r = B_0", MR0, pure.b[0], Ms[0], kind="proof")
            for k in range(1, len(Ms)):
                batch.identity(
                    "(S.18)-(S.19) overwriting at 0 leaves b-kfac unchanged: M~^R@0_B,k = M~_B,k",
                    proc.mtilde[k],
                    pure.mtilde[k],
                    Ms[k],
                    kind="proof",
                )
            batch.identity("(14) E_0 = M_0 - M~_R;0,r (both cases)", E_none[0], Ms[0] - MR0, Ms[0])
            # the family E^(k) of (16): E^(k)_i = E^(K-1)_i for i < k, and E^(k)_k = 0
            E_last = bupdate_error_terms(proc, len(Ms) - 1)
            for k in range(len(Ms)):
                w = sum(kappa(i, rho) * rho ** (k - i) for i in range(k + 1))
                batch.scalar("(S.16) sum_i kappa(i) rho^(k-i) = 1", abs(w - 1.0), kind="proof")
                batch.identity("(14)+(15) rsvd at 0, no update", Ms[k] - none[k], ea_sum(E_none[: k + 1], rho), Ms[k])
                E_b = E_last[:k] + [torch.zeros_like(Ms[0])] if k >= 1 else E_last[:1]
                batch.identity("(14)+(16) rsvd at 0, B-updates", Ms[k] - bupd[k], ea_sum(E_b, rho), Ms[k])
                if k >= 1:
                    rhs = rho**k * (Ms[0] - MR0)
                    for j in range(1, k):
                        rhs = rhs + rho ** (k - j) * (proc.mtilde[j] - proc.b[j])
                    batch.identity(
                        "(S.19)-(S.20) M_k - M~_B,k = rho^k E_0 + sum_j rho^(k-j) (M~_B,j - B_j)",
                        Ms[k] - proc.mtilde[k],
                        rhs,
                        Ms[k],
                        kind="proof",
                    )
                    seq = E_b[:-1] + [(proc.mtilde[k] - proc.b[k]) / (1.0 - rho)]
                    batch.identity("(14) with E_k = (M~_B,k - B_k)/(1-rho) sums to M_k - B_k", Ms[k] - proc.b[k], ea_sum(seq, rho), Ms[k])
                    batch.identity(
                        "erratum-type: (16) read with E_k = (M~_B,k - B_k)/(1-rho) != 0 sums to M_k - M~_B,k",
                        Ms[k] - proc.mtilde[k],
                        ea_sum(seq, rho),
                        Ms[k],
                        kind="erratum",
                    )
            batch.flush()
            count += 1
    return _finish(tally, count, t0)


# --------------------------------------------------------------------------------------------
# Proposition 4.2
# --------------------------------------------------------------------------------------------


def check_prop_4_2(
    n_instances: int = 1000,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    *,
    process: ProcessFn = bkfac_process,
    construction: Callable[..., list[Tensor]] = orthogonal_no_update_case,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (1, 12),
    steps: tuple[int, int] = (2, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> PropositionCheck:
    """Proposition 4.2 (eqs. 17, 18) and the bound (19).

    On every random instance:

    * (18) B-updates: ``||E_j||_F <= ||M_j M_j^T||_F`` for ``j = 1..K-1`` with
      ``E_j = (M~_{B,j} - B_j)/(1 - rho)`` (for ``j <= k - 1`` at any later ``k``; ``E_k = 0``
      is trivial). Because the proof's argument is Eckart-Young-Mirsky, it holds in every
      unitarily invariant norm: also checked in the spectral and nuclear norms.
    * (17) no update, general case: ``||E_j||_F <= sqrt(||M_j M_j^T||_F^2 + ||M~_{R;0,r}||_F^2)``
      (``tr(M_j M_j^T M~_{R;0,r}) >= 0``): (17) is the largest value ``||E_j||_F`` can take.
    * (19) the triangle-inequality bound of ``||M_k - M~_k||_F`` for both processes.

    On a second instance per random draw, built by ``construction`` (default
    :func:`bkfac.experiments.toy.orthogonal_no_update_case`, the case ``V_{M_j}^T U_{M_0,r} = 0``
    of (S.25)): (17) is attained, ``||E_j||_F = sqrt(...)`` to relative ``tol``, and the
    eigenvalues of ``E_j`` are those of ``M_j M_j^T`` and of ``-D_{M_0,r}`` (S.25).

    Proof steps: (S.28) ``E_i`` is the scaled truncation error of ``M~_{B,i}``; (S.30). Errata:
    (S.29) writes ``M~_{B,i} = rho M~_{B,i-1} + (1 - rho) M_i M_i^T`` -- false, the recursion
    (10) has ``rho B_{i-1}``; and "``M~_{B,i-1}`` is of rank r" -- false, its rank is up to
    ``r + n`` (it is ``B_{i-1}`` that has rank ``r``). With ``B_{i-1}`` in their place the
    argument is correct, and (18) holds.
    """
    ranges = _ranges(dims, batches, ranks, steps, rhos)
    tally = _Tally("Proposition 4.2", tol, ranges)
    t0 = time.perf_counter()
    count = 0
    with _single_thread():
        for idx, inst in enumerate(sample_instances(n_instances, seed, dims, batches, ranks, steps, rhos)):
            Bt = inst.batches()
            rho, r, n, d, K = inst.toy.rho, inst.rank, inst.toy.batch, inst.toy.dim, inst.steps
            Ms = ea_process(Bt, rho)
            proc = process(Bt, rho, r, overwrite_at=(0,))
            MR0 = _truncations(Ms[:1], (r,))[r][0]
            nMR0 = float(torch.linalg.matrix_norm(MR0))
            E_none = no_update_error_terms(Bt, r)
            tmt = _truncations(proc.mtilde[1:], (r,))[r] if K > 1 else []
            batch = _Batch(tally, idx)
            for j in range(1, K):
                MM = Bt[j] @ Bt[j].mT
                T = proc.mtilde[j] - proc.b[j]
                Ej = T / (1.0 - rho)
                batch.norm_geq("(18) ||E_j|| <= ||M_j M_j^T|| (B-updates)", MM, Ej, MM)
                bound17 = math.sqrt(float(torch.linalg.matrix_norm(MM)) ** 2 + nMR0**2)
                batch.scalar(
                    "(17) is an upper bound: ||E_j||_F <= sqrt(||M_j M_j^T||_F^2 + ||M~_R;0,r||_F^2) (no update)",
                    (float(torch.linalg.matrix_norm(E_none[j])) - bound17) / bound17,
                )
                batch.identity(
                    "(S.28) E_i = TrcErr_r(M~_B,i) / (1-rho)", Ej, (proc.mtilde[j] - tmt[j - 1]) / (1.0 - rho), MM, kind="proof"
                )
                batch.norm_geq(
                    "(S.30) ||TrcErr_r(rho B_i-1 + (1-rho) M_i M_i^T)|| <= ||(1-rho) M_i M_i^T||",
                    (1.0 - rho) * MM,
                    T,
                    MM,
                    kind="proof",
                )
                batch.identity(
                    "(10) M~_B,i = rho B_i-1 + (1-rho) M_i M_i^T",
                    proc.mtilde[j],
                    rho * proc.b[j - 1] + (1.0 - rho) * MM,
                    proc.mtilde[j],
                    kind="proof",
                )
                batch.identity(
                    "erratum (S.29): M~_B,i = rho M~_B,i-1 + (1-rho) M_i M_i^T",
                    proc.mtilde[j],
                    rho * proc.mtilde[j - 1] + (1.0 - rho) * MM,
                    proc.mtilde[j],
                    kind="erratum",
                )
                batch.rank_le("erratum (S.29) observation 2: rank(M~_B,i-1) <= r", proc.mtilde[j - 1], r, proc.mtilde[j - 1], kind="erratum")
            # (19) for both processes, at every k
            bupd = [proc.b[0]] + proc.mtilde[1:]
            none = rsvd_then_no_update(Bt, rho, r)
            e0 = float(torch.linalg.matrix_norm(Ms[0] - MR0))
            nE_none = torch.linalg.matrix_norm(torch.stack(E_none)).tolist()
            nE_last = torch.linalg.matrix_norm(torch.stack(bupdate_error_terms(proc, K - 1))).tolist()
            for k in range(K):
                nEA = float(torch.linalg.matrix_norm(Ms[k]))
                for name, est, nE in (
                    ("no update", none[k], nE_none[: k + 1]),
                    ("B-updates", bupd[k], nE_last[:k] + [0.0]),  # E_k = 0 at step k (16)
                ):
                    lhs = float(torch.linalg.matrix_norm(Ms[k] - est))
                    rhs = rho**k * e0 + (1.0 - rho) * sum(rho ** (k - j) * nE[j] for j in range(1, k + 1))
                    batch.scalar(f"(19) ||M_k - M~_k||_F <= rho^k ||E_0||_F + (1-rho) sum_j rho^(k-j) ||E_j||_F ({name})", (lhs - rhs) / nEA)
            # the worst case of (17): V_{M_j}^T U_{M_0,r} = 0
            g = torch.Generator().manual_seed(inst.seed + 500_000_009)
            W = construction(d, n, r, K, generator=g)
            U0, D0 = top_eigenpairs(W[0] @ W[0].mT, r)
            MR0w = (U0 * D0) @ U0.mT
            nMR0w = float(torch.linalg.matrix_norm(MR0w))
            for j in range(1, K):
                MM = W[j] @ W[j].mT
                Ej = MM - MR0w
                target = math.sqrt(float(torch.linalg.matrix_norm(MM)) ** 2 + nMR0w**2)
                batch.scalar("(17) attained when V_Mj^T U_M0,r = 0", abs(float(torch.linalg.matrix_norm(Ej)) - target) / target)
                ev = torch.linalg.eigvalsh(_sym(Ej))
                want = torch.sort(torch.cat([torch.linalg.eigvalsh(_sym(MM))[-n:], -D0, Ej.new_zeros(d - n - r)])).values
                batch.scalar("(S.25) eig(E_j) = eig(M_j M_j^T) and -D_M0,r", float((ev - want).abs().max()) / target, kind="proof")
            batch.flush()
            count += 1
    return _finish(tally, count, t0)


# --------------------------------------------------------------------------------------------
# Footnote 11: the light correction (Alg. 6) cannot increase the Frobenius error
# --------------------------------------------------------------------------------------------


def check_light_correction(
    n_instances: int = 1000,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    *,
    dims: tuple[int, int] = (6, 40),
    batches: tuple[int, int] = (1, 8),
    ranks: tuple[int, int] = (2, 12),
    steps: tuple[int, int] = (2, 8),
    rhos: tuple[float, float] = (0.5, 0.99),
) -> PropositionCheck:
    """Footnote 11 (Sec. 3.4): a light correction (Alg. 6) of ``M~_{B,k}`` never increases
    ``||M_k - M~_k||_F``, and afterwards ``U_S^T (M_k - M~_k) U_S = 0`` on the corrected modes.

    On every instance the b-kfac representation of the last step is corrected with
    :func:`bkfac.linalg.light_correction` on ``n_crc`` (uniform in ``1..r``) modes chosen among
    the leading ``r`` (as b-kfac-c does, Alg. 7), against the exact EA factor.
    """
    ranges = _ranges(dims, batches, ranks, steps, rhos)
    ranges["n_crc"] = "uniform in 1..r"
    tally = _Tally("Footnote 11 (light correction)", tol, ranges)
    t0 = time.perf_counter()
    count = 0
    g = torch.Generator().manual_seed(int(seed) + 104729)
    with _single_thread():
        for idx, inst in enumerate(sample_instances(n_instances, seed, dims, batches, ranks, steps, rhos)):
            Bt = inst.batches()
            rho, r = inst.toy.rho, inst.rank
            M = ea_process(Bt, rho)[-1]
            U, d = bkfac_process(Bt, rho, r).factors[-1]
            among = min(r, U.shape[1])
            n_crc = int(torch.randint(1, among + 1, (1,), generator=g))
            before = (U * d) @ U.mT
            Uc, dc = light_correction(U, d, M, n_crc, generator=g, among=among)
            after = (Uc * dc) @ Uc.mT
            batch = _Batch(tally, idx)
            e_b = float(torch.linalg.matrix_norm(M - before))
            e_a = float(torch.linalg.matrix_norm(M - after))
            batch.scalar("fn. 11: ||M_k - M~_k||_F does not increase", (e_a - e_b) / float(torch.linalg.matrix_norm(M)))
            # The corrected columns U_S W span the chosen subspace S; U_S^T (M - M~) U_S = 0 means
            # every pair of them sees zero error. Columns of Uc that are not (up to sign) columns of U
            # were rotated by the correction, so they lie in S: check the error on them.
            # A column kept (up to sign) with a new eigenvalue was corrected too (n_crc = 1, or W
            # with a unit column).
            overlap, match = (U.mT @ Uc).abs().max(dim=0)
            moved = (dc - d[match]).abs() > 1e-12 * float(d.abs().max())
            changed = torch.nonzero((overlap < 1.0 - 1e-9) | moved).flatten()
            if changed.numel():
                Us = Uc[:, changed]
                batch.scalar(
                    "fn. 11: U_S^T (M_k - M~_k) U_S = 0 on the corrected modes",
                    float(torch.linalg.matrix_norm(Us.mT @ (M - after) @ Us)) / float(torch.linalg.matrix_norm(M)),
                )
            batch.flush()
            count += 1
    return _finish(tally, count, t0)
