"""What produced a stored result: its *inputs* (what decides the numbers) and its *provenance*
(where and by which code it was made).

Every producer records both next to its output (a training run in ``summary.json`` under
``inputs``, ``inputs_hash`` and ``provenance``; the error study in ``config.json``):

* **inputs** -- the profile sections and run hyper-parameters that decide the result, fully
  resolved (the paper's defaults that :func:`~bkfac.optim.factory.make_optimizer` fills in
  included, schedules as ``{epoch: value}``), and the seed. Two results with equal inputs are
  the same experiment; :func:`inputs_hash` is the SHA-256 of their canonical JSON.
* **provenance** -- the ``bkfac`` version, the git commit of the code (with ``dirty`` when the
  work tree had uncommitted changes to tracked files), torch version, device, threads, date.
  It says where a result came from; it does not decide whether a result is current.

A stored result is *current* when its recorded ``inputs_hash`` equals the hash of what the
profile would run today (:func:`run_inputs` of the current profile).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path

import torch

from ..optim.factory import paper_defaults
from ..optim.schedules import EpochSchedule
from .profiles import KFAC_NAMES, Profile

__all__ = ["canonical", "inputs_hash", "run_inputs", "error_study_inputs", "provenance", "code_commit"]

REPO = Path(__file__).resolve().parents[2]


def canonical(obj):
    """``obj`` with schedules as ``{epoch: value}`` dicts, tuples as lists and dict keys as
    strings: the JSON form that :func:`inputs_hash` hashes."""
    if isinstance(obj, EpochSchedule):
        return {str(k): canonical(v) for k, v in sorted(obj.to_dict().items())}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot record {type(obj).__name__} {obj!r} as a result input")


def inputs_hash(inputs: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of ``inputs`` (sorted keys)."""
    text = json.dumps(canonical(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _resolved_hyper(opt_name: str, hyper: dict) -> dict:
    """The hyper-parameters the optimizer is built with (``make_optimizer(defaults="paper")``)."""
    full = paper_defaults(opt_name)
    if "lr" in hyper and "lr_schedule" not in hyper:
        full.pop("lr_schedule", None)
    full.update(hyper)
    return full


def run_inputs(profile: Profile, run: str, seed: int) -> dict:
    """The inputs of training run ``run`` of ``profile`` with ``seed`` (module docstring)."""
    opt_name, hyper, label = profile.resolve_run(run)
    spec = profile.runs.get(run, {})
    train = {k: v for k, v in profile.train.items() if k != "seeds"}
    return canonical(dict(
        profile=profile.name, data=profile.data, model=profile.model, train=train, run=run,
        optimizer=opt_name, hyper=_resolved_hyper(opt_name, hyper), lr_per_step=spec.get("lr_per_step"),
        seed=seed,
    ))


def error_study_inputs(profile: Profile, seeds: list[int], *, drive: str, window: int,
                       window_epochs: list[int], algorithms: dict) -> dict:
    """The inputs of the error study: the profile's data, model and train sections, the K-FAC
    hyper-parameters the driver and the shadows use, the study's own settings and seeds."""
    train = {k: v for k, v in profile.train.items() if k != "seeds"}
    kfac = {name: _resolved_hyper(*profile.resolve_run(name)[:2])
            for name in ("k-fac", "r-kfac") if profile.resolve_run(name)[0] in KFAC_NAMES}
    return canonical(dict(
        profile=profile.name, data=profile.data, model=profile.model, train=train, kfac=kfac,
        error_study=dict(profile.error_study, window=window, window_epochs=list(window_epochs)),
        drive=drive, algorithms=algorithms, seeds=list(seeds),
    ))


def code_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout ``bkfac`` runs from."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance(device) -> dict:
    """Where and by which code a result is being made (module docstring)."""
    from .. import __version__

    return dict(bkfac=__version__, **code_commit(), torch=torch.__version__, device=str(device),
                threads=torch.get_num_threads(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
