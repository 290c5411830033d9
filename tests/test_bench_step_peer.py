"""``bkfac bench step`` and ``bkfac bench peer`` run end to end (``--quick``) and write their
tables; the amortisation over step kinds is checked against brute-force counting and the
representative steps really fire their events. No timing is asserted."""

from __future__ import annotations

import copy
import csv
import math
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from bkfac import make_optimizer
from bkfac.bench import peer as peer_mod
from bkfac.bench import step as step_mod
from bkfac.cli import main
from bkfac.experiments.models import build_model
from bkfac.experiments.profiles import load_profile


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


# -- step kinds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("periods", [
    {"t_updt": 25, "t_inv": 250, "t_brand": 125},  # b-kfac, cpu/paper profile
    {"t_updt": 25, "t_inv": 250, "t_brand": 125, "t_corct": 500},  # b-kfac-c
    {"t_updt": 2, "t_inv": 4, "t_brand": 2, "t_rsvd": 4},  # b-r-kfac, smoke profile
    {"update_freq": 200},
    {},
])
def test_step_kinds_match_brute_force(periods):
    kinds = step_mod.step_kinds(periods)
    cycle = math.lcm(*periods.values()) if periods else 1
    assert all(k.cycle == cycle for k in kinds)
    assert sum(k.count for k in kinds) == cycle
    assert math.isclose(sum(k.frequency for k in kinds), 1.0)
    brute: dict[tuple, list[int]] = {}
    for k in range(1, cycle + 1):
        brute.setdefault(tuple(n for n, p in periods.items() if k % p == 0), []).append(k)
    assert {k.events: (k.count, k.rep_step) for k in kinds} == {e: (len(ks), ks[0]) for e, ks in brute.items()}
    for k in kinds:  # the representative step fires exactly the kind's events
        assert tuple(n for n, p in periods.items() if k.rep_step % p == 0) == k.events
    assert [k.count for k in kinds] == sorted((k.count for k in kinds), reverse=True)


def test_step_kinds_b_kfac_counts():
    kinds = {k.name: k.count for k in step_mod.step_kinds({"t_updt": 25, "t_inv": 250, "t_brand": 125})}
    assert kinds == {"plain": 240, "t_updt": 8, "t_updt+t_brand": 1, "t_updt+t_inv+t_brand": 1}


def test_step_kinds_bad_period():
    with pytest.raises(ValueError, match="t_inv"):
        step_mod.step_kinds({"t_updt": 2, "t_inv": 0})


def test_optimizer_periods_and_steps_per_epoch():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkc = make_optimizer("b-kfac-c", model)
        seng = make_optimizer("seng", nn.Sequential(nn.Linear(6, 3)))
    assert step_mod.optimizer_periods(bkc) == {"t_updt": 25, "t_inv": 250, "t_brand": 125, "t_corct": 500}
    assert step_mod.optimizer_periods(seng) == {"update_freq": 200}
    assert step_mod.optimizer_periods(make_optimizer("sgd", nn.Linear(2, 2))) == {}
    bkc.remove_hooks()
    assert step_mod.steps_per_epoch(load_profile("cpu")) == 50000 // 256
    assert step_mod.steps_per_epoch(load_profile("smoke")) == 640 // 64


def _train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_set_step_counter_fires_the_events():
    """Setting the counter to a representative step makes the optimizer do that step's work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    opt = make_optimizer("k-fac", model, t_updt=2, t_inv=4, lr=0.01)
    _train_step(model, opt, x, y)  # step 0 initialises
    inv = opt.layers[0].inv_A
    before, factor = inv.updates, inv.factor.clone()
    step_mod.set_step_counter(opt, 5)  # plain step: no statistics, no eigh
    _train_step(model, opt, x, y)
    assert inv.updates == before and torch.equal(inv.factor, factor)
    step_mod.set_step_counter(opt, 6)  # t_updt only: the EA factor moves, no eigh
    _train_step(model, opt, 2 * x, y)  # new inputs (the same x would leave the EA factor at its fixed point)
    assert inv.updates == before and not torch.equal(inv.factor, factor)
    step_mod.set_step_counter(opt, 8)  # t_updt + t_inv: eigh
    _train_step(model, opt, x, y)
    assert inv.updates == before + 1
    opt.remove_hooks()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seng = make_optimizer("seng", model, update_freq=3, col_sample_size=4)
    for k, refresh in ((0, True), (4, False), (6, True)):
        step_mod.set_step_counter(seng, k)
        _train_step(model, seng, x, y)
        assert (seng.timer.last["statistics"] > 0) == refresh, k


# -- bench step --quick ----------------------------------------------------------------------------
def test_bench_step_quick(tmp_path, capsys):
    rc = main(["bench", "step", "--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    cols, rows = _read(tmp_path / "step.csv")
    assert cols == step_mod.SUMMARY_COLUMNS
    assert [r["optimizer"] for r in rows] == list(step_mod.OPTIMIZERS)
    assert len(rows) == 8
    by = {r["optimizer"]: r for r in rows}
    for r in rows:
        assert r["profile"] == "smoke" and int(r["steps_per_epoch"]) == 10
        for p in ("data", "forward_backward"):
            assert float(r[f"{p}_s"]) > 0, (r["optimizer"], p)
        assert float(r["step_s"]) > 0 and float(r["first_step_s"]) > 0
        phases = sum(float(r[f"{p}_s"]) for p in step_mod.PHASES)
        assert math.isclose(float(r["step_s"]), phases, rel_tol=1e-9)
        assert math.isclose(float(r["epoch_s"]), 10 * float(r["step_s"]), rel_tol=1e-9)
        assert math.isclose(float(r["ratio_to_sgd"]), float(r["epoch_s"]) / float(by["sgd"]["epoch_s"]),
                            rel_tol=1e-9)
    assert float(by["sgd"]["rest_s"]) > 0 and float(by["sgd"]["statistics_s"]) == 0
    assert math.isclose(float(by["sgd"]["ratio_to_sgd_common_fb"]), 1.0, rel_tol=1e-9)
    for r in rows:
        own = sum(float(r[f"{p}_s"]) for p in ("statistics", "inverse", "precondition", "rest"))
        assert math.isclose(float(r["optimizer_s"]), own, rel_tol=1e-9)
    for name in ("k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c", "seng"):
        for p in ("statistics", "inverse", "precondition"):
            assert float(by[name][f"{p}_s"]) > 0, (name, p)
    assert float(by["k-fac"]["ratio_to_kfac"]) == 1.0
    kcols, kinds = _read(tmp_path / "step_kinds.csv")
    assert kcols == step_mod.KIND_COLUMNS
    for name in step_mod.OPTIMIZERS:
        mine = [k for k in kinds if k["optimizer"] == name]
        assert sum(int(k["count"]) for k in mine) == int(mine[0]["cycle"]) == int(by[name]["cycle"])
        assert len(mine) == int(by[name]["kinds"])
        assert all(int(k["runs"]) >= 1 for k in mine)
        # the amortised step is the frequency-weighted mean of the kinds
        mean = sum(float(k["frequency"]) * float(k["step_s"]) for k in mine)
        assert math.isclose(mean, float(by[name]["step_s"]), rel_tol=1e-9)
    # the smoke profile's periods: k-fac T_updt 2, T_inv 4 -> plain x2, t_updt x1, t_updt+t_inv x1
    assert {k["kind"]: int(k["count"]) for k in kinds if k["optimizer"] == "k-fac"} == {
        "plain": 2, "t_updt": 1, "t_updt+t_inv": 1}
    tcols, targets = _read(tmp_path / "step_targets.csv")
    assert tcols == step_mod.TARGET_COLUMNS and len(targets) == 4
    assert all(t["verdict"] in ("PASS", "FAIL") for t in targets)
    # DESIGN's second rung on CPU; each verdict is the comparison of the value with it
    assert [t["threshold"] for t in targets] == ["<= 1.15", "<= 1.15", "<= 0.45", "<= 0.45"]
    assert all((t["verdict"] == "PASS") == (float(t["value"]) <= float(t["threshold"][3:])) for t in targets)
    assert (tmp_path / "step.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "b-kfac t_epoch / sgd t_epoch" in out and "synthetic" in out and "load average" in out
    # the log is what the part printed (all of it, and only it: the line naming the log is not in it)
    log = (tmp_path / "step.log").read_text()
    assert log.startswith("bkfac bench step") and log in out and "load average after the run" in log
    assert "step.log" not in log and "step.log" in out.split(log, 1)[1]
    # the profile measured (the chapters look a stored bench up by its name and model)
    assert yaml.safe_load((tmp_path / "profile.yaml").read_text()) == load_profile("smoke").raw


# -- bench ab ------------------------------------------------------------------------------------------
def test_bench_ab_quick_builds_the_variant_it_names(tmp_path, capsys, monkeypatch):
    """``bench ab --set alg8_backward=false``: A is b-kfac as the profile has it, B the same with
    PyTorch's backward; both timed, the ratio is B's epoch over A's, its spread brackets it, and
    B's optimizer really was built with the setting (A's with the default)."""
    from bkfac.bench import ab as ab_mod

    built = []
    real = step_mod._make_bench
    monkeypatch.setattr(step_mod, "_make_bench", lambda name, *a, **k: built.append(real(name, *a, **k)) or built[-1])
    rc = main(["bench", "ab", "--quick", "--repeats", "2", "--set", "alg8_backward=false", "--out", str(tmp_path)])
    assert rc == 0
    cols, rows = _read(tmp_path / "ab.csv")
    assert cols == ab_mod.COLUMNS and [r["variant"] for r in rows] == ["A", "B"]
    assert rows[0]["settings"] == "as the profile" and rows[1]["settings"] == "alg8_backward=False"
    assert float(rows[0]["ratio_to_a"]) == 1.0
    assert math.isclose(float(rows[1]["ratio_to_a"]), float(rows[1]["epoch_s"]) / float(rows[0]["epoch_s"]))
    assert float(rows[1]["ratio_to_a_min"]) <= float(rows[1]["ratio_to_a_max"])
    assert [b.opt.alg8_backward for b in built] == [True, False]
    assert "alg8_backward=False" in capsys.readouterr().out


def test_bench_ab_refuses_bad_settings(tmp_path, capsys):
    assert main(["bench", "ab", "--quick", "--out", str(tmp_path)]) == 2
    assert "at least one --set" in capsys.readouterr().err
    assert main(["bench", "ab", "--quick", "--set", "alg8_backward", "--out", str(tmp_path)]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "ab", "--quick", "--optimizer", "k-fac", "--set", "t_brand=2", "--out", str(tmp_path)]) == 2
    assert "t_brand" in capsys.readouterr().err
    assert not (tmp_path / "ab.csv").exists()


# -- bench peer ----------------------------------------------------------------------------------------
def test_bench_peer_quick_or_message(tmp_path, capsys):
    """With ASDL installed: the quick comparison runs and the factors agree (float64); without
    it: the clear message and exit status 2."""
    rc = main(["bench", "peer", "--quick", "--repeats", "1", "--dtype", "float64", "--out", str(tmp_path)])
    if peer_mod.load_peer() is None:
        assert rc == 2
        err = capsys.readouterr().err
        assert "pip install asdfghjkl" in err and "not installed" in err
        assert not (tmp_path / "peer.csv").exists()
        return
    assert rc == 0
    cols, rows = _read(tmp_path / "peer.csv")
    assert cols == peer_mod.TIMING_COLUMNS
    assert [r["implementation"] for r in rows] == ["bkfac k-fac", "bkfac k-fac (cholesky)", "ASDL k-fac"]
    for r in rows:
        assert float(r["step_s"]) > 0 and float(r["forward_backward_s"]) > 0
        assert float(r["inverse_s"]) > 0 and float(r["precondition_s"]) > 0
    assert float(rows[0]["statistics_s"]) > 0 and float(rows[1]["statistics_s"]) > 0
    fcols, factors = _read(tmp_path / "peer_factors.csv")
    assert fcols == peer_mod.FACTOR_COLUMNS
    assert {f["kind"] for f in factors} == {"conv2d", "linear"}
    assert len(factors) == 2 * 4  # smoke model: 2 convs + fc0 + fc1, A and G each
    for f in factors:
        assert float(f["max_rel_diff"]) < 1e-10, f
    _, targets = _read(tmp_path / "peer_targets.csv")
    assert targets[0]["verdict"] in ("PASS", "FAIL")
    assert "max rel diff" in capsys.readouterr().out


def test_bench_peer_on_a_channels_last_profile(tmp_path, capsys):
    """A profile that stores its model channels_last (as ``cpu`` does) still compares with ASDL,
    whose K-FAC needs NCHW weights: the part runs all three on NCHW storage and says so."""
    if peer_mod.load_peer() is None:
        pytest.skip("needs the peer (pip install asdfghjkl); its absence is tested above")
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["model"]["channels_last"] = True
    path = tmp_path / "smoke-cl.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main(["bench", "peer", "--profile", str(path), "--quick", "--repeats", "1", "--dtype", "float64",
               "--out", str(tmp_path)])
    assert rc == 0
    assert "storage: NCHW for all three" in capsys.readouterr().out
    _, factors = _read(tmp_path / "peer_factors.csv")
    assert factors and all(float(f["max_rel_diff"]) < 1e-10 for f in factors)


def test_bench_peer_not_installed_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, peer_mod.PEER_MODULE, None)  # importing it now raises ImportError
    assert peer_mod.load_peer() is None
    rc = main(["bench", "peer", "--quick", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ASDL" in err and "pip install asdfghjkl==" in err
    assert not (tmp_path / "peer.csv").exists()


def test_compare_factors_detects_a_wrong_factor(tmp_path):
    """The factor check is not vacuous: agreement to rounding in float64, and a perturbed
    peer factor shows up in exactly that factor."""
    asdl = peer_mod.load_peer()
    if asdl is None:  # the check needs the peer; without it the part must say so
        assert main(["bench", "peer", "--quick", "--out", str(tmp_path)]) == 2
        return
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).double()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    x, y = torch.randn(7, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (7,))
    opt = peer_mod.ours_kfac(ours, load_profile("smoke"))
    _train_step(ours, opt, x, y)
    peer = peer_mod.peer_kfac(asdl, theirs, batch_size=7, rho=opt.rho, lr=0.0, weight_decay=0.0, device="cpu")
    peer.step(x, y)
    rows = peer_mod.compare_factors(opt, peer)
    assert {(r["layer"], r["factor"]) for r in rows} == {("0", "A"), ("0", "G"), ("3", "A"), ("3", "G")}
    assert max(r["max_rel_diff"] for r in rows) < 1e-10
    theirs[3].fisher.kron.A[0, 0] += 1.0
    bad = [(r["layer"], r["factor"]) for r in peer_mod.compare_factors(opt, peer) if r["max_rel_diff"] > 1e-3]
    assert bad == [("3", "A")]
    opt.remove_hooks()


# -- bench stats --quick ---------------------------------------------------------------------------
def test_bench_stats_quick_times_both_routes_of_every_conv_layer(tmp_path):
    """``bench stats``: a row per conv layer of the smoke model and a total, both routes timed,
    the ratio their medians', and the two results equal in float64."""
    from bkfac.bench import stats as stats_mod

    rc = main(["bench", "stats", "--quick", "--repeats", "2", "--dtype", "float64", "--out", str(tmp_path)])
    assert rc == 0
    cols, rows = _read(tmp_path / "stats.csv")
    assert cols == stats_mod.COLUMNS
    convs = [n for n, m in build_model(load_profile("smoke").model).named_modules() if isinstance(m, nn.Conv2d)]
    assert [r["layer"] for r in rows] == convs + ["total"]
    for r in rows:
        assert float(r["patches_s"]) > 0 and float(r["shifted_s"]) > 0
        assert math.isclose(float(r["ratio"]), float(r["patches_s"]) / float(r["shifted_s"]), rel_tol=1e-9)
        assert float(r["ratio_min"]) <= float(r["ratio_max"])
        assert float(r["max_rel_diff"]) < 1e-12
    assert math.isclose(float(rows[-1]["patches_s"]), sum(float(r["patches_s"]) for r in rows[:-1]), rel_tol=1e-9)
    assert (tmp_path / "stats.log").read_text().startswith("bkfac bench stats")
