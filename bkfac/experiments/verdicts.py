"""Orderings decided over seeds: a claim "a is below b" is decided only where the spread allows.

The paper reports Table 2 over 10 runs and Figures 1-2 over 5. An ordering read off one seed
can be flipped by the next, so every ordering verdict of the report goes through
:func:`decide_ordering`, with one rule, stated where it is used:

    **decided** when both sides have at least two runs and their means differ by more than the
    larger of the two sample standard deviations; otherwise **not decided** (the spreads
    overlap, or one run gives no spread at all).

:func:`mean_sd` is the summary the tables print (``mean ± sd`` over runs, ``n`` beside it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["mean_sd", "Ordering", "decide_ordering", "RULE"]

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

    @property
    def decided(self) -> bool:
        return self.verdict != "not decided"

    def __str__(self) -> str:
        return f"{self.verdict} ({self.why})"


def decide_ordering(a: Sequence[float], b: Sequence[float], *, claim: str = "<") -> Ordering:
    """Decide the claim ``mean(a) < mean(b)`` (``claim="<"``) or ``>`` over runs, by :data:`RULE`."""
    if claim not in ("<", ">"):
        raise ValueError(f"claim must be '<' or '>', got {claim!r}")
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if na == 0 or nb == 0:
        raise ValueError("both sides need at least one finite value")
    holds = ma < mb if claim == "<" else ma > mb
    if na < 2 or nb < 2:
        return Ordering("not decided", ma, mb, sa, sb, na, nb,
                        f"{min(na, nb)} run on one side: no spread to decide by")
    gap, spread = abs(ma - mb), max(sa, sb)
    if gap <= spread:
        return Ordering("not decided", ma, mb, sa, sb, na, nb,
                        f"means differ by {gap:.3g}, within the larger sd {spread:.3g}")
    return Ordering("holds" if holds else "fails", ma, mb, sa, sb, na, nb,
                    f"means differ by {gap:.3g} > larger sd {spread:.3g}")
