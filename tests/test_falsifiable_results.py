"""Every verdict that nbval checks in chapters 4 and 6 can fail.

``CELLS`` maps each ``nbval-check-output`` cell of ``chapters/04-error-analysis.ipynb`` and
``chapters/06-optimization.ipynb`` (chapter file stem, cell id) to the test below that feeds the
verdict function behind the cell data on which the cell's claim is false, and sees the printed
verdict turn from ``True`` to ``False``. The report chapter's guard test merges ``CELLS`` with
its own (``tests/test_falsifiable.py``) and fails for a checked cell that no test covers;
``test_cells_cover_every_checked_cell`` is this file's own guard for its two chapters.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from bkfac import book
from bkfac.experiments import propositions as P
from bkfac.experiments import toy
from bkfac.experiments.profiles import load_profile
from bkfac.experiments.report import table2_over_seeds
from bkfac.experiments.verdicts import (format_verdicts, proposition_verdicts, t_epoch_verdicts,
                                        table2_disagreements, toy_bound_verdicts)
from test_toy_propositions import _no_truncation_at_all

CELLS = {
    ("04-error-analysis", "da2bbf4d"): "test_prop_4_1_cell_turns_false",
    ("04-error-analysis", "2adf9e46"): "test_prop_4_2_cell_turns_false",
    ("04-error-analysis", "8e9d2b2d"): "test_toy_bounds_cell_turns_false",
    ("06-optimization", "table2-checks"): "test_table2_checks_cell_turns_false",
}

#: The verdict functions each checked cell prints through (the tests below exercise them).
CELL_FUNCTIONS = {
    ("04-error-analysis", "da2bbf4d"): ("proposition_verdicts", "format_verdicts"),
    ("04-error-analysis", "2adf9e46"): ("proposition_verdicts", "format_verdicts"),
    ("04-error-analysis", "8e9d2b2d"): ("toy_bound_verdicts", "format_verdicts"),
    ("06-optimization", "table2-checks"): ("table2_disagreements", "t_epoch_verdicts", "format_verdicts"),
}

CHAPTERS = ("04-error-analysis", "06-optimization")


def _checked_cells(name: str) -> dict[str, str]:
    nb = json.loads((book.repo_root() / "chapters" / f"{name}.ipynb").read_text())
    return {c["id"]: "".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and "nbval-check-output" in c.get("metadata", {}).get("tags", [])}


def test_cells_cover_every_checked_cell():
    for name in CHAPTERS:
        cells = _checked_cells(name)
        assert cells, f"{name} has no nbval-check-output cell"
        assert set(cells) == {cid for (ch, cid) in CELLS if ch == name}, name
        for cid, src in cells.items():
            assert CELLS[(name, cid)] in globals(), CELLS[(name, cid)]
            for fn in CELL_FUNCTIONS[(name, cid)]:
                assert fn in src, f"{name} cell {cid} no longer prints through {fn}"


# ------------------------------------------------------------------------------------------
# Chapter 4: Propositions 4.1 and 4.2, and the bounds (17)-(19) on one toy process
# ------------------------------------------------------------------------------------------

SMALL = dict(n_instances=40, seed=11, rhos=(0.9, 0.99), steps=(4, 8))
# Wrong: Brand updates without any truncation (B_k := M~_B,k), the wrong process of the propositions' tests
_untruncated_process = _no_truncation_at_all


def _lines(verdicts: dict) -> str:
    return format_verdicts(verdicts)


def test_prop_4_1_cell_turns_false():
    labels = dict(no_violation="Proposition 4.1: no violation", errata="the k-independent reading of (16) is refuted")
    good = proposition_verdicts(P.check_prop_4_1(**SMALL), **labels)
    assert good == {labels["no_violation"]: True, labels["errata"]: True}
    bad = proposition_verdicts(P.check_prop_4_1(**SMALL, process=_untruncated_process), **labels)
    # without truncation the decomposition (14)+(16) no longer holds
    assert bad[labels["no_violation"]] is False
    assert _lines(good) != _lines(bad) and ": False" in _lines(bad)
    res = P.check_prop_4_1(**SMALL)
    res.errata[0].refuted = 0  # a check in which the k-independent reading was never refuted
    assert proposition_verdicts(res, **labels) == {labels["no_violation"]: True, labels["errata"]: False}


def test_prop_4_2_cell_turns_false():
    labels = dict(no_violation="Proposition 4.2 and (19): no violation",
                  errata="both as-written steps of (S.29) are refuted")
    good = proposition_verdicts(P.check_prop_4_2(**SMALL), **labels)
    assert all(good.values())
    bad = proposition_verdicts(P.check_prop_4_2(**SMALL, process=_untruncated_process), **labels)
    assert bad[labels["no_violation"]] is False
    res = P.check_prop_4_2(**SMALL)
    res.errata[0].refuted = 0  # a check in which one as-written step was never refuted
    assert proposition_verdicts(res, **labels)[labels["errata"]] is False
    res.errata.clear()  # no erratum rows at all: nothing was refuted
    assert proposition_verdicts(res, **labels)[labels["errata"]] is False
    assert ": False" in _lines(bad)


def _toy_terms(process=toy.bkfac_process, dim=40, batch=4, r=6, steps=30, rho=0.95):
    """Chapter 4's toy computation (cell dc59a935), small."""
    g = torch.Generator().manual_seed(0)
    stream = toy.ToyEA(dim=dim, batch=batch, rho=rho, decay="power", rate=1.0, noise=0.02, rotation=0.3).sample(steps, g)
    exact = toy.ea_process(stream, rho)
    none = toy.rsvd_then_no_update(stream, rho, r)
    proc = process(stream, rho, r)
    bupd = [none[0]] + proc.mtilde[1:]
    fro = lambda X: float(torch.linalg.matrix_norm(X))  # noqa: E731
    E_none = [fro(E) for E in toy.no_update_error_terms(stream, r)]
    E_b = [fro(E) for E in toy.bupdate_error_terms(proc, steps - 1)[:-1]]
    mm = [fro(M @ M.T) for M in stream]
    worst17 = [math.sqrt(mm[j] ** 2 + fro(none[0]) ** 2) for j in range(steps)]
    tot_none = [fro(exact[k] - none[k]) for k in range(steps)]
    tot_b = [fro(exact[k] - bupd[k]) for k in range(steps)]

    def bound19(E, k):
        return rho**k * E_none[0] + (1 - rho) * sum(rho ** (k - j) * E[j] for j in range(1, k + 1))

    return dict(E_b=E_b, mm=mm, E_none=E_none, worst17=worst17, tot_none=tot_none,
                b19_none=[bound19(E_none, k) for k in range(steps)], tot_b=tot_b,
                b19_b=[bound19(E_b[:k] + [0.0], k) for k in range(steps)],
                slack=[1e-10 * fro(M) for M in exact])


def _worst_truncation_process(batches, rho, r, overwrite_at=()):
    """Wrong: keeps the r *smallest* eigenpairs of M~_B,k (not an optimal truncation)."""
    proc = toy.BKFACProcess(rho=rho, rank=r)
    B = None
    for k, M in enumerate(batches):
        mt = M @ M.mT if k == 0 else rho * B + (1 - rho) * M @ M.mT
        w, V = torch.linalg.eigh(mt)
        keep = torch.argsort(w)[: r] if k else torch.argsort(w, descending=True)[: r]
        B = (V[:, keep] * w[keep]) @ V[:, keep].mT
        proc.mtilde.append(mt)
        proc.b.append(B)
    return proc


def test_toy_bounds_cell_turns_false():
    keys = ["B-updates: every ||E_j||_F below ||M_j M_j^T||_F",
            "no update: every ||E_j||_F below the worst case (17)", "both totals below their bound (19)"]
    good = _toy_terms()
    assert toy_bound_verdicts(**good) == dict.fromkeys(keys, True)
    # a process whose truncation keeps the wrong eigenpairs breaks (18)
    wrong = toy_bound_verdicts(**_toy_terms(_worst_truncation_process))
    assert wrong[keys[0]] is False
    # each line on its own: data where only its claim is false
    for i, (name, change) in enumerate([("E_b", lambda d: [2 * m + 1 for m in d["mm"]][: len(d["E_b"])]),
                                        ("E_none", lambda d: [2 * w for w in d["worst17"]]),
                                        ("tot_b", lambda d: [2 * b + 1 for b in d["b19_b"]])]):
        bad = dict(good, **{name: change(good)})
        out = toy_bound_verdicts(**bad)
        assert out[keys[i]] is False and all(out[k] for k in keys if k != keys[i]), name
        assert format_verdicts(out) != format_verdicts(toy_bound_verdicts(**good))
    with pytest.raises(ValueError, match="one value per step"):
        toy_bound_verdicts(**dict(good, slack=good["slack"][:-1]))


# ------------------------------------------------------------------------------------------
# Chapter 6: Table 2 against the runs' files, and the H200 t_epoch orderings
# ------------------------------------------------------------------------------------------


def _seed(t60, t75, secs, final=0.76):
    return {"summary": {"time_to_60": t60, "epochs_to_60": 2, "time_to_70": 900.0, "epochs_to_70": 4,
                        "time_to_75": t75, "epochs_to_75": 7 if t75 else None, "final_test_acc": final},
            "history": [{"epoch_seconds": x} for x in secs]}


def test_table2_checks_cell_turns_false():
    prof = load_profile("cpu")
    keys = ["60", "70", "75"]
    runs = {"b-kfac": [_seed(400.0, 2000.0, [200, 210]), _seed(420.0, None, [190, 200])],
            "k-fac": [_seed(800.0, 3000.0, [400, 420])]}
    rows = table2_over_seeds(prof, runs)
    line = "Table 2 recomputed from the runs' own files agrees"
    assert table2_disagreements(rows, runs, keys) == []
    # a table that says what the files do not: a miscounted hit, a wrong mean time, a lost epoch
    for key, value in (("hits_75", 2), ("time_to_60_mean", 999.0), ("t_epoch_samples", 3), ("n_seeds", 3)):
        bad = [dict(r) for r in rows]
        bad[0][key] = value
        probs = table2_disagreements(bad, runs, keys)
        assert probs and "b-kfac" in probs[0], key
        assert format_verdicts({line: not probs}) == f"{line}: False"
    assert table2_disagreements(rows[:1], runs, keys)  # a run missing from the table
    sd = table2_disagreements(rows, {**runs, "b-kfac": runs["b-kfac"] + [_seed(1000.0, 2100.0, [205])]}, keys)
    assert any("time to 60%" in p for p in sd) and statistics.fmean([400, 420, 1000]) > 410

    # the H200 column: each ordering false on timings where it is false
    h200 = {"k-fac": 14.8, "r-kfac": 8.5, "b-kfac": 8.4, "b-kfac-c": 8.6, "b-r-kfac": 10.2, "sgd": 4.5}
    good = t_epoch_verdicts(h200, "H200, paper's model")
    assert all(good.values()) and len(good) == 3
    for change, which in (({"r-kfac": 15.0}, "k-fac has the largest"), ({"b-kfac-c": 8.0}, "b-kfac has the smallest"),
                          ({"b-r-kfac": 16.0}, "every b-variant")):
        out = t_epoch_verdicts({**h200, **change}, "H200, paper's model")
        flipped = [k for k, v in out.items() if not v]
        assert any(which in k for k in flipped), change
        assert format_verdicts(out) != format_verdicts(good)
    with pytest.raises(ValueError, match="k-fac, b-kfac"):
        t_epoch_verdicts({"k-fac": 1.0, "sgd": 0.5}, "x")


def test_the_committed_h200_timings_are_read_by_the_cell():
    """The cell reads the stored bench step of the paper's model on the H200: it exists and
    holds the runs the verdicts need."""
    from bkfac.experiments.report import bench_root, read_bench_step

    step = read_bench_step(bench_root() / "cuda-h200" / "step")
    t = {r: step.epoch_seconds(r) for r in step.rows}
    assert {"k-fac", "b-kfac", "r-kfac"} <= set(t) and all(math.isfinite(v) and v > 0 for v in t.values())
    assert "H200" in step.machine
    assert set(t_epoch_verdicts(t, "H200")) == {
        "H200: k-fac has the largest t_epoch of the K-FAC runs", "H200: b-kfac has the smallest t_epoch of the K-FAC runs",
        "H200: every b-variant's t_epoch is below k-fac's"}
