"""The K-factor error study (Sec. 4.2-4.3): metrics against brute force in float64, a shadow equal
to the reference measures zero, r-kfac without resets drifts away on a rotating stream, the
summaries (Table 1, orderings, figures) and the smoke run end to end.

The data-only core (:func:`error_window_metrics`) is fed synthetic K-factor streams; the smoke
run uses a small synthetic CIFAR-shaped data set (monkeypatched loader) unless
``BKFAC_DATA_DIR`` points at real CIFAR-10.
"""

import json
import math
import os

import pytest
import torch

import bkfac.experiments.error_study as es
from bkfac.cli import main
from bkfac.experiments.data import CIFAR10_CLASSES, CIFAR10Arrays
from bkfac.experiments.error_study import (
    PAPER_ALGORITHMS,
    ErrorWindow,
    HistoryShadows,
    ShadowSpec,
    StudyStream,
    add_block_averages,
    check_orderings,
    error_window_metrics,
    inverse_error,
    lanczos_lambda_max,
    plot_error_study,
    step_errors,
    stream_error_metrics,
    table1,
)
from bkfac.experiments.results import read_csv

F64 = torch.float64
KFAC_T = ShadowSpec("k-fac-1t", "eigh", (("t_inv", 1),))  # the benchmark itself


@pytest.fixture
def one_thread():
    """Small matrices on 2 shared, busy cores: OpenMP spin-waiting makes every BLAS call of a
    2-thread process several times slower; one thread gives the same results much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rotating_stream(W, drift, dA=50, dG=24, n=12, seed=1, dtype=F64):
    """Batches A_j = Q_j diag(0.7^i) Z_j / sqrt(n) (fresh Gaussian Z_j) whose eigenbasis Q_j
    rotates by exp(drift K) per step (K skew-symmetric, unit spectral norm); likewise G_j.
    Items (A_j, G_j, (G_j, A_j)): the gradient is J = G_j A_j^T (eq. 20)."""
    g = torch.Generator().manual_seed(seed)

    def rot(d):
        K = torch.randn(d, d, generator=g, dtype=dtype)
        K = (K - K.T) / 2
        return torch.linalg.matrix_exp(drift * K / torch.linalg.matrix_norm(K, 2))

    RA, RG = rot(dA), rot(dG)
    sA, sG = 0.7 ** torch.arange(dA, dtype=dtype), 0.7 ** torch.arange(dG, dtype=dtype)
    QA, QG = torch.eye(dA, dtype=dtype), torch.eye(dG, dtype=dtype)
    out = []
    for _ in range(W):
        A = QA @ (sA[:, None] * torch.randn(dA, n, generator=g, dtype=dtype)) / math.sqrt(n)
        G = QG @ (sG[:, None] * torch.randn(dG, n, generator=g, dtype=dtype)) / math.sqrt(n)
        out.append((A, G, (G, A)))
        QA, QG = RA @ QA, RG @ QG
    return out


def warm_ea(stream, rho, t):
    """EA factors (eq. 5, period t) over a warm-up stream, brute force."""
    MA = MG = None
    for A, G, _ in stream[::t]:
        MA = A @ A.T if MA is None else rho * MA + (1 - rho) * A @ A.T
        MG = G @ G.T if MG is None else rho * MG + (1 - rho) * G @ G.T
    return MA, MG


WIN = dict(t_updt=2, rho=0.9, rank=8, oversample=4, power_iters=3, phi=0.1)
WIN_STREAM = {k: v for k, v in WIN.items() if k != "phi"}


# -- building blocks ---------------------------------------------------------------------------
def test_lanczos_matches_eigvalsh(one_thread):
    g = torch.Generator().manual_seed(0)
    d = 400  # above the eigvalsh shortcut
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    ev = torch.cat([torch.tensor([5.0, 4.99, 4.98], dtype=F64), torch.rand(d - 3, generator=g, dtype=F64) * 4.9])
    M = (Q * ev) @ Q.T
    lam = lanczos_lambda_max(M)
    assert abs(lam - 5.0) / 5.0 < 1e-9
    assert lanczos_lambda_max(M.float()) == pytest.approx(5.0, rel=1e-5)
    with pytest.raises(ValueError, match="square"):
        lanczos_lambda_max(torch.zeros(3, 4))


def test_step_errors_and_inverse_error_by_hand():
    s_ref = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=F64)  # ||s_ref|| = 5
    s = torch.tensor([[3.0, 0.0], [0.0, 4.0 + 1e-3]], dtype=F64)
    m3, m4 = step_errors(s, s_ref)
    assert m3 == pytest.approx(1e-3 / 5, rel=1e-12)
    cos = float((s * s_ref).sum() / (s.norm() * s_ref.norm()))
    assert m4 == pytest.approx(1 - cos, rel=1e-6)
    assert step_errors(2.0 * s_ref, s_ref)[1] == pytest.approx(0.0, abs=1e-15)  # angle only
    assert inverse_error(s, s_ref) == pytest.approx(m3, rel=1e-12)


# -- (a) a shadow identical to the reference measures zero --------------------------------------
@pytest.mark.parametrize("dense_j", [False, True])
def test_identical_shadow_has_zero_error(one_thread, dense_j):
    stream = rotating_stream(40, drift=0.02)
    if dense_j:
        stream = [(A, G, G @ A.T) for A, G, _ in stream]
    rows = stream_error_metrics(stream, [20], window=20, algorithms=[KFAC_T, PAPER_ALGORITHMS[0]], **WIN)
    same = [r for r in rows if r["algorithm"] == "k-fac-1t"]
    assert len(same) == 20
    for r in same:
        for m in (1, 2, 3, 4):
            assert r[f"metric{m}"] < 1e-6, (r["step"], m, r[f"metric{m}"])
    other = [r for r in rows if r["algorithm"] == "b-kfac"]
    assert max(r["metric1"] for r in other) > 1e-4  # the metric can see an approximation


# -- (b) r-kfac without resets drifts away --------------------------------------------------------
def test_rkfac_without_reset_grows_on_drifting_stream(one_thread):
    stream = rotating_stream(100, drift=0.02)
    MA, MG = warm_ea(stream[:40], WIN["rho"], WIN["t_updt"])
    algos = [a for a in PAPER_ALGORITHMS if a.key in ("r-kfac-30t", "r-kfac-1t")]
    rows = error_window_metrics(MA, MG, stream[40:], algorithms=algos, **WIN)  # 60 steps < 30 t
    for m in ("metric1", "metric2", "metric3_block", "metric4_block"):
        growth = {}
        for a in ("r-kfac-30t", "r-kfac-1t"):
            x = [r[m] for r in rows if r["algorithm"] == a]
            growth[a] = (sum(x[-20:]) / 20) / (sum(x[:20]) / 20)
        assert growth["r-kfac-30t"] > 1.4, (m, growth)
        assert growth["r-kfac-1t"] < 1.3, (m, growth)  # a fresh RSVD every block does not drift


# -- (c) every metric against a brute-force dense computation ----------------------------------------
def _brute_damped_inverse(U, d, phi):
    """(U diag(d) U^T + lam I + min(d) (I - U U^T))^{-1}: damping lam = phi d_max and spectrum
    continuation (Sec. 3.5) written out, inverted explicitly."""
    dim = U.shape[0]
    lam = phi * float(d[0])
    P = U @ U.T
    M = (U * d) @ U.T + lam * torch.eye(dim, dtype=F64) + float(d.min()) * (torch.eye(dim, dtype=F64) - P)
    return torch.linalg.inv(M)


def test_metrics_match_brute_force(one_thread):
    t, phi = WIN["t_updt"], WIN["phi"]
    stream = rotating_stream(44, drift=0.03)
    ss = StudyStream(window=30, **WIN_STREAM)  # still open at the last step checked
    ea = {"A": None, "G": None}
    checked = 0
    for k, (A, G, J) in enumerate(stream):
        if k % t == 0:  # brute-force EA of eq. (5), kappa(0) = 1
            ea = {f: X @ X.T if ea[f] is None else WIN["rho"] * ea[f] + (1 - WIN["rho"]) * X @ X.T
                  for f, X in (("A", A), ("G", G))}
        rows, _ = ss.step(k, A if k % t == 0 else None, G if k % t == 0 else None, J, phi=phi,
                          start=20 if k == 20 else None)
        j = k - 20
        if j not in (0, 1, 9, 10, 23):
            continue
        win = ss.active[20]
        for f in ("A", "G"):
            assert torch.allclose(win.ea[f], ea[f], rtol=1e-12, atol=1e-14)
        ref = {f: torch.linalg.inv(ea[f] + phi * float(torch.linalg.eigvalsh(ea[f])[-1]) * torch.eye(ea[f].shape[0], dtype=F64))
               for f in ("A", "G")}
        Jd = G @ A.T
        s_ref = ref["G"] @ Jd @ ref["A"]
        for r in rows:
            inv = {f: _brute_damped_inverse(*win.representation(r["algorithm"], f), phi) for f in ("A", "G")}
            s = inv["G"] @ Jd @ inv["A"]
            want1 = float(torch.linalg.matrix_norm(inv["A"] - ref["A"]) / torch.linalg.matrix_norm(ref["A"]))
            want2 = float(torch.linalg.matrix_norm(inv["G"] - ref["G"]) / torch.linalg.matrix_norm(ref["G"]))
            want3 = float(torch.linalg.matrix_norm(s - s_ref) / torch.linalg.matrix_norm(s_ref))
            want4 = 1.0 - float((s * s_ref).sum() / (torch.linalg.matrix_norm(s) * torch.linalg.matrix_norm(s_ref)))
            assert r["metric1"] == pytest.approx(want1, rel=1e-7, abs=1e-12), (j, r["algorithm"])
            assert r["metric2"] == pytest.approx(want2, rel=1e-7, abs=1e-12), (j, r["algorithm"])
            assert r["metric3"] == pytest.approx(want3, rel=1e-7, abs=1e-12), (j, r["algorithm"])
            assert r["metric4"] == pytest.approx(want4, rel=1e-5, abs=1e-12), (j, r["algorithm"])
            checked += 1
    assert checked == 5 * len(PAPER_ALGORITHMS)


def test_shadow_schedules_and_seeds(one_thread):
    """Shadows update on their own periods (window-relative steps) and share the window's EA."""
    t = WIN["t_updt"]
    stream = rotating_stream(32, drift=0.02)
    ss = StudyStream(window=22, **WIN_STREAM)
    for k, (A, G, J) in enumerate(stream[:10]):
        ss.step(k, A if k % t == 0 else None, G if k % t == 0 else None, J, phi=WIN["phi"])
    A0, G0, J0 = stream[10]
    ss.step(10, A0, G0, J0, phi=WIN["phi"], start="w")
    win = ss.active["w"]
    before = {a.key: win.representation(a.key, "A")[0] for a in PAPER_ALGORITHMS}
    for j, (A, G, J) in enumerate(stream[11:], start=1):
        ss.step(10 + j, A if j % t == 0 else None, G if j % t == 0 else None, J, phi=WIN["phi"])
        if j == 2 * t:  # after two statistics steps
            after = {a.key: win.representation(a.key, "A")[0] for a in PAPER_ALGORITHMS}
            changed = {k for k in before if after[k] is not before[k]}
            assert changed == {"b-kfac", "b-r-kfac", "b-kfac-c", "r-kfac-1t"}
    # r-kfac T_inv = 30t never refreshed inside this window: its A representation is the seed RSVD
    assert win.shadows["r-kfac-30t"]["A"].inv.updates == 1
    assert win.shadows["k-fac-5t"]["A"].inv.updates == 3  # at j = 0, 5t = 10 and 20 (j runs to 21)
    assert win.shadows["r-kfac-5t"]["A"].inv.factor is win.ea["A"]  # the shared EA factor
    assert win.shadows["b-kfac"]["A"].inv.factor is None  # low-memory b-kfac holds none
    # b-r-kfac starts with Alg. 5's heavy step: width r + n_M right after the start; b-kfac and
    # b-kfac-c are the stream's own, run from step 0
    assert before["b-r-kfac"].shape[1] == WIN["rank"] + A0.shape[1]
    assert before["r-kfac-5t"].shape[1] == WIN["rank"]
    assert win.shadows["b-kfac"]["A"].inv is ss.history.inverses["b-kfac"]["A"]
    assert ss.history.inverses["b-kfac"]["A"].updates == 16  # B-updates at k = 0, 2, ..., 30


def test_window_validation(one_thread):
    stream = rotating_stream(6, drift=0.0)
    A0, G0, J0 = stream[0]
    win = ErrorWindow(None, None, A0, G0, **WIN)  # k0 = 0: M_0 = A_0 A_0^T
    assert torch.allclose(win.ea["A"], A0 @ A0.T)
    with pytest.raises(ValueError, match="consecutive"):
        win.step(1, J=J0)
    win.step(0, J=J0)
    win.step(1, J=J0)
    with pytest.raises(ValueError, match="statistics step"):
        win.step(2, J=J0)
    with pytest.raises(ValueError, match="phi"):
        ErrorWindow(None, None, A0, G0, **{**WIN, "phi": 0.0})
    with pytest.raises(ValueError, match="too small"):
        ErrorWindow(None, None, A0, G0, **{**WIN, "rank": 48})
    with pytest.raises(ValueError, match="unknown method"):
        ShadowSpec("x", "qr", (("t_inv", 1),))
    with pytest.raises(ValueError, match="ea_A_prev"):
        ErrorWindow(torch.eye(3, dtype=F64), None, A0, G0, **WIN)
    with pytest.raises(ValueError, match="empty"):
        error_window_metrics(None, None, [], **WIN)


# -- summaries -------------------------------------------------------------------------------------
def _synthetic_rows(levels, growth=None, W=40, t=2, epochs=(15, 30)):
    rows = []
    for e in epochs:
        for a, lv in levels.items():
            for j in range(W):
                g = (1 + growth.get(a, 0.0) * j) if growth else 1.0
                rows.append(dict(window_epoch=e, step=j, algorithm=a, label=a,
                                 **{f"metric{m}": lv[m - 1] * g for m in (1, 2, 3, 4)}))
    return add_block_averages(rows, t, group=("window_epoch", "algorithm"))


def test_table1_and_orderings_on_constructed_rows():
    levels = {"b-r-kfac": (1, 1, 1, 1), "b-kfac-c": (2, 2, 2, 2), "b-kfac": (3, 3, 3, 3),
              "r-kfac-5t": (4, 4, 4, 4), "k-fac-5t": (2, 2, 2, 2), "r-kfac-1t": (1, 1, 1, 1),
              "r-kfac-30t": (0.5, 0.5, 0.5, 0.5)}
    rows = _synthetic_rows(levels, growth={"r-kfac-30t": 0.5})
    tab = table1(rows)
    assert [r["algorithm"] for r in tab] == list(levels)
    br = next(r for r in tab if r["algorithm"] == "b-r-kfac")
    assert br["avg_metric3"] == pytest.approx(1.0) and br["paper_metric1"] == pytest.approx(3.40e-03)
    assert br["window_epoch"] == 30 and br["t_epoch"] == ""
    o = check_orderings(rows, 2)["epoch_30"]
    assert o["b_r_below_r5"]["holds"] and o["bc_between"]["holds"] and o["b_r_below_b"]["holds"]
    assert o["r5_close_to_k5"]["holds"] and o["r5_close_to_k5"]["metric1"]["ratio"] == pytest.approx(2.0)
    assert o["r30_grows"]["holds"] and o["b_constant"]["holds"]
    # r-kfac 30t = 0.5 (1 + 0.5 j) passes b-kfac's level 3 when 1 + 0.5 j > 6, i.e. at j = 11;
    # the block average of steps 10-11 is 0.5 * 6.25 > 3, so from step 10 on
    assert o["r30_exceeds_b_steady"]["holds"] and o["r30_exceeds_b_steady"]["metric3"]["step"] == 10
    assert o["r30_exceeds_b_steady"]["metric3"]["skipped_updates"] == 5
    # the paper's own Table 1 puts b-kfac-c outside [b-r-kfac, b-kfac] on metric 2
    assert o["bc_between"]["metric2"]["paper_holds"] is False and o["bc_between"]["metric1"]["paper_holds"] is True
    # and a failing claim reads as such
    bad = _synthetic_rows({**levels, "b-r-kfac": (5, 1, 1, 1)})
    ob = check_orderings(bad, 2)["epoch_15"]
    assert not ob["b_r_below_r5"]["holds"] and not ob["b_r_below_r5"]["metric1"]["holds"]
    assert ob["b_r_below_r5"]["metric2"]["holds"]
    assert not ob["r30_grows"]["holds"]
    with pytest.raises(ValueError, match="lack"):
        check_orderings([r for r in rows if r["algorithm"] != "b-kfac"], 2)
    # a damping change inside the window (phi halves at step 30) lifts every curve: the growth and
    # constancy claims look only at the steps before it
    jump = _synthetic_rows(levels)
    for r in jump:
        r["phi"] = 0.1 if r["step"] < 30 else 0.05
        if r["step"] >= 30:
            for m in (1, 2, 3, 4):
                r[f"metric{m}"] *= 3.0
    add_block_averages(jump, 2, group=("window_epoch", "algorithm"))
    oj = check_orderings(jump, 2)["epoch_30"]
    assert oj["segment"]["phi_change_step"] == 30 and oj["segment"]["steps"] == [0, 30]
    assert oj["b_constant"]["holds"] and not oj["r30_grows"]["holds"]  # flat before the change
    assert not check_orderings([{k: v for k, v in r.items() if k != "phi"} for r in jump], 2)["epoch_30"]["b_constant"]["holds"]
    assert "phi changes at step 30" in es.format_orderings({"epoch_30": oj})


def test_plot_error_study(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # tests only (never for notebook runs)
    rows = _synthetic_rows({a.key: (1e-2, 2e-2, 3e-2, 4e-3) for a in PAPER_ALGORITHMS})
    fig = plot_error_study(rows, tmp_path / "fig1.png")
    assert (tmp_path / "fig1.png").stat().st_size > 1000
    assert len(fig.axes) == 4 and fig.axes[0].get_yscale() == "log"
    fig2 = plot_error_study(rows, metrics=(3, 4))
    assert "(3)" in fig2.axes[0].get_title() and len(fig2.axes[0].get_lines()) == 7
    with pytest.raises(ValueError, match="among 1..4"):
        plot_error_study(rows, metrics=(5,))
    # a deep k-fac dip does not set the range; every curve has its own style; phi's change is marked
    for r in rows:
        if r["algorithm"] == "k-fac-5t" and r["step"] % 10 == 0:
            r["metric1"] = 1e-9
        r["phi"] = 0.1 if r["step"] < 20 else 0.05
    fig3 = plot_error_study(rows)
    ax = fig3.axes[0]
    assert ax.get_ylim()[0] > 1e-4
    styles = {(str(line.get_linestyle()), line.get_marker()) for line in ax.get_lines()[:7]}
    assert len(styles) == 7
    assert any(line.get_xdata()[0] == 20 for line in ax.get_lines()[7:])  # the vertical phi line
    from bkfac.experiments.error_study import _METRIC_YLABELS

    assert ax.get_ylabel() == _METRIC_YLABELS[1]  # the metric's formula (a ratio: no unit)


# -- (d) the smoke run end to end ------------------------------------------------------------------
def _synthetic_cifar(n_train=640, n_test=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ytr, yte = torch.arange(n_train) % 10, torch.arange(n_test) % 10
    xtr = torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8)
    for x, y in ((xtr, ytr), (xte, yte)):
        for c in range(10):
            x[y == c, c % 3, 4 * (c // 3): 4 * (c // 3) + 4, :6] = 255
    return CIFAR10Arrays(xtr, ytr, xte, yte, CIFAR10_CLASSES, source="synthetic")


def test_smoke_run_writes_all_outputs(tmp_path, monkeypatch, one_thread, capsys):
    if not os.environ.get("BKFAC_DATA_DIR"):
        data = _synthetic_cifar()
        monkeypatch.setattr(es, "load_cifar10", lambda data_dir=None, **kw: data)
    assert main(["error-study", "--profile", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    out = tmp_path / "smoke" / "error_study"
    rows = read_csv(out / "metrics.csv")
    keys = [a.key for a in PAPER_ALGORITHMS]
    assert sorted(set(r["algorithm"] for r in rows)) == sorted(keys)
    assert len(rows) == 2 * 12 * 7  # window_epochs x window x algorithms
    for r in rows:
        for m in ("metric1", "metric2", "metric3", "metric4", "metric3_block", "metric4_block"):
            v = float(r[m])
            assert math.isfinite(v) and v >= 0.0
    # metrics (1)-(2) change only on statistics steps (t_updt = 2)
    b = [float(r["metric1"]) for r in rows if r["algorithm"] == "b-kfac" and r["window_epoch"] == "2"]
    assert all(b[2 * i] == b[2 * i + 1] for i in range(6))
    tab = read_csv(out / "table1.csv")
    assert [r["algorithm"] for r in tab] == keys and all(r["window_epoch"] == "2" for r in tab)
    assert all(float(r["fc0_update_ms_per_step"]) >= 0 for r in tab)
    orderings = json.loads((out / "orderings.json").read_text())
    assert set(orderings) == {"epoch_1", "epoch_2"}
    assert isinstance(orderings["epoch_2"]["b_r_below_r5"]["holds"], bool)
    assert orderings["epoch_2"]["segment"]["window"] == 12
    assert {float(r["phi"]) for r in rows} == {0.1}  # the smoke profile's damping factor
    cfg = json.loads((out / "config.json").read_text())
    run = cfg["runs"][0]
    assert cfg["drive"] == "reference" and run["window_starts"] == {"1": 0, "2": 10}
    assert all(v["factored"] and v["rel_diff"] < 1e-5 for v in run["J_form"].values())
    assert all(d <= 1e-6 for step in run["ea_check"].values() for d in step.values())
    assert "window at epoch 2" in capsys.readouterr().out
    assert len(read_csv(out / "metrics_runs.csv")) == len(rows)


def test_run_error_study_rejects_bad_arguments(tmp_path, monkeypatch):
    from bkfac.experiments.profiles import load_profile

    data = _synthetic_cifar()
    monkeypatch.setattr(es, "load_cifar10", lambda data_dir=None, **kw: data)
    prof = load_profile("smoke")
    with pytest.raises(ValueError, match="K-FAC-family driver"):
        es.run_error_study(prof, drive="sgd", out_root=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="window_epochs"):
        es.run_error_study(prof, window_epochs=[0], out_root=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="window must be a positive"):
        es.run_error_study(prof, window=0, out_root=str(tmp_path), progress=False)
    assert not (tmp_path / "smoke" / "error_study").exists()


# -- (e) b-kfac and b-kfac-c carry their own history (Sec. 4.2: "exactly when the heaviest update
#        of the algorithm at hand is performed"; b-kfac never overwrites) ---------------------------
@pytest.mark.parametrize("name", ["b-kfac", "b-kfac-c"])
def test_history_shadow_equals_the_optimizer_from_step_0(one_thread, name):
    """A history shadow holds, at every window start, the representation a BKFAC (BKFACC)
    optimizer fed the same data stream from step 0 holds (float64, 1e-12)."""
    import torch.nn as nn
    import torch.nn.functional as F

    import bkfac

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5)).to(F64)
    t, rank = 2, 6
    extra = dict(t_corct=5 * t, phi_crc=0.5) if name == "b-kfac-c" else {}  # the paper periods: 5t
    opt = bkfac.make_optimizer(name, model, defaults=None, lr=0.05, damping_phi=0.1, rho=0.9, t_updt=t, t_inv=t,
                               t_brand=t, rank=rank, oversample=2, policy="first-fc", clip=0.07, **extra)
    spec = next(a for a in PAPER_ALGORITHMS if a.key == name)
    gens = {(name, f): opt._factor_generator(0, f) for f in ("A", "G")}  # the optimizer's own streams
    ss = StudyStream(t_updt=t, window=4, algorithms=[spec], rho=0.9, rank=rank, oversample=2, power_iters=2,
                     generators=gens)
    assert spec.carries_history and ss.start_period == spec.heaviest_period(t)
    g = torch.Generator().manual_seed(3)
    lc = opt.capture.layers[0]
    compared = 0
    for k in range(41):
        x, y = torch.randn(7, 40, generator=g, dtype=F64), torch.randint(0, 5, (7,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        A = G = None
        if k % t == 0:
            A, G = lc.batch_A(), lc.batch_G()
        ss.step(k, A, G, None, phi=0.1)
        opt.step()
        if k % ss.start_period == 0:  # a possible window start
            for f, inv in (("A", opt.layers[0].inv_A), ("G", opt.layers[0].inv_G)):
                U, d = inv.representation()
                Us, ds = ss.history.inverses[name][f].representation()
                M, Ms = (U * d) @ U.T, (Us * ds) @ Us.T
                assert inv.method.startswith("brand")
                assert float((M - Ms).norm() / M.norm()) < 1e-12, (k, f)
                compared += 1
    assert compared == 2 * (40 // ss.start_period + 1)
    if name == "b-kfac-c":
        assert ss.history.inverses[name]["A"].updates > 40 // t + 1  # corrections happened


def test_only_history_free_shadows_recompute_at_a_window_start(one_thread, monkeypatch):
    """At a window start, RSVD/eigh of a factor run only for the algorithms whose heaviest update
    is one (b-r-kfac's overwrite, r-kfac, k-fac); b-kfac and b-kfac-c keep their history."""
    import bkfac.inverses.methods as methods

    t = WIN["t_updt"]
    stream = rotating_stream(40, drift=0.02)
    dims = {stream[0][0].shape[0], stream[0][1].shape[0]}
    calls = []
    for mod, name in ((methods, "rsvd"), (methods, "safe_eigh"), (es, "rsvd")):
        real = getattr(mod, name)

        def spy(M, *a, _real=real, _name=name, **kw):
            if M.dim() == 2 and M.shape[0] == M.shape[1] and M.shape[0] in dims:
                calls.append(_name)
            return _real(M, *a, **kw)
        monkeypatch.setattr(mod, name, spy)
    seeded = []
    real_seed = ErrorWindow._seed

    def seed_spy(self, inv, *a):
        seeded.append(type(inv).__name__)
        return real_seed(self, inv, *a)
    monkeypatch.setattr(ErrorWindow, "_seed", seed_spy)
    ss = StudyStream(window=10, **WIN_STREAM)
    for k, (A, G, J) in enumerate(stream[:20]):
        ss.step(k, A if k % t == 0 else None, G if k % t == 0 else None, J, phi=WIN["phi"])
    assert calls == [] and seeded == []  # history shadows run on B-updates (and corrections) only
    A0, G0, J0 = stream[20]
    ss.step(20, A0, G0, J0, phi=WIN["phi"], start="w")
    history_free = [a for a in PAPER_ALGORITHMS if not a.carries_history]
    assert {a.key for a in PAPER_ALGORITHMS if a.carries_history} == {"b-kfac", "b-kfac-c"}
    assert len(seeded) == 2 * len(history_free)
    assert not any(name in ("ShadowBrandInverse", "ShadowBrandCorrectedInverse") for name in seeded)
    n_rsvd = sum(1 for a in history_free if a.method in ("rsvd", "brand+rsvd"))
    assert sorted(calls) == sorted(["rsvd"] * 2 * n_rsvd + ["safe_eigh"] * 2), calls
    win = ss.active["w"]
    for key in ("b-kfac", "b-kfac-c"):
        assert win.shadows[key]["A"].inv is ss.history.inverses[key]["A"]


def test_window_without_the_history_is_refused(one_thread):
    stream = rotating_stream(4, drift=0.0)
    MA, MG = warm_ea(stream[:2], WIN["rho"], WIN["t_updt"])
    A0, G0, _ = stream[2]
    with pytest.raises(ValueError, match="history"):
        ErrorWindow(MA, MG, A0, G0, **WIN)
    ss = StudyStream(window=4, **WIN_STREAM)
    ss.step(0, A0, G0, None, phi=0.1)
    with pytest.raises(ValueError, match="multiple of 10"):
        ss.step(1, A0, G0, None, phi=0.1, start="w")


def test_interrupted_trajectory_resumes_to_the_same_rows(tmp_path, monkeypatch, one_thread):
    """A trajectory stopped after its checkpoint and resumed gives the uninterrupted rows."""
    from bkfac.experiments.profiles import load_profile

    data = _synthetic_cifar()
    monkeypatch.setattr(es, "load_cifar10", lambda data_dir=None, **kw: data)
    prof = load_profile("smoke")
    kw = dict(dev=torch.device("cpu"), data_dir=None, drive="reference", t=2, window=6, window_epochs=[1, 3],
              layer="fc0", progress=False, algorithms=PAPER_ALGORITHMS, inputs_key="x")
    full, _ = es._trajectory(prof, 0, **kw)
    ck = tmp_path / "checkpoint.pt"
    real_step = StudyStream.step

    def stop_in_window_2(self, k, *a, **k2):
        if k == 25:
            raise KeyboardInterrupt
        return real_step(self, k, *a, **k2)
    monkeypatch.setattr(StudyStream, "step", stop_in_window_2)
    with pytest.raises(KeyboardInterrupt):
        es._trajectory(prof, 0, checkpoint=ck, **kw)
    assert ck.exists()
    monkeypatch.setattr(StudyStream, "step", real_step)
    resumed, diag = es._trajectory(prof, 0, checkpoint=ck, **kw)
    assert diag["resumed_at"] == 20
    assert len(resumed) == len(full)
    for a, b in zip(full, resumed):
        assert a == b


def test_identity_started_driver_feeds_the_study_eq5_factors(monkeypatch, one_thread):
    """A driver whose K-factors start from the identity (the `paper` profile) trains the trajectory;
    the study still compares the algorithms on eq. (5)'s factor. Its window-start check sees the
    driver's data part differ from eq. (5)'s by exactly ``rho^u M_0 M_0^T``, even in the first
    epoch where ``rho^u`` is large (a check that ignored the gap would raise)."""
    import copy

    from bkfac.experiments.profiles import Profile, load_profile

    data = _synthetic_cifar()
    monkeypatch.setattr(es, "load_cifar10", lambda data_dir=None, **kw: data)
    smoke = load_profile("smoke")
    raw = copy.deepcopy(smoke.raw)
    raw["kfac"] = {**raw.get("kfac", {}), "factor_init": "identity"}
    prof = Profile("smoke-identity", raw)
    kw = dict(dev=torch.device("cpu"), data_dir=None, drive="reference", t=2, window=6, window_epochs=[1, 2],
              layer="fc0", progress=False, algorithms=PAPER_ALGORITHMS, inputs_key="x")
    rows, diag = es._trajectory(prof, 0, **kw)
    assert rows and all(math.isfinite(float(r["metric1"])) for r in rows)
    assert set(diag["ea_check"]) == {"0", "10"} and all(v > 0 for v in diag["first_outer_max"].values())
    assert all(d <= 1e-6 for step in diag["ea_check"].values() for d in step.values())
    # the gap is there: the same driver from the first batch gives other trajectories' rows
    base, _ = es._trajectory(smoke, 0, **kw)
    assert [r["metric1"] for r in base] != [r["metric1"] for r in rows]


def test_plot_spectrum_decay_and_its_rows():
    import matplotlib

    matplotlib.use("Agg")  # tests only (never for notebook runs)
    d = torch.tensor([4.0, 2.0, 1.0, 1.0])
    row = es._spectrum_row(10, 1, "A", d, 2)
    assert row["top_r_trace_fraction"] == pytest.approx(6 / 8) and row["lam_r_over_lam_1"] == pytest.approx(0.5)
    rows = [es._spectrum_row(k, 1, f, d * (1 + k / 100), 2) for k in (0, 50, 100) for f in ("A", "G")]
    fig = es.plot_spectrum_decay(rows, {"3": 40}, 30)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) == 2
    with pytest.raises(ValueError, match="empty"):
        es.plot_spectrum_decay([])


def test_sec43_claims_verdicts_follow_the_orderings():
    levels = {"b-r-kfac": (1, 1, 1, 1), "b-kfac-c": (2, 2, 2, 2), "b-kfac": (3, 3, 3, 3),
              "r-kfac-5t": (4, 4, 4, 4), "r-kfac-1t": (0.5, 0.5, 0.5, 0.5), "r-kfac-30t": (3, 3, 3, 3),
              "k-fac-5t": (2, 2, 2, 2)}
    orderings = check_orderings(_synthetic_rows(levels, growth={"r-kfac-30t": 0.05}), 2)
    rows = {r["claim"]: r for r in es.sec43_claims(orderings)}
    assert set(rows) == set(es.SEC43_CLAIMS)
    assert rows["b_r_below_r5"]["verdict"] == "reproduced" and rows["bc_between"]["verdict"] == "reproduced"
    # make b-kfac-c worse than b-kfac in one window only: "partly"; in both: "not reproduced"
    bad = dict(levels, **{"b-kfac-c": (5, 5, 5, 5)})
    one = [r for r in _synthetic_rows(bad, growth={"r-kfac-30t": 0.05}) if r["window_epoch"] == 30] + \
        [r for r in _synthetic_rows(levels, growth={"r-kfac-30t": 0.05}) if r["window_epoch"] == 15]
    assert {r["claim"]: r for r in es.sec43_claims(check_orderings(one, 2))}["bc_between"]["verdict"] == "partly"
    both = {r["claim"]: r for r in es.sec43_claims(check_orderings(_synthetic_rows(bad, growth={"r-kfac-30t": 0.05}), 2))}
    assert both["bc_between"]["verdict"] == "not reproduced" and "1,2,3,4" in both["bc_between"]["fails_on_metrics"]
    with pytest.raises(ValueError, match="no window"):
        es.sec43_claims({})


def test_a_complete_seed_is_kept_when_its_inputs_differ_only_where_no_result_can(tmp_path, monkeypatch, one_thread):
    """``resume`` keeps a complete seed whose recorded inputs differ from today's only in what
    ``comparable_inputs`` drops (the number of seeds, hyper-parameters k-fac ignores), and
    recomputes one whose inputs differ in what decides it (here its window)."""
    import copy

    from bkfac.experiments.manifest import inputs_hash
    from bkfac.experiments.profiles import load_profile

    data = _synthetic_cifar()
    monkeypatch.setattr(es, "load_cifar10", lambda data_dir=None, **kw: data)
    prof = load_profile("smoke")
    es.run_error_study(prof, seeds=[0], out_root=str(tmp_path), progress=False, resume=True)
    run_file = tmp_path / "smoke" / "error_study" / "seed0" / "run.json"
    done = json.loads(run_file.read_text())

    def rerun():
        calls = []
        real = es._trajectory
        monkeypatch.setattr(es, "_trajectory", lambda *a, **k: calls.append(1) or real(*a, **k))
        es.run_error_study(prof, seeds=[0], out_root=str(tmp_path), progress=False, resume=True)
        monkeypatch.setattr(es, "_trajectory", real)
        return bool(calls)

    harmless = copy.deepcopy(done)
    harmless["inputs"]["error_study"]["repeats"] = 7
    harmless["inputs"]["kfac"]["k-fac"]["rank"] = 3  # k-fac has no rank
    harmless["inputs_hash"] = inputs_hash(harmless["inputs"])
    run_file.write_text(json.dumps(harmless))
    assert not rerun()
    decisive = copy.deepcopy(done)
    decisive["inputs"]["error_study"]["window"] = done["inputs"]["error_study"]["window"] + 1
    decisive["inputs_hash"] = inputs_hash(decisive["inputs"])
    run_file.write_text(json.dumps(decisive))
    assert rerun()
