"""Orderings decided over seeds: a claim "a is below b" is decided only where the spread allows.

The paper reports Table 2 over 10 runs and Figures 1-2 over 5. An ordering read off one seed
can be flipped by the next, so every ordering verdict of the report goes through
:func:`decide_ordering`, with one rule, stated where it is used:

    **decided** when both sides have at least two runs and their means differ by more than the
    larger of the two sample standard deviations; otherwise **not decided** (the spreads
    overlap, or one run gives no spread at all).

:func:`mean_sd` is the summary the tables print (``mean ± sd`` over runs, ``n`` beside it);
:func:`decide_stats` applies the rule to published summaries (the paper's ``mean ± sd`` of 10
runs), so the paper's own Table 2 gets its verdict by the same rule as ours.

The book's chapters print verdicts through the functions below, and
``tests/test_falsifiable_results.py`` feeds each of them data on which its claim is false:

* :func:`table2_claims` -- the paper's Sec. 6.1 claims on a Table 2 (ours over seeds, or the
  paper's own), each a combination of orderings (:func:`combine`);
* :func:`table2_disagreements` -- our Table 2 recomputed independently from the runs' summaries;
* :func:`t_epoch_verdicts` -- the per-epoch cost orderings on one measured column (the H200
  timings of the paper's model);
* :func:`proposition_verdicts`, :func:`toy_bound_verdicts` -- chapter 4's checks of
  Propositions 4.1-4.2 and of the bounds (17)-(19) on one toy process;
* :func:`format_verdicts` -- the ``name: value`` lines the chapters print.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["mean_sd", "Ordering", "decide_ordering", "decide_stats", "combine", "VERDICTS", "RULE",
           "KFACS", "B_VARIANTS", "hit_stats", "table2_claims", "table2_disagreements", "t_epoch_verdicts",
           "proposition_verdicts", "toy_bound_verdicts", "format_verdicts"]

#: The decision rule, as the book states it.
RULE = ("an ordering is decided when both sides have at least two runs and their means differ by more "
        "than the larger sample standard deviation; otherwise it is 'not decided'")


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample sd, n)`` of the finite ``values`` (sd is NaN for fewer than two)."""
    x = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(x) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) if n > 1 else math.nan
    return m, sd, n


@dataclass(frozen=True)
class Ordering:
    """The outcome of :func:`decide_ordering` for the claim ``a < b`` (or ``a > b``)."""

    verdict: str  # "holds", "fails" or "not decided"
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    n_a: int
    n_b: int
    why: str
    claim: str = "<"

    @property
    def decided(self) -> bool:
        return self.verdict != "not decided"

    def __str__(self) -> str:
        return f"{self.verdict} ({self.why})"


def decide_ordering(a: Sequence[float], b: Sequence[float], *, claim: str = "<") -> Ordering:
    """Decide the claim ``mean(a) < mean(b)`` (``claim="<"``) or ``>`` over runs, by :data:`RULE`."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if claim not in ("<", ">"):
        raise ValueError(f"claim must be '<' or '>', got {claim!r}")
    if na == 0 or nb == 0:
        raise ValueError("both sides need at least one finite value")
    return decide_stats(ma, sa, na, mb, sb, nb, claim=claim)


def decide_stats(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int, *,
                 claim: str = "<") -> Ordering:
    """:data:`RULE` applied to summaries (``mean``, sample ``sd``, number of runs ``n``) of both
    sides, e.g. the ``mean ± sd`` over 10 runs the paper publishes. ``sd`` may be NaN where
    ``n < 2``."""
    if claim not in ("<", ">"):
        raise ValueError(f"claim must be '<' or '>', got {claim!r}")
    for name, n in (("n_a", n_a), ("n_b", n_b)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    for name, m in (("mean_a", mean_a), ("mean_b", mean_b)):
        if not math.isfinite(float(m)):
            raise ValueError(f"{name} must be finite, got {m!r}")
    ma, mb, sa, sb = float(mean_a), float(mean_b), float(sd_a), float(sd_b)
    holds = ma < mb if claim == "<" else ma > mb
    if n_a < 2 or n_b < 2:
        return Ordering("not decided", ma, mb, sa, sb, n_a, n_b,
                        f"{min(n_a, n_b)} run on one side: no spread to decide by", claim)
    gap, spread = abs(ma - mb), max(sa, sb)
    if gap <= spread:
        return Ordering("not decided", ma, mb, sa, sb, n_a, n_b,
                        f"means differ by {gap:.3g}, within the larger sd {spread:.3g}", claim)
    return Ordering("holds" if holds else "fails", ma, mb, sa, sb, n_a, n_b,
                    f"means differ by {gap:.3g} > larger sd {spread:.3g}", claim)


#: The verdicts a claim can get; ``"no data"`` where a run it needs has no results.
VERDICTS = ("holds", "fails", "not decided", "no data")


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a claim that is the conjunction of orderings: ``fails`` if any fails,
    ``holds`` if all that could be compared hold, ``not decided`` if none fails and one is not
    decided, ``no data`` if nothing could be compared (orderings with ``no data`` -- a run
    without results -- are left out; :func:`table2_claims` counts them)."""
    bad = [x for x in verdicts if x not in VERDICTS]
    if bad:
        raise ValueError(f"verdicts must be among {VERDICTS}, got {bad[0]!r}")
    v = [x for x in verdicts if x != "no data"]
    if not v:
        return "no data"
    if "fails" in v:
        return "fails"
    return "holds" if all(x == "holds" for x in v) else "not decided"


#: The K-FAC family of Table 2 (run names of the profiles), and the paper's proposed variants.
KFACS = ("k-fac", "r-kfac", "r-kfac-tinv25", "b-kfac", "b-kfac-c", "b-r-kfac")
B_VARIANTS = ("b-kfac", "b-kfac-c", "b-r-kfac")


def hit_stats(hits: int, n: int) -> tuple[float, float, int]:
    """``(mean, sample sd, n)`` of the 0/1 indicators "this run reached the target" of ``n`` runs of
    which ``hits`` did (the paper's "# hit 93.5%" as a sample)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(hits, bool) or not isinstance(hits, int) or not 0 <= hits <= n:
        raise ValueError(f"hits must be an integer in 0..{n}, got {hits!r}")
    return mean_sd([1.0] * hits + [0.0] * (n - hits))


def _stat(row: dict | None, key: str, n_key: str) -> tuple[float, float, int] | None:
    if not row:
        return None
    m, n = row.get(f"{key}_mean"), row.get(n_key)
    if m is None or n in (None, 0) or not math.isfinite(float(m)):
        return None
    return float(m), float(row.get(f"{key}_sd", math.nan)), int(n)


def _time_order(rows: dict, a: str, b: str, key: str) -> Ordering | str:
    """``a`` reaches target ``key`` before ``b``: times over the runs that reach it. A side whose
    runs all miss the target is slower than one that reaches it (decided with >= 2 runs each)."""
    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb or not ra.get("n_seeds") or not rb.get("n_seeds"):
        return "no data"
    sa, sb = _stat(ra, f"time_to_{key}", f"hits_{key}"), _stat(rb, f"time_to_{key}", f"hits_{key}")
    if sa and sb:
        return decide_stats(*sa, *sb, claim="<")
    if sa and not sb:  # b never reaches it
        ok = sa[2] >= 2 and rb["n_seeds"] >= 2
        return Ordering("holds" if ok else "not decided", sa[0], math.inf, sa[1], math.nan, sa[2], rb["n_seeds"],
                        f"{b} reaches it in none of {rb['n_seeds']} run(s)")
    if sb and not sa:
        ok = sb[2] >= 2 and ra["n_seeds"] >= 2
        return Ordering("fails" if ok else "not decided", math.inf, sb[0], math.nan, sb[1], ra["n_seeds"], sb[2],
                        f"{a} reaches it in none of {ra['n_seeds']} run(s)")
    return Ordering("not decided", math.inf, math.inf, math.nan, math.nan, ra["n_seeds"], rb["n_seeds"],
                    "neither reaches it")


def _epoch_order(rows: dict, a: str, b: str, claim: str) -> Ordering | str:
    sa, sb = _stat(rows.get(a), "t_epoch", "t_epoch_samples"), _stat(rows.get(b), "t_epoch", "t_epoch_samples")
    if not sa or not sb:
        return "no data"
    return decide_stats(*sa, *sb, claim=claim)


def _hits_order(rows: dict, a: str, b: str, key: str) -> Ordering | str:
    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb or not ra.get("n_seeds") or not rb.get("n_seeds"):
        return "no data"
    return decide_stats(*hit_stats(int(ra[f"hits_{key}"]), int(ra["n_seeds"])),
                        *hit_stats(int(rb[f"hits_{key}"]), int(rb["n_seeds"])), claim=">")


def _verdict(o) -> str:
    return o if isinstance(o, str) else o.verdict


def _by_means(o) -> str:
    """The reading of an ordering by its means alone (what one seed can say): holds/fails."""
    if isinstance(o, str):
        return o
    if o.verdict in ("holds", "fails"):
        return o.verdict
    if o.mean_a == o.mean_b:  # equal, or neither side reaches the target
        return "not decided"
    return "holds" if (o.mean_a < o.mean_b if o.claim == "<" else o.mean_a > o.mean_b) else "fails"


def table2_claims(rows: dict[str, dict], targets: Sequence[str], *, sgd: bool = True) -> list[dict]:
    """The claims of the paper's Sec. 6.1 (its Table 2) decided on one Table 2.

    ``rows`` maps a run name (``k-fac``, ``r-kfac``, ``r-kfac-tinv25``, ``b-kfac``, ``b-kfac-c``,
    ``b-r-kfac``, ``seng``, ``sgd``) to a row of
    :func:`bkfac.experiments.report.table2_over_seeds` (``time_to_<t>_mean/_sd``, ``hits_<t>``,
    ``n_seeds``, ``t_epoch_mean/_sd/_samples``); the paper's own table in that form is
    :func:`bkfac.experiments.report.paper_table2_rows`. ``targets`` are the target keys, lowest
    first (ours ``["60", "70", "75"]``, the paper's ``["91", "93", "93.5"]``). Each claim is a
    conjunction of orderings, each decided by :data:`RULE` (times over the runs reaching the
    target, ``t_epoch`` over its per-epoch samples, hits as 0/1 indicators per run), combined by
    :func:`combine`. Returns one dict per claim: ``id``, ``claim``, ``verdict``, ``by_means``
    (the same orderings read from the means alone, what one seed can say), ``n`` (runs per side,
    smallest), ``missing`` (orderings left out: a run without results) and ``parts`` (each
    ordering, for the record). The last claims ask whether the first-order methods beat every
    K-FAC at every target: seng (the paper: only above its lowest target) and, with ``sgd``, our
    SGD baseline (the paper has no SGD run)."""
    if len(targets) < 2:
        raise ValueError(f"targets must name at least two target keys (lowest first), got {targets!r}")
    low, top, upper = targets[0], targets[-1], list(targets[1:])
    others = lambda x: [k for k in KFACS if k != x]  # noqa: E731
    spec = [
        ("b-lowest-t-epoch", "b-kfac has the lowest t_epoch of the K-FAC family",
         [(f"b-kfac < {k} (t_epoch)", _epoch_order(rows, "b-kfac", k, "<")) for k in others("b-kfac")]),
        ("k-largest-t-epoch", "k-fac has the largest t_epoch of the K-FAC family",
         [(f"k-fac > {k} (t_epoch)", _epoch_order(rows, "k-fac", k, ">")) for k in others("k-fac")]),
        ("b-beats-k-r", "b-kfac reaches every target before k-fac and r-kfac",
         [(f"b-kfac before {k} to {t}%", _time_order(rows, "b-kfac", k, t)) for t in targets for k in ("k-fac", "r-kfac")]),
        ("bc-beats-k-r", "b-kfac-c reaches every target before k-fac and r-kfac",
         [(f"b-kfac-c before {k} to {t}%", _time_order(rows, "b-kfac-c", k, t)) for t in targets
          for k in ("k-fac", "r-kfac")]),
        ("b-beat-seng-low", "every b-variant reaches the lowest target before seng",
         [(f"{b} before seng to {low}%", _time_order(rows, b, "seng", low)) for b in B_VARIANTS]),
        ("seng-best-upper", "seng reaches the higher targets before every K-FAC",
         [(f"seng before {k} to {t}%", _time_order(rows, "seng", k, t)) for t in upper for k in KFACS]),
        ("br-hits-more", "b-r-kfac reaches the top target in more runs than r-kfac",
         [(f"hits b-r-kfac > r-kfac ({top}%)", _hits_order(rows, "b-r-kfac", "r-kfac", top))]),
    ]
    for f in ["seng"] + (["sgd"] if sgd else []):
        spec.append((f"{f}-beats-kfacs", f"{f} reaches every target before every K-FAC",
                     [(f"{f} before {k} to {t}%", _time_order(rows, f, k, t)) for t in targets for k in KFACS]))
    out = []
    for cid, text, parts in spec:
        verdicts = [_verdict(o) for _, o in parts]
        means = [_by_means(o) for _, o in parts]
        ns = [min(o.n_a, o.n_b) for _, o in parts if not isinstance(o, str)]
        out.append(dict(id=cid, claim=text, verdict=combine(verdicts), by_means=combine(means),
                        n=min(ns) if ns else 0, missing=verdicts.count("no data"),
                        parts=[(name, str(o)) for name, o in parts]))
    return out


def _close(a, b, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def table2_disagreements(rows: Sequence[dict], runs: dict[str, list[dict]], targets: Sequence[str]) -> list[str]:
    """Every cell of a Table 2 over seeds (``rows``, as
    :func:`bkfac.experiments.report.table2_over_seeds` builds them) that disagrees with a
    recomputation from the runs' own files (``runs``: run name -> its seeds' ``{"summary",
    "history"}``), done here independently with :mod:`statistics`: seeds per run, hits per
    target (summaries with a time to it), mean and sd of those times, ``t_epoch`` over every
    epoch of every seed. Empty when the table says what the files say."""
    import statistics

    problems = []
    by_run = {r["run"]: r for r in rows}
    if set(by_run) != set(runs):
        problems.append(f"rows for {sorted(by_run)}, results for {sorted(runs)}")
    for run, seeds in runs.items():
        r = by_run.get(run)
        if r is None:
            continue
        if r.get("n_seeds") != len(seeds):
            problems.append(f"{run}: n_seeds {r.get('n_seeds')}, {len(seeds)} seed(s) stored")
        for t in targets:
            times = [s["summary"][f"time_to_{t}"] for s in seeds if s["summary"].get(f"time_to_{t}") is not None]
            if r.get(f"hits_{t}") != len(times):
                problems.append(f"{run}: hits to {t}% {r.get(f'hits_{t}')}, {len(times)} seed(s) reach it")
            mean = statistics.fmean(times) if times else math.nan
            sd = statistics.stdev(times) if len(times) > 1 else math.nan
            if not (_close(r.get(f"time_to_{t}_mean"), mean) and _close(r.get(f"time_to_{t}_sd"), sd)):
                problems.append(f"{run}: time to {t}% {r.get(f'time_to_{t}_mean')} ± {r.get(f'time_to_{t}_sd')}, "
                                f"the summaries give {mean} ± {sd}")
        secs = [float(h["epoch_seconds"]) for s in seeds for h in s["history"]]
        if r.get("t_epoch_samples") != len(secs) or not _close(r.get("t_epoch_mean"),
                                                                 statistics.fmean(secs) if secs else math.nan):
            problems.append(f"{run}: t_epoch {r.get('t_epoch_mean')} over {r.get('t_epoch_samples')} epoch(s), "
                            f"the histories give {statistics.fmean(secs) if secs else math.nan} over {len(secs)}")
    return problems


def t_epoch_verdicts(t_epoch: dict[str, float], where: str) -> dict[str, bool]:
    """The per-epoch cost claims of the paper's Table 2 read on one measured column ``t_epoch``
    (run name -> seconds per epoch, one measurement each, e.g. the H200 timings of the paper's
    model): k-fac the slowest of the K-FAC runs measured, b-kfac the fastest, and every b-variant
    faster than k-fac. ``where`` names the column in the returned keys. Needs ``k-fac``,
    ``b-kfac`` and at least one other K-FAC run."""
    kf = {k: float(v) for k, v in t_epoch.items() if k in KFACS and v is not None and math.isfinite(float(v))}
    missing = [k for k in ("k-fac", "b-kfac") if k not in kf]
    if missing or len(kf) < 3:
        raise ValueError(f"t_epoch must hold k-fac, b-kfac and another K-FAC run; it has {sorted(kf)}")
    return {
        f"{where}: k-fac has the largest t_epoch of the K-FAC runs": max(kf, key=kf.get) == "k-fac",
        f"{where}: b-kfac has the smallest t_epoch of the K-FAC runs": min(kf, key=kf.get) == "b-kfac",
        f"{where}: every b-variant's t_epoch is below k-fac's": all(kf[b] < kf["k-fac"] for b in B_VARIANTS if b in kf),
    }


def proposition_verdicts(res, *, no_violation: str, errata: str) -> dict[str, bool]:
    """Chapter 4's verdicts on a proposition check (:class:`bkfac.experiments.propositions.PropositionCheck`):
    ``no_violation`` -- every claim and proof step held on every instance; ``errata`` -- every
    erratum-type statement (a reading or step of the paper that is false as written) was refuted
    on some instance (False when there is none)."""
    return {no_violation: res.violations == 0,
            errata: bool(res.errata) and all(e.refuted > 0 for e in res.errata)}


def toy_bound_verdicts(*, E_b: Sequence[float], mm: Sequence[float], E_none: Sequence[float],
                       worst17: Sequence[float], tot_none: Sequence[float], b19_none: Sequence[float],
                       tot_b: Sequence[float], b19_b: Sequence[float], slack: Sequence[float]) -> dict[str, bool]:
    """Chapter 4's verdicts on one toy process: each B-update error term ``||E_j||_F`` (``E_b``,
    ``j >= 1``) at most ``||M_j M_j^T||_F`` (``mm``, bound (18)); each no-update term (``E_none``)
    at most the worst case (17) (``worst17``); both total errors at most their bound (19).
    ``slack[k]`` is the rounding allowance at step ``k``."""
    K = len(tot_none)
    if not (len(b19_none) == len(tot_b) == len(b19_b) == len(slack) == K and len(E_none) == len(worst17) == K):
        raise ValueError("tot_none, b19_none, tot_b, b19_b, slack, E_none and worst17 must all have one value per step")
    return {
        "B-updates: every ||E_j||_F below ||M_j M_j^T||_F": all(E_b[i] <= mm[i] + slack[i] for i in range(1, len(E_b))),
        "no update: every ||E_j||_F below the worst case (17)": all(E_none[i] <= worst17[i] + slack[i] for i in range(1, K)),
        "both totals below their bound (19)": all(tot_none[k] <= b19_none[k] + slack[k] and tot_b[k] <= b19_b[k] + slack[k]
                                                 for k in range(K)),
    }


def format_verdicts(verdicts: dict[str, object]) -> str:
    """The ``name: value`` lines a chapter prints for a verdict cell."""
    return "\n".join(f"{k}: {v}" for k, v in verdicts.items())
