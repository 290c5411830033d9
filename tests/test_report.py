"""The book's loader of stored runs (``ensure_runs``, ``table2_rows``) and ``bkfac reproduce``'s
plan: a run is read back only when its files agree and its inputs are the profile's; a stale
one is trained again or, by request, used and marked; nothing trains before the plan is said."""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import warnings

import nbformat
import pytest
import torch
import yaml

import bkfac.experiments.report as report
import bkfac.experiments.train as train_mod
from bkfac import book
from bkfac.experiments import manifest as m
from bkfac.experiments.data import CIFAR10_CLASSES, CIFAR10Arrays
from bkfac.experiments.profiles import load_profile
from bkfac.experiments.results import write_csv, write_json


def _write_run(root, profile, run, *, inputs=None, epochs=None, seed=0):
    n = epochs or profile.train["epochs"]
    d = root / profile.name / run / f"seed{seed}"
    hist = [dict(epoch=e, test_acc=0.1 * e, test_loss=1.0, train_loss=1.0, epoch_seconds=100.0,
                 train_seconds=100.0 * e) for e in range(1, n + 1)]
    write_csv(d / "history.csv", hist)
    inputs = inputs if inputs is not None else m.run_inputs(profile, run, seed)
    write_json(d / "summary.json", dict(epochs_run=n, final_test_acc=hist[-1]["test_acc"], best_test_acc=0.1 * n,
                                        seed=seed, run=run, t_epoch_mean=100.0, t_epoch_std=0.0, inputs=inputs,
                                        inputs_hash=m.inputs_hash(inputs)))
    return d


@pytest.fixture
def smoke_root(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "results_root", lambda name: tmp_path / "results")
    monkeypatch.setenv("BKFAC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(report.STALE_ENV, raising=False)
    return tmp_path / "results"


def test_a_stale_summary_beside_a_new_history_is_an_error_naming_the_files(smoke_root):
    smoke = load_profile("smoke")
    d = _write_run(smoke_root, smoke, "sgd")
    write_csv(d / "history.csv", [dict(epoch=1, test_acc=0.3)])  # a new run killed after epoch 1
    for train_missing in (False, True):
        with pytest.raises(ValueError, match=r"summary\.json says 2 epoch\(s\), history\.csv has 1") as err:
            report.ensure_runs(smoke, ["sgd"], train_missing=train_missing)
        assert str(d) in str(err.value)
    assert json.loads((d / "summary.json").read_text())["epochs_run"] == 2  # nothing was overwritten


def test_table2_rows_refuses_a_summary_that_disagrees_with_its_history(smoke_root):
    smoke = load_profile("smoke")
    d = _write_run(smoke_root, smoke, "sgd")
    res = report.ensure_runs(smoke, ["sgd"], train_missing=False)
    assert report.table2_rows(smoke, res)[0]["config"] == "current"
    bad = copy.deepcopy(res)
    bad["sgd"]["history"] = bad["sgd"]["history"][:1]
    with pytest.raises(ValueError, match=r"summary\.json and .*history\.csv disagree: summary\.json says 2"):
        report.table2_rows(smoke, bad)
    write_csv(d / "history.csv", [dict(epoch=1, test_acc=0.1)])  # the folder changed after it was read
    with pytest.raises(ValueError, match="history.csv has 1"):
        report.table2_rows(smoke, res)


def _synthetic(n_train=640, n_test=200):
    g = torch.Generator().manual_seed(0)
    ytr, yte = torch.arange(n_train) % 10, torch.arange(n_test) % 10
    xtr = torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8)
    return CIFAR10Arrays(xtr, ytr, xte, yte, CIFAR10_CLASSES, source="synthetic")


def test_a_stale_run_is_reused_marked_or_trained_again(smoke_root, monkeypatch, capsys):
    data = _synthetic()
    monkeypatch.setattr(train_mod, "load_cifar10", lambda data_dir=None, **kw: data)
    smoke = load_profile("smoke")
    other = copy.deepcopy(m.run_inputs(smoke, "sgd", 0))
    other["hyper"]["lr"] = 0.5
    d = _write_run(smoke_root, smoke, "sgd", inputs=other)
    with pytest.warns(UserWarning, match=r"not the profile's \(stale: hyper\.lr\)"):
        got = report.ensure_runs(smoke, ["sgd"], stale="reuse")
    assert got["sgd"]["config"] == "stale: hyper.lr" and not got["sgd"]["trained_now"]
    assert report.table2_rows(smoke, got)[0]["config"] == "stale: hyper.lr"
    assert json.loads((d / "summary.json").read_text())["inputs"]["hyper"]["lr"] == 0.5

    monkeypatch.setenv(report.STALE_ENV, "retrain")  # as `bkfac reproduce` without --reuse-stale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = report.ensure_runs(smoke, ["sgd"])
    assert "ensure_runs: retrain smoke/sgd seed 0 (stale: hyper.lr)" in capsys.readouterr().out
    assert got["sgd"]["trained_now"] and got["sgd"]["config"] == "current"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["inputs_hash"] == m.inputs_hash(m.run_inputs(smoke, "sgd", 0))
    assert len(got["sgd"]["history"]) == smoke.train["epochs"]
    monkeypatch.setenv(report.STALE_ENV, "sometimes")
    with pytest.raises(ValueError, match="BKFAC_STALE_RESULTS"):
        report.ensure_runs(smoke, ["sgd"])


@pytest.fixture
def toy_book(tmp_path, monkeypatch):
    """A book with one chapter that reads two runs of the smoke profile and the error study."""
    (tmp_path / "chapters" / "params").mkdir(parents=True)
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\nbook:\n  chapters: [chapters/runs.ipynb]\n")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "smoke"\nseed = 0\nruns = []\ndevice = "cpu"'),
        nbformat.v4.new_code_cell("results = ensure_runs(prof, runs)\nrows = load_error_study(profile)"),
    ])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, tmp_path / "chapters" / "runs.ipynb")
    for p in book.PROFILES:
        (tmp_path / "chapters" / "params" / f"{p}.yaml").write_text(yaml.safe_dump({"runs": {"runs": ["sgd", "k-fac"]}}))
    monkeypatch.setenv("BKFAC_ROOT", str(tmp_path))
    return tmp_path


def test_reproduce_says_what_it_will_train_and_its_cost_before_anything(toy_book, capsys):
    smoke = load_profile("smoke")
    _write_run(toy_book / ".nbrun" / "smoke" / "data" / "results", smoke, "sgd")
    before = (toy_book / "chapters" / "runs.ipynb").read_text()
    args = argparse.Namespace(profile="smoke", chapters=None, list=False, plan=True, reuse_stale=False,
                              from_scratch=False)
    assert book.run_reproduce(args) == 0
    out = capsys.readouterr().out
    assert "smoke/sgd/seed0" in out and "reuse       inputs identical" in out
    assert "smoke/k-fac/seed0" in out and "train       no results" in out
    assert "smoke/error_study" in out
    assert "will train 2 result(s) before executing the chapters: about 3 min (+ 1 of unknown cost)" in out
    assert "profile 'smoke' from scratch: a few minutes" in out
    assert (toy_book / "chapters" / "runs.ipynb").read_text() == before  # --plan executes nothing
    assert not (toy_book / ".nbrun" / "smoke" / "data" / "results" / "smoke" / "k-fac").exists()

    args.from_scratch = True
    assert book.run_reproduce(args) == 0
    assert "smoke/sgd/seed0                    retrain     --from-scratch" in capsys.readouterr().out
    args.reuse_stale = True
    with pytest.raises(ValueError, match="exclude each other"):
        book.run_reproduce(args)


def test_reproduce_marks_stale_results_reused_with_reuse_stale(toy_book, capsys):
    smoke = load_profile("smoke")
    other = copy.deepcopy(m.run_inputs(smoke, "k-fac", 0))
    other["hyper"]["t_updt"] = 3
    root = toy_book / ".nbrun" / "smoke" / "data" / "results"
    _write_run(root, smoke, "sgd")
    _write_run(root, smoke, "k-fac", inputs=other)
    args = argparse.Namespace(profile="smoke", chapters=None, list=False, plan=True, reuse_stale=True,
                              from_scratch=False)
    assert book.run_reproduce(args) == 0
    out = capsys.readouterr().out
    assert "smoke/k-fac/seed0                  reuse-stale stale: hyper.t_updt" in out
    assert "--reuse-stale: 1 result(s) of another configuration are used" in out
    args.reuse_stale = False
    assert book.run_reproduce(args) == 0
    assert "smoke/k-fac/seed0                  retrain     stale: hyper.t_updt" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Table 2 over seeds, the per-epoch cost columns, the curves and the stamps
# ---------------------------------------------------------------------------------------------


def _write_seed(root, profile, run, seed, times, secs):
    """A finished run of ``seed`` with chosen times to the targets and epoch seconds."""
    d = _write_run(root, profile, run, seed=seed, epochs=len(secs))
    s = json.loads((d / "summary.json").read_text())
    for a, t in zip(profile.train["targets"], times):
        s[f"time_to_{a * 100:g}"] = t
        s[f"epochs_to_{a * 100:g}"] = None if t is None else 1
    s.update(final_test_acc=0.1 * len(secs), provenance=dict(device="cpu", threads=1, torch="2.x", commit="abcdef0123"))
    write_json(d / "summary.json", s)
    hist = [dict(epoch=e, test_acc=0.1 * e, test_loss=1.0, train_loss=1.0, epoch_seconds=x,
                 train_seconds=sum(secs[:e])) for e, x in enumerate(secs, 1)]
    write_csv(d / "history.csv", hist)
    return d


def test_ensure_seed_runs_reads_every_stored_seed_and_any_subset(smoke_root):
    smoke = load_profile("smoke")  # seeds [0]; targets 0.15, 0.2
    _write_seed(smoke_root, smoke, "sgd", 0, [10.0, 20.0], [5.0, 7.0])
    _write_seed(smoke_root, smoke, "sgd", 2, [12.0, None], [6.0, 8.0])  # a seed the profile does not list
    _write_seed(smoke_root, smoke, "b-kfac", 0, [30.0, 40.0], [9.0, 11.0])
    (smoke_root / "smoke" / "b-kfac" / "seed1").mkdir()  # being trained: no summary yet
    res = report.ensure_seed_runs(smoke, ["sgd", "b-kfac", "k-fac"], train_missing=False)
    assert [r["seed"] for r in res["sgd"]] == [0, 2] and [r["seed"] for r in res["b-kfac"]] == [0]
    assert res["k-fac"] == [] and report.seeds_present(smoke, "sgd") == [0, 2]
    rows = {r["run"]: r for r in report.table2_over_seeds(smoke, {k: v for k, v in res.items() if v})}
    sgd = rows["sgd"]
    assert sgd["n_seeds"] == 2 and sgd["hits_20"] == 1 and sgd["hits_15"] == 2
    assert sgd["time_to_15_mean"] == pytest.approx(11.0) and sgd["t_epoch_mean"] == pytest.approx(6.5)
    shown = {r["run"]: r for r in report.table2_display(smoke, list(rows.values()))}
    cell = shown["sgd"]  # label "sgd"; 2 targets paired with the paper's lowest and top
    assert cell["t to 15% (s)"] == "11 ± 1 (2)" and cell["t to 20% (s)"] == "20 (1)"
    assert cell["hit 20%"] == "1 of 2" and cell["paper t to 91%"] == "-"  # the paper has no SGD
    assert "paper t to 93.5%" in cell and shown["b-kfac"]["paper t to 93.5%"] == "1913 ± 125"
    assert shown["b-kfac"]["paper hit 93.5%"] == "10 of 10"


def test_paper_table2_rows_and_target_pairing():
    p = report.paper_table2_rows()
    assert set(p) == {"seng", "k-fac", "r-kfac", "r-kfac-tinv25", "b-kfac", "b-kfac-c", "b-r-kfac"}
    b = p["b-kfac"]
    assert (b["time_to_93_mean"], b["time_to_93_sd"], b["hits_93"], b["hits_93.5"]) == (1325.0, 58.9, 10, 10)
    assert b["t_epoch_samples"] == 500 and b["epochs_to_93_mean"] == 28.6
    assert p["r-kfac"]["hits_93.5"] == 0 and math.isnan(p["r-kfac"]["time_to_93.5_mean"])
    assert report.paired_paper_targets(3) == ["91", "93", "93.5"]
    assert report.paired_paper_targets(2) == ["91", "93.5"] and report.paired_paper_targets(1) == ["93.5"]
    with pytest.raises(ValueError, match="n must"):
        report.paired_paper_targets(0)


def test_format_mean_sd():
    assert report.format_mean_sd(1237.4, 40.2, 3) == "1237 ± 40 (3)"
    assert report.format_mean_sd(1237.4, float("nan"), 1) == "1237 (1)"
    assert report.format_mean_sd(float("nan"), 1.0, 0) == "-" and report.format_mean_sd(None) == "-"
    assert report.format_mean_sd(0.00297, 0.0001, 2, fmt=".2e") == "2.97e-03 ± 1.00e-04 (2)"
    assert report.format_mean_sd(46.3, 0.62, digits=1) == "46.3 ± 0.6"


def test_bench_step_for_picks_the_benchmark_of_the_profiles_model(tmp_path):
    cpu = load_profile("cpu")
    header = "optimizer,label,epoch_s\n"

    def bench(name, model, epochs, epoch_s):
        d = tmp_path / name
        d.mkdir()
        raw = copy.deepcopy(cpu.raw)
        raw["model"], raw["train"]["epochs"] = model, epochs
        (d / "profile.yaml").write_text(yaml.safe_dump(raw))
        (d / "step.csv").write_text(header + f"k-fac,k-fac,{epoch_s}\nb-kfac,b-kfac,{epoch_s / 2}\n")
        (d / "step.log").write_text("bkfac bench step\nmachine: TestCPU, 2 cores; load 0.1\n")
        return d

    bench("a-other-model", dict(cpu.model, fc_hidden=1024), 7, 100.0)
    bench("b-same-model-6-epochs", cpu.model, 6, 200.0)
    bench("c-same-model", cpu.model, 7, 300.0)
    got = report.bench_step_for(cpu, root=tmp_path)
    assert got.folder.name == "c-same-model" and got.epoch_seconds("b-kfac") == 150.0
    assert got.epoch_seconds("sgd") is None and got.machine.startswith("TestCPU")
    assert report.bench_step_for(load_profile("smoke"), root=tmp_path) is None
    with pytest.raises(ValueError, match="step.csv"):
        report.read_bench_step(tmp_path)
    # the per-epoch cost table: ratios to k-fac in each column
    rows = [dict(run="k-fac", label="k-fac", t_epoch_mean=600.0, t_epoch_sd=10.0, t_epoch_samples=7),
            dict(run="b-kfac", label="b-kfac", t_epoch_mean=300.0, t_epoch_sd=5.0, t_epoch_samples=7)]
    cost = {r["run"]: r for r in report.t_epoch_display(rows, bench=got, gpu_epochs={"k-fac": 10.0, "b-kfac": 6.0})}
    assert cost["b-kfac"]["trainings / k-fac"] == "0.50" and cost["b-kfac"]["bench / k-fac"] == "0.50"
    assert cost["b-kfac"]["paper / k-fac"] == f"{46.3 / 97.8:.2f}" and cost["b-kfac"]["GPU, 1 epoch (s)"] == "6.00"
    assert cost["b-kfac"]["GPU bench / k-fac"] == "-" and cost["k-fac"]["trainings t_epoch (s)"] == "600.0 ± 10.0 (7)"


def test_read_epoch_runs_and_fc0_shape(tmp_path):
    for run, t in (("k-fac", 15.5), ("b-kfac", 9.1)):
        write_json(tmp_path / run / "summary.json", dict(run=run, t_epoch_mean=t))
    assert report.read_epoch_runs(tmp_path) == {"b-kfac": 9.1, "k-fac": 15.5}
    assert report.fc0_shape(load_profile("cpu")) == (4096, 2048)
    assert report.fc0_shape(load_profile("paper")) == (16384, 2048)


def test_accuracy_curves_draw_each_seed_and_the_mean(smoke_root):
    import matplotlib

    matplotlib.use("Agg")
    cpu = load_profile("cpu")  # damping 0.1 -> 0.05 at epoch 5
    res = {"b-kfac": [dict(history=[dict(epoch=e, test_acc=a, train_seconds=100.0 * e) for e, a in
                                    enumerate(accs, 1)]) for accs in ([0.5, 0.7, 0.8], [0.6, 0.7, 0.76])],
           "k-fac": [dict(history=[dict(epoch=1, test_acc=0.4, train_seconds=300.0)])], "sgd": []}
    fig = report.plot_accuracy_curves(cpu, res)
    left, right = fig.axes[:2]
    means = [ln for ln in left.get_lines() if ln.get_label().startswith("b-kfac")]
    assert len(means) == 1 and list(means[0].get_ydata()) == pytest.approx([55.0, 70.0, 78.0])
    assert means[0].get_marker() != [ln for ln in left.get_lines() if ln.get_label().startswith("k-fac")][0].get_marker()
    faint = [ln for ln in right.get_lines() if ln.get_alpha() == 0.3]
    assert len(faint) == 3  # one per seed
    assert any(list(ln.get_xdata()) == [4.5, 4.5] for ln in right.get_lines())  # the damping change
    assert left.get_ylim()[0] == pytest.approx(45.0) and left.get_ylabel() == "test accuracy (%)"
    assert fig.legends and "(n=2)" in [t.get_text() for t in fig.legends[0].get_texts()][0]
    with pytest.raises(ValueError, match="no run"):
        report.plot_accuracy_curves(cpu, {"sgd": []})


def test_stamps_say_how_the_results_were_made():
    made = [dict(device="cpu", threads=1, torch="2.14.1", commit="f4b1f8e220"),
            dict(device="cpu", threads=None, torch="2.14.1", commit="ab3499e4a9")]
    s = book.made_stamp(made)
    assert s == "2 results made on cpu with 1 thread (1 of 2 record no thread count), torch 2.14.1, code ab3499e, f4b1f8e"
    assert book.made_stamp([dict(device="cpu", threads=2)]) == "1 result made on cpu with 2 threads"
    assert "no thread count recorded" in book.made_stamp([dict(device="cpu")])
    with pytest.raises(ValueError, match="provenance"):
        book.made_stamp([])
    stamp = book.run_stamp("smoke", "cpu", made=made)
    assert "drawn on CPU" in stamp and "with 1 thread" in stamp and "threads)" not in stamp.split("|")[1]
    assert "threads)" in book.run_stamp("smoke", "cpu")  # without provenance: this process's threads


def test_table1_over_seeds_means_and_spreads():
    from bkfac.experiments.error_study import table1_over_seeds

    rows = []
    for seed, scale in ((0, 1.0), (1, 3.0)):
        for step in range(4):
            for a in ("b-kfac", "k-fac-5t"):
                rows.append(dict(seed=seed, window_epoch=5, step=step, algorithm=a, label=a,
                                 metric1=scale * (step + 1), metric2=scale, metric3=1.0, metric4=2.0 * scale))
        rows.append(dict(seed=seed, window_epoch=3, step=0, algorithm="b-kfac", label="b-kfac", metric1=99.0,
                         metric2=99.0, metric3=99.0, metric4=99.0))
    diags = [dict(seed=0, update_ms_per_step={"5": {"b-kfac": 20.0, "k-fac-5t": 200.0}}),
             dict(seed=1, update_ms_per_step={"5": {"b-kfac": 30.0, "k-fac-5t": 220.0}})]
    t = {r["algorithm"]: r for r in table1_over_seeds(rows, diags)}
    b = t["b-kfac"]
    assert b["window_epoch"] == 5 and b["n_seeds"] == 2
    assert b["metric1_mean"] == pytest.approx((2.5 + 7.5) / 2) and b["metric1_sd"] == pytest.approx(statistics.stdev([2.5, 7.5]))
    assert b["update_ms_mean"] == pytest.approx(25.0) and b["update_ms_n"] == 2
    assert b["paper_metric1"] == pytest.approx(48.6e-03) and t["k-fac-5t"]["paper_t_epoch"] == "169 ± 5.6"
    one = {r["algorithm"]: r for r in table1_over_seeds([r for r in rows if r["seed"] == 0], diags[:1])}
    assert one["b-kfac"]["n_seeds"] == 1 and math.isnan(one["b-kfac"]["metric1_sd"])
    with pytest.raises(ValueError, match="run_rows"):
        table1_over_seeds([])


def test_a_run_being_trained_now_is_left_alone_before_its_first_epoch(smoke_root, monkeypatch):
    import fcntl
    import os

    cpu = load_profile("cpu")  # committed results: a run in training is reported, never trained
    folder = smoke_root / "cpu" / "seng" / "seed0"
    folder.mkdir(parents=True)

    def no_training(*a, **k):
        raise AssertionError("trained a run another process is training")

    monkeypatch.setattr(train_mod, "train_run", no_training)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what `bkfac train` holds while it trains
        assert report.ensure_runs(cpu, ["seng"], train_missing=True) == {"seng": None}
        assert report.ensure_seed_runs(cpu, ["seng"], train_missing=True) == {"seng": []}
    finally:
        os.close(fd)
    with pytest.raises(AssertionError, match="trained a run"):  # unlocked and empty: it is trained
        report.ensure_runs(cpu, ["seng"], train_missing=True)


def test_a_long_stamp_is_wrapped_to_the_figure_width(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    made = [dict(device="cpu", threads=None if i % 2 else 1, torch="2.14.1+cu130", commit=f"{i:07x}abc") for i in range(12)]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([0, 1], [0, 1])
    book.stamp_figure(fig, "smoke", "cpu", made=made)
    stamp = [t for t in fig.texts if "results made on" in t.get_text()][0]
    assert "\n" in stamp.get_text() and "code 0000000" in stamp.get_text().replace("\n  ", " ")
    fig.savefig(tmp_path / "f.png", dpi=100, bbox_inches="tight")
    assert Image.open(tmp_path / "f.png").size[0] <= 5 * 100 + 10  # the stamp does not widen the figure


def test_factor_start_and_first_lr_read_the_profile(tmp_path):
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    raw = yaml.safe_load((PROFILE_DIR / "cpu.yaml").read_text())
    assert report.factor_start(load_profile("cpu")).startswith("from the first batch")
    assert report.first_lr(load_profile("cpu")) == raw["kfac"]["lr_schedule"][1]
    raw["kfac"]["factor_init"] = "identity"
    raw["kfac"]["lr_schedule"] = {1: 0.3, 3: 0.1}
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(raw))
    changed = load_profile(str(tmp_path / "cpu.yaml"))
    assert report.factor_start(changed).startswith("from the identity")
    assert report.first_lr(changed) == 0.3
