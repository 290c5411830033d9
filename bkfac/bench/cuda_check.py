"""One short prepared CUDA check: correctness of every optimizer on CUDA, and the `paper` profile's
per-step breakdown.

    python -m bkfac.bench.cuda_check --out DIR [--steps 251] [--device cuda]

(``make cuda-check`` runs it with ``--steps 0``, correctness only, beside the CUDA tests,
``bkfac bench step --profile paper --device cuda`` and one synthetic-data epoch of every run of
the ``paper`` profile.)

1. Correctness: a small conv + wide-FC model in float64, 6 steps of every optimizer
   (k-fac, r-kfac, sre-kfac, b-kfac, b-r-kfac, b-kfac-c, seng, sgd) on CPU and on CUDA from the
   same initial weights and batches; the relative parameter difference must be < 1e-8.
2. Timing: the paper's model (modified VGG16_bn, FC0 16384 -> 2048) in float32 with batch 256
   of synthetic CIFAR-shaped data already on the device (the real images do not travel to the
   GPU machine), each optimizer with the paper's hyper-parameters, ``--steps`` steps (251 covers
   T_updt 25, T_brand 125 and the T_inv = T_rsvd = 250 recomputation); per phase: forward/backward
   and the optimizer's statistics / inverse / precondition / rest (timer synchronised with CUDA).
   The per-epoch estimate is ``195 * mean step time`` (an epoch has 195 batches of 256).
   ``--steps 0`` skips this part.

3. ``--syncs``: host synchronisations of every optimizer's step on the paper model, counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` over 8 steps with short periods (``SYNC_PERIODS``:
   every kind of step occurs), grouped by the Python line that asked for them
   (``cuda_syncs.csv``).
4. ``--trace``: ``torch.profiler`` over 10 plain steps (after initialisation) of sgd, k-fac and
   b-kfac on the paper model with the paper's hyper-parameters: the operators that take the GPU
   time and the CPU time of ``optimizer.step()`` (``trace_<optimizer>.txt``).

Writes ``cuda_correctness.csv``, ``cuda_step.csv`` and ``cuda_check.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..experiments.models import paper_model
from ..experiments.results import atomic_write_text, write_csv
from ..optim.factory import make_optimizer

NAMES = ["sgd", "seng", "k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c"]
SMALL_HYPER = {
    "k-fac": dict(t_updt=2, t_inv=2),
    "r-kfac": dict(t_updt=2, t_inv=2, rank=16, oversample=4),
    "sre-kfac": dict(t_updt=2, t_inv=2, rank=16, oversample=4),
    "b-kfac": dict(t_updt=2, t_inv=2, t_brand=2, rank=16, oversample=4),
    "b-r-kfac": dict(t_updt=2, t_inv=2, t_brand=2, t_rsvd=4, rank=16, oversample=4),
    "b-kfac-c": dict(t_updt=2, t_inv=2, t_brand=2, t_corct=4, rank=16, oversample=4),
    "seng": dict(update_freq=3, col_sample_size=8, lr_scheme=None),
    "sgd": dict(momentum=0.9),
}


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 64, 200), nn.ReLU(inplace=True), nn.Linear(200, 10)).double()


def _paper_batch(device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(256, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (256,), generator=g).to(device))


def correctness(device) -> list[dict]:
    rows = []
    for name in NAMES:
        params = {}
        for dev in ("cpu", device):
            model = _small_model().to(dev)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make_optimizer(name, model, defaults=None, lr=0.05, weight_decay=1e-3, **SMALL_HYPER[name])
            for k in range(6):
                g = torch.Generator().manual_seed(k)
                x = torch.randn(32, 3, 16, 16, generator=g, dtype=torch.float64).to(dev)
                y = torch.randint(0, 10, (32,), generator=g).to(dev)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            params[dev] = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
        rel = float((params["cpu"] - params[device]).norm() / params["cpu"].norm())
        rows.append(dict(optimizer=name, rel_diff_cpu_vs_cuda=rel, ok=rel < 1e-8))
        print(f"correctness {name:9s} rel diff {rel:.2e} {'OK' if rel < 1e-8 else 'FAIL'}", flush=True)
    return rows


def timing(device, steps: int, out: Path | None = None) -> list[dict]:
    rows = []
    x, y = _paper_batch(device)
    for name in NAMES:
        torch.manual_seed(0)
        model = paper_model().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make_optimizer(name, model, sync_timer=True)
        tot = dict(forward_backward=0.0, statistics=0.0, inverse=0.0, precondition=0.0, rest=0.0)
        torch.cuda.synchronize()
        t_all = time.perf_counter()
        for k in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            tot["forward_backward"] += t1 - t0
            timed = {p: v for p, v in opt.timer.last.items()}
            for p in ("statistics", "inverse", "precondition", "rest"):
                tot[p] += timed.get(p, 0.0)
            tot["rest"] += max(0.0, (t2 - t1) - sum(timed.values()))
        wall = time.perf_counter() - t_all
        per_step = wall / steps
        row = dict(optimizer=name, steps=steps, ms_per_step=1e3 * per_step, epoch_s_estimate=195 * per_step,
                   **{f"ms_{p}": 1e3 * v / steps for p, v in tot.items()},
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        rows.append(row)
        if out is not None:
            write_csv(out / "cuda_step.csv", rows)  # incremental: a timeout keeps what was measured
        print(f"timing {name:9s} {row['ms_per_step']:8.1f} ms/step  epoch ~{row['epoch_s_estimate']:6.1f} s  "
              + "  ".join(f"{p} {row['ms_' + p]:.1f}" for p in tot), flush=True)
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows


SYNC_PERIODS = {
    "k-fac": dict(t_updt=2, t_inv=4),
    "r-kfac": dict(t_updt=2, t_inv=4),
    "sre-kfac": dict(t_updt=2, t_inv=4),
    "b-kfac": dict(t_updt=2, t_inv=8, t_brand=4),
    "b-r-kfac": dict(t_updt=2, t_inv=8, t_brand=2, t_rsvd=4),
    "b-kfac-c": dict(t_updt=2, t_inv=8, t_brand=2, t_corct=4),
    "seng": dict(update_freq=3),
    "sgd": {},
}


def sync_report(device, steps: int = 8) -> list[dict]:
    """Host synchronisations per optimizer step on the paper model (float32, batch 256), counted
    by CUDA's sync debug mode after an initialising step 0, grouped by the Python line."""
    rows = []
    x, y = _paper_batch(device)
    for name in NAMES:
        torch.manual_seed(0)
        model = paper_model().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make_optimizer(name, model, **SYNC_PERIODS[name])
        counts: Counter = Counter()
        for k in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            torch.cuda.synchronize()
            if k == 0:
                opt.step()  # initialisation, not counted
                continue
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            counts.update(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
                          for w in rec if "synchroniz" in str(w.message))
        total = sum(counts.values())
        rows.append(dict(optimizer=name, steps=steps, syncs=total, syncs_per_step=total / steps,
                         where="; ".join(f"{k} x{v}" for k, v in counts.most_common())))
        print(f"syncs {name:9s} {total / steps:6.1f} per step: {rows[-1]['where']}", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    return rows


def trace(device, out: Path, names=("sgd", "k-fac", "b-kfac"), steps: int = 10) -> None:
    """``torch.profiler`` tables of ``steps`` plain steps (paper hyper-parameters) per optimizer."""
    from torch.profiler import ProfilerActivity, profile, record_function

    x, y = _paper_batch(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    on_gpu = len(acts) == 2
    sorts = ("device_time_total", "self_device_time_total") if on_gpu else ("cpu_time_total", "self_cpu_time_total")
    for name in names:
        torch.manual_seed(0)
        model = paper_model().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make_optimizer(name, model)

        def one(tag):
            opt.zero_grad(set_to_none=True)
            with record_function(f"{tag}forward_backward"):
                F.cross_entropy(model(x), y).backward()
            with record_function(f"{tag}optimizer.step"):
                opt.step()

        for _ in range(2):  # step 0 initialises; step 1 is a plain one
            one("")
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                one("## ")
            if on_gpu:
                torch.cuda.synchronize()
        avg = prof.key_averages()
        tables = [f"sorted by {key}\n" + avg.table(sort_by=key, row_limit=25 if key.startswith("self") else 12)
                  for key in sorts]
        atomic_write_text(out / f"trace_{name}.txt",
                          f"{name}: {steps} plain steps, paper model, batch 256\n" + "\n".join(tables) + "\n")
        print(f"trace {name}: written", flush=True)
        del model, opt, prof
        if on_gpu:
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/results/bench")
    ap.add_argument("--steps", type=int, default=251)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--syncs", action="store_true", help="count host synchronisations per step (CUDA only)")
    ap.add_argument("--trace", action="store_true", help="torch.profiler tables of sgd, k-fac and b-kfac steps")
    ap.add_argument("--no-correctness", action="store_true", help="skip the CPU-vs-CUDA correctness part")
    args = ap.parse_args(argv)
    out = Path(args.out)
    lines = [f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}"]
    print(lines[0], flush=True)
    corr = [] if args.no_correctness else correctness(args.device)
    if corr:
        write_csv(out / "cuda_correctness.csv", corr)
    if args.syncs and args.device.startswith("cuda"):
        syncs = sync_report(args.device)
        write_csv(out / "cuda_syncs.csv", syncs)
        lines += [f"syncs {r['optimizer']}: {r['syncs_per_step']:.1f} per step ({r['where']})" for r in syncs]
    if args.trace:
        trace(args.device, out)
    if args.steps < 0:
        raise SystemExit(f"--steps must be >= 0, got {args.steps}")
    if args.device.startswith("cuda") and args.steps > 0:
        tim = timing(args.device, args.steps, out)
        write_csv(out / "cuda_step.csv", tim)
        sgd = next(r for r in tim if r["optimizer"] == "sgd")["ms_per_step"]
        for r in tim:
            lines.append(f"{r['optimizer']:9s} {r['ms_per_step']:8.1f} ms/step ({r['ms_per_step'] / sgd:5.2f}x SGD)  "
                         + "  ".join(f"{k[3:]} {v:.1f}" for k, v in r.items() if k.startswith("ms_") and k != "ms_per_step"))
    lines += [f"correctness {r['optimizer']}: {r['rel_diff_cpu_vs_cuda']:.2e}" for r in corr]
    atomic_write_text(out / "cuda_check.txt", "\n".join(lines) + "\n")
    return 0 if all(r["ok"] for r in corr) else 1


if __name__ == "__main__":
    raise SystemExit(main())
