"""The claims table: deciding functions against hand-computed cases, the table's shape, and
Table 2 orderings that stay 'not decided' with one seed and get decided (either way) with three."""

import pytest

from bkfac.experiments import claims as C
from bkfac.experiments.results import read_csv


# ---- deciding functions ---------------------------------------------------------------------
def test_slope_verdict_reads_the_loglog_slope():
    lin = [(d, 3e-5 * d) for d in (1000, 2000, 4000, 8000)]
    quad = [(d, 1e-9 * d * d) for d in (1000, 2000, 4000, 8000)]
    assert C.slope_verdict(lin, "linear", "t")[0] == "reproduced"
    assert "slope 1.00" in C.slope_verdict(lin, "linear", "t")[1]
    assert C.slope_verdict(quad, "linear", "t")[0] == "not reproduced"
    assert C.slope_verdict(quad, "quadratic", "t")[0] == "reproduced"
    assert C.slope_verdict(quad[:2], "quadratic", "t")[0] == "not decided"
    with pytest.raises(ValueError, match="scaling"):
        C.slope_verdict(lin, "quartic", "t")


def test_ratio_and_proposition_verdicts():
    assert C.ratio_verdict({1: 2.0, 2: 3.0}, "r")[0] == "reproduced"
    assert C.ratio_verdict({1: 0.5, 2: 3.0}, "r")[0] == "partly"
    assert C.ratio_verdict({1: 0.5}, "r")[0] == "not reproduced"
    ok = [dict(statement="a", kind="claim", checks="10", violations="0", refuted="0"),
          dict(statement="erratum x", kind="erratum", checks="10", violations="0", refuted="3")]
    assert C.proposition_verdict(ok, "P")[0] == "reproduced"
    bad = ok + [dict(statement="b", kind="proof", checks="10", violations="2", refuted="0")]
    v, why = C.proposition_verdict(bad, "P")
    assert v == "not reproduced" and "2 violations" in why
    assert C.erratum_verdict(ok, "erratum x", "E")[0] == "not reproduced"
    ok[1]["refuted"] = "0"
    assert C.erratum_verdict(ok, "erratum x", "E")[0] == "reproduced"


def test_compare_runs_and_combine():
    assert C.compare_runs([1.0], [5.0]).verdict == "not decided"
    assert C.compare_runs([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]).verdict == "holds"
    assert C.compare_runs([5.0, 5.1, 4.9], [1.0, 1.1, 0.9]).verdict == "fails"
    # a side that never reaches the target is the slower one when the other always does
    assert C.compare_runs([1.0, 2.0], [None, None]).verdict == "holds"
    assert C.compare_runs([None, None], [1.0, 2.0], ">").verdict == "holds"
    assert C.compare_runs([1.0, None], [None, None]).verdict == "not decided"
    h, f, n = (C.compare_runs(*x) for x in (([1, 1.1], [5, 5.1]), ([5, 5.1], [1, 1.1]), ([1], [2])))
    assert C.combine({"a": h, "b": h}, "w")[0] == "reproduced"
    assert C.combine({"a": h, "b": f}, "w")[0] == "partly"
    assert C.combine({"a": f, "b": n}, "w")[0] == "not reproduced"
    assert C.combine({"a": h, "b": n}, "w")[0] == "not decided"
    assert C.combine({}, "w")[0] == "not decided"


def test_error_metrics_and_spectrum_verdicts():
    rows = [dict(algorithm="x", **{f"avg_metric{m}": v for m, v in zip((1, 2, 3, 4), (1, 1, 1, 9))}),
            dict(algorithm="y", **{f"avg_metric{m}": 2 for m in (1, 2, 3, 4)})]
    assert C.error_metrics_verdict(rows, "x", "y")[0] == "reproduced"       # 3 of 4
    assert C.error_metrics_verdict(rows, "y", "x")[0] == "partly"           # 1 of 4
    spec = [dict(layer="fc0", factor="A", dim="1000", **{"top-10 energy": "0.5"}),
            dict(layer="fc0", factor="Gamma", dim="100", **{"top-10 energy": "0.15"})]
    v, why = C.spectrum_decay_verdict(spec, 10)  # flat shares 0.01 and 0.1: 0.15 < 2 x 0.1
    assert v == "partly" and "Gamma 0.15 vs flat 0.10" in why


# ---- the table --------------------------------------------------------------------------------
def test_claims_table_shape_and_verdicts(tmp_path):
    rows = C.claims("cpu")
    assert len(rows) >= 25
    assert all(set(r) == set(C.COLUMNS) for r in rows)
    assert all(r["verdict"] in C.VERDICTS and r["decided_by"] in ("computed", "judgement") for r in rows)
    assert all(r["why"] and r["claim"] and r["section"] for r in rows)
    assert all("judgement" in r["why"] for r in rows if r["decided_by"] == "judgement")
    sections = {r["section"].split(",")[0] for r in rows}
    assert {"Abstract", "Prop. 3.1", "Prop. 3.2", "Prop. 4.1", "Prop. 4.2", "Sec. 4.3", "Sec. 6.1", "Table 2"} <= sections
    assert any("footnote 11" in r["section"] for r in rows)
    assert len([r for r in rows if r["key"].startswith("sec43-")]) >= 7
    assert C.mismatches(rows, "cpu") == []
    path = C.write_claims("cpu", tmp_path / "claims.csv")
    assert [r["key"] for r in read_csv(path)] == [r["key"] for r in rows]


def _runs(times: dict[str, list]) -> dict:
    """Synthetic stored runs: per run, per seed, the times to the three targets and a history."""
    out = {}
    for run, per_seed in times.items():
        seeds = []
        for t in per_seed:
            summary = {f"time_to_{k}": v for k, v in zip(("60", "70", "75"), t)}
            summary.update({f"epochs_to_{k}": (None if v is None else v / 100) for k, v in zip(("60", "70", "75"), t)})
            seeds.append(dict(summary=summary, history=[{"epoch_seconds": t[0] / 3}] * 3))
        out[run] = seeds
    return out


def test_table2_orderings_are_not_decided_on_one_seed_and_decided_on_three():
    one = _runs({"b-kfac": [(100, 200, 300)], "b-kfac-c": [(110, 210, 310)], "r-kfac": [(150, 250, 350)]})
    ev = C.Evidence("cpu", runs=one)
    row = C.recompute("abs-two-outperform", evidence=ev)
    assert row["verdict"] == "not decided" and "1 run on one side" in row["why"]
    three = _runs({"b-kfac": [(100, 200, 300), (101, 201, 301), (99, 199, 299)],
                   "b-kfac-c": [(110, 210, 310), (111, 211, 311), (109, 209, 309)],
                   "r-kfac": [(150, 250, 350), (151, 251, 351), (149, 249, 349)]})
    assert C.recompute("abs-two-outperform", evidence=C.Evidence("cpu", runs=three))["verdict"] == "reproduced"
    # the same data with r-kfac the fastest: the claim is false and the verdict says so
    flipped = dict(three, **{"r-kfac": three["b-kfac"], "b-kfac": three["r-kfac"], "b-kfac-c": three["r-kfac"]})
    assert C.recompute("abs-two-outperform", evidence=C.Evidence("cpu", runs=flipped))["verdict"] == "not reproduced"


def test_mismatches_catches_a_typed_verdict():
    rows = C.claims("cpu")
    computed = next(r for r in rows if r["key"] == "prop31")
    forged = [dict(r) for r in rows]
    i = rows.index(computed)
    forged[i]["verdict"] = "not reproduced"
    assert C.mismatches(forged, "cpu") == ["prop31"]
    forged[i]["verdict"] = "made up"
    assert C.mismatches(forged, "cpu") == ["prop31"]
    with pytest.raises(ValueError, match="key"):
        C.recompute("no-such-claim")


def test_scales_follow_the_stored_evidence(tmp_path):
    """The scale column of the training and error-study claims is computed from what is stored:
    the seeds per run and the error study's runs and windows, not typed for one profile."""
    import json

    from bkfac.experiments.claims import Evidence, es_scale, runs_scale

    runs = {"sgd": [{"summary": {}, "history": []}] * 2, "k-fac": [{"summary": {}, "history": []}] * 2}
    ev = Evidence("cpu", root=tmp_path, runs=runs)
    assert "2 seed(s) per run" in runs_scale(ev) and "FC0 4096 -> 2048" in runs_scale(ev)
    es_dir = tmp_path / "data" / "results" / "cpu" / "error_study"
    es_dir.mkdir(parents=True)
    (es_dir / "config.json").write_text(json.dumps({"seeds": [0, 1, 2], "window_epochs": [2, 6]}))
    assert es_scale(Evidence("cpu", root=tmp_path)).startswith(
        "profile cpu error study: 3 run(s) (paper 5), windows at epochs 2 and 6 of 7")
