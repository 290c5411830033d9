"""The B-update policy (Sec. 3.5, 4.2, 6): the paper B-updates the first FC layer only and runs
r-kfac for every other layer; ``d > n_M + r`` ("mixed") is our generalisation."""

import warnings

import pytest
import torch
import torch.nn as nn

import bkfac
from bkfac.experiments.models import build_model
from bkfac.experiments.profiles import load_profile


def _planned(name: str, model: nn.Module, n: int = 2, **hyper):
    """The optimizer and its plan for batch size ``n`` (describe() before any step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bkfac.make_optimizer(name, model, **hyper)
    return opt, opt.describe(batch_size=n, input_shape=(3, 32, 32))


@pytest.mark.parametrize("profile", ["cpu", "paper"])
@pytest.mark.parametrize("name", ["b-kfac", "b-r-kfac", "b-kfac-c"])
def test_profiles_b_update_fc0_only(profile, name):
    torch.manual_seed(0)
    model = build_model(load_profile(profile).model)
    opt, plan = _planned(name, model)
    assert opt.policy == "first-fc"
    rows = [r for r in plan if r["kind"] != "unsupported"]
    brand = {(r["layer"], r["factor"]) for r in rows if r["method"].startswith("brand")}
    assert brand == {("fc0", "A"), ("fc0", "G")}, brand
    for r in rows:
        if r["layer"] != "fc0":
            assert r["method"] in ("rsvd", "eigh"), r  # r-kfac (eigh where too small for rank r)
    table = opt.describe_table(batch_size=2, input_shape=(3, 32, 32))
    assert "fc0" in table and "brand" in table and "first FC, d > r" in table


def test_mixed_policy_also_takes_fc1_on_the_paper_model():
    """Our rule d > n_M + r puts FC1's A-factor (d = 2049) on the B-update path too."""
    torch.manual_seed(0)
    model = build_model(load_profile("paper").model)
    _, plan = _planned("b-kfac", model, policy="mixed")
    brand = {(r["layer"], r["factor"]) for r in plan if r["method"].startswith("brand")}
    assert ("fc1", "A") in brand and ("fc0", "A") in brand


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        bkfac.BKFAC(nn.Linear(3, 2), policy="first")
