"""The book's loader of stored runs (``ensure_runs``, ``table2_rows``) and ``bkfac reproduce``'s
plan: a run is read back only when its files agree and its inputs are the profile's; a stale
one is trained again or, by request, used and marked; nothing trains before the plan is said."""

from __future__ import annotations

import argparse
import copy
import json
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
