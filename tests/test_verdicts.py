"""Orderings over seeds (bkfac.experiments.verdicts): decided only where the spread allows."""

import math
import statistics

import pytest

from bkfac.experiments.verdicts import decide_ordering, mean_sd


def test_mean_sd_against_statistics():
    x = [0.751, 0.760, 0.744]
    m, sd, n = mean_sd(x)
    assert n == 3 and m == pytest.approx(statistics.mean(x)) and sd == pytest.approx(statistics.stdev(x))
    assert math.isnan(mean_sd([1.0])[1]) and mean_sd([float("nan"), 2.0])[:1] == (2.0,)


def test_separated_seeds_decide_and_the_claim_can_fail():
    fast, slow = [280.0, 284.0, 282.0], [350.0, 356.0, 352.0]
    assert decide_ordering(fast, slow).verdict == "holds"
    assert decide_ordering(slow, fast).verdict == "fails"
    assert decide_ordering(slow, fast, claim=">").verdict == "holds"


def test_overlapping_seeds_are_not_decided():
    a, b = [0.750, 0.752, 0.760], [0.753, 0.745, 0.758]
    o = decide_ordering(a, b)
    assert o.verdict == "not decided" and not o.decided and "within" in o.why


def test_one_seed_is_never_decided():
    o = decide_ordering([0.70], [0.80])
    assert o.verdict == "not decided" and "no spread" in o.why
    with pytest.raises(ValueError):
        decide_ordering([], [1.0])
    with pytest.raises(ValueError, match="claim"):
        decide_ordering([1.0], [2.0], claim="<=")
