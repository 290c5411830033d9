"""bkfac.experiments.probe: the first steps of a run record what they ran and stop on divergence."""

import pytest

import bkfac.experiments.probe as probe
from bkfac.experiments.profiles import load_profile
from bkfac.experiments.results import read_csv

from test_train import synthetic_cifar


@pytest.fixture
def fake_data(monkeypatch):
    data = synthetic_cifar()
    monkeypatch.setattr(probe, "load_cifar10", lambda data_dir=None, **kw: data)
    return data


def test_rows_record_the_start_and_the_learning_rate(fake_data, tmp_path):
    smoke = load_profile("smoke")
    rows = probe.first_steps(smoke, "b-kfac", steps=3, batch_size=16, lr=0.07, factor_init="identity")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["factor_init"] == "identity" and r["lr"] == 0.07 and not r["diverged"] for r in rows)
    assert probe.first_steps(smoke, "b-kfac", steps=1, batch_size=16)[0]["factor_init"] == "batch"
    path = probe.write_probe(rows, "smoke", out_root=tmp_path)
    assert [r["factor_init"] for r in read_csv(path)] == ["identity"] * 3


def test_a_diverging_run_stops_and_says_so(fake_data):
    smoke = load_profile("smoke")
    rows = probe.first_steps(smoke, "sgd", steps=12, batch_size=16, lr=1e4, diverged_at=1.5)
    assert rows[-1]["diverged"] and len(rows) < 12
    assert not any(r["diverged"] for r in rows[:-1])
    with pytest.raises(ValueError, match="steps"):
        probe.first_steps(smoke, "sgd", steps=0)


def _rows(label, init, lr, losses, diverged_last=False):
    return [dict(label=label, run="b-kfac", factor_init=init, batch_size=8, step=k, loss=v, lr=lr, seconds=0.1,
                 diverged=diverged_last and k == len(losses) - 1) for k, v in enumerate(losses)]


def test_summary_says_which_configuration_trains():
    rows = (_rows("falls", "identity", 0.3, [2.3, 2.2, 2.1, 2.0, 1.9, 1.9, 1.8])
            + _rows("flat", "batch", 0.3, [2.3, 3.0, 2.4, 2.9, 2.3, 2.4, 2.3])
            + _rows("blows up", "batch", 0.3, [2.3, 2.5, 4.0, 30.0], diverged_last=True)
            + _rows("falls then diverges", "batch", 0.05, [2.3, 1.5, 1.2, 1.0, 1.0, 20.0], diverged_last=True))
    s = {r["label"]: r for r in probe.summarize_probe(rows)}
    assert list(s) == ["falls", "flat", "blows up", "falls then diverges"]
    assert s["falls"]["trains"] and s["falls"]["steps"] == 7
    assert s["falls"]["last_loss_mean"] == pytest.approx((2.0 + 1.9 + 1.9 + 1.8 + 2.1) / 5)
    assert not s["flat"]["trains"] and not s["flat"]["diverged"]
    assert not s["blows up"]["trains"] and s["blows up"]["diverged"]
    assert not s["falls then diverges"]["trains"]


def test_read_probe_parses_what_write_probe_wrote(tmp_path):
    rows = _rows("a", "identity", 0.3, [2.3, 2.0], diverged_last=True)
    probe.write_probe(rows, "smoke", out_root=tmp_path)
    back = probe.read_probe("smoke", out_root=tmp_path)
    assert back == rows
    assert probe.read_probe("cpu", out_root=tmp_path) == []
    fig = probe.plot_probe({"smoke": back})
    assert len(fig.axes[0].lines) == 2  # the curve and the cross of the diverged step
