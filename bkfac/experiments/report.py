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
* :func:`table2_rows`, :func:`paper_table2` -- our Table 2 (one seed) and the paper's published one.
* :func:`ensure_seed_runs`, :func:`table2_over_seeds`, :func:`paper_table2_rows`,
  :func:`table2_display` -- Table 2 over every stored seed (seeds land as they are trained:
  any subset is read, ``n`` is said per cell), beside the paper's ``mean ± sd`` of 10 runs.
* :func:`bench_step_for`, :func:`read_bench_step`, :func:`read_epoch_runs`,
  :func:`t_epoch_display` -- the per-epoch cost columns: the trainings' ``t_epoch``, the
  side-by-side ``bkfac bench step`` of the same model, the GPU timings of the paper's model
  (``data/results/bench/``), the paper's ``t_epoch``, each also as a ratio to k-fac's.

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
    "factor_start",
    "first_lr",
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
    "table2_over_seeds",
    "paper_table2",
    "paper_table1",
    "PAPER_TARGETS",
    "target_keys",
    "seeds_present",
    "ensure_seed_runs",
    "paper_table2_rows",
    "format_mean_sd",
    "paired_paper_targets",
    "table2_display",
    "BenchStep",
    "read_bench_step",
    "bench_root",
    "bench_step_for",
    "read_epoch_runs",
    "t_epoch_display",
    "plot_accuracy_curves",
    "fc0_shape",
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
    "cpu": "about 12-14 hours on 2 CPU cores (3 seeds of 8 trainings of 7 epochs, about 5.3 single-thread "
           "hours per seed, and 3 error-study trajectories of about 2.3 hours each)",
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
    A run folder that another process is training into now (it holds the folder's training
    lock), even before its first epoch is written, is likewise ``None`` for ``cpu``/``paper``.
    A folder whose files disagree (:func:`bkfac.experiments.results.run_state`) raises
    ``ValueError`` naming them."""
    from .. import book
    from .manifest import _busy, run_status
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
        if profile.name in book.IN_PLACE_PROFILES and (state == "partial" or (folder.is_dir() and _busy(folder))):
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


# ---------------------------------------------------------------------------------------------
# Table 2 over seeds, the paper's Table 2 in the same form, and the per-epoch cost columns
# ---------------------------------------------------------------------------------------------

#: The paper's target accuracies (its Table 2 columns), lowest first, as table keys.
PAPER_TARGETS = ("91", "93", "93.5")
#: Our run names for the paper's row labels that differ from them.
_PAPER_ALIASES = {"r-kfac T_inv=25": "r-kfac-tinv25"}
#: The paper's Table 2 t_epoch is over every epoch of its 10 runs of 50 epochs ("500 samples").
PAPER_EPOCH_SAMPLES = 500


def target_keys(profile) -> list[str]:
    """The profile's target accuracies as the keys of the summaries and tables (``0.75 -> "75"``)."""
    return [f"{a * 100:g}" for a in profile.train["targets"]]


def seeds_present(profile, run: str) -> list[int]:
    """The seeds of ``run`` with a finished result (``summary.json``) under :func:`results_root`,
    whether or not the profile lists them (seeds land as they are trained)."""
    folder = results_root(profile.name) / profile.name / run
    out = []
    for d in folder.glob("seed*"):
        if d.name[4:].isdigit() and (d / "summary.json").is_file():
            out.append(int(d.name[4:]))
    return sorted(out)


def ensure_seed_runs(profile, runs, *, seed: int | None = None, device: str = "cpu", data_dir=None,
                     train_missing: bool = True, progress: bool = False, stale: str | None = None
                     ) -> dict[str, list[dict]]:
    """Every stored seed of every run: ``{run: [result, ...]}`` ordered by seed, each result as
    :func:`ensure_runs` returns it plus ``"seed"``. ``seed`` (default: the profile's first) goes
    through :func:`ensure_runs` with ``train_missing`` -- a missing run is trained, as
    ``bkfac reproduce`` plans it; every other finished seed found under :func:`results_root`,
    whether or not the profile lists it, is read back and never trained (seeds land as they are
    trained: ``bkfac train --seed k``). A seed without results (or being trained now) is left
    out, so a run may have fewer seeds than another."""
    runs = list(runs)
    first = profile.train["seeds"][0] if seed is None else seed
    found = sorted({s for r in runs for s in seeds_present(profile, r)} - {first})
    out: dict[str, list[dict]] = {r: [] for r in runs}
    for k in [first] + found:
        got = ensure_runs(profile, runs, seed=k, device=device, data_dir=data_dir,
                          train_missing=train_missing and k == first, progress=progress, stale=stale)
        for r, res in got.items():
            if res is not None:
                out[r].append(dict(res, seed=k))
    for r in out:
        out[r].sort(key=lambda res: res["seed"])
    return out


def paper_table2_rows() -> dict[str, dict]:
    """The paper's Table 2 in the form of :func:`table2_over_seeds` (keyed by our run names,
    targets :data:`PAPER_TARGETS`): times to each target (mean, sd over the runs that reach it;
    "all solvers get to 93% accuracy 10 out of 10 times", so 10 hits at 91 % and 93 %, "# hit
    93.5%" at 93.5 %), ``t_epoch`` over :data:`PAPER_EPOCH_SAMPLES` epochs, epochs to 93 %."""
    out = {}
    f = lambda v: float(v) if v not in (None, "") else math.nan  # noqa: E731
    for label, p in paper_table2().items():
        n = int(p["runs"])
        row = dict(run=_PAPER_ALIASES.get(label, label), label=label, n_seeds=n)
        for key, col in zip(PAPER_TARGETS, ("91", "93", "935")):
            row[f"time_to_{key}_mean"], row[f"time_to_{key}_sd"] = f(p[f"t_acc{col}_mean_s"]), f(p[f"t_acc{col}_sd_s"])
            row[f"hits_{key}"] = int(p["hits_935"]) if key == "93.5" else n
        row["t_epoch_mean"], row["t_epoch_sd"], row["t_epoch_samples"] = (f(p["t_epoch_mean_s"]), f(p["t_epoch_sd_s"]),
                                                                          PAPER_EPOCH_SAMPLES)
        row["epochs_to_93_mean"], row["epochs_to_93_sd"] = f(p["n_acc93_mean"]), f(p["n_acc93_sd"])
        out[row["run"]] = row
    return out


def format_mean_sd(mean, sd=math.nan, n: int | None = None, digits: int = 0, fmt: str | None = None) -> str:
    """``"1237 ± 40 (3)"``: a table cell of a mean over runs, its sd where there is one, and the
    number of runs ``n`` behind it when given; ``"-"`` where there is no value. Numbers are
    written with ``digits`` decimals, or with the format spec ``fmt`` (e.g. ``".2e"``)."""
    if mean is None or mean == "" or not math.isfinite(float(mean)) or n == 0:
        return "-"
    spec = fmt or f".{digits}f"
    cell = format(float(mean), spec)
    if sd is not None and sd != "" and math.isfinite(float(sd)):
        cell += f" ± {format(float(sd), spec)}"
    return cell + (f" ({n})" if n is not None else "")


def paired_paper_targets(n: int) -> list[str]:
    """The paper's targets (:data:`PAPER_TARGETS`) paired with a profile's ``n`` targets, lowest
    with lowest and top with top (all three for ``n = 3``; 91 % and 93.5 % for ``n = 2``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    last = len(PAPER_TARGETS) - 1
    if n == 1:
        return [PAPER_TARGETS[-1]]
    return [PAPER_TARGETS[round(i * last / (n - 1))] for i in range(n)]


def table2_display(profile, rows: list[dict], paper_rows: dict[str, dict] | None = None) -> list[dict]:
    """The cells of chapter 6's Table 2: per run, ours beside the paper's for each pair of
    targets (ours lowest with the paper's lowest, ...), the hits of the top target out of the
    seeds, the epochs to the middle target and the final accuracy (targets paired by
    :func:`paired_paper_targets`). Ours are ``mean ± sd (n)``
    over the seeds (:func:`table2_over_seeds` rows), the paper's ``mean ± sd`` of its 10 runs
    (:func:`paper_table2_rows`)."""
    paper_rows = paper_table2_rows() if paper_rows is None else paper_rows
    ours_t = target_keys(profile)
    mid, top = ours_t[len(ours_t) // 2], ours_t[-1]
    out = []
    for r in rows:
        p = paper_rows.get(r["run"], {})
        line = {"run": r["label"], "seeds": r["n_seeds"]}
        for ours, theirs in zip(ours_t, paired_paper_targets(len(ours_t))):
            line[f"t to {ours}% (s)"] = format_mean_sd(r[f"time_to_{ours}_mean"], r[f"time_to_{ours}_sd"],
                                                     r[f"hits_{ours}"])
            line[f"paper t to {theirs}%"] = (format_mean_sd(p[f"time_to_{theirs}_mean"], p[f"time_to_{theirs}_sd"])
                                            if p else "-")
        line[f"hit {top}%"] = f"{r[f'hits_{top}']} of {r['n_seeds']}"
        line["paper hit 93.5%"] = f"{p['hits_93.5']} of {p['n_seeds']}" if p else "-"
        line[f"epochs to {mid}%"] = format_mean_sd(r[f"epochs_to_{mid}_mean"], r[f"epochs_to_{mid}_sd"],
                                                  r[f"hits_{mid}"], digits=1)
        line["paper epochs to 93%"] = format_mean_sd(p["epochs_to_93_mean"], p["epochs_to_93_sd"], digits=1) if p else "-"
        line["final acc (%)"] = format_mean_sd(100 * r["final_acc_mean"], 100 * r["final_acc_sd"], r["n_seeds"], 1)
        out.append(line)
    return out


@dataclass
class BenchStep:
    """A stored ``bkfac bench step`` (``step.csv``, ``step.log``, ``profile.yaml``): per
    optimizer, the amortised seconds per step and per epoch, measured side by side."""

    folder: Path
    rows: dict  # optimizer -> step.csv row (numbers as float)
    machine: str  # the log's "machine:" line, or "" when absent

    def epoch_seconds(self, run: str) -> float | None:
        r = self.rows.get(run)
        return None if r is None else float(r["epoch_s"])

    @property
    def where(self) -> str:
        from .. import book

        return book.display_path(self.folder)


def read_bench_step(folder) -> BenchStep:
    """Read a ``bkfac bench step`` folder (``data/results/bench/<name>/``)."""
    from .results import read_csv

    folder = Path(folder)
    if not (folder / "step.csv").is_file():
        raise ValueError(f"{folder} holds no step.csv (not a `bkfac bench step` folder)")
    rows = {r["optimizer"]: r for r in read_csv(folder / "step.csv")}
    machine = ""
    if (folder / "step.log").is_file():
        machine = next((ln.strip()[len("machine:"):].strip() for ln in (folder / "step.log").read_text().splitlines()
                        if ln.startswith("machine:")), "")
    return BenchStep(folder, rows, machine)


def bench_root() -> Path:
    """``data/results/bench`` of the repository: benchmarks are measurements of the machine, the
    same for every profile's chapters."""
    from .. import book

    return book.repo_root() / "data" / "results" / "bench"


def bench_step_for(profile, root=None) -> BenchStep | None:
    """The stored ``bkfac bench step`` of ``profile``'s model: among ``<root>/*/profile.yaml``
    (default :func:`bench_root`) those of the same profile name and model, the one that also
    agrees on the training settings (epochs, batch), then on the K-FAC settings, then by folder
    name; ``None`` when no stored bench step measured this model."""
    import yaml

    root = Path(root) if root is not None else bench_root()
    best = None
    for y in sorted(root.glob("*/profile.yaml")):
        if not (y.parent / "step.csv").is_file():
            continue
        try:
            raw = yaml.safe_load(y.read_text())
        except yaml.YAMLError:
            continue
        if not isinstance(raw, dict) or raw.get("name") != profile.name or raw.get("model") != profile.model:
            continue
        train = raw.get("train") or {}
        score = (sum(train.get(k) == profile.train.get(k) for k in ("epochs", "batch_size")),
                 raw.get("kfac") == profile.raw.get("kfac"))
        if best is None or score > best[0]:
            best = (score, y.parent)
    return read_bench_step(best[1]) if best else None


def read_epoch_runs(folder) -> dict[str, float]:
    """``{run: t_epoch_mean}`` of the one-epoch trainings stored under ``folder/<run>/summary.json``
    (``bkfac train --synthetic-data`` timings, e.g. ``data/results/bench/cuda-h200/epochs``)."""
    out = {}
    for s in sorted(Path(folder).glob("*/summary.json")):
        with open(s) as fh:
            d = json.load(fh)
        out[d.get("run", s.parent.name)] = float(d["t_epoch_mean"])
    return out


def t_epoch_display(rows: list[dict], paper_rows: dict[str, dict] | None = None, *, bench: BenchStep | None = None,
                    gpu_epochs: dict[str, float] | None = None, gpu_step: BenchStep | None = None) -> list[dict]:
    """The cells of chapter 6's per-epoch cost table: per run, the trainings' ``t_epoch``
    (``mean ± sd (epochs)`` over every epoch of every seed), the side-by-side ``bench step``
    epoch of the same model (``bench``), the paper's model on a GPU timed by one training epoch
    (``gpu_epochs``) and by ``bench step`` (``gpu_step``), the paper's ``t_epoch``; and each as a
    ratio to k-fac's in the same column, which is what compares across machines."""
    paper_rows = paper_table2_rows() if paper_rows is None else paper_rows
    cols = {
        "trainings": {r["run"]: r["t_epoch_mean"] for r in rows},
        "bench": {r["run"]: bench.epoch_seconds(r["run"]) for r in rows} if bench else {},
        "gpu epoch": dict(gpu_epochs or {}),
        "gpu step": {r["run"]: gpu_step.epoch_seconds(r["run"]) for r in rows} if gpu_step else {},
        "paper": {k: v["t_epoch_mean"] for k, v in paper_rows.items()},
    }

    def ratio(col, run):
        v, k = cols[col].get(run), cols[col].get("k-fac")
        return f"{v / k:.2f}" if v is not None and k and math.isfinite(v) and math.isfinite(k) else "-"

    def secs(col, run, digits=1):
        v = cols[col].get(run)
        return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "-"

    out = []
    for r in rows:
        run = r["run"]
        p = paper_rows.get(run)
        out.append({
            "run": r["label"],
            "trainings t_epoch (s)": format_mean_sd(r["t_epoch_mean"], r["t_epoch_sd"], r["t_epoch_samples"], 1),
            "trainings / k-fac": ratio("trainings", run),
            "bench step epoch (s)": secs("bench", run),
            "bench / k-fac": ratio("bench", run),
            "GPU, 1 epoch (s)": secs("gpu epoch", run, 2),
            "GPU, bench step epoch (s)": secs("gpu step", run, 2),
            "GPU bench / k-fac": ratio("gpu step", run),
            "paper t_epoch (s)": format_mean_sd(p["t_epoch_mean"], p["t_epoch_sd"], digits=1) if p else "-",
            "paper / k-fac": ratio("paper", run),
        })
    return out


#: Line style and marker of each run in chapter 6's curves (overlapping runs stay visible).
_RUN_STYLES = {
    "sgd": ((0, (5, 2)), "x"), "seng": ("-.", "v"), "k-fac": ((0, (1, 1)), "+"), "r-kfac": ((0, (3, 1, 1, 1)), "D"),
    "r-kfac-tinv25": ((0, (6, 1, 1, 1, 1, 1)), "P"), "b-kfac": ("-", "o"), "b-kfac-c": (":", "^"),
    "b-r-kfac": ("--", "s"), "sre-kfac": ((0, (2, 2)), "*"),
}


def _changes(schedule) -> list[tuple[int, object, object]]:
    """``(epoch, before, after)`` for each change of an epoch schedule ``{epoch: value}``."""
    if not isinstance(schedule, dict):
        return []
    items = sorted((int(k), v) for k, v in schedule.items())
    return [(e, items[i - 1][1], v) for i, (e, v) in enumerate(items) if i and v != items[i - 1][1]]


def plot_accuracy_curves(profile, results: dict[str, list[dict]], *, width: float = 7.8, floor: float | None = None):
    """Chapter 6's accuracy curves: test accuracy (%) against cumulative training time (s, left)
    and against the epoch (right), one faint line per seed and the mean over the seeds (at each
    epoch all of them reached) as a bold line with its run's own style and marker; the profile's
    targets dotted; the K-FAC damping changes of the profile (``kfac.damping_phi``) marked on the
    epoch axis; the legend below the panels. The y-range starts at ``floor`` (default: 15 points
    below the lowest target), so the first epochs of the slow starters do not set the scale.
    ``results`` maps a run to its seeds' results (:func:`ensure_seed_runs`). Returns the figure."""
    import matplotlib.pyplot as plt

    if not any(results.values()):
        raise ValueError("results holds no run with a stored seed")
    targets = [100 * a for a in profile.train["targets"]]
    lo = floor if floor is not None else max(0.0, min(targets) - 15.0)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(width, 4.0), sharey=True)
    cmap = plt.get_cmap("tab10")
    top = lo + 1.0
    for i, (run, seeds) in enumerate(results.items()):
        if not seeds:
            continue
        color = cmap(i % 10)
        ls, mk = _RUN_STYLES.get(run, ("-", "o"))
        n_ep = min(len(s["history"]) for s in seeds)
        for s in seeds:
            h = s["history"]
            a1.plot([float(r["train_seconds"]) for r in h], [100 * float(r["test_acc"]) for r in h], color=color,
                    lw=0.7, alpha=0.3, ls=ls)
            a2.plot([int(float(r["epoch"])) for r in h], [100 * float(r["test_acc"]) for r in h], color=color,
                    lw=0.7, alpha=0.3, ls=ls)
        mean_t = [sum(float(s["history"][e]["train_seconds"]) for s in seeds) / len(seeds) for e in range(n_ep)]
        mean_a = [100 * sum(float(s["history"][e]["test_acc"]) for s in seeds) / len(seeds) for e in range(n_ep)]
        label = f"{profile.resolve_run(run)[2]} (n={len(seeds)})"
        a1.plot(mean_t, mean_a, color=color, lw=1.5, ls=ls, marker=mk, ms=4, label=label)
        a2.plot(range(1, n_ep + 1), mean_a, color=color, lw=1.5, ls=ls, marker=mk, ms=4)
        top = max([top] + mean_a + [100 * float(r["test_acc"]) for s in seeds for r in s["history"]])
    for ax in (a1, a2):
        for t in targets:
            ax.axhline(t, color="0.5", ls=":", lw=0.8)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(lo, top + 1.0)
    for t in targets:  # inside the panel: the figure keeps its width (the book's column)
        a2.text(0.99, t, f"target {t:g} %", transform=a2.get_yaxis_transform(), fontsize=7, va="bottom", ha="right",
                color="0.4")
    for e, before, after in _changes(profile.raw.get("kfac", {}).get("damping_phi")):
        a2.axvline(e - 0.5, color="0.3", ls="--", lw=0.8)
        a2.text(e - 0.5, lo + 0.5, f" K-FAC damping {before} -> {after}", fontsize=7, rotation=90, va="bottom",
                ha="right", color="0.3")
    a1.set_xlabel("cumulative training time (s)")
    a2.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (%)")
    a1.set_title(f"y-axis from {lo:g} %: earlier epochs below it", fontsize=8)
    a2.set_title("faint: each seed; bold: mean over seeds", fontsize=8)
    handles, names = a1.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (-(-len(names) // 4)) + 0.02, 1, 1))
    return fig


def fc0_shape(profile) -> tuple[int, int]:
    """``(in_features, out_features)`` of the first fully-connected layer (FC0) of ``profile``'s
    model, built on the ``meta`` device (no memory, no weights)."""
    from .models import build_model

    with torch.device("meta"):
        model = build_model(profile.model)
    fc = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    if fc is None:
        raise ValueError(f"profile {profile.name!r}'s model has no fully-connected layer")
    return fc.in_features, fc.out_features


def factor_start(profile, run: str = "b-kfac") -> str:
    """Where run ``run`` of ``profile`` starts its K-factors' exponential average, in words."""
    from .error_study import _kfac_hyper

    init = _kfac_hyper(profile, run).get("factor_init", "batch")
    return {"batch": "from the first batch (eq. 5)", "identity": "from the identity (the author's code)"}[init]


def first_lr(profile, run: str = "b-kfac") -> float:
    """The learning rate run ``run`` of ``profile`` trains with in epoch 1."""
    from ..optim.schedules import as_schedule
    from .error_study import _kfac_hyper

    hyper = _kfac_hyper(profile, run)
    sched = hyper.get("lr_schedule")
    if sched is None:
        return float(hyper["lr"])
    sched = as_schedule(sched)
    return float(sched(1) if callable(sched) else sched)
