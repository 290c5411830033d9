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
:func:`write_probe` (``data/results/<profile>/lr-probe/probe.csv``); :func:`read_probe`,
:func:`summarize_probe` (one row per configuration: did it diverge, did the loss fall) and
:func:`plot_probe` show it.
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
from .results import read_csv, results_dir, write_csv

__all__ = ["first_steps", "write_probe", "read_probe", "summarize_probe", "plot_probe", "TRAINS_RULE"]

#: When a probed configuration "trains" (:func:`summarize_probe`).
TRAINS_RULE = ("it trains when no step diverged and the mean loss of its last 5 steps lies at least 5 % "
               "below its first step's loss")


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


def read_probe(profile: str, out_root=None) -> list[dict]:
    """The rows :func:`write_probe` wrote for ``profile`` (numbers parsed; ``[]`` when absent)."""
    path = results_dir(profile, out_root) / "lr-probe" / "probe.csv"
    if not path.is_file():
        return []
    out = []
    for r in read_csv(path):
        out.append(dict(r, batch_size=int(r["batch_size"]), step=int(r["step"]), loss=float(r["loss"]),
                        lr=float(r["lr"]), seconds=float(r["seconds"]) if r["seconds"] else None,
                        diverged=r["diverged"] == "True"))
    return out


def summarize_probe(rows: list[dict], tail: int = 5, drop: float = 0.05) -> list[dict]:
    """One row per configuration (``label``, in order of appearance): its start
    (``factor_init``), lr, steps run, first loss, mean loss of the last ``tail`` steps, whether
    a step diverged, and ``trains`` by :data:`TRAINS_RULE` (no divergence and the tail mean at
    least ``drop`` below the first loss)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    out = []
    for label in labels:
        sel = sorted((r for r in rows if r["label"] == label), key=lambda r: r["step"])
        losses = [r["loss"] for r in sel]
        diverged = any(r["diverged"] for r in sel)
        last = sum(losses[-tail:]) / len(losses[-tail:])
        out.append(dict(label=label, run=sel[0]["run"], factor_init=sel[0]["factor_init"], lr=sel[0]["lr"],
                        batch_size=sel[0]["batch_size"], steps=len(sel), first_loss=losses[0], last_loss_mean=last,
                        max_loss=max(losses), diverged=diverged,
                        trains=(not diverged) and last <= (1.0 - drop) * losses[0]))
    return out


def plot_probe(panels: dict[str, list[dict]], path=None):
    """Training loss over the first steps, one panel per model (``{title: rows}``), one line per
    configuration: colour by the factor start, solid for lr 0.3 and dashed otherwise; a cross
    marks a diverged step. Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(2, n)  # two panels a row: the figure fits the book's column (850 px)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows + 0.5), squeeze=False)
    flat = [ax for row in axes for ax in row]
    colours = {"batch": "tab:red", "identity": "tab:blue"}
    legend: dict[str, object] = {}
    for ax, (title, rows) in zip(flat, panels.items()):
        for label in dict.fromkeys(r["label"] for r in rows):
            sel = sorted((r for r in rows if r["label"] == label), key=lambda r: r["step"])
            ls = "-" if abs(sel[0]["lr"] - 0.3) < 1e-12 else "--"
            start = "identity" if sel[0]["factor_init"] == "identity" else "first batch"
            key = f"lr {sel[0]['lr']:g}, EA from the {start}"
            (line,) = ax.plot([r["step"] for r in sel], [r["loss"] for r in sel], ls, marker=".", ms=3,
                              color=colours.get(sel[0]["factor_init"], "0.4"), label=key)
            legend.setdefault(key, line)
            for r in sel:
                if r["diverged"]:
                    ax.plot(r["step"], r["loss"], "x", color="k", ms=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats)")
        ax.set_yscale("log")
    spare = flat[n:]
    for ax in spare:
        ax.axis("off")
    if spare:  # the legend in the empty panel, clear of the data
        spare[0].legend(legend.values(), legend.keys(), loc="center", fontsize=8, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
