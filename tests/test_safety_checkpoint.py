"""Checkpoints from disk are loaded with ``weights_only=True``: a crafted ``checkpoint.pt`` cannot run
code on ``--resume``, a truncated one gives a message naming it, and the genuine checkpoints of every
optimizer still resume to the uninterrupted run's numbers.

Training uses the smoke profile's synthetic data (``--synthetic-data``: 640 random images)."""

from __future__ import annotations

import pytest
import torch

import bkfac.experiments.train as train_mod
from bkfac.cli import main
from bkfac.experiments.profiles import load_profile
from bkfac.experiments.results import load_checkpoint

RUNS = ["sgd", "seng", "k-fac", "r-kfac", "r-kfac-tinv25", "sre-kfac", "b-kfac", "b-kfac-c", "b-r-kfac"]


class _CreatesAFile:
    """Unpickled, this object opens (creates) ``path``: a stand-in for any payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train_cli(out, *extra):
    return main(["train", "--profile", "smoke", "--optimizer", "sgd", "--synthetic-data", "--quiet", "--epochs", "2",
                 "--out", str(out), *extra])


def _folder(out, run="sgd"):
    return out / "smoke-synthetic" / run / "seed0"


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    crafted = {"model": _CreatesAFile(marker), "optimizer": {}, "history": [], "epoch": 1, "rng": {}}
    # the file really is a threat to a plain unpickle
    probe = tmp_path / "probe.pt"
    torch.save(crafted, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    folder = _folder(tmp_path / "res")
    folder.mkdir(parents=True)
    torch.save(crafted, folder / "checkpoint.pt")
    assert _train_cli(tmp_path / "res", "--resume") == 2
    err = capsys.readouterr().err
    assert "refusing to load checkpoint" in err and str(folder / "checkpoint.pt") in err, err
    assert "Traceback" not in err and "weights_only" not in err  # no advice to unpickle it after all
    assert not marker.exists()
    # the API refuses it as well (train_run checks the folder itself), and so does load_checkpoint
    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        train_mod.train_run(load_profile("smoke"), "sgd", out_root=str(tmp_path / "res"), resume=True, epochs=2,
                            progress=False, synthetic_data=True)
    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        load_checkpoint(folder / "checkpoint.pt")
    assert not marker.exists()
    assert not (folder / "history.csv").exists()  # nothing trained
    # a plain pickle (not torch's zip format) with the same payload
    import pickle

    (folder / "checkpoint.pt").write_bytes(pickle.dumps(crafted))
    assert _train_cli(tmp_path / "res", "--resume") == 2
    assert "refusing to load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_checkpoint_gives_a_message_naming_it(tmp_path, capsys):
    out = tmp_path / "res"
    assert _train_cli(out, "--epochs", "1") == 0
    ckpt = _folder(out) / "checkpoint.pt"
    (_folder(out) / "summary.json").unlink()  # an unfinished run, killed before its summary
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert _train_cli(out, "--resume") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is truncated or corrupt" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(ckpt)


def test_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path):
    import yaml

    from bkfac.experiments.profiles import PROFILE_DIR

    smoke = load_profile("smoke")
    train_mod.train_run(smoke, "b-kfac", out_root=str(tmp_path), epochs=1, progress=False, synthetic_data=True)
    (_folder(tmp_path, "b-kfac") / "summary.json").unlink()
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["kfac"]["damping_phi"] = 0.2
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"other inputs than this run's \(hyper.damping_phi: 0.1 -> 0.2\)"):
        train_mod.train_run(load_profile(str(path)), "b-kfac", out_root=str(tmp_path), resume=True, progress=False,
                            synthetic_data=True)
    # and a wider model: refused by the recorded inputs before any state is loaded
    raw["kfac"]["damping_phi"] = 0.1
    raw["model"]["fc_hidden"] = 32
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"model.fc_hidden: 64 -> 32"):
        train_mod.train_run(load_profile(str(path)), "b-kfac", out_root=str(tmp_path), resume=True, progress=False,
                            synthetic_data=True)


@pytest.mark.parametrize("run", RUNS)
def test_genuine_checkpoints_of_every_optimizer_resume(run, tmp_path):
    """Loaded with ``weights_only=True``: one epoch, then ``resume`` to two equals two at once."""
    smoke = load_profile("smoke")
    full = train_mod.train_run(smoke, run, out_root=str(tmp_path / "a"), epochs=2, progress=False, synthetic_data=True)
    train_mod.train_run(smoke, run, out_root=str(tmp_path / "b"), epochs=1, progress=False, synthetic_data=True)
    ck = load_checkpoint(_folder(tmp_path / "b", run) / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["seed"] == 0 and len(ck["inputs_hash"]) == 64
    longer = train_mod.train_run(smoke, run, out_root=str(tmp_path / "b"), epochs=2, resume=True, progress=False,
                                 synthetic_data=True)
    keys = ("test_acc", "test_loss", "train_loss", "lr")
    assert [[h[k] for k in keys] for h in longer.history] == [[h[k] for k in keys] for h in full.history]
