"""Run profiles (``smoke``, ``cpu``, ``paper``): YAML files validated on load.

A profile fixes every hyper-parameter of an experiment: data subset, model, training
length, targets, the K-FAC family's shared hyper-parameters (on top of the paper's,
:func:`bkfac.paper_defaults`), the optimizer runs of Table 2, and the error study.
A run is ``{optimizer, hyper, label, lr_per_step}``: the optimizer's name, hyper-parameters
on top of the profile's ``kfac`` ones (K-FAC family only), a display label, and optionally a
per-step linear one-cycle learning rate (``max_lr``, ``pct_start``, ``div_factor``,
``final_div_factor``; :func:`bkfac.experiments.train.one_cycle`) in place of an epoch schedule.
Unknown keys and bad values raise ``ValueError`` naming them (malformed YAML too, with its line);
the profile's ``name`` and its run names become results folders, so they must be safe path
components (:func:`~bkfac.experiments.results.check_name`: no ``/``, no leading ``.``). Every
run's optimizer is built once on a tiny model at load time, so a bad hyper-parameter fails
before training.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from .results import check_name

PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILES = ("smoke", "cpu", "paper")

_SCHEMA = {
    "name": str,
    "description": str,
    "device": str,
    "data": {"n_train": (int, type(None)), "n_test": (int, type(None))},
    "model": dict,
    "train": {
        "epochs": int,
        "batch_size": int,
        "test_batch_size": int,
        "seeds": list,
        "targets": list,
        "max_batches_per_epoch": (int, type(None)),
        "amp": (str, type(None)),
    },
    "kfac": dict,
    "runs": dict,
    "error_study": {
        "t_updt": int,
        "window": int,
        "window_epochs": list,
        "repeats": int,
        "layer": str,
    },
}

#: train keys a profile may leave out, with the value they then take (not recorded in a run's
#: inputs while they keep it, so adding one leaves the stored runs' inputs as they were)
OPTIONAL_TRAIN = {"amp": None}
#: ``train.amp``: the forward and loss under ``torch.autocast`` in this dtype (``fp16`` with a
#: ``torch.amp.GradScaler``); ``None`` trains in float32
AMP_CHOICES = (None, "bf16", "fp16")

KFAC_NAMES = ("k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c")

__all__ = ["Profile", "load_profile", "PROFILES"]


def _check(section: dict, schema: dict, where: str) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(schema)}")
    missing = sorted(set(schema) - set(section))
    if missing:
        raise ValueError(f"missing key(s) {missing} in {where}")
    for key, kind in schema.items():
        value = section[key]
        if isinstance(kind, dict):
            _check(value, kind, f"{where}.{key}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}.{key} has a bad value {value!r} (expected {kind})")


@dataclass
class Profile:
    """A validated run profile (see the YAML files in ``bkfac/experiments/profiles``)."""

    name: str
    raw: dict

    @property
    def device(self) -> str:
        return self.raw["device"]

    @property
    def data(self) -> dict:
        return self.raw["data"]

    @property
    def model(self) -> dict:
        return copy.deepcopy(self.raw["model"])

    @property
    def train(self) -> dict:
        return self.raw["train"]

    @property
    def runs(self) -> dict:
        return self.raw["runs"]

    @property
    def error_study(self) -> dict:
        return self.raw["error_study"]

    def run_names(self) -> list[str]:
        return list(self.raw["runs"])

    def resolve_run(self, name: str) -> tuple[str, dict, str]:
        """``(optimizer name, hyper-parameters, label)`` of run ``name`` (a run of the profile
        or a plain optimizer name)."""
        from ..optim.factory import _normalise, hyper_names

        runs = self.raw["runs"]
        if name not in runs:
            try:
                key = _normalise(name)
            except ValueError:
                raise ValueError(f"unknown run/optimizer {name!r} for profile {self.name!r}; "
                                 f"runs: {', '.join(runs)}") from None
            matches = [r for r, spec in runs.items() if spec["optimizer"] == key and "hyper" not in spec]
            name = matches[0] if matches else key
            spec = runs.get(name, {"optimizer": key})
        else:
            spec = runs[name]
        opt = spec["optimizer"]
        hyper = {}
        if opt in KFAC_NAMES:  # the family's shared settings, where the method uses them
            used = hyper_names(opt)
            hyper.update(copy.deepcopy({k: v for k, v in self.raw["kfac"].items() if k in used}))
        hyper.update(copy.deepcopy(spec.get("hyper", {})))
        return opt, hyper, spec.get("label", name)


LR_PER_STEP_KEYS = ("max_lr", "pct_start", "div_factor", "final_div_factor")


def _check_lr_per_step(where: str, spec) -> None:
    """A run's ``lr_per_step``: the arguments of a linear one-cycle schedule (see
    :func:`bkfac.experiments.train.one_cycle`), all four required."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(LR_PER_STEP_KEYS)}")
    if set(spec) != set(LR_PER_STEP_KEYS):
        raise ValueError(f"{where} must have exactly the keys {', '.join(LR_PER_STEP_KEYS)}, got {sorted(spec)}")
    for key, v in spec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{where}.{key} must be a positive finite number, got {v!r}")
    if not spec["pct_start"] < 1:
        raise ValueError(f"{where}.pct_start must be in (0, 1), got {spec['pct_start']!r}")
    if spec["div_factor"] < 1 or spec["final_div_factor"] < 1:
        raise ValueError(f"{where}: div_factor and final_div_factor must be >= 1 (the peak is max_lr)")


def _validate_runs(profile: Profile) -> None:
    import torch.nn as nn

    from ..optim.factory import check_hyper, hyper_names, hyper_users, make_optimizer, resolve_hyper

    for key, value in profile.raw["kfac"].items():  # the family's shared section, on its own
        users = [n for n in hyper_users(key) if n in KFAC_NAMES]
        if not users:
            raise ValueError(f"profile {profile.name!r}: kfac: unknown hyper-parameter {key!r}; the K-FAC "
                             f"family's are: {', '.join(dict.fromkeys(k for n in KFAC_NAMES for k in hyper_names(n)))}")
        try:
            check_hyper(users[0], {key: value})
        except ValueError as exc:
            raise ValueError(f"profile {profile.name!r}: kfac: {exc}") from None
    for run, spec in profile.runs.items():
        if not isinstance(spec, dict) or "optimizer" not in spec:
            raise ValueError(f"runs.{run} must be a mapping with an 'optimizer' key")
        bad = sorted(set(spec) - {"optimizer", "hyper", "label", "lr_per_step"})
        if bad:
            raise ValueError(f"unknown key(s) {bad} in runs.{run}; allowed: hyper, label, lr_per_step, optimizer")
        opt, hyper, _ = profile.resolve_run(run)
        if "lr_per_step" in spec:
            _check_lr_per_step(f"runs.{run}.lr_per_step", spec["lr_per_step"])
            if hyper.get("lr_schedule") is not None:
                raise ValueError(f"runs.{run}: lr_per_step and an lr_schedule both set the learning rate; keep one")
        tiny = nn.Sequential(nn.Linear(4, 3))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # model-free: types, ranges, unused hyper-parameters, t_rsvd/t_corct multiples of
                # t_brand and phi_crc in (0, 1] with the paper's defaults underneath
                check_hyper(opt, resolve_hyper(opt, hyper))
                o = make_optimizer(opt, tiny, **hyper)
            if hasattr(o, "remove_hooks"):
                o.remove_hooks()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"profile {profile.name!r}, run {run!r}: {exc}") from None


def load_profile(name_or_path: str) -> Profile:
    """Load and validate a profile by name (``smoke``, ``cpu``, ``paper``) or YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"profile file {path} does not exist")
    else:
        if name_or_path not in PROFILES:
            raise ValueError(f"unknown profile {name_or_path!r}; choose one of {', '.join(PROFILES)} "
                             "or give a path to a YAML file")
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ValueError(f"profile {path} is not valid YAML{where}: {problem}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read profile {path}: {exc}") from None
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        for key, default in OPTIONAL_TRAIN.items():
            raw["train"].setdefault(key, default)
    _check(raw, _SCHEMA, f"profile {path.name}")
    check_name(f"profile {path.name}: name", raw["name"])
    for run in raw["runs"]:
        check_name(f"profile {path.name}: run name", run)
    t = raw["train"]
    for key in ("epochs", "batch_size", "test_batch_size"):
        if t[key] < 1:
            raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
    if not all(isinstance(a, float) and 0 < a < 1 for a in t["targets"]):
        raise ValueError(f"train.targets must be accuracies in (0, 1), got {t['targets']}")
    if not t["seeds"] or not all(isinstance(s, int) and s >= 0 for s in t["seeds"]):
        raise ValueError(f"train.seeds must be non-negative integers, got {t['seeds']}")
    for key in ("n_train", "n_test"):
        if raw["data"][key] is not None and raw["data"][key] < 1:
            raise ValueError(f"data.{key} must be >= 1 or null (the whole split), got {raw['data'][key]}")
    if t["max_batches_per_epoch"] is not None and t["max_batches_per_epoch"] < 1:
        raise ValueError(f"train.max_batches_per_epoch must be >= 1 or null, got {t['max_batches_per_epoch']}")
    if t["amp"] not in AMP_CHOICES:
        raise ValueError(f"train.amp must be one of {AMP_CHOICES}, got {t['amp']!r}")
    if raw["device"] not in ("cpu", "cuda") and not raw["device"].startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {raw['device']!r}")
    profile = Profile(raw["name"], raw)
    from .models import build_model

    build_model(profile.model)  # validates the model section (unknown keys -> ValueError)
    _validate_runs(profile)
    return profile
