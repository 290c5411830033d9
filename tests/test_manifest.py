"""The results manifest: what produced every figure, table and stored result.

* The committed ``figures/`` and ``tables/``: every file is in its folder's ``manifest.json``
  with its SHA-256 (computed here with hashlib), the notebook that writes it exists, and every
  stored result it was drawn from exists.
* Stored results against a profile: results written with the profile's inputs are current;
  a copy of the ``cpu`` profile with another ``lr_schedule`` makes exactly the K-FAC runs (and
  the error study, whose trajectory is k-fac with those hyper-parameters) stale, nothing else.
* The committed ``cpu`` results are never stale: current, or they say why they are not.
* The kernel side: reads under ``data/results/`` are recorded, ``save_figure``/``save_table``
  enter the notebook, the hash and those sources, and a figure or table drawn from a stale
  result says so in its stamp.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from bkfac import book
from bkfac.experiments import manifest as m
from bkfac.experiments.profiles import KFAC_NAMES, PROFILE_DIR, load_profile

ROOT = book.repo_root()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# The committed figures and tables
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", m.OUTPUT_KINDS)
def test_every_committed_figure_and_table_is_in_the_manifest_with_its_hash(kind):
    folder = ROOT / kind
    files = json.loads((folder / m.MANIFEST_NAME).read_text())["files"]
    present = sorted(p for p in folder.iterdir() if p.is_file() and p.name != m.MANIFEST_NAME
                     and not p.name.startswith("."))
    assert present, f"no files in {kind}/"
    for p in present:
        assert p.name in files, f"{kind}/{p.name} is not in {kind}/{m.MANIFEST_NAME}"
        e = files[p.name]
        assert e["sha256"] == _sha(p), f"{kind}/{p.name}: hash differs from the manifest's"
        assert e["notebook"] and (ROOT / e["notebook"]).is_file(), f"{kind}/{p.name}: notebook {e['notebook']!r}"
        assert e["notebook"] in [str(c.relative_to(ROOT)) for c in book.chapters(ROOT)]
        assert e["profile"] in book.PROFILES
        src = e["sources"]
        assert src == "unknown" or isinstance(src, (dict, list))
        if isinstance(src, dict):  # every stored result it was drawn from exists
            for s in src:
                assert (ROOT / s).is_file(), f"{kind}/{p.name}: source {s} does not exist"
    assert sorted(files) == [p.name for p in present], "the manifest lists files that do not exist"
    assert m.check_outputs(ROOT) == []


def test_check_outputs_names_every_disagreement(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "c.ipynb").write_text("{}")
    figs = tmp_path / "figures"
    figs.mkdir()
    (figs / "ok.png").write_bytes(b"ok")
    (figs / "edited.png").write_bytes(b"new bytes")
    (figs / "unlisted.png").write_bytes(b"x")
    (figs / ".ok.png.123.tmp").write_bytes(b"temp files are not outputs")
    entry = dict(notebook="chapters/c.ipynb", profile="cpu", sources=[])
    files = {
        "ok.png": dict(entry, sha256=hashlib.sha256(b"ok").hexdigest()),
        "edited.png": dict(entry, sha256=hashlib.sha256(b"old bytes").hexdigest()),
        "gone.png": dict(entry, sha256="0" * 64),
    }
    (figs / m.MANIFEST_NAME).write_text(json.dumps({"files": files}))
    problems = m.check_outputs(tmp_path)
    assert any("unlisted.png is not in" in p for p in problems)
    assert any("edited.png: its SHA-256" in p for p in problems)
    assert any("lists gone.png, which does not exist" in p for p in problems)
    assert not any("ok.png:" in p and "edited" not in p for p in problems)
    assert len(problems) == 3
    files["ok.png"]["notebook"] = "chapters/missing.ipynb"
    files["ok.png"]["sources"] = {"data/results/cpu/k-fac/seed0/summary.json": "1" * 64}
    (figs / m.MANIFEST_NAME).write_text(json.dumps({"files": files}))
    problems = m.check_outputs(tmp_path)
    assert any("ok.png: notebook 'chapters/missing.ipynb' does not exist" in p for p in problems)
    assert any("ok.png: source data/results/cpu/k-fac/seed0/summary.json does not exist" in p for p in problems)


# ------------------------------------------------------------------------------------------
# Stored results against the profile
# ------------------------------------------------------------------------------------------


def _write_run(root: Path, profile, run: str, seed: int = 0, inputs: dict | None = None, epochs: int | None = None):
    """A finished run as train_run writes it: history, and a summary with the inputs."""
    from bkfac.experiments.results import write_csv, write_json

    n = epochs or profile.train["epochs"]
    d = root / profile.name / run / f"seed{seed}"
    hist = [dict(epoch=e, test_acc=0.1 * e, epoch_seconds=100.0, train_seconds=100.0 * e) for e in range(1, n + 1)]
    write_csv(d / "history.csv", hist)
    inputs = inputs if inputs is not None else m.run_inputs(profile, run, seed)
    write_json(d / "summary.json", dict(epochs_run=n, final_test_acc=hist[-1]["test_acc"], seed=seed, run=run,
                                        t_epoch_mean=100.0, inputs=inputs, inputs_hash=m.inputs_hash(inputs),
                                        provenance=m.provenance("cpu")))
    return d


def _write_error_study(root: Path, profile):
    from bkfac.experiments.results import write_json

    seeds = m.error_study_seeds(profile)
    inputs = m.expected_error_study_inputs(profile, seeds)
    d = root / profile.name / "error_study"
    for s in seeds:
        write_json(d / f"seed{s}" / "run.json", dict(inputs_hash=m.inputs_hash(dict(inputs, seeds=[s])), seed=s,
                                                    diag={}, provenance=m.provenance("cpu")))
    write_json(d / "config.json", dict(seeds=seeds, complete=True, inputs=inputs, inputs_hash=m.inputs_hash(inputs)))


def test_changing_lr_schedule_marks_exactly_the_kfac_runs_stale(tmp_path):
    cpu = load_profile("cpu")
    seeds = cpu.train["seeds"]
    es_seeds = m.error_study_seeds(cpu)
    root = tmp_path / "results"
    for run in cpu.runs:
        for s in seeds:
            _write_run(root, cpu, run, s)
    _write_error_study(root, cpu)
    rows = m.collect_status(cpu, root)
    es = {"cpu/error_study"} | {f"cpu/error_study/seed{s}" for s in es_seeds}
    assert {r.result for r in rows} == ({f"cpu/{r}/seed{s}" for r in cpu.runs for s in seeds} | es)
    assert all(r.match == "current" and r.state == "done" for r in rows), [(r.result, r.why) for r in rows]

    raw = yaml.safe_load((PROFILE_DIR / "cpu.yaml").read_text())
    changed = copy.deepcopy(raw)
    changed["kfac"]["lr_schedule"] = {1: 0.04, 4: 0.03, 5: 0.01, 6: 0.005}
    (tmp_path / "cpu-copy.yaml").write_text(yaml.safe_dump(changed))
    copy_profile = load_profile(str(tmp_path / "cpu-copy.yaml"))
    assert copy_profile.name == "cpu"
    rows = {r.result: r for r in m.collect_status(copy_profile, root)}
    kfac = [run for run, spec in cpu.runs.items() if spec["optimizer"] in KFAC_NAMES]
    assert sorted(kfac) == sorted(("k-fac", "r-kfac", "r-kfac-tinv25", "b-kfac", "b-kfac-c", "b-r-kfac"))
    kfac_runs = {f"cpu/{run}/seed{s}" for run in kfac for s in seeds}
    # the error study's trajectory is k-fac with the profile's k-fac hyper-parameters: it is a K-FAC run too
    assert {k for k, r in rows.items() if r.match == "stale"} == kfac_runs | es
    assert {k for k, r in rows.items() if r.match == "current"} == {f"cpu/{r}/seed{s}" for r in ("sgd", "seng")
                                                                     for s in seeds}
    for k in kfac_runs:
        assert rows[k].keys == ["hyper.lr_schedule"], rows[k].keys
    for k in es:
        assert rows[k].keys == ["kfac.k-fac.lr_schedule", "kfac.r-kfac.lr_schedule"], (k, rows[k].keys)
    text = m.format_status(list(rows.values()))
    assert "stale: hyper.lr_schedule" in text and "cpu/sgd/seed0" in text


def test_an_error_study_with_fewer_seeds_than_the_profile_is_partial_not_stale(tmp_path):
    cpu = load_profile("cpu")
    assert len(m.error_study_seeds(cpu)) > 1
    raw = yaml.safe_load((PROFILE_DIR / "cpu.yaml").read_text())
    one = copy.deepcopy(raw)
    one["error_study"]["repeats"] = 1
    one["train"]["seeds"] = [0]
    (tmp_path / "cpu-one.yaml").write_text(yaml.safe_dump(one))
    root = tmp_path / "results"
    _write_error_study(root, load_profile(str(tmp_path / "cpu-one.yaml")))  # repeats: 1 recorded
    rows = {r.result: r for r in m.error_study_status(cpu, root)}
    assert rows["cpu/error_study"].state == "partial" and rows["cpu/error_study"].match == "current"
    assert "seeds [0] of [0, 1, 2]" in rows["cpu/error_study"].progress
    assert rows["cpu/error_study/seed0"].match == "current"
    assert rows["cpu/error_study/seed1"].state == "missing"


def test_status_says_why_a_result_is_not_current(tmp_path):
    smoke = load_profile("smoke")
    root = tmp_path / "r"
    _write_run(root, smoke, "sgd", epochs=1)  # a shorter run
    legacy = _write_run(root, smoke, "k-fac")
    summary = json.loads((legacy / "summary.json").read_text())
    for key in ("inputs", "inputs_hash", "provenance"):
        summary.pop(key)
    (legacy / "summary.json").write_text(json.dumps(summary))
    mixed = _write_run(root, smoke, "r-kfac")
    (mixed / "history.csv").write_text("epoch,test_acc\n1,0.1\n")  # a stale summary beside a shorter history
    ignored = copy.deepcopy(m.run_inputs(smoke, "b-kfac", 0))
    ignored["hyper"]["not_a_hyper_parameter"] = 1  # b-kfac does not use it: it cannot change the result
    _write_run(root, smoke, "b-kfac", inputs=ignored)
    rows = {r.result: r for r in m.collect_status(smoke, root)}
    assert rows["smoke/sgd/seed0"].match == "stale"
    assert rows["smoke/sgd/seed0"].keys == ["train.epochs (ran 1, the profile asks for 2)"]
    assert rows["smoke/k-fac/seed0"].match == "unknown" and "no recorded inputs" in rows["smoke/k-fac/seed0"].why
    assert rows["smoke/r-kfac/seed0"].state == "broken"
    assert "summary.json says 2 epoch(s), history.csv has 1" in rows["smoke/r-kfac/seed0"].why
    assert rows["smoke/b-kfac/seed0"].match == "current"
    assert rows["smoke/seng/seed0"].state == "missing"
    assert rows["smoke/error_study"].state == "missing"


def test_the_committed_cpu_results_are_current_or_say_why():
    cpu = load_profile("cpu")
    rows = m.collect_status(cpu, ROOT / "data" / "results")
    for r in rows:
        assert r.state != "broken", r.why
        if r.state == "done":
            assert r.match in ("current", "unknown"), f"{r.result} is {r.why}: retrain it or restore the profile"
            if r.match == "unknown":
                assert r.detail
    done = {r.result: r for r in rows if r.state == "done" and r.kind == "run"}
    for run in ("sgd", "k-fac", "r-kfac", "r-kfac-tinv25"):  # backfilled: inputs proven equal
        r = done[f"cpu/{run}/seed0"]
        assert r.match == "current", r.why
        assert r.provenance["reconstructed"]["from_commit"].startswith("ab3499e")


def test_inputs_at_a_commit_come_from_that_commit():
    sgd = m.inputs_at_commit("ab3499e", "cpu", "sgd", 0)
    assert sgd["hyper"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 5.0e-4}
    assert sgd["lr_per_step"] == {"max_lr": 0.05, "pct_start": 0.2, "div_factor": 5.0, "final_div_factor": 100.0}
    assert sgd["model"] == {"arch": "vgg16_bn_mod", "width": 0.125, "fc_hidden": 2048, "dropout": 0.5,
                            "final_pool": False, "channels_last": True}
    assert sgd["train"]["epochs"] == 7 and sgd["seed"] == 0
    kfac = m.inputs_at_commit("ab3499e", "cpu", "k-fac", 0)
    # that commit's PAPER_DEFAULTS gave k-fac power_iters and spectrum_continuation (unused by k-fac)
    assert kfac["hyper"]["power_iters"] == 4 and kfac["hyper"]["spectrum_continuation"] is True
    assert kfac["hyper"]["lr_schedule"] == {"1": 0.05, "4": 0.03, "5": 0.01, "6": 0.005}
    assert m.comparable_inputs(kfac) == m.comparable_inputs(m.run_inputs(load_profile("cpu"), "k-fac", 0))
    with pytest.raises(ValueError, match="not a run of profile"):
        m.inputs_at_commit("ab3499e", "cpu", "no-such-run", 0)


def test_diff_inputs_treats_a_schedule_as_one_key_and_number_types_as_different():
    a = {"hyper": {"lr_schedule": {"1": 0.1, "5": 0.01}, "rank": 220}, "seed": 0}
    b = {"hyper": {"lr_schedule": {"1": 0.1, "5": 0.02}, "rank": 220.0}, "seed": 0}
    assert m.diff_inputs(a, b) == ["hyper.lr_schedule", "hyper.rank"]
    assert m.diff_inputs(a, {**a, "extra": None}) == ["extra"]
    assert m.diff_inputs(a, copy.deepcopy(a)) == []


# ------------------------------------------------------------------------------------------
# The kernel side: reads, save_figure/save_table, stamps
# ------------------------------------------------------------------------------------------


def test_only_reads_under_data_results_are_recorded(tmp_path):
    m.watch_reads()
    m.clear_reads()
    res = tmp_path / "data" / "results" / "cpu" / "k-fac" / "seed0"
    res.mkdir(parents=True)
    (res / "summary.json").write_text("{}")
    (res / "NOTES.md").write_text("notes")
    (tmp_path / "elsewhere.txt").write_text("x")
    (res / "summary.json").read_text()
    (res / "NOTES.md").read_text()
    (tmp_path / "elsewhere.txt").read_text()
    with open(res / "written.csv", "w") as fh:
        fh.write("a\n")
    assert m.results_read() == [res / "summary.json"]
    # an unfinished run (no summary.json) is read for planning, never a source
    part = tmp_path / "data" / "results" / "cpu" / "k-fac" / "seed1"
    part.mkdir(parents=True)
    (part / "history.csv").write_text("epoch\n1\n")
    (part / "history.csv").read_text()
    assert m.results_read() == [res / "summary.json"]
    (part / "summary.json").write_text("{}")  # finished: its history is a source
    assert m.results_read() == [res / "summary.json", part / "history.csv"]
    m.clear_reads()
    assert m.results_read() == []


@pytest.fixture
def toy_book(tmp_path, monkeypatch):
    """A one-chapter book under tmp_path whose chapter saves table 't1' and figure 'f1'."""
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\nbook:\n  chapters: [chapters/c1.ipynb]\n")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "smoke"'),
        nbformat.v4.new_code_cell('book.save_table(rows, "t1", profile)\nbook.save_figure(fig, "f1", profile)'),
    ])
    nbformat.write(nb, tmp_path / "chapters" / "c1.ipynb")
    monkeypatch.setenv("BKFAC_ROOT", str(tmp_path))
    monkeypatch.delenv("BKFAC_CHAPTER", raising=False)
    m.watch_reads()
    m.clear_reads()
    yield tmp_path
    m.clear_reads()


def test_save_table_and_figure_enter_notebook_hash_and_sources(toy_book, monkeypatch):
    import matplotlib.pyplot as plt

    smoke = load_profile("smoke")
    root = toy_book / ".nbrun" / "smoke" / "data" / "results"
    run_dir = _write_run(root, smoke, "sgd")
    (run_dir / "summary.json").read_text()  # what a chapter's loader does
    (run_dir / "history.csv").read_text()
    path = book.save_table([{"a": 1}], "t1", "smoke")
    assert path == toy_book / ".nbrun" / "smoke" / "tables" / "t1.csv"
    entry = json.loads((path.parent / m.MANIFEST_NAME).read_text())["files"]["t1.csv"]
    assert entry["notebook"] == "chapters/c1.ipynb"  # found from the chapter's code
    assert entry["sha256"] == _sha(path) and entry["profile"] == "smoke"
    rel = ".nbrun/smoke/data/results/smoke/sgd/seed0/"
    assert entry["sources"] == {rel + "summary.json": _sha(run_dir / "summary.json"),
                                rel + "history.csv": _sha(run_dir / "history.csv")}
    assert "stale_sources" not in entry
    assert "ANOTHER CONFIGURATION" not in book.run_stamp("smoke")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    book.stamp_figure(fig, "smoke")
    assert len(fig.texts) == 1
    monkeypatch.setenv("BKFAC_CHAPTER", "c1")  # as `bkfac reproduce` sets it
    fpath = book.save_figure(fig, "f1", "smoke")
    plt.close(fig)
    fentry = json.loads((fpath.parent / m.MANIFEST_NAME).read_text())["files"]["f1.png"]
    assert fentry["notebook"] == "chapters/c1.ipynb" and fentry["sha256"] == _sha(fpath)
    assert m.check_outputs(toy_book, base=toy_book / ".nbrun" / "smoke") == []


def test_a_table_or_figure_drawn_from_a_stale_result_says_so(toy_book):
    import matplotlib.pyplot as plt

    smoke = load_profile("smoke")
    root = toy_book / ".nbrun" / "smoke" / "data" / "results"
    other = copy.deepcopy(m.run_inputs(smoke, "k-fac", 0))
    other["hyper"]["lr_schedule"] = {"1": 0.3}
    run_dir = _write_run(root, smoke, "k-fac", inputs=other)
    (run_dir / "summary.json").read_text()
    stamp = book.run_stamp("smoke")
    assert "DRAWN FROM RESULTS OF ANOTHER CONFIGURATION: smoke/k-fac/seed0 (stale: hyper.lr_schedule)" in stamp
    path = book.save_table([{"a": 1}], "t1", "smoke")
    entry = json.loads((path.parent / m.MANIFEST_NAME).read_text())["files"]["t1.csv"]
    assert entry["stale_sources"] == {"smoke/k-fac/seed0": "stale: hyper.lr_schedule"}
    fig, _ = plt.subplots()
    book.stamp_figure(fig, "smoke")
    texts = [t.get_text() for t in fig.texts]
    plt.close(fig)
    assert len(texts) == 2 and any("ANOTHER CONFIGURATION" in t for t in texts)
