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

A stored result is *current* when its recorded inputs equal what the profile would run today
(:func:`run_inputs` of the current profile), both taken as :func:`comparable_inputs`
(hyper-parameters the optimizer does not use left out; where only ``inputs_hash`` was recorded,
the hashes are compared); *stale* when they differ (:func:`diff_inputs` names the keys),
*unknown* when it records no inputs.

* :func:`collect_status` -- one :class:`ResultStatus` per stored (or expected) result of a
  profile: training runs, the error study and its seeds; ``bkfac results status`` prints them
  (:func:`format_status`) with the code commit and the age of each.
* :func:`backfill_run` -- ``bkfac results backfill``: give a run trained before inputs were
  recorded its ``inputs``, when :func:`inputs_at_commit` proves them equal to today's; the
  provenance then says it was reconstructed, and from which commit.
* Figures and tables: :func:`record_output` (called by :func:`bkfac.book.save_figure` and
  :func:`~bkfac.book.save_table`) keeps ``manifest.json`` beside them: per file the notebook
  that wrote it, its SHA-256, the profile, the commit, and the stored results it was drawn
  from -- every file under a ``data/results/`` folder that this process has read so far
  (:func:`watch_reads`, a Python audit hook on ``open``), with their hashes, and which of them
  were stale. :func:`check_outputs` lists what does not agree.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..optim.factory import resolve_hyper
from ..optim.schedules import EpochSchedule
from .profiles import KFAC_NAMES, Profile

__all__ = ["canonical", "inputs_hash", "run_inputs", "error_study_inputs", "provenance", "code_commit",
           "flatten", "diff_inputs", "comparable_inputs", "ResultStatus", "run_status", "error_study_status", "collect_status",
           "format_status", "inputs_at_commit", "backfill_run", "watch_reads", "results_read", "clear_reads",
           "record_output", "check_outputs", "backfill_outputs", "stale_reads", "OUTPUT_KINDS",
           "MANIFEST_NAME", "add_results_args", "run_results", "train_steps_per_epoch"]

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


def _resolved_hyper(opt_name: str, hyper: dict, defaults=None) -> dict:
    """The hyper-parameters the optimizer is built with (:func:`~bkfac.optim.factory.resolve_hyper`);
    ``defaults``: another ``{optimizer: defaults}`` than today's :func:`paper_defaults`."""
    if defaults is None:
        return resolve_hyper(opt_name, hyper)
    return {**resolve_hyper(opt_name, hyper, defaults=None), **{
        k: v for k, v in defaults[opt_name].items()
        if k not in hyper and not (k == "lr_schedule" and "lr" in hyper)}}


def run_inputs(profile: Profile, run: str, seed: int, *, defaults: dict | None = None,
               epochs: int | None = None) -> dict:
    """The inputs of training run ``run`` of ``profile`` with ``seed`` (module docstring).
    ``defaults`` (``{optimizer: hyper-parameters}``) replaces today's paper defaults, to rebuild
    the inputs of another commit (:func:`inputs_at_commit`); ``epochs`` is the epoch budget the
    run was trained to when it is not the profile's (``bkfac train --epochs``)."""
    opt_name, hyper, label = profile.resolve_run(run)
    spec = profile.runs.get(run, {})
    train = train_inputs(profile)
    if epochs is not None:
        train["epochs"] = epochs
    resolved = _resolved_hyper(opt_name, hyper, defaults)
    if opt_name == "seng":  # its lr decays per iteration over the epoch's length (train.py)
        resolved["steps_per_epoch"] = train_steps_per_epoch(profile)
    return canonical(dict(
        profile=profile.name, data=profile.data, model=profile.model, train=train, run=run,
        optimizer=opt_name, hyper=resolved, lr_per_step=spec.get("lr_per_step"),
        seed=seed,
    ))


def train_inputs(profile: Profile) -> dict:
    """The ``train`` section as it decides a result: without ``seeds`` (each run records its
    own), and without the optional keys that keep their default (``profiles.OPTIONAL_TRAIN``)."""
    from .profiles import OPTIONAL_TRAIN

    return {k: v for k, v in profile.train.items()
            if k != "seeds" and not (k in OPTIONAL_TRAIN and v == OPTIONAL_TRAIN[k])}


def train_steps_per_epoch(profile: Profile) -> int:
    """Steps per training epoch of ``profile``: ``n_train // batch_size`` (the training loader
    drops the last partial batch), capped by ``max_batches_per_epoch``."""
    from .data import CIFAR10_TRAIN_SIZE

    t = profile.train
    steps = (profile.data.get("n_train") or CIFAR10_TRAIN_SIZE) // t["batch_size"]
    return min(steps, t["max_batches_per_epoch"]) if t.get("max_batches_per_epoch") else steps


def error_study_inputs(profile: Profile, seeds: list[int], *, drive: str, window: int,
                       window_epochs: list[int], algorithms: dict) -> dict:
    """The inputs of the error study: the profile's data, model and train sections, the K-FAC
    hyper-parameters the driver and the shadows use, the study's own settings and seeds."""
    train = train_inputs(profile)
    kfac = {name: _resolved_hyper(*profile.resolve_run(name)[:2])
            for name in ("k-fac", "r-kfac") if profile.resolve_run(name)[0] in KFAC_NAMES}
    return canonical(dict(
        profile=profile.name, data=profile.data, model=profile.model, train=train, kfac=kfac,
        error_study=dict(profile.error_study, window=window, window_epochs=list(window_epochs)),
        drive=drive, algorithms=algorithms, seeds=list(seeds),
    ))


def code_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout ``bkfac`` runs from."""
    sha = _git("rev-parse", "HEAD", timeout=10)
    if not sha:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", timeout=20)
    return {"commit": sha, "dirty": None if status is None else status != ""}


def provenance(device) -> dict:
    """Where and by which code a result is being made (module docstring)."""
    from .. import __version__

    return dict(bkfac=__version__, **code_commit(), torch=torch.__version__, device=str(device),
                threads=torch.get_num_threads(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _git(*args: str, text: bool = True, timeout: float = 30):
    """``git -C REPO args`` stdout (stripped when text), or None when git fails."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=text, timeout=timeout,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() if text else out


# --------------------------------------------------------------------------------------------
# Comparing inputs
# --------------------------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a.b": value}`` of a nested dict. A schedule (``{epoch: value}``, every key a number)
    and an empty dict are single values, so a changed schedule is one key (``hyper.lr_schedule``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not all(str(x).lstrip("-").isdigit() for x in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_ABSENT = object()


def diff_inputs(recorded: dict, current: dict) -> list[str]:
    """The dotted keys (:func:`flatten`) whose values differ between two inputs, compared as
    :func:`inputs_hash` compares them (canonical JSON: ``1`` and ``1.0`` differ)."""
    a, b = flatten(canonical(recorded)), flatten(canonical(current))

    def same(k):
        x, y = a.get(k, _ABSENT), b.get(k, _ABSENT)
        return x is not _ABSENT and y is not _ABSENT and json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)

    return [k for k in sorted(set(a) | set(b)) if not same(k)]


# --------------------------------------------------------------------------------------------
# The status of stored results
# --------------------------------------------------------------------------------------------


@dataclass
class ResultStatus:
    """One stored (or expected) result and how it compares with what its profile runs today.

    ``state``: ``done``, ``partial`` (unfinished: a run's history/checkpoint without summary,
    an error-study seed with only its checkpoint), ``incomplete`` (an error study missing
    seeds), ``missing`` or ``broken`` (files that disagree; ``detail`` names them). ``match``:
    ``current``, ``stale`` (``keys`` differ), ``unknown`` (no recorded inputs) or ``-``."""

    result: str
    kind: str
    path: Path
    state: str
    match: str = "-"
    detail: str = ""
    keys: list = field(default_factory=list)
    progress: str = ""
    provenance: dict | None = None
    busy: bool = False
    info: dict = field(default_factory=dict)

    @property
    def why(self) -> str:
        """``match`` with its reason, one line."""
        if self.match == "stale":
            return "stale: " + ", ".join(self.keys)
        if self.match == "unknown":
            return f"unknown: {self.detail}"
        if self.state == "broken":
            return f"files disagree: {self.detail}"
        return self.match


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None


def _busy(folder: Path) -> bool:
    """Whether a process holds the training lock of a run folder (``bkfac train`` takes an
    exclusive ``flock`` on it while it trains). Probes with a shared lock, released at once."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _used_hyper(opt_name: str) -> set | None:
    """The hyper-parameters optimizer ``opt_name`` uses (its class's ``hyper_parameters()``), or
    None when the class does not say (then nothing is left out)."""
    from ..optim.factory import optimizer_class

    try:
        names = getattr(optimizer_class(opt_name), "hyper_parameters", None)
        return set(names()) if names is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def comparable_inputs(inputs: dict) -> dict:
    """``inputs`` less the hyper-parameters its optimizer does not use (a training run's
    ``hyper``; the error study's ``kfac.<name>``) and less the error study's ``repeats`` (the
    number of seeds; each seed's own is recorded): a value that cannot change a result, such as
    the ``rank`` a profile's shared ``kfac`` section hands to k-fac, never makes it stale."""
    out = canonical(inputs)
    if isinstance(out.get("error_study"), dict):
        # how many seeds the study runs is not an input of any one seed's result
        out["error_study"].pop("repeats", None)
    if isinstance(out.get("hyper"), dict) and isinstance(out.get("optimizer"), str):
        used = _used_hyper(out["optimizer"])
        if used is not None:
            out["hyper"] = {k: v for k, v in out["hyper"].items() if k in used}
    if isinstance(out.get("kfac"), dict):
        for name, hyper in list(out["kfac"].items()):
            used = _used_hyper(name) if isinstance(hyper, dict) else None
            if used is not None:
                out["kfac"][name] = {k: v for k, v in hyper.items() if k in used}
    return out


def _compare(recorded: dict | None, recorded_hash: str | None, expected: dict) -> tuple[str, list[str]]:
    """``(match, keys)`` of recorded inputs (or only their hash) against ``expected``, both
    compared as :func:`comparable_inputs`."""
    if recorded_hash is None and recorded is None:
        return "unknown", []
    if recorded is None:
        return ("current", []) if recorded_hash == inputs_hash(expected) else ("stale", ["(only the hash was recorded)"])
    a, b = comparable_inputs(recorded), comparable_inputs(expected)
    if inputs_hash(a) == inputs_hash(b):
        return "current", []
    return "stale", diff_inputs(a, b) or ["(number types: e.g. 1 against 1.0)"]


def run_status(profile: Profile, root: str | os.PathLike, run: str, seed: int) -> ResultStatus:
    """The status of training run ``run``/``seed`` of ``profile`` under ``root``
    (``<root>/<profile>/<run>/seed<k>/``): its recorded inputs against :func:`run_inputs` of the
    profile, and its number of epochs against the profile's budget."""
    from .results import SUMMARY, inspect_run, load_checkpoint

    d = Path(root) / profile.name / run / f"seed{seed}"
    rs = ResultStatus(f"{profile.name}/{run}/seed{seed}", "run", d, "missing")
    try:
        info = inspect_run(d)
    except ValueError as exc:
        rs.state, rs.detail = "broken", str(exc)
        return rs
    budget = profile.train["epochs"]
    rs.info.update(epochs=info["epochs"], budget=budget, checkpoint_epoch=info["checkpoint_epoch"])
    if info["state"] == "empty":
        rs.detail = "no results"
        return rs
    if run not in profile.runs:
        rs.state = "done" if info["state"] == "done" else "partial"
        rs.match, rs.keys = "stale", [f"runs.{run} (not a run of the profile)"]
        return rs
    expected = run_inputs(profile, run, seed)
    if info["state"] == "partial":
        rs.state, rs.busy = "partial", _busy(d)
        rs.progress = f"epoch {info['epochs']} of {budget}" + ("; being trained now" if rs.busy else "")
        recorded = None
        if info["checkpoint_epoch"] is not None and info["inputs_hash"] is not None:
            try:
                recorded = load_checkpoint(d / "checkpoint.pt", mmap=True).get("inputs")
            except ValueError:
                recorded = None
        rs.match, rs.keys = _compare(recorded, info["inputs_hash"], expected)
        if rs.match == "unknown":
            rs.detail = "no checkpoint with recorded inputs"
        return rs
    summary = _load_json(d / SUMMARY)
    rs.state, rs.provenance = "done", summary.get("provenance")
    rs.info.update(t_epoch=summary.get("t_epoch_mean"), final_test_acc=summary.get("final_test_acc"))
    rs.match, rs.keys = _compare(summary.get("inputs"), summary.get("inputs_hash"), expected)
    if rs.match == "unknown":
        rs.detail = "no recorded inputs"
    if info["epochs"] != budget and rs.match != "unknown":
        rs.keys = [k for k in rs.keys if k != "train.epochs"]
        rs.keys.append(f"train.epochs (ran {info['epochs']}, the profile asks for {budget})")
        rs.match = "stale"
    return rs


def error_study_seeds(profile: Profile) -> list[int]:
    """The seeds ``bkfac error-study`` runs by default: ``repeats`` seeds from the profile's first."""
    first = profile.train["seeds"][0]
    return [first + i for i in range(profile.error_study["repeats"])]


def expected_error_study_inputs(profile: Profile, seeds: list[int]) -> dict:
    """What ``bkfac error-study --profile P`` runs today (the reference drive, the profile's
    windows, the paper's seven algorithms): :func:`error_study_inputs`."""
    from .error_study import PAPER_ALGORITHMS

    es = profile.error_study
    t = es["t_updt"]
    return error_study_inputs(profile, list(seeds), drive="reference", window=es["window"],
                              window_epochs=list(es["window_epochs"]),
                              algorithms={a.key: a.label(t) for a in PAPER_ALGORITHMS})


def error_study_status(profile: Profile, root: str | os.PathLike) -> list[ResultStatus]:
    """The error study of ``profile`` under ``root``: one row for the combined files (what the
    chapters read) and one per seed (on disk or expected)."""
    import torch

    d = Path(root) / profile.name / "error_study"
    name = f"{profile.name}/error_study"
    config = None
    rows = []
    combined = ResultStatus(name, "error study", d, "missing", detail="no results")
    if (d / "config.json").is_file():
        try:
            config = _load_json(d / "config.json")
        except ValueError as exc:
            combined.state, combined.detail = "broken", str(exc)
    on_disk = sorted(int(p.name[4:]) for p in d.glob("seed*") if re.fullmatch(r"seed\d+", p.name) and p.is_dir())
    seeds = sorted(set(on_disk) | set(error_study_seeds(profile)))
    provs = []
    for s in seeds:
        sdir = d / f"seed{s}"
        rs = ResultStatus(f"{name}/seed{s}", "error study seed", sdir, "missing", detail="no results")
        expected = expected_error_study_inputs(profile, [s])
        if (sdir / "run.json").is_file():
            try:
                run = _load_json(sdir / "run.json")
            except ValueError as exc:
                rs.state, rs.detail = "broken", str(exc)
                rows.append(rs)
                continue
            rs.state, rs.provenance = "done", run.get("provenance")
            provs.append(rs.provenance)
            rs.info["seconds"] = (run.get("diag") or {}).get("seconds", {}).get("total")
            recorded = run.get("inputs")
            if recorded is None and config and config.get("inputs") is not None:
                cand = dict(config["inputs"], seeds=[s])
                recorded = cand if inputs_hash(cand) == run.get("inputs_hash") else None
            rs.match, rs.keys = _compare(recorded, run.get("inputs_hash"), expected)
            if rs.match == "unknown":
                rs.detail = "run.json records no inputs"
        elif (sdir / "checkpoint.pt").is_file():
            rs.state = "partial"
            rs.progress = "in progress or interrupted: a checkpoint between windows"
            try:
                ck = torch.load(sdir / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
                key = ck.get("inputs_key") if isinstance(ck, dict) else None
                rs.detail = "its checkpoint records no inputs"
            except Exception as exc:  # noqa: BLE001 - a checkpoint being replaced, or corrupt: say so
                key, rs.detail = None, f"its checkpoint is unreadable ({type(exc).__name__})"
            rs.match, rs.keys = _compare(None, key, expected)
        rows.append(rs)
    if config is not None:
        combined.state = "done" if config.get("complete", True) else "incomplete"
        combined.provenance = provs[0] if provs else None
        combined.progress = f"seeds {config.get('seeds')}"
        want, have = list(error_study_seeds(profile)), config.get("seeds")
        if combined.state == "done" and isinstance(have, list) and set(have) < set(want):
            # fewer seeds than the profile asks for: partial, and compared on the seeds it holds
            combined.state, combined.progress = "partial", f"seeds {have} of {want}"
            want = have
        expected = expected_error_study_inputs(profile, want)
        combined.match, combined.keys = _compare(config.get("inputs"), config.get("inputs_hash"), expected)
        if combined.match == "unknown":
            combined.detail = "config.json records no inputs (written before the study recorded them)"
        combined.info["seconds"] = sum(((r.get("seconds") or {}).get("total") or 0.0) for r in config.get("runs", [])) or None
    return [combined] + rows


def collect_status(profile: Profile, root: str | os.PathLike) -> list[ResultStatus]:
    """Every result of ``profile`` under ``root``: its training runs (the profile's runs and
    seeds, then any other run folder on disk), the error study and its seeds."""
    base = Path(root) / profile.name
    pairs = [(run, s) for run in profile.runs for s in profile.train["seeds"]]
    if base.is_dir():
        for rd in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "error_study"):
            for sd in sorted(rd.glob("seed*")):
                if re.fullmatch(r"seed\d+", sd.name) and (rd.name, int(sd.name[4:])) not in pairs:
                    pairs.append((rd.name, int(sd.name[4:])))
    rows = [run_status(profile, root, run, s) for run, s in pairs]
    return rows + error_study_status(profile, root)


def _archive_status(root: Path, name: str) -> list[ResultStatus]:
    """Run folders under ``root/name`` where ``name`` is no profile: listed, never compared."""
    from .results import inspect_run

    rows = []
    for sd in sorted((root / name).glob("*/seed*")):
        if not (sd.is_dir() and re.fullmatch(r"seed\d+", sd.name)):
            continue
        rs = ResultStatus(f"{name}/{sd.parent.name}/{sd.name}", "archive", sd, "done", "unknown",
                          detail=f"no profile named {name!r} (kept for comparison)")
        try:
            rs.state = inspect_run(sd)["state"]
            if (sd / "summary.json").is_file():
                rs.provenance = _load_json(sd / "summary.json").get("provenance")
        except ValueError as exc:
            rs.state, rs.detail = "broken", str(exc)
        rows.append(rs)
    if (root / name / "error_study" / "config.json").is_file():
        rows.append(ResultStatus(f"{name}/error_study", "archive", root / name / "error_study", "done", "unknown",
                                 detail=f"no profile named {name!r} (kept for comparison)"))
    return rows


def _parse_date(text: str | None):
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M UTC", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            d = _dt.datetime.strptime(text, fmt)
            return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            continue
    return None


def _age(then) -> str:
    if then is None:
        return "-"
    s = max(0.0, (_dt.datetime.now(_dt.timezone.utc) - then).total_seconds())
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


def _committed(path: Path) -> tuple[str | None, str | None]:
    """``(short sha, ISO date)`` of the last commit that changed ``path`` (None outside git)."""
    try:
        rel = Path(path).resolve().relative_to(REPO)
    except ValueError:
        return None, None
    out = _git("log", "-1", "--format=%h %cI", "--", str(rel))
    return tuple(out.split(" ", 1)) if out else (None, None)


def _commit_and_age(rs: ResultStatus) -> tuple[str, str]:
    p = rs.provenance
    if p:
        sha = (p.get("commit") or "?")[:7]
        if p.get("reconstructed"):
            sha += " (reconstructed)"
        elif p.get("dirty"):
            sha += "+dirty"
        return sha, _age(_parse_date(p.get("date")))
    if rs.state in ("missing", "partial"):
        return "-", "-"
    stored = next((rs.path / f for f in ("history.csv", "rows.csv", "metrics_runs.csv") if (rs.path / f).is_file()),
                  rs.path)  # where the numbers are: later commits may rewrite only metadata
    sha, date = _committed(stored)
    return (f"unrecorded; committed in {sha}", _age(_parse_date(date))) if sha else ("unrecorded", "-")


def format_status(rows: list[ResultStatus]) -> str:
    """The table ``bkfac results status`` prints: result, state, config match (with the keys
    that differ or why it is unknown), code commit, age."""
    table = [("result", "state", "config match", "code commit", "age")]
    for rs in rows:
        state = rs.state + (f" ({rs.progress})" if rs.progress else "")
        table.append((rs.result, state, rs.why, *_commit_and_age(rs)))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ---")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Inputs of runs trained before they were recorded
# --------------------------------------------------------------------------------------------

_DUMP_AT_COMMIT = r"""
import json, sys
import bkfac
from bkfac.experiments.profiles import load_profile
from bkfac.optim.factory import paper_defaults

def conv(o):
    if hasattr(o, "to_dict"):
        return {str(k): conv(v) for k, v in sorted(o.to_dict().items())}
    if isinstance(o, dict):
        return {str(k): conv(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [conv(v) for v in o]
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    return str(o)

p = load_profile(sys.argv[1])
names = sorted({spec["optimizer"] for spec in p.raw["runs"].values()})
print(json.dumps(dict(file=bkfac.__file__, version=bkfac.__version__, raw=conv(p.raw),
                      defaults={n: conv(paper_defaults(n)) for n in names})))
"""


@functools.lru_cache(maxsize=8)
def _at_commit(commit: str, profile_name: str) -> dict:
    """The profile (raw YAML) and the paper defaults of its optimizers as the package at
    ``commit`` gives them: its ``bkfac/`` extracted with ``git archive`` and imported in a
    subprocess (nothing of today's code takes part)."""
    data = _git("archive", "--format=tar", commit, "bkfac", text=False, timeout=120)
    if not data:
        raise ValueError(f"cannot read bkfac/ at commit {commit!r} (git archive failed)")
    with tempfile.TemporaryDirectory(prefix="bkfac-at-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        env = dict(os.environ, PYTHONPATH=tmp, PYTHONNOUSERSITE="1")
        proc = subprocess.run([sys.executable, "-c", _DUMP_AT_COMMIT, profile_name], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ValueError(f"the profile {profile_name!r} does not load at commit {commit}: "
                             + (proc.stderr.strip().splitlines() or ["?"])[-1])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if not Path(out["file"]).resolve().is_relative_to(Path(tmp).resolve()):
            raise RuntimeError(f"imported {out['file']} instead of the package of commit {commit}")
    return out


def inputs_at_commit(commit: str, profile_name: str, run: str, seed: int) -> dict:
    """:func:`run_inputs` rebuilt from the profile YAML and ``PAPER_DEFAULTS`` as they were at
    ``commit`` (today's definition of the inputs, applied to that commit's values)."""
    at = copy.deepcopy(_at_commit(commit, profile_name))
    old = Profile(at["raw"]["name"], at["raw"])
    if run not in old.runs:
        raise ValueError(f"run {run!r} is not a run of profile {profile_name!r} at commit {commit}")
    return run_inputs(old, run, seed, defaults=at["defaults"])


#: summary.json keys that later commits may rewrite without changing the run (how the data set is named)
_METADATA_KEYS = ("data",)


def backfill_run(profile: Profile, root: str | os.PathLike, run: str, seed: int, *, commit: str | None = None,
                 write: bool = True) -> tuple[bool, str]:
    """Record the inputs of a finished run that predates recorded inputs, when they are proven
    equal to today's: the run is the one ``commit`` holds (default: the last commit that changed
    its ``history.csv``, where its numbers were stored; its history equal, its summary equal but
    for how the data set is named), and :func:`inputs_at_commit` of that commit hashes as :func:`run_inputs` of
    ``profile`` does. Then ``inputs``, ``inputs_hash`` and a ``provenance`` whose
    ``reconstructed`` entry names the commit are added to ``summary.json`` (with ``write``).
    Returns ``(done, message)``; the message says why not when it is not done."""
    from .results import SUMMARY, inspect_run, write_json

    d = Path(root) / profile.name / run / f"seed{seed}"
    info = inspect_run(d)
    if info["state"] != "done":
        return False, f"{d}: no finished run ({info['state']})"
    summary = _load_json(d / SUMMARY)
    if summary.get("inputs_hash") is not None:
        return False, f"{d / SUMMARY} already records its inputs"
    try:
        rel = d.resolve().relative_to(REPO)
    except ValueError:
        return False, f"{d} is not inside the repository: no commit to reconstruct its inputs from"
    commit = commit or _git("log", "-1", "--format=%H", "--", str(rel / "history.csv"))
    if not commit:
        return False, f"{d}: no commit changed its history.csv (not committed?)"
    full = _git("rev-parse", "--verify", f"{commit}^{{commit}}")
    if not full:
        return False, f"unknown commit {commit!r}"
    if _git("diff", "--quiet", full, "--", str(rel / "history.csv")) is None:
        return False, f"{rel}/history.csv differs from that of commit {full[:7]}: not the run that commit holds"
    then = _git("show", f"{full}:{(rel / SUMMARY).as_posix()}")
    try:
        then = json.loads(then) if then else None
    except ValueError:
        then = None
    if then is None:
        return False, f"commit {full[:7]} holds no readable {rel}/{SUMMARY}"
    moved = sorted(k for k in set(then) | set(summary) if k not in _METADATA_KEYS and then.get(k) != summary.get(k))
    if moved:
        return False, f"{rel}/{SUMMARY} differs from that of commit {full[:7]} in {', '.join(moved)}"
    if summary.get("seed") not in (None, seed) or summary.get("run") not in (None, run):
        return False, f"{d / SUMMARY} is for run {summary.get('run')!r} seed {summary.get('seed')!r}"
    at = copy.deepcopy(_at_commit(full, profile.name))
    old_profile = Profile(at["raw"]["name"], at["raw"])
    if run not in old_profile.runs:
        return False, f"run {run!r} is not a run of profile {profile.name!r} at commit {full[:7]}"
    old = run_inputs(old_profile, run, seed, defaults=at["defaults"])
    new = run_inputs(profile, run, seed)
    match, keys = _compare(old, None, new)
    if match != "current":
        return False, (f"its inputs at commit {full[:7]} differ from today's profile in: "
                       + ", ".join(keys) + "; it stays 'unknown' (retrain it to make it current)")
    head = _git("rev-parse", "HEAD")
    date = _git("show", "-s", "--format=%cI", full)
    when = _parse_date(date)
    prov = dict(
        bkfac=at["version"], commit=full, dirty=None, torch=summary.get("torch"), device=summary.get("device"),
        threads=None, date=when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if when else None,
        reconstructed=dict(
            from_commit=full,
            method=(f"inputs rebuilt by bkfac.experiments.manifest.inputs_at_commit from "
                    f"bkfac/experiments/profiles/{profile.name}.yaml and bkfac/optim/factory.py PAPER_DEFAULTS at "
                    f"commit {full[:7]}, the last commit that changed this run's history.csv; equal (comparable_inputs) to "
                    f"today's profile (at commit {head[:7] if head else '?'})"),
            note=("commit and date are those of the commit that stored the results (the code that trained them "
                  "is at or before it); threads were not recorded"),
            recorded=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        ),
    )
    if write:
        summary.update(inputs=old, inputs_hash=inputs_hash(old), provenance=prov)
        write_json(d / SUMMARY, summary)
    return True, f"{rel}: inputs equal at {full[:7]} and today (hash {inputs_hash(old)[:12]})"


# --------------------------------------------------------------------------------------------
# What this process read: the sources of a figure or table
# --------------------------------------------------------------------------------------------

_READS: dict[str, None] = {}  # absolute paths, in the order first read
_READS_LOCK = threading.Lock()
_WATCHING = False
_MARKER = os.sep + os.path.join("data", "results") + os.sep


def _on_audit(event: str, args) -> None:
    if event != "open":
        return
    try:
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        p = os.fsdecode(os.fspath(path))
        if _MARKER not in p:
            return
        if isinstance(mode, str):
            if any(c in mode for c in "wax+"):
                return
        elif isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            return
        p = os.path.abspath(p)
        name = os.path.basename(p)
        # not sources: notes, temp files, checkpoints (run_state only checks them; never committed)
        if name.startswith(".") or name == "NOTES.md" or name.endswith(".pt"):
            return
        with _READS_LOCK:
            _READS.setdefault(p, None)
    except Exception:  # noqa: BLE001 - an audit hook must never make an open fail
        return


def watch_reads() -> None:
    """From now on, record every file under a ``data/results/`` folder that this process opens
    for reading (a :func:`sys.addaudithook` on ``open``; ``NOTES.md``, temp files and
    checkpoints aside).
    Idempotent. :func:`bkfac.book` turns it on, so a chapter's kernel records what it read."""
    global _WATCHING
    if not _WATCHING:
        sys.addaudithook(_on_audit)
        _WATCHING = True


def results_read() -> list[Path]:
    """The stored-result files this process has read since :func:`watch_reads` (or
    :func:`clear_reads`), in the order first read, those that still exist -- less the files of
    unfinished training runs (a ``seed<k>/`` folder without ``summary.json``): planning reads
    them (epochs done, time per epoch), no result is drawn from them, and they are never
    committed."""
    with _READS_LOCK:
        paths = list(_READS)
    out = []
    for p in paths:
        if not os.path.isfile(p):
            continue
        where = _result_of(Path(p))
        if where is not None and where[2] == "run" and not (Path(p).parent / "summary.json").is_file():
            continue
        out.append(Path(p))
    return out


def clear_reads() -> None:
    with _READS_LOCK:
        _READS.clear()


def _result_of(path: Path) -> tuple[Path, str, str, str | None, int | None] | None:
    """``(root, profile folder, kind, run, seed)`` of a file under ``<root>/<profile>/...``
    where ``root`` ends in ``data/results``; None for other files."""
    parts = Path(path).parts
    idx = [i for i in range(len(parts) - 1) if parts[i] == "data" and parts[i + 1] == "results"]
    if not idx:
        return None
    i = idx[-1]
    root, rest = Path(*parts[: i + 2]), parts[i + 2:]
    if len(rest) >= 3 and rest[1] == "error_study":
        m = re.fullmatch(r"seed(\d+)", rest[2]) if len(rest) >= 4 else None
        return root, rest[0], "error study", None, int(m.group(1)) if m else None
    if len(rest) >= 4 and re.fullmatch(r"seed\d+", rest[2]):
        return root, rest[0], "run", rest[1], int(rest[2][4:])
    return None


_STATUS_CACHE: dict = {}


def stale_reads(profile: str | Profile | None = None) -> dict[str, str]:
    """``{result: why}`` for the results this process read (:func:`results_read`) that are not
    current for their profile (stale, or with no recorded inputs). ``profile``: the profile to
    compare with when its results are among them (a name or a loaded profile)."""
    from .profiles import PROFILES, load_profile

    loaded = {}
    if isinstance(profile, Profile):
        loaded[profile.name] = profile
    out: dict[str, str] = {}
    seen = set()
    for path in results_read():
        where = _result_of(path)
        if where is None:
            continue
        root, pname, kind, run, seed = where
        key = (str(root), pname, kind, run, seed)
        if key in seen:
            continue
        seen.add(key)
        if pname not in loaded:
            if pname not in PROFILES:
                continue
            loaded[pname] = load_profile(pname)
        prof = loaded[pname]
        folder = root / pname / (run if kind == "run" else "error_study")
        stamp = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()))
        cache_key = (key, inputs_hash(prof.raw), stamp)
        if cache_key not in _STATUS_CACHE:
            if kind == "run":
                rows = [run_status(prof, root, run, seed)]
            else:
                rows = [r for r in error_study_status(prof, root)
                        if (seed is None and r.kind == "error study") or r.result.endswith(f"/seed{seed}")]
            _STATUS_CACHE[cache_key] = {r.result: r.why for r in rows if r.match in ("stale", "unknown")}
        out.update(_STATUS_CACHE[cache_key])
    return out


# --------------------------------------------------------------------------------------------
# The manifest of figures and tables
# --------------------------------------------------------------------------------------------

#: The output folders a manifest covers.
OUTPUT_KINDS = ("figures", "tables")
#: The manifest's file name inside each of them.
MANIFEST_NAME = "manifest.json"
_ABOUT = ("What wrote each file of this folder: the notebook, the file's SHA-256, the profile, the commit of the "
          "code (dirty: uncommitted changes), and the stored results it was drawn from ('sources': every file "
          "under data/results/ the notebook's kernel had read when the file was written, with its SHA-256 then; "
          "'unknown' where that was not recorded). Written by bkfac.book.save_figure/save_table; "
          "checked by tests/test_manifest.py.")
_SAVERS = {"figures": "save_figure", "tables": "save_table"}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _notebook_writing(kind: str, name: str, root: Path) -> str | None:
    """The chapter whose code calls ``save_figure``/``save_table`` with the literal ``name``."""
    from .. import book

    pat = re.compile(rf"{_SAVERS[kind]}\s*\([^\n]*?[\"']{re.escape(name)}[\"']")
    for nb_path in book.chapters(root):
        try:
            cells = json.loads(nb_path.read_text(encoding="utf-8")).get("cells", [])
        except (OSError, ValueError):
            continue
        for c in cells:
            if c.get("cell_type") == "code" and pat.search("".join(c.get("source", ""))):
                return _rel(nb_path, root)
    return None


def _writer(kind: str, name: str, root: Path) -> str | None:
    chapter = os.environ.get("BKFAC_CHAPTER", "").strip()  # set by `bkfac reproduce` for each chapter
    if chapter:
        from .. import book

        try:
            return _rel(book.chapter_path(chapter, root), root)
        except ValueError:
            pass
    return _notebook_writing(kind, name, root)


class _Locked:
    """An exclusive ``flock`` on a folder while its manifest is read and rewritten."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def load_manifest(folder: str | os.PathLike) -> dict:
    """``{file name: entry}`` of ``<folder>/manifest.json`` (empty when there is none)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return {}
    data = _load_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{path}: expected an object with a 'files' mapping")
    return files


def _write_manifest(folder: Path, files: dict) -> None:
    from .results import atomic_write_text

    text = json.dumps({"about": _ABOUT, "files": dict(sorted(files.items()))}, indent=1, sort_keys=True)
    atomic_write_text(folder / MANIFEST_NAME, text + "\n")


def record_output(path: str | os.PathLike, profile: str, *, root: Path | None = None) -> dict:
    """Enter the file ``path`` (just written into a ``figures``/``tables`` folder) in that
    folder's manifest: the notebook writing it (``$BKFAC_CHAPTER`` set by ``bkfac reproduce``,
    else the chapter whose code saves that name), its SHA-256, ``profile``, the code commit and
    date, its sources (:func:`results_read`, each with its SHA-256) and which of them are not
    current (:func:`stale_reads`). Returns the entry."""
    from .. import book

    path = Path(path)
    root = root or book.repo_root()
    kind = path.parent.name
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"{path} is not in a figures/ or tables/ folder")
    sources = {_rel(p, root): file_sha256(p) for p in results_read()}
    entry = dict(notebook=_writer(kind, path.stem, root), sha256=file_sha256(path), profile=profile,
                 **code_commit(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 sources=sources)
    stale = stale_reads(profile) if sources else {}
    if stale:
        entry["stale_sources"] = stale
    with _Locked(path.parent):
        files = load_manifest(path.parent)
        files[path.name] = entry
        _write_manifest(path.parent, files)
    return entry


def _output_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))


def check_outputs(root: Path | None = None, base: Path | None = None) -> list[str]:
    """What does not agree in the manifests of ``figures/`` and ``tables/`` under ``base``
    (default: ``root``, the repository; ``.nbrun/smoke`` for the smoke profile's outputs): a file
    missing from its manifest or whose SHA-256 differs, an entry without an existing notebook,
    an entry for a file that is gone, a recorded source that does not exist (notebooks and
    sources are relative to ``root``). Empty: all agree."""
    from .. import book

    root = root or book.repo_root()
    base = base or root
    problems = []
    for kind in OUTPUT_KINDS:
        folder = base / kind
        if not folder.is_dir():
            continue
        try:
            files = load_manifest(folder)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        present = {p.name: p for p in _output_files(folder)}
        for name, p in present.items():
            e = files.get(name)
            if e is None:
                problems.append(f"{kind}/{name} is not in {kind}/{MANIFEST_NAME}")
                continue
            if e.get("sha256") != file_sha256(p):
                problems.append(f"{kind}/{name}: its SHA-256 is not the one {kind}/{MANIFEST_NAME} records "
                                "(written without save_figure/save_table, or edited since)")
            nb = e.get("notebook")
            if not nb or not (root / nb).is_file():
                problems.append(f"{kind}/{name}: notebook {nb!r} does not exist")
            src = e.get("sources")
            if isinstance(src, dict):
                problems += [f"{kind}/{name}: source {s} does not exist" for s in src if not (root / s).is_file()]
            elif src not in ("unknown", []):
                problems.append(f"{kind}/{name}: sources must be a mapping, [] or 'unknown', got {src!r}")
        problems += [f"{kind}/{MANIFEST_NAME} lists {name}, which does not exist" for name in files if name not in present]
    return problems


def changed_sources(root: Path | None = None) -> dict[str, list[str]]:
    """``{"figures/x.png": [source, ...]}``: outputs drawn from stored results that changed
    (or went) since the output was written -- re-execute their notebooks."""
    from .. import book

    root = root or book.repo_root()
    out = {}
    for kind in OUTPUT_KINDS:
        folder = root / kind
        if not (folder / MANIFEST_NAME).is_file():
            continue
        for name, e in load_manifest(folder).items():
            src = e.get("sources")
            if isinstance(src, dict):
                moved = [s for s, h in src.items() if not (root / s).is_file() or file_sha256(root / s) != h]
                if moved:
                    out[f"{kind}/{name}"] = moved
    return out


_READERS = ("ensure_runs(", "load_error_study(", "results_root(", "data/results")


def backfill_outputs(root: Path | None = None) -> list[str]:
    """Enter every file of ``figures/`` and ``tables/`` that its manifest lacks (or records with
    another hash), from what git and the chapters show: the chapter whose code saves that name,
    the profile its committed notebook was executed with, the commit that last changed the
    file. Sources: ``[]`` when that chapter's code reads no stored results, else ``'unknown'``
    (until the chapter is executed again, which records them). Returns the files entered."""
    from .. import book

    root = root or book.repo_root()
    entered = []
    for kind in OUTPUT_KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        with _Locked(folder):
            files = load_manifest(folder)
            for p in _output_files(folder):
                sha = file_sha256(p)
                if files.get(p.name, {}).get("sha256") == sha:
                    continue
                nb = _notebook_writing(kind, p.stem, root)
                reads, profile = True, None
                if nb is not None:
                    cells = json.loads((root / nb).read_text(encoding="utf-8"))["cells"]
                    code = "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
                    reads = any(r in code for r in _READERS)
                    for c in cells:
                        if "injected-parameters" in c.get("metadata", {}).get("tags", []):
                            m = re.search(r"^profile\s*=\s*[\"'](\w+)[\"']", "".join(c.get("source", "")), re.M)
                            profile = m.group(1) if m else None
                rel = _rel(p, root)
                committed = _git("diff", "--quiet", "HEAD", "--", rel) is not None and \
                    _git("ls-files", "--error-unmatch", rel) is not None
                if committed:
                    last = _git("log", "-1", "--format=%H %cI", "--", rel)
                    commit, date = last.split(" ", 1) if last else (None, None)
                    when, dirty = _parse_date(date), None
                    how = "'commit' and 'date' are those of the commit that last changed the file"
                else:
                    commit, dirty = _git("rev-parse", "HEAD"), True
                    when = _dt.datetime.fromtimestamp(p.stat().st_mtime, _dt.timezone.utc)
                    how = "the file was written in the work tree after 'commit' (date: its modification time)"
                files[p.name] = dict(
                    notebook=nb, sha256=sha, profile=profile, commit=commit, dirty=dirty,
                    date=when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if when else None,
                    sources="unknown" if reads else [],
                    note=("entered from git and the chapter's code, not at writing time: " + how + "; " + (
                        "the chapter reads stored results, which were not recorded: executing it again "
                        "records them" if reads else "the chapter's code reads no stored results")),
                )
                entered.append(f"{kind}/{p.name}")
            _write_manifest(folder, files)
    return entered


# --------------------------------------------------------------------------------------------
# `bkfac results ...`
# --------------------------------------------------------------------------------------------


def add_results_args(parser) -> None:
    """Arguments of ``bkfac results {status,backfill}``."""
    sub = parser.add_subparsers(dest="results_cmd", metavar="{status,backfill}", required=True)
    p = sub.add_parser("status", help="each stored result: config match with today's profile, code commit, age")
    p.add_argument("--profile", default=None,
                   help="a profile name or YAML file (a copy shows what its changes make stale); default: every "
                        "profile with results, and the folders of no profile")
    p.add_argument("--root", default=None, help="results root (default: the profile's: data/results, "
                                                 ".nbrun/<profile>/data/results for smoke)")
    p = sub.add_parser("backfill", help="record the inputs of runs trained before inputs were recorded, where "
                                        "they are proven equal to today's")
    p.add_argument("--profile", default="cpu")
    p.add_argument("runs", nargs="*", help="run names (default: every finished run that records no inputs)")
    p.add_argument("--seed", type=int, default=None, help="default: the profile's seeds")
    p.add_argument("--commit", default=None, help="the commit to rebuild the inputs from (default: the last "
                                                   "commit that changed the run's results)")
    p.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    p.add_argument("--outputs", action="store_true", help="instead: enter the figures/tables that the manifests lack")


def _root_for(profile_name: str, root: str | None) -> Path:
    if root is not None:
        return Path(root)
    from .report import results_root

    return results_root(profile_name)


def run_results(args) -> int:
    from .profiles import PROFILES, load_profile

    if args.results_cmd == "backfill":
        if args.outputs:
            for f in backfill_outputs():
                print(f"entered {f}")
            return 0
        profile = load_profile(args.profile)
        root = _root_for(profile.name, None)
        seeds = [args.seed] if args.seed is not None else profile.train["seeds"]
        runs = args.runs or [r.result.split("/")[1] for r in collect_status(profile, root)
                             if r.kind == "run" and r.match == "unknown" and r.state == "done"]
        ok = True
        for run in runs:
            for s in seeds:
                done, msg = backfill_run(profile, root, run, s, commit=args.commit, write=not args.dry_run)
                print(("would backfill " if args.dry_run else "backfilled ") + msg if done else "not backfilled: " + msg)
                ok = ok and done
        return 0 if ok else 1
    if args.profile is not None:
        profile = load_profile(args.profile)
        sections = [(profile, _root_for(profile.name, args.root))]
        archives = []
    else:
        sections = []
        for name in PROFILES:
            root = _root_for(name, args.root)
            if (root / name).is_dir():
                sections.append((load_profile(name), root))
        base = Path(args.root) if args.root else REPO / "data" / "results"
        archives = [p.name for p in sorted(base.iterdir()) if p.is_dir() and p.name not in PROFILES
                    and p.name != "bench"] if base.is_dir() else []
    rows = []
    for profile, root in sections:
        rows += collect_status(profile, root)
    for name in archives:
        rows += _archive_status(base, name)
    if not rows:
        print("no stored results")
        return 0
    print(format_status(rows))
    bench = REPO / "data" / "results" / "bench"
    if args.profile is None and args.root is None and bench.is_dir():
        n = sum(1 for p in bench.iterdir() if p.is_dir())
        print(f"\n{n} benchmark folder(s) under data/results/bench/ record no inputs (`bkfac bench` writes none); "
              "PERFORMANCE.md gives the commit, machine and command of each number taken from them.")
    changed = changed_sources()
    if changed:
        print("\nfigures/tables drawn from stored results that changed since (re-execute their chapters):")
        for f, srcs in changed.items():
            print(f"  {f}: {', '.join(srcs)}")
    return 0
