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


def test_table2_over_seeds_means_spreads_and_hits():
    """Table 2 over seeds: times over the seeds that reach a target, hits out of n, t_epoch over
    every epoch of every seed -- against hand-computed values."""
    from bkfac.experiments.profiles import load_profile
    from bkfac.experiments.report import table2_over_seeds

    prof = load_profile("cpu")  # targets 0.6, 0.7, 0.75

    def seed(t60, t75, secs, final):
        return {"summary": {"time_to_60": t60, "epochs_to_60": 2, "time_to_70": 900.0, "epochs_to_70": 4,
                            "time_to_75": t75, "epochs_to_75": 7 if t75 else None, "final_test_acc": final},
                "history": [{"epoch_seconds": x} for x in secs]}

    rows = table2_over_seeds(prof, {"b-kfac": [seed(400.0, 2000.0, [200, 210], 0.76), seed(420.0, None, [190, 200], 0.74),
                                               seed(410.0, 2100.0, [205, 195], 0.755)]})
    r = rows[0]
    assert r["n_seeds"] == 3 and r["hits_75"] == 2 and r["hits_60"] == 3
    assert r["time_to_75_mean"] == pytest.approx(2050.0) and r["time_to_75_sd"] == pytest.approx(statistics.stdev([2000, 2100]))
    assert r["time_to_60_mean"] == pytest.approx(410.0)
    assert r["t_epoch_samples"] == 6 and r["t_epoch_mean"] == pytest.approx(200.0)
    assert r["t_epoch_sd"] == pytest.approx(statistics.stdev([200, 210, 190, 200, 205, 195]))
    assert r["final_acc_mean"] == pytest.approx(statistics.mean([0.76, 0.74, 0.755]))
    one = table2_over_seeds(prof, {"sgd": [seed(300.0, None, [100.0], 0.7)]})[0]
    assert one["hits_75"] == 0 and math.isnan(one["time_to_75_mean"]) and math.isnan(one["t_epoch_sd"])
