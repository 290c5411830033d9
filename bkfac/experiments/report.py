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
* :func:`ensure_runs` -- the Table 2 runs of a profile: read ``history.csv``/``summary.json``,
  or train the missing ones with :func:`bkfac.experiments.train.train_run`.
* :func:`table2_rows`, :func:`paper_table2` -- our Table 2 and the paper's published one.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
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
    "table2_rows",
    "paper_table2",
    "paper_table1",
]


def results_root(profile: str) -> Path:
    """Absolute root under which ``<profile>/<run>/seed<k>/`` and ``<profile>/error_study/`` live."""
    from .. import book

    return book.output_dir("data", profile) / "results" if profile not in book.IN_PLACE_PROFILES \
        else book.repo_root() / "data" / "results"


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


def _summary_path(root: Path, profile: str, run: str, seed: int) -> Path:
    return root / profile / run / f"seed{seed}" / "summary.json"


def ensure_runs(profile, runs, *, seed: int = 0, device: str = "cpu", data_dir=None, train_missing: bool = True,
                progress: bool = False) -> dict[str, dict]:
    """For each run name: ``{"history": [...], "summary": {...}, "trained_now": bool}`` read from
    :func:`results_root`, training the runs whose ``summary.json`` is missing (unless
    ``train_missing`` is false: those runs map to ``None``). An unfinished run (``history.csv``
    without ``summary.json``, e.g. one being trained right now) is never overwritten: with
    ``train_missing`` it is resumed from its checkpoint only for non-committed profiles;
    for ``cpu``/``paper`` it is reported as missing. A stored run whose number of epochs differs
    from the profile's budget is used as it is, with a warning."""
    from .. import book
    from .train import load_history, summarize, train_run

    root = results_root(profile.name)
    use_repo_cache()
    budget = profile.train["epochs"]
    out: dict[str, dict] = {}
    for run in runs:
        if run not in profile.runs:
            raise ValueError(f"run {run!r} is not a run of profile {profile.name!r}; runs: {', '.join(profile.runs)}")
        spath = _summary_path(root, profile.name, run, seed)
        trained = False
        if not spath.is_file():
            busy = (spath.parent / "history.csv").is_file() and profile.name in book.IN_PLACE_PROFILES
            if not train_missing or busy:
                out[run] = None
                continue
            train_run(profile, run, seed=seed, device=device, data_dir=data_dir, out_root=str(root), progress=progress)
            trained = True
        hist = load_history(profile.name, run, seed, out_root=str(root))
        with open(spath) as fh:
            summary = json.load(fh)
        if len(hist) != budget:
            warnings.warn(f"stored run {run!r} of profile {profile.name!r} has {len(hist)} epoch(s), the profile "
                          f"asks for {budget} (made with another version of the profile?); "
                          f"`bkfac train --profile {profile.name} --optimizer {run} --resume` continues a shorter "
                          "one from its checkpoint", stacklevel=2)
        summary.update({k: v for k, v in summarize(hist, profile.train["targets"]).items() if k not in summary})
        out[run] = dict(history=hist, summary=summary, trained_now=trained)
    return out


def table2_rows(profile, results: dict[str, dict | None]) -> list[dict]:
    """Our Table 2: per run, time (s) and epochs to each target, t_epoch mean/sd, best accuracy."""
    rows = []
    for run, res in results.items():
        _, _, label = profile.resolve_run(run)
        row = dict(run=run, label=label)
        if res is None:
            row["status"] = "not run yet"
            rows.append(row)
            continue
        s = res["summary"]
        for a in profile.train["targets"]:
            key = f"{a * 100:g}"
            row[f"time_to_{key}"] = s.get(f"time_to_{key}")
            row[f"epochs_to_{key}"] = s.get(f"epochs_to_{key}")
        row.update(t_epoch_mean=s.get("t_epoch_mean"), t_epoch_std=s.get("t_epoch_std"),
                   best_test_acc=s.get("best_test_acc"), epochs_run=s.get("epochs_run"), status="done")
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
