"""The deviations table is generated from the profiles: change a profile value, the table changes."""

import copy

from bkfac.experiments.deviations import PAPER_SETUP, deviations, write_deviations
from bkfac.experiments.profiles import Profile, load_profile
from bkfac.experiments.results import read_csv


def _by_aspect(rows):
    return {r["aspect"]: r for r in rows}


def test_paper_profile_departs_only_where_it_must(tmp_path):
    rows = _by_aspect(deviations(load_profile("paper")))
    assert set(rows) == set(PAPER_SETUP)
    # empirical Fisher by default; the EA from the identity, as the author's code (eq. (5) as printed: the first batch)
    assert {a for a, r in rows.items() if r["differs"]} == {"Fisher", "K-factor start"}
    assert "author's code" in rows["K-factor start"]["ours"]
    cpu = _by_aspect(deviations(load_profile("cpu")))
    assert cpu["epochs"]["differs"] and cpu["model"]["differs"] and cpu["hardware"]["differs"]
    assert cpu["model"]["ours"].endswith("FC0 4096 -> 2048")
    path = write_deviations(load_profile("cpu"), tmp_path / "deviations.csv")
    assert [r["aspect"] for r in read_csv(path)] == list(PAPER_SETUP)


def test_changing_a_profile_value_changes_the_table():
    prof = load_profile("cpu")
    before = _by_aspect(deviations(prof))
    raw = copy.deepcopy(prof.raw)
    raw["kfac"]["lr_schedule"] = {1: 0.3, 2: 0.2}
    raw["kfac"]["fisher"] = "mc"
    raw["train"]["seeds"] = [0, 1, 2]
    after = _by_aspect(deviations(Profile(raw["name"], raw)))
    assert after["learning rate (K-FACs)"]["ours"] == "0.3, 0.2 from epoch 2" != before["learning rate (K-FACs)"]["ours"]
    assert before["Fisher"]["differs"] and not after["Fisher"]["differs"]
    assert after["Table 2 runs per optimizer"]["ours"] == "3"
    unchanged = set(PAPER_SETUP) - {"learning rate (K-FACs)", "Fisher", "Table 2 runs per optimizer"}
    assert all(after[a] == before[a] for a in unchanged)
