"""A run folder has one owner state, and ``bkfac train`` checks everything before it trains.

* :func:`run_state` says done / partial / empty and refuses files of different runs (a stale
  summary beside a newer history, a checkpoint of other inputs or seed);
* ``--epochs`` below 1, an unwritable ``--out``, malformed or path-escaping profiles, training into
  a folder that holds a run without ``--resume``/``--overwrite``: each a one-paragraph message and
  exit status 2, before anything trains and without changing any file;
* ``--overwrite`` replaces a run and says so; temp files of a killed writer are removed at start;
  results files get the usual mode; a second process cannot train into a folder being trained into;
* a killed rank of a data-parallel run: a message, not a traceback.

Training uses the smoke profile's synthetic data (``--synthetic-data``: 640 random images).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import bkfac.experiments.train as train_mod
from bkfac.cli import main
from bkfac.experiments.profiles import PROFILE_DIR, load_profile
from bkfac.experiments.results import RUN_FILES, inspect_run, run_state

REPO = Path(__file__).resolve().parents[1]


def _train(out, *extra, run="sgd", epochs="2"):
    return main(["train", "--profile", "smoke", "--optimizer", run, "--synthetic-data", "--quiet", "--epochs", epochs,
                 "--out", str(out), *extra])


def _folder(out, run="sgd"):
    return Path(out) / "smoke-synthetic" / run / "seed0"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to build the data fails the test: the command must stop before training."""
    def refuse(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "synthetic_cifar10", refuse)
    monkeypatch.setattr(train_mod, "load_cifar10", refuse)


def _one_paragraph_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("bkfac train: error: "), err
    assert "\n\n" not in err.strip(), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run and an unfinished one (1 epoch, no summary) of the same inputs."""
    root = tmp_path_factory.mktemp("finished")
    assert _train(root / "done") == 0
    assert _train(root / "part", epochs="1") == 0
    (_folder(root / "part") / "summary.json").unlink()
    return root


def _copy(finished, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(finished / name, dst)
    return dst


# ------------------------------------------------------------------ run_state


def test_run_state_of_finished_unfinished_and_empty_folders(finished, tmp_path):
    assert run_state(_folder(finished / "done")) == "done"
    assert run_state(_folder(finished / "part")) == "partial"
    assert run_state(tmp_path / "nothing" / "seed0") == "empty"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".history.csv.abc.tmp").write_text("x")  # a temp file is not a run
    assert run_state(tmp_path / "e") == "empty"
    info = inspect_run(_folder(finished / "done"))
    assert info["epochs"] == 2 and info["checkpoint_epoch"] == 2 and info["seed"] == 0
    assert info["inputs_hash"] == json.loads((_folder(finished / "done") / "summary.json").read_text())["inputs_hash"]
    # without its checkpoint (committed results): still done
    out = _copy(finished, "done", tmp_path)
    (_folder(out) / "checkpoint.pt").unlink()
    assert run_state(_folder(out)) == "done"
    # history one epoch ahead of the checkpoint (killed between the two writes): unfinished, not a mix
    part = _copy(finished, "part", tmp_path)
    shutil.copy(_folder(finished / "done") / "history.csv", _folder(part) / "history.csv")
    assert run_state(_folder(part)) == "partial"


def test_stale_summary_beside_a_newer_history_is_an_error(finished, tmp_path):
    """The issue's case: a finished run's summary beside the history of a new, unfinished run."""
    out = _copy(finished, "part", tmp_path)
    folder = _folder(out)
    shutil.copy(_folder(finished / "done") / "summary.json", folder / "summary.json")
    with pytest.raises(ValueError, match=r"mixes files of different runs: summary.json says 2 epoch\(s\), "
                                         r"history.csv has 1, checkpoint.pt is at epoch 1; (the recorded inputs differ .*; )?remove"):
        run_state(folder)
    # the same number of epochs but another run's numbers: the final accuracy differs
    out2 = _copy(finished, "done", tmp_path / "x")
    other = json.loads((_folder(out2) / "summary.json").read_text())
    other["final_test_acc"] = other["final_test_acc"] + 0.25
    (_folder(out2) / "summary.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="final test accuracy"):
        run_state(_folder(out2))
    # another inputs_hash or seed in the summary
    for key, value, match in (("inputs_hash", "0" * 64, "recorded inputs differ"), ("seed", 3, "the seeds differ")):
        s = json.loads((_folder(finished / "done") / "summary.json").read_text())
        s[key] = value
        (_folder(out2) / "summary.json").write_text(json.dumps(s))
        with pytest.raises(ValueError, match=match):
            run_state(_folder(out2))


def test_cli_refuses_the_mix_when_it_starts_or_resumes(finished, tmp_path, capsys, no_training):
    out = _copy(finished, "part", tmp_path)
    folder = _folder(out)
    shutil.copy(_folder(finished / "done") / "summary.json", folder / "summary.json")
    before = _snapshot(folder)
    for extra in ((), ("--resume",)):
        assert _train(out, *extra) == 2
        _one_paragraph_error(capsys, "mixes files of different runs", str(folder), "summary.json", "history.csv")
    assert _snapshot(folder) == before


# ------------------------------------------------------------------ arguments checked before training


@pytest.mark.parametrize("epochs", ["-1", "0"])
def test_epochs_below_one_are_errors_and_change_nothing(epochs, finished, tmp_path, capsys, no_training):
    out = _copy(finished, "done", tmp_path)
    before = _snapshot(_folder(out))
    for extra in ((), ("--resume",), ("--overwrite",)):
        assert _train(out, *extra, epochs=epochs) == 2
        _one_paragraph_error(capsys, f"--epochs must be >= 1, got {epochs}")
    assert _snapshot(_folder(out)) == before
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        train_mod.train_run(load_profile("smoke"), "sgd", out_root=str(out), epochs=int(epochs), synthetic_data=True)


def test_finished_run_needs_resume_or_overwrite(finished, tmp_path, capsys, monkeypatch):
    out = _copy(finished, "done", tmp_path)
    folder = _folder(out)
    before = _snapshot(folder)
    with monkeypatch.context() as m:
        m.setattr(train_mod, "synthetic_cifar10", lambda *a, **k: pytest.fail("training started"))
        assert _train(out) == 2
        _one_paragraph_error(capsys, f"{folder} holds a finished run (2 epoch(s))", "--resume", "--overwrite")
        assert _snapshot(folder) == before
        # an unfinished run as well
        part = _copy(finished, "part", tmp_path)
        assert _train(part) == 2
        _one_paragraph_error(capsys, "holds an unfinished run (1 epoch(s) done")
        # --resume to the run's own length: returned as stored, nothing rewritten
        assert _train(out, "--resume") == 0
        assert _snapshot(folder) == before
        # --resume to fewer epochs than it has: an error
        assert _train(out, "--resume", epochs="1") == 2
        _one_paragraph_error(capsys, "beyond the 1 epoch(s) asked for")
        assert _train(out, "--resume", "--overwrite") == 2
        _one_paragraph_error(capsys, "exclude each other")
    # --overwrite replaces it, and says so
    capsys.readouterr()
    assert _train(out, "--overwrite", epochs="1") == 0
    err = capsys.readouterr().err
    assert f"--overwrite: replaced the run in {folder}" in err and "summary.json" in err, err
    assert json.loads((folder / "summary.json").read_text())["epochs_run"] == 1
    assert run_state(folder) == "done"


def test_every_folder_of_optimizer_all_is_checked_before_any_training(finished, tmp_path, capsys, no_training):
    """``--optimizer all`` trains nine runs: a finished one among them stops the command at once."""
    out = _copy(finished, "done", tmp_path)
    assert _train(out, run="all") == 2
    _one_paragraph_error(capsys, f"{_folder(out)} holds a finished run")
    assert sorted(p.name for p in (out / "smoke-synthetic").iterdir()) == ["sgd"]  # no other run was started


def test_resume_of_a_finished_run_to_more_epochs_leaves_no_stale_summary(finished, tmp_path, monkeypatch):
    """While a finished run is continued, its folder holds an unfinished run, not a stale summary."""
    out = _copy(finished, "done", tmp_path)
    folder = _folder(out)
    seen = []
    real = train_mod.evaluate

    def spy(*a, **k):
        seen.append(((folder / "summary.json").exists(), run_state(folder)))
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    assert _train(out, "--resume", epochs="3") == 0
    assert seen == [(False, "partial")]  # during epoch 3
    assert json.loads((folder / "summary.json").read_text())["epochs_run"] == 3
    assert run_state(folder) == "done"


def test_unwritable_out_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "below"):
        assert _train(out) == 2
        _one_paragraph_error(capsys, "cannot write results to", f"{blocker} is not a folder", "--out")
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere: the mode check only holds for other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert _train(ro) == 2
            _one_paragraph_error(capsys, "is not writable")
        finally:
            ro.chmod(0o700)


# ------------------------------------------------------------------ profiles


def _profile_file(tmp_path, mutate, name="p.yaml"):
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    mutate(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("bad", ["../../x", "/abs/x", "a/b", ".hidden", ""])
def test_path_escaping_profile_name_is_refused(bad, tmp_path, capsys, no_training):
    path = _profile_file(tmp_path, lambda r: r.update(name=bad))
    with pytest.raises(ValueError, match="is not a safe name"):
        load_profile(str(path))
    out = tmp_path / "deep" / "er" / "res"
    assert main(["train", "--profile", str(path), "--optimizer", "sgd", "--out", str(out), "--quiet"]) == 2
    _one_paragraph_error(capsys, "is not a safe name")
    assert list(tmp_path.rglob("*")) == [path]  # nothing written anywhere
    assert not Path("/abs").exists()
    # a run name is a folder too
    path = _profile_file(tmp_path, lambda r: r["runs"].update({"../evil": {"optimizer": "sgd"}}))
    with pytest.raises(ValueError, match=r"run name '../evil' is not a safe name"):
        load_profile(str(path))
    # and the API refuses a hand-made Profile with such a name
    p = load_profile("smoke")
    p.name = "../../x"
    with pytest.raises(ValueError, match="is not a safe name"):
        train_mod.train_run(p, "sgd", out_root=str(out), synthetic_data=True)


def test_malformed_profile_yaml_gives_a_message(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: smoke\ntrain: {epochs: 2\nmodel: [1, 2\n")
    with pytest.raises(ValueError, match=r"profile .*broken.yaml is not valid YAML at line \d+"):
        load_profile(str(path))
    assert main(["train", "--profile", str(path), "--quiet"]) == 2
    _one_paragraph_error(capsys, "broken.yaml is not valid YAML")
    path.write_text("")
    assert main(["train", "--profile", str(path), "--quiet"]) == 2
    _one_paragraph_error(capsys, "must be a mapping")
    path.write_text("- just\n- a list\n")
    assert main(["train", "--profile", str(path), "--quiet"]) == 2
    _one_paragraph_error(capsys, "must be a mapping")
    for mutate, match in ((lambda r: r["data"].update(n_train=0), "data.n_train must be >= 1"),
                          (lambda r: r["train"].update(max_batches_per_epoch=0), "max_batches_per_epoch must be")):
        with pytest.raises(ValueError, match=match):
            load_profile(str(_profile_file(tmp_path, mutate)))


# ------------------------------------------------------------------ files of the folder


def test_temp_files_cleaned_at_start_ignored_by_git_and_results_have_the_usual_mode(finished, tmp_path):
    out = _copy(finished, "part", tmp_path)
    folder = _folder(out)
    for name in (".checkpoint.pt.k3j2.tmp", ".history.csv.x9.tmp", ".summary.json.q.tmp"):
        (folder / name).write_bytes(b"half a file")
    assert _train(out, "--resume") == 0
    assert not list(folder.glob(".*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    for name in RUN_FILES:
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    probe = "data/results/cpu/sgd/seed0/.checkpoint.pt.abc123.tmp"
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "-q", probe])
    assert ignored.returncode == 0  # git ignores the temp files of a killed writer


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path):
    import fcntl

    folder = _folder(tmp_path)
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        with pytest.raises(ValueError, match=f"another process is training into {folder}"):
            train_mod.train_run(load_profile("smoke"), "sgd", out_root=str(tmp_path), epochs=1, progress=False,
                                synthetic_data=True)
    finally:
        os.close(fd)
    train_mod.train_run(load_profile("smoke"), "sgd", out_root=str(tmp_path), epochs=1, progress=False,
                        synthetic_data=True)
    assert run_state(folder) == "done"


# ------------------------------------------------------------------ a killed rank


def _killed_rank_worker(rank):
    import signal

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits on the dead peer
    return rank


def _launch_killed(args):
    from bkfac.distributed import launch

    launch(_killed_rank_worker, 2, timeout=20.0)
    return 0


@pytest.mark.timeout(120)
def test_a_killed_rank_gives_a_message_not_a_traceback(monkeypatch, capsys):
    import bkfac.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "train", (__name__, "_no_args", "_launch_killed", "test"))
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bkfac train: error: ") and "Traceback" not in err, err
    assert "rank 1 was killed by SIGKILL without reporting" in err, err


def _no_args(p):
    pass
