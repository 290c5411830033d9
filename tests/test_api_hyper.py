"""Hyper-parameters are checked when an optimizer is built: every optimizer, every checked
hyper-parameter, a bad value fails at construction naming the argument; a hyper-parameter the
method does not use fails naming the method; the same checks run without a model
(``check_hyper``) and when a run profile is loaded."""

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import yaml

import bkfac
from bkfac.experiments.profiles import PROFILE_DIR, load_profile
from bkfac.optim.factory import OPTIMIZERS, check_hyper, hyper_names, make_optimizer, optimizer_class

NAMES = list(OPTIMIZERS)

#: Bad values of every hyper-parameter any optimizer uses (wrong type or out of range).
BAD = {
    "lr": [-1.0, math.nan, "0.1"],
    "damping_phi": [0.0, -0.1, {1: 0.1, 3: -1.0}, "x"],
    "damping": [0.0, -1.0],
    "rho": [0.0, 1.0, 1.5],
    "t_updt": [0, 2.5, True],
    "t_inv": [0, -3],
    "rank": [0, 2.5, {1: 10, 5: 0}],
    "oversample": [-1, 1.5],
    "power_iters": [-1, 2.0],
    "weight_decay": [-1e-3, math.inf],
    "momentum": [1.0, -0.1],
    "clip": [0.0, -1.0, "big"],
    "clip_mode": ["max"],
    "fisher": ["true"],
    "loss_reduction": ["none"],
    "spectrum_continuation": [1, "yes"],
    "linear_time": ["yes"],
    "alg8_backward": ["yes"],
    "policy": ["first", None],
    "factor_init": ["eye", None, 1],
    "min_damping": [0.0, -1.0],
    "seed": [1.5, "0"],
    "factor_dtype": [torch.int32, "float64"],
    "lr_schedule": [{1: -0.1}, {2: 0.1}, "abc"],
    "params": [5, "weights"],
    "exclude": [nn.Linear, (nn.Linear, 3)],
    "timer": ["t"],
    "sync_timer": [1, None],
    "check_finite": [None],
    "comm": [object()],
    "inverse": ["qr"],
    "t_brand": [0, 1.5],
    "t_rsvd": [0],
    "t_corct": [0],
    "phi_crc": [0.0, 1.5],
    "nesterov": ["yes"],
    "update_freq": [0, 2.5],
    "col_sample_size": [0],
    "lr_scheme": ["cosine"],
    "lr_decay_rate": [-1],
    "lr_decay_epoch": [0],
    "steps_per_epoch": [0],
    "loader": [5],
    "im_size_threshold": [-1],
    "svd_rank": [0],
    "col_scaling": ["x"],
    "implicit_transpose": ["x"],
}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_every_hyper_parameter_has_bad_values():
    """A new hyper-parameter must come with its bad values here (so that it is tested)."""
    used = {k for n in NAMES for k in hyper_names(n)}
    assert used - set(BAD) == set()


CASES = [(n, k, i) for n in NAMES for k in hyper_names(n) for i in range(len(BAD[k]))]


@pytest.mark.parametrize("name,key,i", CASES, ids=[f"{n}-{k}-{i}" for n, k, i in CASES])
def test_bad_value_fails_at_construction_naming_the_argument(name, key, i):
    bad = BAD[key][i]
    pattern = re.escape(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=pattern):
            check_hyper(name, {key: bad})  # no model needed
        with pytest.raises(ValueError, match=pattern):
            make_optimizer(name, model(), **{key: bad})
        with pytest.raises(ValueError, match=pattern):
            optimizer_class(name)(model(), **{key: bad})


def _valid_value(key):
    """A value of ``key`` that the methods using it accept (a class default)."""
    for n in NAMES:
        used = optimizer_class(n).hyper_parameters()
        if key in used:
            return used[key]
    raise AssertionError(key)


UNUSED = [(n, k) for n in NAMES for k in sorted({k for m in NAMES for k in hyper_names(m)} - set(hyper_names(n)))]


@pytest.mark.parametrize("name,key", UNUSED, ids=[f"{n}-{k}" for n, k in UNUSED])
def test_unused_hyper_parameter_names_the_method(name, key):
    value = _valid_value(key)
    cls = optimizer_class(name)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} does not use {key}\b"):
        check_hyper(name, {key: value})
    if key == "loader":  # make_optimizer's own argument: SENG's schedule length, no other method needs it
        make_optimizer(name, model(), loader=[0, 1])
    else:
        with pytest.raises(ValueError, match=rf"^{re.escape(name)} does not use {key}\b"):
            make_optimizer(name, model(), **{key: value})
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} does not use {key}\b"):
        cls(model(), **{key: value})


def test_the_issue_examples():
    with pytest.raises(ValueError, match="t_rsvd=25 must be a multiple of t_brand=10"):
        make_optimizer("b-r-kfac", model(), t_brand=10, t_rsvd=25)
    with pytest.raises(ValueError, match="t_rsvd=30 must be a multiple of t_brand=25"):  # the paper's t_brand
        make_optimizer("b-r-kfac", model(), t_rsvd=30)
    with pytest.raises(ValueError, match="t_corct=25 must be a multiple of t_brand=10"):
        bkfac.BKFACC(model(), t_brand=10, t_corct=25)
    with pytest.raises(ValueError, match="phi_crc must lie in"):
        make_optimizer("b-kfac-c", model(), phi_crc=1.5)
    with pytest.raises(ValueError, match="k-fac does not use rank: k-fac keeps full-rank representations"):
        make_optimizer("k-fac", model(), rank=64)
    with pytest.raises(ValueError, match=r"r-kfac does not use t_brand \(a hyper-parameter of b-kfac, b-r-kfac, b-kfac-c\)"):
        make_optimizer("r-kfac", model(), t_brand=5)
    with pytest.raises(ValueError, match="unknown hyper-parameter 'rnak'"):
        make_optimizer("b-kfac", model(), rnak=64)
    with pytest.raises(ValueError, match="clip must be positive when clip_mode='rms'"):
        make_optimizer("b-kfac", model(), clip=None)
    assert make_optimizer("b-kfac", model(), clip=None, clip_mode=None).clip is None
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        make_optimizer("sgd", model(), nesterov=True, momentum=0.0)
    with pytest.raises(ValueError, match=r"steps_per_epoch=3 differs from len\(loader\)=4"):
        make_optimizer("seng", model(), loader=[0, 1, 2, 3], steps_per_epoch=3)


@pytest.mark.parametrize("name", NAMES)
def test_paper_defaults_hold_only_what_the_method_uses(name):
    assert set(bkfac.paper_defaults(name)) <= set(hyper_names(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not use" warning from the defaults
        make_optimizer(name, model())


def _profile_with(tmp_path, run_hyper: dict, optimizer: str):
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["runs"] = {"x": {"optimizer": optimizer, "hyper": run_hyper}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("optimizer,hyper,match", [
    ("b-kfac-c", {"phi_crc": 1.5, "t_brand": 2, "t_corct": 4}, "phi_crc"),
    ("b-kfac-c", {"t_brand": 2, "t_corct": 5}, "t_corct=5 must be a multiple of t_brand=2"),
    ("b-r-kfac", {"t_brand": 10, "t_rsvd": 25}, "t_rsvd=25 must be a multiple of t_brand=10"),
    ("b-r-kfac", {"t_rsvd": 30}, "t_rsvd=30 must be a multiple of t_brand=25"),  # the paper's t_brand underneath
    ("r-kfac", {"t_brand": 2}, "r-kfac does not use t_brand"),
    ("sgd", {"momentum": 1.5}, "momentum"),
])
def test_profile_validation_runs_the_same_checks(tmp_path, optimizer, hyper, match):
    with pytest.raises(ValueError, match=match):
        load_profile(_profile_with(tmp_path, hyper, optimizer))


def test_the_committed_profiles_pass():
    for name in ("smoke", "cpu", "paper"):
        load_profile(name)


@pytest.mark.parametrize("shared,match", [
    ({"rnak": 3}, r"kfac: unknown hyper-parameter 'rnak'"),
    ({"phi_crc": 2.0}, r"kfac: phi_crc must lie in \(0.0, 1.0\]"),
    ({"policy": "first"}, r"kfac: policy must be 'mixed', 'first-fc' or 'all'"),
])
def test_the_shared_kfac_section_is_checked_on_its_own(tmp_path, shared, match):
    raw = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    raw["kfac"].update(shared)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=match):
        load_profile(str(path))
