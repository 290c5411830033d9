"""The first steps of a profile's run at a chosen learning rate: does it train or diverge?

The paper trains every K-FAC at lr 0.3 in epoch 1 (Sec. 6). Whether that learning rate is
stable depends on what the K-factors hold in the first steps: the EA of eq. (5) started from
the first batch (``kappa(0) = 1``, our default) or from the identity (what the author's code
does; ``factor_init='identity'``). :func:`first_steps` measures it: ``steps`` training steps of run ``run`` of
``profile`` on CIFAR-10 batches of ``batch_size``, with the run's hyper-parameters and
``overrides`` (e.g. ``lr=0.3``), recording the training loss of every step. It stops early,
recording where, when the loss is not finite or exceeds ``diverged_at`` times the first
step's loss.

``bkfac probe`` is not a command: chapters and scripts call :func:`first_steps` and
:func:`write_probe` (``data/results/<profile>/lr-probe/probe.csv``).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..optim.factory import make_optimizer
from .data import load_cifar10, make_loaders
from .models import build_model
from .profiles import Profile
from .results import results_dir, write_csv

__all__ = ["first_steps", "write_probe"]


def first_steps(profile: Profile, run: str, *, steps: int = 15, batch_size: int | None = None, seed: int = 0,
                data_dir=None, device: str = "cpu", diverged_at: float = 5.0, label: str | None = None,
                **overrides) -> list[dict]:
    """Rows ``(label, run, factor_init, batch_size, step, loss, lr, seconds, diverged)`` of the
    first ``steps`` steps (module docstring)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not diverged_at > 1:
        raise ValueError(f"diverged_at must be > 1, got {diverged_at!r}")
    opt_name, hyper, _ = profile.resolve_run(run)
    hyper = {**hyper, **overrides}
    if "lr" in overrides:
        hyper.pop("lr_schedule", None)
    bs = batch_size or profile.train["batch_size"]
    arrays = load_cifar10(data_dir)
    loader, _ = make_loaders(arrays, batch_size=bs, test_batch_size=1000, seed=seed, device=device)
    loader.set_epoch(1)
    torch.manual_seed(seed)
    model = build_model(profile.model).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(opt_name, model, **hyper)
    init = getattr(opt, "factor_init", "")
    if hasattr(opt, "set_epoch"):
        opt.set_epoch(1)
    model.train()
    rows, first = [], None
    it = loader.iter_from(0)
    for k in range(steps):
        x, y = next(it)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        value = float(loss.detach())
        row = dict(label=label or run, run=run, factor_init=init, batch_size=bs, step=k, loss=value,
                   lr=opt.param_groups[0]["lr"], seconds=None)
        if first is None:
            first = value
        if not math.isfinite(value) or value > diverged_at * first:
            row["diverged"] = True
            rows.append(row)
            break
        loss.backward()
        try:
            opt.step()
        except FloatingPointError:
            row["diverged"] = True
            rows.append(row)
            break
        row["seconds"] = time.perf_counter() - t0
        row["diverged"] = False
        rows.append(row)
    return rows


def write_probe(rows: list[dict], profile: str, out_root=None) -> Path:
    """Write the probe rows to ``<results>/<profile>/lr-probe/probe.csv`` (atomic)."""
    return write_csv(results_dir(profile, out_root) / "lr-probe" / "probe.csv", rows,
                     ["label", "run", "factor_init", "batch_size", "step", "loss", "lr", "seconds", "diverged"])
