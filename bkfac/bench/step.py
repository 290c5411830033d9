"""``bkfac bench step``: per-step and per-epoch time of every optimizer, split into phases.

What is timed, in one process, on the profile's model (``--profile``; ``cpu`` by default,
``paper`` on CUDA, ``smoke`` with ``--quick``), for each optimizer of Table 2 (k-fac,
r-kfac, sre-kfac, b-kfac, b-r-kfac, b-kfac-c, SENG, and our SGD baseline) built by
:func:`bkfac.make_optimizer` with the hyper-parameters of the profile's run of that name
(:meth:`~bkfac.experiments.profiles.Profile.resolve_run`):

* **data** -- the next batch from the project's training loader
  (:class:`~bkfac.experiments.data.CIFARLoader`: shuffle, random crop + flip, normalisation,
  on the device) over a pool of *synthetic* uint8 images: the real augmentation path, but
  not the decoding of CIFAR-10 (done once per run and cached) -- the benchmark needs no
  data set;
* **forward_backward** -- ``zero_grad``, the forward pass, the cross-entropy and
  ``loss.backward()`` (K-FAC's capture hooks and SENG's per-sample capture included);
* the optimizer's own phases from ``optimizer.timer.last``
  (:class:`~bkfac.optim.timer.PhaseTimer`): **statistics**, **inverse**, **precondition**,
  **rest** (anything of ``step()`` outside the timed phases is added to *rest*). On CUDA the
  timer is built with ``sync_timer=True`` and every phase boundary is synchronised.

Per-epoch estimate (amortisation over the periods). What a step costs depends only on
which periodic events fire at its index ``k``: ``k % T == 0`` for each period of the
optimizer (K-FAC family: T_updt, T_inv and the method's T_brand / T_rsvd / T_corct; SENG:
its curvature ``update_freq``; SGD: none). Over one *cycle* of ``L = lcm(periods)`` steps
every combination occurs with a fixed frequency. Each *kind* of step (a distinct
combination) is timed at a representative index (the first ``k`` in ``1..L`` that has it;
the optimizer's step counter is set to ``k`` before the step, after the optimizer has been
initialised by a real step 0 and a warm-up step, so its state has steady-state sizes), and

    t_step = sum over kinds (count_kind / L) * t_kind,     t_epoch = steps_per_epoch * t_step,

with ``steps_per_epoch = n_train // batch`` of the profile (195 for CIFAR-10 at 256). This is
the long-run mean epoch time (T_inv = 250 > 195, so single epochs differ), what the paper's
t_epoch averages over its 50 epochs. The first step (factor initialisation, once per run)
is reported separately (``first_step_s``) and not amortised. Each kind's time is the sum of
the per-phase medians of up to ``--repeats`` runs (one discarded warm-up run unless it took
more than 2 s; runs stop once they total ``--max-seconds``); the runs are interleaved
round-robin over the optimizers and kinds so that load drift on a shared machine hits all
of them alike.

Targets (DESIGN's second rung, as ratios measured side by side in one run): b-kfac's t_epoch
at most 1.15x SGD's and at most 0.45x k-fac's on CPU (1.4x SGD's and 0.5x k-fac's on CUDA);
printed PASS/FAIL, on the measured ratio and again with
every optimizer charged SGD's data + forward/backward time ("common forward/backward": the
phase all share is the noisiest on a loaded machine). Every ratio comes with its spread over
the rounds (round ``i`` amortises the ``i``-th run of each kind of step; the ratio of round
``i`` compares two optimizers' round ``i``, which ran beside each other). Writes ``step.csv`` (one row per
optimizer, amortised per-step phases, t_epoch, ratios), ``step_kinds.csv`` (one row per
optimizer and kind of step), ``step_targets.csv``, ``step.png`` (stacked bars of the
per-epoch time by phase) and ``profile.yaml`` (the profile measured: the chapters find the
stored bench of their model by it) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ..book import display_path
from .common import (
    format_table,
    load_average,
    round_ratios,
    load_bench_profile,
    machine_info,
    machine_line,
    resolve_device,
    resolve_dtype,
    save_figure_atomic,
    set_threads,
    sync,
    verdict,
    write_csv_atomic,
    write_text_atomic,
)

__all__ = [
    "OPTIMIZERS", "PHASES", "TARGETS", "StepKind", "optimizer_periods", "step_kinds", "set_step_counter",
    "steps_per_epoch", "bench_step", "check_targets", "plot_step", "main",
]

#: Every optimizer of the comparison, in table order.
OPTIMIZERS = ("sgd", "seng", "k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c")
#: Phases of one training step, as in the training harness (``bkfac.experiments.train``).
PHASES = ("data", "forward_backward", "statistics", "inverse", "precondition", "rest")
#: (optimizer, reference, largest allowed ratio of t_epoch) by device type -- DESIGN's second
#: rung of end-to-end targets: b-kfac's t_epoch at most 1.15x SGD's
#: on the cpu model (1.4x on an H200 with the paper's model) and at most 0.45x k-fac's (0.5x, the
#: first rung, on CUDA).
TARGETS = {"cpu": (("b-kfac", "sgd", 1.15), ("b-kfac", "k-fac", 0.45)),
           "cuda": (("b-kfac", "sgd", 1.4), ("b-kfac", "k-fac", 0.5))}
SLOW_S = 2.0  # a first run slower than this is kept as a sample (warm-up effects are negligible)

SUMMARY_COLUMNS = (["optimizer", "label", "profile", "steps_per_epoch", "cycle", "kinds"]
                   + [f"{p}_s" for p in PHASES]
                   + ["step_s", "epoch_s", "ratio_to_sgd", "ratio_to_kfac", "optimizer_s", "ratio_to_sgd_common_fb",
                      "ratio_to_sgd_min", "ratio_to_sgd_max", "ratio_to_kfac_min", "ratio_to_kfac_max",
                      "first_step_s", "runs", "device", "dtype"])
KIND_COLUMNS = (["optimizer", "kind", "count", "cycle", "frequency", "rep_step", "runs"]
                + [f"{p}_s" for p in PHASES] + ["step_s"])
TARGET_COLUMNS = ["target", "value", "spread_min", "spread_max", "threshold", "verdict"]


# -- the step kinds -------------------------------------------------------------------------------
@dataclass
class StepKind:
    """Steps whose index fires the same periodic events."""

    events: tuple[str, ...]  # names of the periods T with k % T == 0 ("plain": none)
    count: int  # how many steps of the cycle 1..cycle are of this kind
    cycle: int
    rep_step: int  # the first step index of this kind in 1..cycle

    @property
    def name(self) -> str:
        return "+".join(self.events) if self.events else "plain"

    @property
    def frequency(self) -> float:
        return self.count / self.cycle


def optimizer_periods(opt) -> dict[str, int]:
    """The periods (in steps) of the events that change what ``opt.step()`` does.

    K-FAC family: ``t_updt``, ``t_inv`` and every ``t_*`` of its method (``t_brand``,
    ``t_rsvd``, ``t_corct``); SENG: ``update_freq``; anything else (SGD): none.
    """
    from ..optim.kfac import KFACFamily

    if isinstance(opt, KFACFamily):
        periods = {"t_updt": int(opt.t_updt), "t_inv": int(opt.t_inv)}
        periods.update({k: int(v) for k, v in opt.method_kw.items() if k.startswith("t_")})
        return periods
    if hasattr(opt, "update_freq"):
        return {"update_freq": int(opt.update_freq)}
    return {}


def step_kinds(periods: dict[str, int]) -> list[StepKind]:
    """The kinds of step over one cycle ``1..lcm(periods)``, most frequent first.

    >>> [(k.name, k.count) for k in step_kinds({"t_updt": 2, "t_inv": 4})]
    [('plain', 2), ('t_updt', 1), ('t_updt+t_inv', 1)]
    """
    for name, p in periods.items():
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"period {name} must be a positive integer, got {p!r}")
    cycle = reduce(math.lcm, periods.values(), 1)
    kinds: dict[tuple[str, ...], StepKind] = {}
    for k in range(1, cycle + 1):
        events = tuple(name for name, p in periods.items() if k % p == 0)
        if events not in kinds:
            kinds[events] = StepKind(events, 0, cycle, k)
        kinds[events].count += 1
    return sorted(kinds.values(), key=lambda s: (-s.count, s.rep_step))


def set_step_counter(opt, k: int) -> None:
    """Make ``opt``'s next ``step()`` be step ``k`` of its schedule (a benchmark device:
    K-FAC family ``steps``, SENG's step counter; SGD has none)."""
    from ..optim.kfac import KFACFamily

    if isinstance(opt, KFACFamily):
        opt.steps = k
    elif hasattr(opt, "update_freq") and hasattr(opt, "_step_count"):
        opt._step_count = k
    elif optimizer_periods(opt):  # pragma: no cover - a new periodic optimizer must be taught here
        raise ValueError(f"do not know how to set the step counter of {type(opt).__name__}")


def steps_per_epoch(profile) -> int:
    """Batches per epoch of the profile's training loader (``drop_last``): ``n_train // batch``."""
    t = profile.train
    n_train = profile.data.get("n_train") or 50000  # CIFAR-10's training set
    steps = n_train // t["batch_size"]
    if t.get("max_batches_per_epoch"):
        steps = min(steps, t["max_batches_per_epoch"])
    return max(1, steps)


# -- one optimizer -------------------------------------------------------------------------------------
@dataclass
class _Bench:
    name: str
    label: str
    model: torch.nn.Module
    opt: object
    kinds: list[StepKind]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    warm: set = field(default_factory=set)
    first: dict = field(default_factory=dict)
    #: the profile's precision (``train.amp``), as training runs it
    mp: object = None


class _Batches:
    """Endless batches from :class:`CIFARLoader` over a pool of synthetic uint8 images."""

    def __init__(self, batch_size: int, input_size, in_channels: int, num_classes: int, device, dtype, seed: int):
        from ..experiments.data import CIFARLoader

        g = torch.Generator().manual_seed(seed)
        pool = 4 * batch_size
        images = torch.randint(0, 256, (pool, in_channels, *input_size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, num_classes, (pool,), generator=g)
        mean = std = [0.5] * in_channels
        self.loader = CIFARLoader(images, labels, batch_size=batch_size, train=True, seed=seed, device=device,
                                  mean=mean, std=std)
        self.dtype = dtype
        self.epoch = 0
        self.it = iter(self.loader)

    def next(self):
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.it = iter(self.loader)
            x, y = next(self.it)
        return x.to(self.dtype), y


def _one_step(b: _Bench, batches: _Batches, device, k: int | None) -> dict:
    """One training step (step index ``k`` of the optimizer's schedule); seconds per phase."""
    if k is not None:
        set_step_counter(b.opt, k)
    sync(device)
    t0 = time.perf_counter()
    x, y = batches.next()
    sync(device)
    t1 = time.perf_counter()
    b.opt.zero_grad(set_to_none=True)
    with b.mp.autocast():
        loss = F.cross_entropy(b.model(x), y)
    b.mp.backward(loss)
    sync(device)
    t2 = time.perf_counter()
    b.mp.step(b.opt)
    sync(device)
    t3 = time.perf_counter()
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"bench step: {b.name} produced a non-finite loss at step {k}")
    timed = dict(getattr(b.opt, "timer").last)
    phases = {"data": t1 - t0, "forward_backward": t2 - t1}
    for p in ("statistics", "inverse", "precondition", "rest"):
        phases[p] = float(timed.get(p, 0.0))
    phases["rest"] += max(0.0, (t3 - t2) - sum(float(v) for v in timed.values()))
    return phases


def _make_bench(name: str, profile, base_model, *, device, sync_timer: bool) -> _Bench:
    from ..optim.factory import make_optimizer

    opt_name, hyper, label = profile.resolve_run(name)
    if sync_timer:
        hyper["sync_timer"] = True
    model = copy.deepcopy(base_model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm gets the SGD step: listed by describe()
        opt = make_optimizer(opt_name, model, **hyper)
    if hasattr(opt, "set_epoch"):
        opt.set_epoch(1)
    from ..experiments.train import MixedPrecision

    return _Bench(name, label, model, opt, step_kinds(optimizer_periods(opt)),
                  mp=MixedPrecision(profile.train.get("amp"), device))


def _median_phases(samples: list[dict]) -> dict:
    return {p: statistics.median(s[p] for s in samples) for p in PHASES}


def bench_step(profile, optimizers=OPTIMIZERS, *, device="cpu", dtype=torch.float32, repeats: int = 3,
               budget_s: float = 120.0, seed: int = 0, warmup: bool = True,
               log=print) -> tuple[list[dict], list[dict]]:
    """Time every optimizer's kinds of step on ``profile``'s model (see the module docstring).

    ``warmup=False`` (``--quick``) keeps every run as a sample: no warm-up step after the
    first, no discarded first run per kind.

    Returns ``(summary_rows, kind_rows)``: per optimizer the amortised per-step phases,
    ``step_s``, ``epoch_s`` and ratios to SGD and k-fac (``nan`` when not measured) with
    their spread over the rounds (``ratio_to_*_min`` / ``_max``: round ``i`` amortises the
    ``i``-th run of every kind of step, and the ratio compares it with the reference's round
    ``i``, which ran beside it); per optimizer and kind the median phases, its count in the
    cycle and the number of runs. The per-round amortised phases are kept in
    ``summary_row["rounds"]`` (not written to the CSV).
    """
    from ..experiments.models import build_model

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training harness runs every optimizer
    spec = profile.model
    torch.manual_seed(seed)
    base = build_model(spec).to(device=device, dtype=dtype)
    batch = profile.train["batch_size"]
    batches = _Batches(batch, tuple(spec.get("input_size", (32, 32))), int(spec.get("in_channels", 3)),
                       int(spec.get("num_classes", 10)), device, dtype, seed)
    spe = steps_per_epoch(profile)
    benches = []
    for name in optimizers:
        b = _make_bench(name, profile, base, device=device, sync_timer=device.type == "cuda")
        b.first = _one_step(b, batches, device, 0)  # initialisation (once per run, not amortised)
        if warmup:
            _one_step(b, batches, device, b.kinds[0].rep_step)  # warm-up of the most frequent kind
        log(f"  {name}: first step {sum(b.first.values()):.3g}s; {len(b.kinds)} kind(s) of step over a cycle of "
            f"{b.kinds[0].cycle}: " + ", ".join(f"{s.name} x{s.count}" for s in b.kinds))
        benches.append(b)

    def done(b: _Bench, s: StepKind) -> bool:
        runs = b.samples.get(s.name, [])
        return len(runs) >= repeats or (bool(runs) and sum(sum(r.values()) for r in runs) >= budget_s)

    # round-robin over optimizers and kinds: load drift on a shared machine hits all alike
    while not all(done(b, s) for b in benches for s in b.kinds):
        for b in benches:
            for s in b.kinds:
                if done(b, s):
                    continue
                ph = _one_step(b, batches, device, s.rep_step)
                if warmup and s.name not in b.warm:
                    b.warm.add(s.name)
                    if sum(ph.values()) < SLOW_S:
                        continue  # discarded warm-up run of this kind
                b.samples.setdefault(s.name, []).append(ph)

    kind_rows, summary = [], []
    for b in benches:
        amortised = dict.fromkeys(PHASES, 0.0)
        runs = 0
        for s in b.kinds:
            med = _median_phases(b.samples[s.name])
            runs += len(b.samples[s.name])
            kind_rows.append({"optimizer": b.name, "kind": s.name, "count": s.count, "cycle": s.cycle,
                              "frequency": s.frequency, "rep_step": s.rep_step, "runs": len(b.samples[s.name]),
                              **{f"{p}_s": med[p] for p in PHASES}, "step_s": sum(med.values())})
            for p in PHASES:
                amortised[p] += s.frequency * med[p]
        step_s = sum(amortised.values())
        summary.append({"optimizer": b.name, "label": b.label, "profile": profile.name, "steps_per_epoch": spe,
                        "cycle": b.kinds[0].cycle, "kinds": len(b.kinds),
                        **{f"{p}_s": amortised[p] for p in PHASES}, "step_s": step_s, "epoch_s": spe * step_s,
                        "first_step_s": sum(b.first.values()), "runs": runs, "device": str(device),
                        "dtype": str(dtype).replace("torch.", "")})
        summary[-1]["rounds"] = _round_phases(b)
        if hasattr(b.opt, "remove_hooks"):
            b.opt.remove_hooks()
    ref = {r["optimizer"]: r for r in summary}
    sgd = ref.get("sgd")
    for r in summary:
        r["ratio_to_sgd"] = r["epoch_s"] / sgd["epoch_s"] if sgd else float("nan")
        r["ratio_to_kfac"] = r["epoch_s"] / ref["k-fac"]["epoch_s"] if "k-fac" in ref else float("nan")
        for key, other in (("sgd", sgd), ("kfac", ref.get("k-fac"))):
            spread = round_ratios([sum(x.values()) for x in r["rounds"]],
                                  [sum(x.values()) for x in other["rounds"]]) if other else [float("nan")]
            r[f"ratio_to_{key}_min"], r[f"ratio_to_{key}_max"] = min(spread), max(spread)
        r["optimizer_s"] = sum(r[f"{p}_s"] for p in ("statistics", "inverse", "precondition", "rest"))
        # the same data + forward/backward as SGD's for everyone: removes the noise of the largest,
        # identical phase (a shared machine's load moves it by 10-20 % between optimizers)
        r["ratio_to_sgd_common_fb"] = ((sgd["data_s"] + sgd["forward_backward_s"] + r["optimizer_s"]) / sgd["step_s"]
                                       if sgd else float("nan"))
    return summary, kind_rows


def _round_phases(b: _Bench) -> list[dict]:
    """Amortised phases of each round ``i``: the ``i``-th run of every kind of step (a kind
    with fewer runs, stopped by the time budget, contributes its last), weighted by the kind's
    frequency."""
    rounds = max(len(b.samples[s.name]) for s in b.kinds)
    out = []
    for i in range(rounds):
        ph = dict.fromkeys(PHASES, 0.0)
        for s in b.kinds:
            runs = b.samples[s.name]
            for p in PHASES:
                ph[p] += s.frequency * runs[min(i, len(runs) - 1)][p]
        out.append(ph)
    return out


def _common_fb(rounds: list[dict], sgd_rounds: list[dict]) -> list[float]:
    """Per round: SGD's data + forward/backward plus the optimizer's own phases."""
    own = ("statistics", "inverse", "precondition", "rest")
    return [sgd_rounds[min(i, len(sgd_rounds) - 1)]["data"] + sgd_rounds[min(i, len(sgd_rounds) - 1)]
            ["forward_backward"] + sum(r[p] for p in own) for i, r in enumerate(rounds)]


def check_targets(summary: list[dict]) -> list[dict]:
    """DESIGN's end-to-end targets (:data:`TARGETS` of the device the rows were measured on) as
    PASS/FAIL rows (``n/a`` when an optimizer was not run).

    Each target is checked on the measured t_epoch ratio, and again (marked "common
    forward/backward") with SGD's data + forward/backward time in both numerator and
    denominator, which removes the run-to-run noise of the phase all optimizers share.
    """
    by = {r["optimizer"]: r for r in summary}
    device = str(summary[0].get("device", "cpu")) if summary else "cpu"
    rows = []
    for opt, ref, limit in TARGETS["cuda" if device.startswith("cuda") else "cpu"]:
        for common in (False, True):
            spread = [float("nan")]
            if opt in by and ref in by and (not common or "sgd" in by):
                if common:
                    base = by["sgd"]["data_s"] + by["sgd"]["forward_backward_s"]
                    value = (base + by[opt]["optimizer_s"]) / (base + by[ref]["optimizer_s"])
                    if all("rounds" in by[k] for k in (opt, ref, "sgd")):
                        spread = round_ratios(_common_fb(by[opt]["rounds"], by["sgd"]["rounds"]),
                                              _common_fb(by[ref]["rounds"], by["sgd"]["rounds"]))
                else:
                    value = by[opt]["epoch_s"] / by[ref]["epoch_s"]
                    if all("rounds" in by[k] for k in (opt, ref)):
                        spread = round_ratios([sum(x.values()) for x in by[opt]["rounds"]],
                                              [sum(x.values()) for x in by[ref]["rounds"]])
            else:
                value = float("nan")
            ok = None if math.isnan(value) else value <= limit
            name = f"{opt} t_epoch / {ref} t_epoch" + (" (common forward/backward)" if common else "")
            rows.append({"target": name, "value": value, "spread_min": min(spread), "spread_max": max(spread),
                         "threshold": f"<= {limit}", "verdict": verdict(ok)})
    return rows


def plot_step(summary: list[dict], path, title: str = "") -> Path:
    """Stacked bars: per-epoch seconds of each optimizer, split by phase."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.4, 4.4))
    ax = fig.subplots()
    names = [r["optimizer"] for r in summary]
    bottom = [0.0] * len(summary)
    for i, p in enumerate(PHASES):
        vals = [r[f"{p}_s"] * r["steps_per_epoch"] for r in summary]
        ax.bar(names, vals, bottom=bottom, color=f"C{i}", label=p.replace("_", "/"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, (r, top) in enumerate(zip(summary, bottom)):
        if not math.isnan(r.get("ratio_to_sgd", float("nan"))):
            ax.annotate(f"{r['ratio_to_sgd']:.2g}x", (x, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per epoch (amortised over the periods)")
    ax.set_title(title or "Time per epoch by phase (labels: ratio to SGD)")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench step``."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    profile = load_bench_profile(args, device)
    out = Path(args.out)
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    print(f"bkfac bench step  (profile {profile.name}: model {profile.model}, batch {profile.train['batch_size']}, "
          f"{steps_per_epoch(profile)} steps per epoch)")
    print(machine_line(info))
    print(f"data: CIFARLoader augmentation over synthetic uint8 images on {device}; dtype {args.dtype}; "
          f"median of up to {args.repeats} runs per kind of step{'' if args.quick else ' after a warm-up'}, "
          "interleaved; per-epoch time amortised over the "
          "cycle lcm(periods) by the frequency of each kind of step")
    t0 = time.perf_counter()
    summary, kinds = bench_step(profile, OPTIMIZERS, device=device, dtype=dtype, repeats=args.repeats,
                                budget_s=args.max_seconds, seed=args.seed, warmup=not args.quick)
    targets = check_targets(summary)
    print()
    print(format_table(kinds, ["optimizer", "kind", "count", "cycle", "runs"] + [f"{p}_s" for p in PHASES]
                       + ["step_s"],
                       ["optimizer", "kind", "count", "cycle", "runs", "data", "fwd/bwd", "stats", "inverse",
                        "precond", "rest", "step s"]))
    print()
    for r in summary:
        r["sgd_range"] = f"{r['ratio_to_sgd_min']:.3g}-{r['ratio_to_sgd_max']:.3g}"
        r["kfac_range"] = f"{r['ratio_to_kfac_min']:.3g}-{r['ratio_to_kfac_max']:.3g}"
    print(format_table(summary, ["optimizer"] + [f"{p}_s" for p in PHASES] + ["step_s", "epoch_s", "ratio_to_sgd",
                                                                             "sgd_range", "ratio_to_kfac", "kfac_range",
                                                                             "ratio_to_sgd_common_fb", "first_step_s"],
                       ["optimizer", "data", "fwd/bwd", "stats", "inverse", "precond", "rest", "step s", "epoch s",
                        "/ SGD", "rounds", "/ k-fac", "rounds", "/ SGD (common f/b)", "first step s"]))
    print("(per-step columns are amortised means; epoch s = steps per epoch x step s; 'common f/b': every "
          "optimizer charged SGD's data + forward/backward time)")
    print()
    for t in targets:
        print(f"target {t['verdict']:4s}  {t['target']}: {t['value']:.3g} (rounds {t['spread_min']:.3g}-"
              f"{t['spread_max']:.3g}; want {t['threshold']})")
    print(f"load average after the run: {load_average()}")
    written = [write_csv_atomic(out / "step.csv", summary, SUMMARY_COLUMNS),
               write_csv_atomic(out / "step_kinds.csv", kinds, KIND_COLUMNS),
               write_csv_atomic(out / "step_targets.csv", targets, TARGET_COLUMNS)]
    written.append(write_text_atomic(out / "profile.yaml", yaml.safe_dump(profile.raw, sort_keys=False)))
    if not getattr(args, "no_figure", False):
        written.append(plot_step(summary, out / "step.png",
                                 title=f"Time per epoch by phase, profile {profile.name} ({info['device_name']})"))
    print(f"wrote {', '.join(display_path(p) for p in written)} in {time.perf_counter() - t0:.0f}s")
    return 0


def _parser(part: str = "step") -> argparse.ArgumentParser:
    """``python -m bkfac.bench.<part>``: the common bench options plus ``--profile``."""
    from . import add_bench_args

    parser = argparse.ArgumentParser(prog=f"python -m bkfac.bench.{part}",
                                     description=f"bkfac bench {part} (see the module docstring)")
    add_bench_args(parser)
    if not any("--profile" in a.option_strings for a in parser._actions):
        parser.add_argument("--profile", default=None,
                            help="run profile (default: cpu; paper on CUDA; smoke with --quick)")
    return parser


if __name__ == "__main__":  # pragma: no cover - exercised by hand
    sys.exit(main(_parser().parse_args(["step"] + sys.argv[1:])))
