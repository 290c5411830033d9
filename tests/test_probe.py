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
