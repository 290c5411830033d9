"""``bkfac bench distributed``: step time of data-parallel K-FACs on 1 and 2 processes.

For each world size W (1 and 2; on CUDA up to the number of GPUs, with nccl) the part
launches W local processes (:func:`bkfac.distributed.launch`, gloo over loopback on CPU),
each with one torch thread (``--threads`` where the bench parser has it), plus, on CPU, one
process using every core for reference, and trains the same small model (a
:class:`~bkfac.experiments.models.SmallCNN` whose wide ``fc0`` puts its factors on the
B-update path, d > n_M + r) wrapped in ``DistributedDataParallel``, on a fixed *global*
batch split evenly over the ranks, with every optimizer's periods set to 1 (every step
updates every factor: the case the inverse-work sharding is for). Per step it records:

* ``fwd_bwd`` -- zero_grad, forward, loss, backward (DDP's gradient all-reduce included);
* the optimizer's phases from ``optimizer.timer.last`` -- ``statistics`` (includes the
  all-gather of the batch matrices), ``inverse`` (includes the broadcast of the owners'
  representations), ``precondition``, ``rest``;
* ``comm`` -- the part of the optimizer's step spent in collectives
  (``TorchDistributedComm.seconds``);
* ``step`` -- all of the above.

The ranks meet at a barrier before every step (not timed). Each number is the median over
the timed steps on a rank, then the maximum over the ranks (the slowest rank sets the pace).
``balance`` is the largest rank's share of the estimated inverse cost over the mean
(:func:`~bkfac.distributed.factor_cost`; 1.0 is perfect). ``speedup`` is the step time of
one process with the same threads per rank over this one, at the same global batch. Writes ``distributed.csv`` under ``--out``.
Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from ..book import display_path
from .common import format_table, load_average, machine_info, resolve_device, resolve_dtype, write_csv_atomic

__all__ = ["main", "bench_distributed", "ROW_COLUMNS", "METHODS"]

METHODS = ("sgd", "k-fac", "r-kfac", "b-kfac", "b-r-kfac")
PHASES = ("fwd_bwd", "statistics", "inverse", "precondition", "rest", "comm", "step")
ROW_COLUMNS = ["method", "world_size", "threads", "global_batch", "local_batch", "steps"] + [f"{p}_s" for p in PHASES] + [
    "samples_per_s", "speedup", "balance", "methods", "device", "backend"]

#: model and hyper-parameters: full and --quick
CONFIG = {
    False: dict(model=dict(channels=(8, 16), fc_hidden=128, input_size=(32, 32)), global_batch=32, rank=32,
                oversample=8, power_iters=2, steps=5, warmup=1),
    True: dict(model=dict(channels=(8, 16), fc_hidden=64, input_size=(16, 16)), global_batch=16, rank=16,
               oversample=4, power_iters=1, steps=3, warmup=1),
}


def _worker(rank: int, cfg: dict) -> list[dict]:
    """One rank: time ``cfg['steps']`` steps of each method (after a warm-up)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import bkfac
    from bkfac.distributed import TorchDistributedComm
    from bkfac.experiments.models import SmallCNN

    world = dist.get_world_size()
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    dtype = getattr(torch, cfg["dtype"])
    local = cfg["global_batch"] // world
    H, W = cfg["model"]["input_size"]
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    n_batches = 4
    xs = torch.randn(n_batches, cfg["global_batch"], 3, H, W, generator=g).to(device, dtype)
    ys = torch.randint(0, 10, (n_batches, cfg["global_batch"]), generator=g).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for method in cfg["methods"]:
        torch.manual_seed(cfg["seed"])
        model = SmallCNN(**cfg["model"]).to(device, dtype)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        comm = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "sgd":
                opt = bkfac.make_optimizer("sgd", net, defaults=None, lr=0.01, momentum=0.9)
            else:
                comm = TorchDistributedComm()
                extra = {"b-kfac": dict(t_brand=1), "b-r-kfac": dict(t_brand=1, t_rsvd=1)}.get(method, {})
                low_rank = {k: cfg[k] for k in ("rank", "oversample", "power_iters") if k in bkfac.hyper_names(method)}
                opt = bkfac.make_optimizer(method, net, defaults=None, comm=comm, lr=0.01, t_updt=1, t_inv=1,
                                           sync_timer=device.type == "cuda", **low_rank, **extra)
        samples: list[dict] = []
        for k in range(cfg["warmup"] + cfg["steps"]):
            x = xs[k % n_batches, rank * local:(rank + 1) * local]
            y = ys[k % n_batches, rank * local:(rank + 1) * local]
            dist.barrier()
            sync()
            before = dict(comm.seconds) if comm is not None else {}
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
            sync()
            t2 = time.perf_counter()
            if k < cfg["warmup"]:
                continue
            s = {"fwd_bwd": t1 - t0, "step": t2 - t0}
            for p in ("statistics", "inverse", "precondition", "rest"):
                s[p] = opt.timer.last.get(p, 0.0)
            s["comm"] = sum(comm.seconds[c] - before[c] for c in comm.seconds) if comm is not None else 0.0
            samples.append(s)
        row = {f"{p}_s": statistics.median(s[p] for s in samples) for p in PHASES}
        if comm is not None and world > 1:
            costs, a = comm.costs(), comm.assignment()
            load = [sum(c for key, c in costs.items() if a[key] == r) for r in range(world)]
            row["balance"] = max(load) / (sum(load) / world)
        else:
            row["balance"] = 1.0
        row["methods"] = "" if method == "sgd" else " ".join(sorted({r["method"] for r in opt.describe() if r["kind"] != "unsupported"}))
        row.update(method=method, world_size=world, threads=torch.get_num_threads(), steps=cfg["steps"],
                   global_batch=cfg["global_batch"], local_batch=local)
        rows.append(row)
    return rows


def bench_distributed(*, configs=((1, 1), (2, 1)), quick: bool = False, device: str = "cpu", dtype: str = "float32",
                      steps: int | None = None, seed: int = 0, methods=METHODS, timeout: float = 300.0) -> list[dict]:
    """Run the benchmark for each ``(world size, threads per rank)`` of ``configs``; return one
    row per (method, config). ``speedup`` is relative to the first config."""
    from ..distributed import check_batch, launch

    cfg = dict(CONFIG[bool(quick)])
    if steps is not None:
        cfg["steps"] = steps
    cfg.update(device=str(device), dtype=dtype, seed=seed, methods=tuple(methods))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    rows = []
    for w, threads in configs:
        check_batch(cfg["global_batch"], w)
        per_rank = launch(_worker, w, cfg, backend=backend, timeout=timeout, threads=threads)
        merged = []
        for i, method_rows in enumerate(zip(*per_rank)):
            row = dict(method_rows[0])
            for p in PHASES:
                row[f"{p}_s"] = max(r[f"{p}_s"] for r in method_rows)
            row.update(device=str(device), backend=backend)
            merged.append(row)
        rows += merged
    w0, t0 = configs[0]
    base = {r["method"]: r["step_s"] for r in rows if (r["world_size"], r["threads"]) == (w0, t0)}
    for r in rows:
        r["samples_per_s"] = r["global_batch"] / r["step_s"]
        r["speedup"] = base[r["method"]] / r["step_s"]
    return rows


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench distributed``."""
    device = resolve_device(args.device)
    resolve_dtype(args.dtype)
    threads = getattr(args, "threads", None) or 1
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        configs = [(w, threads) for w in range(1, min(2, n_gpu) + 1)]
        if n_gpu < 2:
            print("bkfac bench distributed: one CUDA device -- nccl needs one device per rank, so only world size 1")
    else:
        # W ranks with `threads` threads each; plus one process using every core, for reference
        configs = [(1, threads), (2, threads)] + ([(1, cores)] if cores > threads else [])
    steps = max(args.repeats, CONFIG[bool(args.quick)]["steps"]) if not args.quick else args.repeats
    info = machine_info(device)
    cfg = CONFIG[bool(args.quick)]
    print(f"bkfac bench distributed  ({'quick' if args.quick else 'small'} model: SmallCNN {cfg['model']}, "
          f"global batch {cfg['global_batch']}, rank {cfg['rank']}, every period 1)")
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']}, device "
          f"{info['device']} [{info['device_name']}]; load average {load_average()}")
    print(f"(world size, threads per rank): {configs} ({'nccl' if device.type == 'cuda' else 'gloo, loopback'}); "
          f"{steps} timed steps per method after a warm-up; median per rank, max over ranks")
    t0 = time.perf_counter()
    rows = bench_distributed(configs=tuple(configs), quick=args.quick, device=str(device), dtype=args.dtype,
                             steps=steps, seed=args.seed, timeout=max(300.0, float(args.max_seconds)))
    cols = ["method", "world_size", "threads", "local_batch"] + [f"{p}_s" for p in PHASES] + [
        "samples_per_s", "speedup", "balance"]
    heads = ["method", "W", "thr", "n/rank", "fwd/bwd", "stats", "inverse", "precond", "rest", "comm", "step s",
             "samples/s", "speedup", "balance"]
    print()
    print(format_table(rows, cols, heads))
    print("(seconds per step; stats includes the all-gather of A_k/G_k, inverse the broadcast of (U, d); "
          "comm = time in the optimizer's collectives; DDP's all-reduce is in fwd/bwd)")
    out = Path(args.out)
    path = write_csv_atomic(out / "distributed.csv", rows, ROW_COLUMNS)
    print(f"load average after the run: {load_average()}")
    print(f"wrote {display_path(path)} in {time.perf_counter() - t0:.0f}s")
    return 0
