"""The training harness and ``bkfac train``: every optimizer runs on the smoke profile and writes its
results; an interrupted run resumes to the same numbers; bad input gives clear errors.

These tests use a small synthetic CIFAR-shaped data set (monkeypatched loader) so they do not
need the real images; ``tests/test_data.py`` covers reading the real ones.
"""

import json
import warnings

import pytest
import torch

import bkfac.experiments.train as train_mod
from bkfac.cli import main
from bkfac.experiments.data import CIFAR10_CLASSES, CIFAR10Arrays
from bkfac.experiments.profiles import load_profile
from bkfac.experiments.results import load_checkpoint, read_csv


def synthetic_cifar(n_train=640, n_test=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ytr = torch.arange(n_train) % 10
    yte = torch.arange(n_test) % 10
    xtr = torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8)
    # a learnable signal: a bright class-dependent patch
    for x, y in ((xtr, ytr), (xte, yte)):
        for c in range(10):
            x[y == c, c % 3, 4 * (c // 3) : 4 * (c // 3) + 4, :6] = 255
    return CIFAR10Arrays(xtr, ytr, xte, yte, CIFAR10_CLASSES, source="synthetic")


@pytest.fixture
def fake_data(monkeypatch):
    data = synthetic_cifar()
    monkeypatch.setattr(train_mod, "load_cifar10", lambda data_dir=None, **kw: data)
    return data


def _curves(history, *extra):
    """Per epoch: the numbers that must not depend on timing (accuracy, losses, and ``extra``)."""
    keys = ("test_acc", "test_loss", "train_loss", *extra)
    return [[h[k] for k in keys] for h in history]


RUNS = ["sgd", "seng", "k-fac", "r-kfac", "r-kfac-tinv25", "sre-kfac", "b-kfac", "b-kfac-c", "b-r-kfac"]


@pytest.mark.parametrize("run", RUNS)
def test_every_optimizer_trains_on_smoke_and_writes_results(run, fake_data, tmp_path):
    rc = main(["train", "--profile", "smoke", "--optimizer", run, "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = tmp_path / "smoke" / run / "seed0"
    hist = read_csv(out / "history.csv")
    assert [int(h["epoch"]) for h in hist] == [1, 2]
    for h in hist:
        assert 0.0 <= float(h["test_acc"]) <= 1.0 and float(h["epoch_seconds"]) > 0
        assert float(h["t_forward_backward"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"] == run and summary["epochs_run"] == 2
    assert "time_to_15" in summary and "epochs_to_20" in summary
    assert (out / "checkpoint.pt").exists()
    if run == "seng":  # its lr decays per iteration over the epoch's length, recorded in its inputs
        assert summary["inputs"]["hyper"]["steps_per_epoch"] == summary["batches_per_epoch"] == 10


def test_synthetic_data_run_never_reads_cifar_and_writes_apart(tmp_path, monkeypatch, capsys):
    def refuse(*a, **kw):
        raise AssertionError("--synthetic-data must not load CIFAR-10")

    monkeypatch.setattr(train_mod, "load_cifar10", refuse)
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--profile", "smoke", "--optimizer", "b-kfac", "--out", str(tmp_path), "--quiet",
               "--epochs", "1", "--synthetic-data"])
    assert rc == 0
    assert not (tmp_path / "smoke").exists()  # real results are never overwritten by a timing run
    out = tmp_path / "smoke-synthetic" / "b-kfac" / "seed0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"].startswith("synthetic") and summary["epochs_run"] == 1
    assert summary["batches_per_epoch"] == 10  # the smoke profile's 640 images in batches of 64
    assert float(read_csv(out / "history.csv")[0]["t_statistics"]) > 0
    printed = capsys.readouterr().out  # the run folder named relative to the working directory
    assert "s -> smoke-synthetic/b-kfac/seed0" in printed and str(tmp_path) not in printed


def test_resume_after_interruption_gives_the_same_numbers(fake_data, tmp_path):
    profile = load_profile("smoke")
    full = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "a"), progress=False)
    # interrupted in the middle of the last epoch, then resumed from the last checkpoint
    part = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, stop_after_batches=4)
    assert part.summary == {"interrupted": True}
    assert len(read_csv(tmp_path / "b" / "smoke" / "b-kfac" / "seed0" / "history.csv")) == 1
    resumed = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, resume=True)
    assert _curves(resumed.history) == _curves(full.history)


def test_a_finished_run_extended_by_resume_equals_the_longer_run(fake_data, tmp_path, monkeypatch):
    """A run finished under a shorter epoch budget continues with ``--resume`` when the budget
    grows (the K-FAC schedules are per epoch), to the numbers of the longer run trained at once;
    the book's loader warns about the shorter stored run until then."""
    import bkfac.experiments.report as report

    profile = load_profile("smoke")  # 2 epochs
    full = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "a"), progress=False)
    short = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, epochs=1)
    assert short.summary["epochs_run"] == 1
    monkeypatch.setenv("BKFAC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(report, "results_root", lambda name: tmp_path / "b")
    with pytest.warns(UserWarning, match="has 1 epoch.*asks for 2"):
        got = report.ensure_runs(profile, ["b-kfac"], train_missing=False)
    assert len(got["b-kfac"]["history"]) == 1
    longer = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, resume=True)
    assert _curves(longer.history) == _curves(full.history)
    assert longer.summary["epochs_run"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(report.ensure_runs(profile, ["b-kfac"], train_missing=False)["b-kfac"]["history"]) == 2


def test_summary_times_to_targets():
    hist = [dict(epoch=1, test_acc=0.5, epoch_seconds=10.0, train_seconds=10.0),
            dict(epoch=2, test_acc=0.8, epoch_seconds=12.0, train_seconds=22.0)]
    s = train_mod.summarize(hist, [0.5, 0.75, 0.9])
    assert s["time_to_50"] == 10.0 and s["epochs_to_75"] == 2 and s["time_to_90"] is None
    assert s["t_epoch_mean"] == 11.0


def test_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BKFAC_DATA_DIR", str(tmp_path / "nowhere"))
    # missing data: says where it looked and how to provide the data
    assert main(["train", "--profile", "smoke", "--optimizer", "sgd", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "BKFAC_DATA_DIR" in err
    # unknown optimizer
    assert main(["train", "--profile", "smoke", "--optimizer", "adam", "--out", str(tmp_path)]) == 2
    assert "unknown run/optimizer 'adam'" in capsys.readouterr().err
    # unknown profile
    assert main(["train", "--profile", "gpu-huge"]) == 2
    assert "unknown profile 'gpu-huge'" in capsys.readouterr().err
    # a device that does not exist
    with pytest.raises(ValueError, match="does not exist|not available"):
        train_mod.resolve_device("cuda:7")
    with pytest.raises(ValueError, match="unsupported device|invalid device"):
        train_mod.resolve_device("tpu")


ONE_CYCLE = {"max_lr": 0.1, "pct_start": 0.25, "div_factor": 4.0, "final_div_factor": 50.0}


def _smoke_with_one_cycle(tmp_path):
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["runs"]["sgd"]["lr_per_step"] = ONE_CYCLE
    raw["runs"]["sgd"]["hyper"].pop("lr_schedule", None)
    path = tmp_path / "smoke-onecycle.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


def test_lr_per_step_follows_the_one_cycle_and_resumes(fake_data, tmp_path):
    profile = _smoke_with_one_cycle(tmp_path)
    seen = []
    real_step = train_mod.torch.optim.SGD.step

    def spy(opt, *a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return real_step(opt, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod.torch.optim.SGD, "step", spy)
    try:
        full = train_mod.train_run(profile, "sgd", out_root=str(tmp_path / "a"), progress=False)
    finally:
        mp.undo()
    n = profile.train["epochs"] * 10  # 640 images in batches of 64
    assert len(seen) == n
    peak = round(0.25 * n) - 1  # OneCycleLR's last warm-up step
    lo, hi, end = 0.1 / 4, 0.1, 0.1 / (4 * 50)
    # brute force: linear up from lo to hi over [0, peak], linear down to end over [peak, n - 1]
    ref = [lo + (hi - lo) * k / peak if k <= peak else hi + (end - hi) * (k - peak) / (n - 1 - peak) for k in range(n)]
    assert max(abs(a - b) for a, b in zip(seen, ref)) < 1e-12
    # interrupted in the middle of the last epoch and resumed: the schedule comes back with the checkpoint
    part = train_mod.train_run(profile, "sgd", out_root=str(tmp_path / "b"), progress=False, stop_after_batches=4)
    assert part.summary == {"interrupted": True}
    resumed = train_mod.train_run(profile, "sgd", out_root=str(tmp_path / "b"), progress=False, resume=True)
    assert _curves(resumed.history, "lr") == _curves(full.history, "lr")


def test_profile_validation(tmp_path):
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    for mutate, match in [
        (lambda r: r["train"].update(epochz=3), r"unknown key\(s\) \['epochz'\] in profile"),
        (lambda r: r["kfac"].update(rho=1.5), "rho must lie in the open interval"),
        (lambda r: r["kfac"].update(t_brandd=3), "unknown hyper-parameter 't_brandd'"),
        (lambda r: r["model"].update(widht=2), r"unknown model parameter\(s\) \['widht'\]"),
        (lambda r: r["train"].update(targets=[93]), "train.targets must be accuracies"),
        (lambda r: r["runs"].update(bad={"optimizer": "adam"}), "unknown optimizer 'adam'"),
        (lambda r: r["runs"]["sgd"].update(lr_per_step={"max_lr": 0.1}), "must have exactly the keys"),
        (lambda r: r["runs"]["sgd"].update(lr_per_step=dict(ONE_CYCLE, pct_start=1.5)), r"pct_start must be in \(0, 1\)"),
        (lambda r: r["runs"]["sgd"].update(lr_per_step=dict(ONE_CYCLE, max_lr=-1)), "max_lr must be a positive"),
        (lambda r: r["runs"]["b-kfac"].update(lr_per_step=ONE_CYCLE), "lr_per_step and an lr_schedule"),
        (lambda r: r["train"].update(amp="fp8"), "train.amp must be one of"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(raw))
        mutate(bad)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=match):
            load_profile(str(path))
    for name in ("smoke", "cpu", "paper"):
        assert load_profile(name).name == name


def test_data_parallel_train_two_processes(tmp_path, monkeypatch):
    """``bkfac train --nproc 2`` (gloo, loopback) trains on a PNG tree and rank 0 writes the results."""
    from PIL import Image

    data = synthetic_cifar(n_train=640, n_test=200)
    root = tmp_path / "cifar"
    for split, xs, ys in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / CIFAR10_CLASSES[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    monkeypatch.setenv("BKFAC_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["train", "--profile", "smoke", "--optimizer", "b-kfac", "--nproc", "2", "--epochs", "1",
               "--data-dir", str(root), "--out", str(tmp_path / "res"), "--quiet"])
    assert rc == 0
    out = tmp_path / "res" / "smoke" / "b-kfac" / "seed0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["world_size"] == 2 and "kfac" in ck["optimizer"]


def _amp_profile(tmp_path, amp):
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["train"]["amp"] = amp
    path = tmp_path / f"smoke-{amp}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


def test_amp_is_recorded_only_when_set():
    """``train.amp`` left out (or null) keeps a run's recorded inputs as they were before the key
    existed; set, it is part of them."""
    from bkfac.experiments.manifest import run_inputs

    smoke = load_profile("smoke")
    assert smoke.train["amp"] is None and "amp" not in run_inputs(smoke, "b-kfac", 0)["train"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_under_autocast_tracks_float32_and_resumes(amp, fake_data, tmp_path):
    """Every step's forward and loss under autocast (fp16 with a GradScaler): b-kfac's first epoch
    lands near the float32 run's (the tolerance of tests/test_autocast.py), the inputs record
    the precision, and an interrupted run resumes to the uninterrupted numbers (the scaler's
    state travels in the checkpoint)."""
    from bkfac.experiments.manifest import run_inputs

    profile = _amp_profile(tmp_path, amp)
    assert run_inputs(profile, "b-kfac", 0)["train"]["amp"] == amp
    ref = train_mod.train_run(load_profile("smoke"), "b-kfac", out_root=str(tmp_path / "f32"), progress=False)
    full = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "a"), progress=False)
    assert full.summary["inputs"]["train"]["amp"] == amp
    for h, r in zip(full.history, ref.history):
        assert abs(h["train_loss"] - r["train_loss"]) < 0.2 * r["train_loss"]
    assert _curves(full.history) != _curves(ref.history)  # autocast did run
    train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, stop_after_batches=4)
    ck = load_checkpoint(tmp_path / "b" / profile.name / "b-kfac" / "seed0" / "checkpoint.pt")
    assert (ck["grad_scaler"] is not None) == (amp == "fp16")
    resumed = train_mod.train_run(profile, "b-kfac", out_root=str(tmp_path / "b"), progress=False, resume=True)
    assert _curves(resumed.history) == _curves(full.history)
