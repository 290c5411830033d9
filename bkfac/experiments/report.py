"""Small helpers that keep the book's chapters thin (chapters 01, 04 and 06).

* :func:`results_root` -- where a profile's training/error-study results live for the book
  (``data/results`` of the repository for ``cpu``/``paper``; ``.nbrun/<profile>/data/results``
  for ``smoke``, so a test run never writes into the committed results). Absolute, so it does
  not depend on the kernel's working directory (papermill runs in ``chapters/``).
* :func:`use_repo_cache` -- point the decoded-CIFAR cache at the repository's ``data/cache``.
* :func:`first_batch` -- one training batch of the profile (augmented, on ``device``).
* :func:`kfac_warmup` -- train the profile's model a few steps with a K-FAC-family optimizer
  and return it (its dense EA K-factors of eq. (5) are then inspected by chapter 01).
* :func:`factor_spectrum`, :func:`top_r_energy` -- sorted eigenvalues of an EA K-factor and the
  fraction of its trace held by the top ``r`` of them.
* :func:`ensure_runs` -- the Table 2 runs of a profile: read ``history.csv``/``summary.json``
  when their recorded inputs are those the profile runs today, else train them (or reuse them,
  marked, with the ``reuse`` policy) with :func:`bkfac.experiments.train.train_run`.
* :func:`plan_results`, :func:`format_plan`, :func:`execute_plan` -- what ``bkfac reproduce``
  does with the stored results before it executes the chapters: reuse, train, resume or
  retrain each, with the estimated cost, said before anything trains.
* :func:`table2_rows`, :func:`paper_table2` -- our Table 2 and the paper's published one.

A stored result is reused only when its inputs are identical to what the profile runs today
(:func:`bkfac.experiments.manifest.run_status`); a stale one (other inputs) or one that records
no inputs is trained again, unless the policy is ``reuse`` (``bkfac reproduce --reuse-stale``):
then it is used, and the figures and tables drawn from it say so in their stamp
(:func:`bkfac.book.run_stamp`). A run folder whose files disagree (a summary beside the
history of another run) is an error naming them, never a finished run
(:func:`bkfac.experiments.results.run_state`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "results_root",
    "use_repo_cache",
    "first_batch",
    "kfac_warmup",
    "factor_spectrum",
    "top_r_energy",
    "ensure_runs",
    "stale_policy",
    "decide",
    "PlanItem",
    "plan_results",
    "format_plan",
    "execute_plan",
    "FROM_SCRATCH_COST",
    "table2_rows",
    "paper_table2",
    "paper_table1",
]


def results_root(profile: str) -> Path:
    """Absolute root under which ``<profile>/<run>/seed<k>/`` and ``<profile>/error_study/`` live
    (not created: the writers create what they write)."""
    from .. import book

    book._check_profile(profile)
    if profile in book.IN_PLACE_PROFILES:
        return book.repo_root() / "data" / "results"
    return book.repo_root() / book.NBRUN / profile / "data" / "results"


def use_repo_cache() -> Path:
    """Set ``$BKFAC_CACHE_DIR`` to the repository's ``data/cache`` unless already set (the
    default is relative to the working directory, which is ``chapters/`` under papermill)."""
    from .. import book

    if not os.environ.get("BKFAC_CACHE_DIR", "").strip():
        os.environ["BKFAC_CACHE_DIR"] = str(book.repo_root() / "data" / "cache")
    return Path(os.environ["BKFAC_CACHE_DIR"])


def _loaders(profile, seed: int, device, data_dir=None):
    from .data import load_cifar10, make_loaders, subset

    use_repo_cache()
    partial = profile.data["n_train"] is not None or profile.data["n_test"] is not None
    arrays = load_cifar10(data_dir, expected_counts=None) if partial else load_cifar10(data_dir)
    if partial:
        arrays = subset(arrays, profile.data["n_train"] or arrays.n_train,
                        profile.data["n_test"] or arrays.n_test, seed=0)
    t = profile.train
    return make_loaders(arrays, batch_size=t["batch_size"], test_batch_size=t["test_batch_size"],
                        seed=seed, device=device)


def first_batch(profile, seed: int = 0, device: str = "cpu", data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch ``(x, y)`` of epoch 1 of ``profile`` (its batch size, its
    data subset, the training augmentation), on ``device``."""
    train_loader, _ = _loaders(profile, seed, torch.device(device), data_dir)
    train_loader.set_epoch(1)
    return next(iter(train_loader))


def kfac_warmup(profile, steps: int, *, optimizer: str = "k-fac", seed: int = 0, device: str = "cpu",
                data_dir=None, **overrides):
    """Train ``profile``'s model for ``steps`` steps (CIFAR-10, the profile's batch size and
    augmentation) with the profile's ``optimizer`` run (its hyper-parameters, updated with
    ``overrides``, e.g. ``t_updt``). Returns ``(model, optimizer, losses)``; the optimizer's
    hooks are left on (``opt.remove_hooks()`` when done)."""
    from ..optim.factory import make_optimizer
    from .models import build_model

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    dev = torch.device(device)
    train_loader, _ = _loaders(profile, seed, dev, data_dir)
    torch.manual_seed(seed)
    model = build_model(profile.model).to(dev)
    name, hyper, _ = profile.resolve_run(optimizer)
    hyper.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm layers get SGD (listed by describe())
        opt = make_optimizer(name, model, **hyper)
    model.train()
    losses: list[float] = []
    epoch = 1
    while len(losses) < steps:
        opt.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) >= steps:
                break
        epoch += 1
    return model, opt, losses


def factor_spectrum(inv) -> torch.Tensor:
    """Eigenvalues (descending, float64, clamped at 0) of a factor-inverse object's dense EA
    K-factor (eq. (5))."""
    if inv is None or getattr(inv, "factor", None) is None:
        raise ValueError("the factor has no dense EA statistics yet (no statistics step, or a method without them)")
    ev = torch.linalg.eigvalsh(inv.symmetric_factor().double().cpu())
    return ev.flip(0).clamp_min(0.0)


def top_r_energy(eigs: torch.Tensor, r: int) -> float:
    """Fraction of the trace held by the ``r`` largest eigenvalues (1 when ``r >= dim``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative integer, got {r!r}")
    total = float(eigs.sum())
    return float(eigs[:r].sum()) / total if total > 0 else float("nan")


#: What running a profile from scratch costs (its trainings and error study), said where a
#: user decides to run it (``bkfac reproduce``, README).
FROM_SCRATCH_COST = {
    "smoke": "a few minutes",
    "cpu": "about 5-6 hours on 2 CPU cores (8 trainings of 7 epochs, about 3 hours on both cores, then the "
           "error study, about 2 hours)",
    "paper": "about 6 GPU-hours on one H200 (8 trainings of 50 epochs at 5-15 s an epoch, and the error study)",
}

STALE_ENV = "BKFAC_STALE_RESULTS"
_POLICIES = ("retrain", "reuse")


def stale_policy(stale: str | None = None, train_missing: bool = True) -> str:
    """What to do with a stored result that is stale or records no inputs: ``"retrain"`` or
    ``"reuse"``. ``stale`` if given, else ``$BKFAC_STALE_RESULTS`` (set by ``bkfac reproduce``
    for the chapters' kernels), else ``"retrain"`` when training is allowed, ``"reuse"`` when not."""
    value = stale if stale is not None else (os.environ.get(STALE_ENV, "").strip() or None)
    if value is None:
        return "retrain" if train_missing else "reuse"
    if value not in _POLICIES:
        raise ValueError(f"stale-results policy must be one of {', '.join(_POLICIES)}, got {value!r}"
                         + (f" (from ${STALE_ENV})" if stale is None else ""))
    return value


def _epochs_only(rs) -> bool:
    return len(rs.keys) == 1 and rs.keys[0].startswith("train.epochs (ran")


def decide(rs, *, reuse_stale: bool = False, from_scratch: bool = False) -> tuple[str, str]:
    """``(action, why)`` for one :class:`~bkfac.experiments.manifest.ResultStatus`: ``reuse``
    (identical inputs), ``reuse-stale`` (other or unrecorded inputs, ``reuse_stale``), ``train``
    (nothing stored), ``resume`` (an unfinished run of identical inputs, or a shorter finished
    one with its checkpoint), ``retrain`` (other or unrecorded inputs; ``from_scratch``),
    ``wait`` (another process is training it now) or ``error`` (its files disagree)."""
    if rs.state == "broken":
        return "error", rs.detail
    if rs.busy:
        return "wait", "another process is training it now"
    if from_scratch:
        return ("train", "no results") if rs.state == "missing" else ("retrain", "--from-scratch")
    if rs.state == "missing":
        return "train", "no results"
    if rs.match == "current":
        if rs.state == "done":
            return "reuse", "inputs identical to the profile's"
        return "resume", f"unfinished ({rs.detail or rs.state}), inputs identical"
    if reuse_stale and rs.state == "done":
        return "reuse-stale", rs.why
    if (rs.kind == "run" and rs.state == "done" and _epochs_only(rs)
            and rs.info.get("checkpoint_epoch") == rs.info.get("epochs") < rs.info.get("budget", 0)):
        return "resume", rs.why
    return "retrain", rs.why


def _t_epoch_estimate(rs) -> float | None:
    t = rs.info.get("t_epoch")
    if t is None and (rs.path / "history.csv").is_file():
        from .results import read_csv

        try:
            secs = [float(r["epoch_seconds"]) for r in read_csv(rs.path / "history.csv")]
            t = sum(secs) / len(secs) if secs else None
        except (OSError, KeyError, ValueError):
            t = None
    return t if t is not None and math.isfinite(t) else None


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "no stored time to estimate from"
    return f"about {seconds / 3600:.1f} h" if seconds >= 3600 else f"about {max(1.0, seconds / 60):.0f} min"


@dataclass
class PlanItem:
    """One stored result that the chapters need, and what ``bkfac reproduce`` does with it."""

    status: object  # manifest.ResultStatus
    action: str
    why: str
    seconds: float | None  # estimated cost of the action (None: unknown or nothing to do)
    run: str | None = None  # training run name; None for the error study
    seed: int | None = None

    @property
    def trains(self) -> bool:
        return self.action in ("train", "resume", "retrain")


def plan_results(profile, *, runs=(), seed: int = 0, error_study: bool = False, reuse_stale: bool = False,
                 from_scratch: bool = False) -> list[PlanItem]:
    """What to do with each stored result the chapters need (training ``runs`` with ``seed``,
    and the error study if ``error_study``): :func:`decide` on its status, with the cost of
    training estimated from the stored epoch times (or the stored study's duration)."""
    from .manifest import error_study_status, run_status

    if reuse_stale and from_scratch:
        raise ValueError("--reuse-stale (reuse stored results of another configuration) and --from-scratch "
                         "(ignore stored results) exclude each other")
    root = results_root(profile.name)
    budget = profile.train["epochs"]
    items = []
    for run in runs:
        if run not in profile.runs:
            raise ValueError(f"run {run!r} is not a run of profile {profile.name!r}; runs: {', '.join(profile.runs)}")
        rs = run_status(profile, root, run, seed)
        action, why = decide(rs, reuse_stale=reuse_stale, from_scratch=from_scratch)
        items.append(PlanItem(rs, action, why, None, run=run, seed=seed))
    known = [t for t in (_t_epoch_estimate(it.status) for it in items) if t is not None]
    for it in items:
        if not it.trains:
            continue
        t = _t_epoch_estimate(it.status)
        if t is None and known:
            t = sum(known) / len(known)
            it.why += " (cost from the mean epoch time of the profile's stored runs)"
        done = (it.status.info.get("checkpoint_epoch") or it.status.info.get("epochs") or 0) if it.action == "resume" else 0
        it.seconds = t * (budget - done) if t is not None else None
    if error_study:
        rows = error_study_status(profile, root)
        combined, seeds = rows[0], rows[1:]
        action, why = decide(combined, reuse_stale=reuse_stale, from_scratch=from_scratch)
        if combined.state in ("missing", "incomplete") and not from_scratch:
            if any(s.state == "partial" and s.match == "current" for s in seeds) or combined.state == "incomplete":
                action, why = "resume", "unfinished study: complete seeds kept, an interrupted one continued"
        if action == "reuse" and any(s.match not in ("current", "-") for s in seeds if s.state == "done"):
            action, why = "retrain", "a seed's inputs differ: " + "; ".join(
                f"{s.result} {s.why}" for s in seeds if s.state == "done" and s.match not in ("current",))
        secs = combined.info.get("seconds") or (sum(s.info.get("seconds") or 0.0 for s in seeds) or None)
        items.append(PlanItem(combined, action, why, secs if action in ("train", "resume", "retrain") else None,
                              seed=seed))
    return items


def format_plan(profile, items: list[PlanItem]) -> str:
    """The lines ``bkfac reproduce`` prints before it trains anything: one per result, then the
    total estimated cost and the profile's from-scratch cost."""
    lines = []
    for it in items:
        what = it.status.result
        cost = (f"; {_hours(it.seconds)}" if it.seconds is not None else "; cost unknown") if it.trains else ""
        lines.append(f"  {what:34s} {it.action:11s} {it.why}{cost}")
    todo = [it for it in items if it.trains]
    if todo:
        known = [it.seconds for it in todo if it.seconds is not None]
        if known:
            more = "" if len(known) == len(todo) else f" (+ {len(todo) - len(known)} of unknown cost)"
            total = f"{_hours(sum(known))}{more}, from the stored epoch times"
        else:
            total = "cost unknown (nothing stored to estimate it from)"
        lines.append(f"  will train {len(todo)} result(s) before executing the chapters: {total}; profile "
                     f"'{profile.name}' from scratch: {FROM_SCRATCH_COST.get(profile.name, 'unknown')}")
    stale = [it for it in items if it.action == "reuse-stale"]
    if stale:
        lines.append(f"  --reuse-stale: {len(stale)} result(s) of another configuration are used; the figures and "
                     "tables drawn from them say so in their stamp")
    return "\n".join(lines)


def execute_plan(profile, items: list[PlanItem], *, device: str | None = None, data_dir=None,
                 progress: bool = True) -> None:
    """Carry out the training actions of ``items`` (:func:`plan_results`) in order: ``train`` and
    ``retrain`` train from scratch (replacing what is stored), ``resume`` continues from the
    checkpoint. ``wait``/``error`` items raise ``ValueError`` before anything trains."""
    from .error_study import run_error_study
    from .train import train_run

    blocked = [it for it in items if it.action in ("wait", "error")]
    if blocked:
        raise ValueError("cannot use these stored results: " + "; ".join(
            f"{it.status.result}: {it.why}" for it in blocked))
    root = results_root(profile.name)
    use_repo_cache()
    for it in items:
        if not it.trains:
            continue
        if progress:
            print(f"{it.action} {it.status.result} ({it.why}); "
                  f"{_hours(it.seconds) if it.seconds is not None else 'cost unknown'}", flush=True)
        if it.run is not None:
            train_run(profile, it.run, seed=it.seed, device=device, data_dir=data_dir, out_root=str(root),
                      resume=it.action == "resume", overwrite=it.action == "retrain", progress=progress)
        else:
            run_error_study(profile, seed=it.seed, device=device, data_dir=data_dir, out_root=str(root),
                            progress=progress, resume=it.action != "retrain" or it.why != "--from-scratch")


def ensure_runs(profile, runs, *, seed: int = 0, device: str = "cpu", data_dir=None, train_missing: bool = True,
                progress: bool = False, stale: str | None = None) -> dict[str, dict]:
    """For each run name: ``{"history", "summary", "trained_now", "dir", "config"}`` read from
    :func:`results_root`, or ``None`` when it is not available.

    A stored run whose recorded inputs are those ``profile`` runs today is read back. A run that
    is missing is trained when ``train_missing`` (else ``None``). A stale run (other inputs, or
    another number of epochs) or one that records no inputs follows :func:`stale_policy`
    (``stale``, else ``$BKFAC_STALE_RESULTS``): ``"retrain"`` trains it again (a shorter run
    with its checkpoint is continued), ``"reuse"`` reads it with a warning, and ``config`` says
    why it is not current (figures and tables drawn from it say so: :func:`bkfac.book.run_stamp`).
    Before training, one line says what is trained and why. An unfinished run (a history or
    checkpoint without summary, e.g. one being trained now) is never overwritten: it is resumed
    from its checkpoint only for non-committed profiles; for ``cpu``/``paper`` it is ``None``.
    A folder whose files disagree (:func:`bkfac.experiments.results.run_state`) raises
    ``ValueError`` naming them."""
    from .. import book
    from .manifest import run_status
    from .results import run_state
    from .train import load_history, summarize, train_run

    policy = stale_policy(stale, train_missing)
    root = results_root(profile.name)
    use_repo_cache()
    budget = profile.train["epochs"]
    out: dict[str, dict] = {}
    for run in runs:
        if run not in profile.runs:
            raise ValueError(f"run {run!r} is not a run of profile {profile.name!r}; runs: {', '.join(profile.runs)}")
        folder = root / profile.name / run / f"seed{seed}"
        state = run_state(folder)
        if state == "partial" and profile.name in book.IN_PLACE_PROFILES:
            out[run] = None  # maybe being trained right now: `bkfac reproduce` resumes it when it is not
            continue
        rs = run_status(profile, root, run, seed)
        action, why = decide(rs, reuse_stale=policy == "reuse")
        if action in ("wait", "error"):
            raise ValueError(f"stored run {run!r} of profile {profile.name!r} in {folder}: {why}")
        trained = False
        if action in ("train", "resume", "retrain") and not (state == "done" and policy == "reuse"):
            if not train_missing:
                if state != "done":
                    out[run] = None
                    continue
                action = "reuse-stale"
            else:
                print(f"ensure_runs: {action} {profile.name}/{run} seed {seed} ({why}); "
                      f"{_hours(_t_epoch_estimate(rs) * budget if _t_epoch_estimate(rs) else None)}", flush=True)
                train_run(profile, run, seed=seed, device=device, data_dir=data_dir, out_root=str(root),
                          resume=action == "resume", overwrite=action == "retrain", progress=progress)
                trained = True
                if run_state(folder) != "done":
                    raise ValueError(f"training {run!r} left {folder} unfinished")
                rs = run_status(profile, root, run, seed)
        if rs.match != "current":
            if _epochs_only(rs):
                warnings.warn(f"stored run {run!r} of profile {profile.name!r} has {rs.info['epochs']} epoch(s), the "
                              f"profile asks for {budget} (made with another version of the profile?); "
                              f"`bkfac train --profile {profile.name} --optimizer {run} --resume` continues a shorter "
                              "one from its checkpoint", stacklevel=2)
            else:
                warnings.warn(f"stored run {run!r} of profile {profile.name!r} is used as it is although its "
                              f"configuration is not the profile's ({rs.why}); figures and tables drawn from it "
                              "say so (`bkfac reproduce` trains it again unless --reuse-stale)", stacklevel=2)
        hist = load_history(profile.name, run, seed, out_root=str(root))
        with open(folder / "summary.json") as fh:
            summary = json.load(fh)
        summary.update({k: v for k, v in summarize(hist, profile.train["targets"]).items() if k not in summary})
        out[run] = dict(history=hist, summary=summary, trained_now=trained, dir=folder, config=rs.why)
    return out


def table2_rows(profile, results: dict[str, dict | None]) -> list[dict]:
    """Our Table 2: per run, time (s) and epochs to each target, t_epoch mean/sd, best accuracy,
    and ``config`` (``current``, or why the run is not: :func:`ensure_runs`). A result whose
    summary and history disagree (epochs, seed; its folder's files re-checked with
    :func:`bkfac.experiments.results.run_state`) raises ``ValueError`` naming them."""
    from .results import run_state

    rows = []
    for run, res in results.items():
        _, _, label = profile.resolve_run(run)
        row = dict(run=run, label=label)
        if res is None:
            row["status"] = "not run yet"
            rows.append(row)
            continue
        s, h = res["summary"], res["history"]
        where = res.get("dir")
        if where is not None and run_state(where) != "done":
            raise ValueError(f"run {run!r}: {where} holds no finished run (its summary.json is gone)")
        problems = []
        if s.get("epochs_run") != len(h):
            problems.append(f"summary.json says {s.get('epochs_run')} epoch(s), history.csv has {len(h)}")
        if where is not None and s.get("seed") is not None and f"seed{s['seed']}" != Path(where).name:
            problems.append(f"summary.json is for seed {s['seed']}, the folder is {Path(where).name}")
        if problems:
            files = f"{Path(where) / 'summary.json'} and {Path(where) / 'history.csv'}" if where else "its files"
            raise ValueError(f"run {run!r}: {files} disagree: " + "; ".join(problems))
        for a in profile.train["targets"]:
            key = f"{a * 100:g}"
            row[f"time_to_{key}"] = s.get(f"time_to_{key}")
            row[f"epochs_to_{key}"] = s.get(f"epochs_to_{key}")
        row.update(t_epoch_mean=s.get("t_epoch_mean"), t_epoch_std=s.get("t_epoch_std"),
                   best_test_acc=s.get("best_test_acc"), epochs_run=s.get("epochs_run"), status="done",
                   config=res.get("config", "unknown: not read by ensure_runs"))
        rows.append(row)
    return rows


def table2_over_seeds(profile, runs: dict[str, list[dict]]) -> list[dict]:
    """Table 2 as the paper reports it, over seeds (its caption): per run, for each target the
    mean and sd of the time and of the epochs to it over the seeds that reach it, with how many
    do (``hits_<target>``, "# hit" of the paper, out of ``n_seeds``); ``t_epoch`` mean and sd over
    every epoch of every seed (the paper's 500 samples of 10 runs x 50 epochs); the final
    accuracy's mean and sd. ``runs`` maps a run name to its seeds' ``{"summary", "history"}``
    (:func:`ensure_runs`' results, one per seed). Spreads are ``nan`` below two samples."""
    from .verdicts import mean_sd

    rows = []
    for run, seeds in runs.items():
        _, _, label = profile.resolve_run(run)
        row = dict(run=run, label=label, n_seeds=len(seeds))
        for a in profile.train["targets"]:
            key = f"{a * 100:g}"
            times = [s["summary"].get(f"time_to_{key}") for s in seeds]
            reached = [t for t in times if t is not None]
            row[f"time_to_{key}_mean"], row[f"time_to_{key}_sd"], row[f"hits_{key}"] = mean_sd(reached)
            ep = [s["summary"].get(f"epochs_to_{key}") for s in seeds if s["summary"].get(f"epochs_to_{key}")]
            row[f"epochs_to_{key}_mean"], row[f"epochs_to_{key}_sd"], _ = mean_sd(ep)
        epochs = [float(h["epoch_seconds"]) for s in seeds for h in s["history"]]
        row["t_epoch_mean"], row["t_epoch_sd"], row["t_epoch_samples"] = mean_sd(epochs)
        row["final_acc_mean"], row["final_acc_sd"], _ = mean_sd([s["summary"].get("final_test_acc") for s in seeds])
        rows.append(row)
    return rows


def _paper_csv(name: str) -> list[dict]:
    from .. import book

    with open(book.repo_root() / "data" / "paper" / name, newline="") as fh:
        return list(csv.DictReader(fh))


def paper_table2() -> dict[str, dict]:
    """The paper's Table 2 (``data/paper/table2.csv``), keyed by optimizer label."""
    return {r["optimizer"]: r for r in _paper_csv("table2.csv")}


def paper_table1() -> dict[str, dict]:
    """The paper's Table 1 (``data/paper/table1.csv``), keyed by optimizer label."""
    return {r["optimizer"]: r for r in _paper_csv("table1.csv")}
