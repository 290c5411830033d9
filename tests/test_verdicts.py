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


def test_decide_stats_is_the_rule_on_summaries():
    from bkfac.experiments.verdicts import decide_stats

    a, b = [280.0, 284.0, 282.0], [350.0, 356.0, 352.0]
    o = decide_stats(*mean_sd(a), *mean_sd(b))
    assert o == decide_ordering(a, b) and o.verdict == "holds"
    # the paper's Table 2: b-kfac 1325 ± 58.9 vs r-kfac 1357 ± 38.7 to 93 % (10 runs): within the sd
    assert decide_stats(1325, 58.9, 10, 1357, 38.7, 10).verdict == "not decided"
    assert decide_stats(894.0, 22.9, 10, 920.3, 24.5, 10).verdict == "holds"  # 91 %: 26.3 > 24.5
    assert decide_stats(97.8, 8.2, 500, 46.3, 0.62, 500, claim=">").verdict == "holds"
    assert decide_stats(1.0, math.nan, 1, 2.0, 0.1, 5).verdict == "not decided"
    with pytest.raises(ValueError, match="n_a"):
        decide_stats(1.0, 0.1, 0, 2.0, 0.1, 3)
    with pytest.raises(ValueError, match="mean_b"):
        decide_stats(1.0, 0.1, 3, math.nan, 0.1, 3)


def test_combine_and_hit_stats():
    from bkfac.experiments.verdicts import combine, hit_stats

    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "not decided"]) == "not decided"
    assert combine(["not decided", "fails", "holds"]) == "fails"
    assert combine(["no data", "holds"]) == "holds" and combine(["no data"]) == "no data" and combine([]) == "no data"
    with pytest.raises(ValueError, match="verdicts"):
        combine(["maybe"])
    m, sd, n = hit_stats(8, 10)
    assert (m, n) == (0.8, 10) and sd == pytest.approx(statistics.stdev([1] * 8 + [0] * 2))
    assert hit_stats(0, 10)[:2] == (0.0, 0.0)
    with pytest.raises(ValueError, match="hits"):
        hit_stats(11, 10)


def _row(run, t, sd, n, hits_top=None, t_epoch=(100.0, 1.0, 50), keys=("60", "70", "75")):
    r = dict(run=run, n_seeds=n, t_epoch_mean=t_epoch[0], t_epoch_sd=t_epoch[1], t_epoch_samples=t_epoch[2])
    for i, k in enumerate(keys):
        hits = n if (k != keys[-1] or hits_top is None) else hits_top
        r[f"time_to_{k}_mean"] = t * (1 + i) if hits else math.nan
        r[f"time_to_{k}_sd"] = sd if hits > 1 else math.nan
        r[f"hits_{k}"] = hits
    return r


def test_table2_claims_separated_overlapping_and_missing():
    from bkfac.experiments.verdicts import table2_claims

    keys = ["60", "70", "75"]
    # separated: b-kfac fastest K-FAC everywhere (small sd), seng faster still, k-fac slowest
    sep = {"k-fac": _row("k-fac", 3000, 10, 3, t_epoch=(600, 5, 21)),
           "r-kfac": _row("r-kfac", 1500, 10, 3, hits_top=0, t_epoch=(350, 5, 21)),
           "r-kfac-tinv25": _row("r-kfac-tinv25", 1600, 10, 3, t_epoch=(370, 5, 21)),
           "b-kfac": _row("b-kfac", 1000, 10, 3, t_epoch=(300, 5, 21)),
           "b-kfac-c": _row("b-kfac-c", 1100, 10, 3, t_epoch=(310, 5, 21)),
           "b-r-kfac": _row("b-r-kfac", 1200, 10, 3, t_epoch=(320, 5, 21)),
           "seng": _row("seng", 800, 10, 3, t_epoch=(250, 5, 21)),
           "sgd": _row("sgd", 2000, 10, 3, t_epoch=(200, 5, 21))}
    c = {x["id"]: x for x in table2_claims(sep, keys)}
    assert c["b-lowest-t-epoch"]["verdict"] == "holds" and c["k-largest-t-epoch"]["verdict"] == "holds"
    assert c["b-beats-k-r"]["verdict"] == "holds" and c["bc-beats-k-r"]["verdict"] == "holds"
    assert c["br-hits-more"]["verdict"] == "holds"  # 3 of 3 against r-kfac's 0 of 3
    assert c["seng-beats-kfacs"]["verdict"] == "holds" and c["b-beat-seng-low"]["verdict"] == "fails"
    assert c["sgd-beats-kfacs"]["verdict"] == "fails" and c["sgd-beats-kfacs"]["n"] == 3
    # overlapping spreads: nothing about b-kfac vs r-kfac is decided, but the means still read
    ovl = dict(sep, **{"b-kfac": _row("b-kfac", 1450, 200, 3, t_epoch=(345, 40, 21))})
    c = {x["id"]: x for x in table2_claims(ovl, keys)}
    assert c["b-beats-k-r"]["verdict"] == "not decided" and c["b-beats-k-r"]["by_means"] == "holds"
    # 345 ± 40: decidedly below k-fac's 600, within the sd of b-kfac-c's 310 (35 <= 40)
    assert c["b-lowest-t-epoch"]["verdict"] == "not decided" and c["b-lowest-t-epoch"]["by_means"] == "fails"
    parts = dict(c["b-lowest-t-epoch"]["parts"])
    assert parts["b-kfac < k-fac (t_epoch)"].startswith("holds")
    assert parts["b-kfac < b-kfac-c (t_epoch)"].startswith("not decided")
    # one seed: never decided, the means say what they say
    one = {k: _row(k, v["time_to_60_mean"], math.nan, 1, t_epoch=(v["t_epoch_mean"], math.nan, 1)) for k, v in sep.items()}
    c = {x["id"]: x for x in table2_claims(one, keys)}
    assert all(x["verdict"] in ("not decided", "no data") for x in c.values())
    assert c["b-lowest-t-epoch"]["by_means"] == "holds" and c["sgd-beats-kfacs"]["by_means"] == "fails"
    # a run without results: left out, counted; no results at all for a claim: no data
    part = {k: v for k, v in sep.items() if k != "seng"}
    c = {x["id"]: x for x in table2_claims(part, keys, sgd=False)}
    assert c["seng-beats-kfacs"]["verdict"] == "no data" and "sgd-beats-kfacs" not in c
    assert c["b-lowest-t-epoch"]["missing"] == 0 and c["b-beat-seng-low"]["missing"] == 3
    with pytest.raises(ValueError, match="targets"):
        table2_claims(sep, ["60"])


def test_table2_claims_on_the_papers_table():
    """The paper's own Table 2, decided by the same rule (its mean ± sd of 10 runs)."""
    from bkfac.experiments.report import PAPER_TARGETS, paper_table2_rows
    from bkfac.experiments.verdicts import table2_claims

    c = {x["id"]: x for x in table2_claims(paper_table2_rows(), PAPER_TARGETS, sgd=False)}
    assert c["b-lowest-t-epoch"]["verdict"] == "holds"  # 46.3 ± 0.62 against 47.4 ± 0.45 and above
    assert c["k-largest-t-epoch"]["verdict"] == "holds"
    assert c["seng-best-upper"]["verdict"] == "holds"  # 1098 ± 37.5 and 1144 ± 51 against every K-FAC
    assert c["seng-beats-kfacs"]["verdict"] == "fails"  # at 91 %: 999 ± 54 against b-kfac's 894 ± 23
    assert c["b-beats-k-r"]["verdict"] == "not decided"  # 93 %: 1325 ± 58.9 against r-kfac's 1357 ± 38.7
    assert c["br-hits-more"]["verdict"] == "holds"  # 8 of 10 against 0 of 10
