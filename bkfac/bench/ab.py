"""``bkfac bench ab``: one optimizer against itself with some hyper-parameters changed, side by side.

``--optimizer`` names a run of the profile (default ``b-kfac``); ``--set KEY=VALUE`` (repeatable,
values read as YAML scalars: ``false``, ``25``, ``0.1``) changes its hyper-parameters. Both
variants are timed by :func:`bkfac.bench.step.bench_step` in one process, on the profile's
model, every kind of step of the optimizer's cycle interleaved round-robin (so the load of a
shared machine hits both alike) and amortised as ``bench step`` amortises. The ratio B / A of
the amortised step comes with its spread over the rounds (round ``i`` compares the two
variants' ``i``-th runs, which ran beside each other). Use it for what a setting buys, for
example Algorithm 8's line 2 (``--set alg8_backward=false``: the weight gradient formed again).
Writes ``ab.csv`` (one row per variant: amortised phases, step and epoch time, the ratio and its
spread) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import yaml

from ..book import display_path
from .common import (format_table, load_average, load_bench_profile, machine_info, machine_line, resolve_device,
                     resolve_dtype, round_ratios, set_threads, write_csv_atomic)
from .step import PHASES, bench_step, steps_per_epoch

COLUMNS = ["variant", "optimizer", "settings"] + [f"{p}_s" for p in PHASES] + [
    "step_s", "epoch_s", "ratio_to_a", "ratio_to_a_min", "ratio_to_a_max", "runs", "profile", "device", "dtype"]


def parse_settings(items) -> dict:
    """``["alg8_backward=false", "t_updt=50"]`` -> ``{"alg8_backward": False, "t_updt": 50}``
    (YAML scalars); ``ValueError`` naming a malformed item."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def ab_profile(profile, run: str, changes: dict):
    """``(profile with one more run, name of that run)``: run ``run`` of ``profile`` with its
    hyper-parameters updated by ``changes`` (checked by the optimizer's own checks)."""
    from ..optim.factory import check_hyper

    if not changes:
        raise ValueError("bench ab needs at least one --set KEY=VALUE")
    opt, hyper, label = profile.resolve_run(run)
    new = {**hyper, **changes}
    check_hyper(opt, new)
    name = f"{run} [" + ", ".join(f"{k}={v}" for k, v in changes.items()) + "]"
    raw = dict(profile.raw)
    raw["runs"] = {**profile.raw["runs"], name: {"optimizer": opt, "hyper": new, "label": f"{label} {name}"}}
    if run not in profile.raw["runs"]:
        raw["runs"][run] = {"optimizer": opt, "hyper": hyper}
    return dataclasses.replace(profile, raw=raw), name


def bench_ab(profile, run: str, changes: dict, **kw) -> list[dict]:
    """Rows :data:`COLUMNS` for variant A (``run`` as the profile has it) and B (with
    ``changes``), timed side by side by :func:`~bkfac.bench.step.bench_step` (``kw``: its
    keyword arguments)."""
    prof, variant = ab_profile(profile, run, changes)
    summary, _ = bench_step(prof, [run, variant], **kw)
    a, b = summary
    rows = []
    for tag, r, settings in (("A", a, "as the profile"), ("B", b, ", ".join(f"{k}={v}" for k, v in changes.items()))):
        spread = round_ratios([sum(x.values()) for x in r["rounds"]], [sum(x.values()) for x in a["rounds"]])
        rows.append({"variant": tag, "optimizer": run, "settings": settings,
                     **{f"{p}_s": r[f"{p}_s"] for p in PHASES}, "step_s": r["step_s"], "epoch_s": r["epoch_s"],
                     "ratio_to_a": r["epoch_s"] / a["epoch_s"], "ratio_to_a_min": min(spread),
                     "ratio_to_a_max": max(spread), "runs": r["runs"], "profile": profile.name,
                     "device": r["device"], "dtype": r["dtype"]})
    return rows


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench ab``."""
    device = resolve_device(args.device)
    profile = load_bench_profile(args, device)
    changes = parse_settings(getattr(args, "set", None))
    run = getattr(args, "optimizer", None) or "b-kfac"
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    print(f"bkfac bench ab  (profile {profile.name}, {run}: A as the profile, B with "
          + ", ".join(f"{k}={v}" for k, v in changes.items()) + f"; {steps_per_epoch(profile)} steps per epoch)")
    print(machine_line(info))
    t0 = time.perf_counter()
    rows = bench_ab(profile, run, changes, device=device, dtype=resolve_dtype(args.dtype), repeats=args.repeats,
                    budget_s=args.max_seconds, seed=args.seed, warmup=not args.quick)
    for r in rows:
        r["rounds"] = f"{r['ratio_to_a_min']:.3g}-{r['ratio_to_a_max']:.3g}"
    print()
    print(format_table(rows, ["variant", "settings"] + [f"{p}_s" for p in PHASES] + ["step_s", "epoch_s",
                                                                                    "ratio_to_a", "rounds"],
                       ["variant", "settings", "data", "fwd/bwd", "stats", "inverse", "precond", "rest", "step s",
                        "epoch s", "/ A", "rounds"]))
    print(f"(amortised means over the cycle; medians of up to {args.repeats} runs per kind of step, interleaved)")
    print(f"load average after the run: {load_average()}")
    path = write_csv_atomic(Path(args.out) / "ab.csv", rows, COLUMNS)
    print(f"wrote {display_path(path)} in {time.perf_counter() - t0:.0f}s")
    return 0
