"""``bkfac bench stats``: the conv layers' K-factor statistics, shifted products against the
patch copy.

On the profile's model (``--profile``; ``cpu`` by default, ``smoke`` with ``--quick``) one
training forward/backward of a batch of the profile's size (synthetic images) is recorded by
a :class:`~bkfac.curvature.capture.KFactorCapture`. For every conv layer, ``A_k A_k^T`` (what
the K-FAC family's statistics steps take every T_updt) is then computed both ways, the runs
interleaved: from shifted products of the layer's input
(:func:`~bkfac.curvature.patches.conv_patch_gram`, ``batch_outer_A(route='shifted')``, the
CPU route of stride-1 layers) and from the patch copy and one blocked-SYRK product
(``route='patches'``, the route of other strides and of CUDA). Reported per layer: its input
shape, the number of patch columns ``N``, both medians, their ratio with its spread over the
rounds, and the largest difference between the two results relative to the largest entry;
then the sums over the layers. On CUDA both routes are timed too (the shifted one is not what
the optimizers use there). Writes ``stats.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..book import display_path
from .common import (
    format_table,
    load_average,
    load_bench_profile,
    machine_info,
    machine_line,
    resolve_device,
    resolve_dtype,
    round_ratios,
    set_threads,
    time_interleaved,
    write_csv_atomic,
)

__all__ = ["COLUMNS", "bench_stats", "main"]

COLUMNS = ["layer", "input", "N", "patches_s", "shifted_s", "ratio", "ratio_min", "ratio_max", "max_rel_diff"]


def _recorded_model(profile, device, dtype, seed: int):
    """The profile's model after one training forward/backward, and the capture holding it."""
    from ..curvature.capture import KFactorCapture
    from ..experiments.models import build_model

    spec = profile.model
    torch.manual_seed(seed)
    model = build_model(spec).to(device=device, dtype=dtype).train()
    capture = KFactorCapture(model)
    n = profile.train["batch_size"]
    x = torch.randn(n, int(spec.get("in_channels", 3)), *tuple(spec.get("input_size", (32, 32))), device=device,
                    dtype=dtype)
    if spec.get("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, int(spec.get("num_classes", 10)), (n,), device=device)
    F.cross_entropy(model(x), y).backward()
    return model, capture


def bench_stats(profile, *, device="cpu", dtype=torch.float32, repeats: int = 3, budget_s: float = 120.0,
                seed: int = 0) -> list[dict]:
    """One row per conv layer whose statistics the shifted route can take, then ``'total'``
    (module docstring)."""
    device = torch.device(device)
    _, capture = _recorded_model(profile, device, dtype, seed)
    rows, rounds = [], []
    for lc in capture.layers:
        if not lc.shifted_applies(lc.inputs, any_device=True):
            continue
        t = time_interleaved({"patches": lambda lc=lc: lc.batch_outer_A(route="patches"),
                              "shifted": lambda lc=lc: lc.batch_outer_A(route="shifted")},
                             device=device, repeats=repeats, budget_s=budget_s, keep=True)
        a, b = t["patches"].result, t["shifted"].result
        spread = round_ratios(t["patches"].runs, t["shifted"].runs)
        rows.append({"layer": lc.name, "input": "x".join(str(v) for v in lc.inputs.shape), "N": lc._n_positions(lc.inputs),
                     "patches_s": t["patches"].median, "shifted_s": t["shifted"].median,
                     "ratio": t["patches"].median / t["shifted"].median, "ratio_min": min(spread),
                     "ratio_max": max(spread),
                     "max_rel_diff": float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))})
        rounds.append((t["patches"].runs, t["shifted"].runs))
    capture.remove()
    if rows:
        k = min(min(len(p), len(s)) for p, s in rounds)
        spread = round_ratios([sum(p[i] for p, _ in rounds) for i in range(k)],
                              [sum(s[i] for _, s in rounds) for i in range(k)])
        patches, shifted = sum(r["patches_s"] for r in rows), sum(r["shifted_s"] for r in rows)
        rows.append({"layer": "total", "input": "", "N": sum(r["N"] for r in rows), "patches_s": patches,
                     "shifted_s": shifted, "ratio": patches / shifted, "ratio_min": min(spread),
                     "ratio_max": max(spread), "max_rel_diff": max(r["max_rel_diff"] for r in rows)})
    return rows


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench stats``."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    profile = load_bench_profile(args, device)
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    print(f"bkfac bench stats  (profile {profile.name}: model {profile.model}, batch {profile.train['batch_size']})")
    print(machine_line(info))
    print(f"dtype {args.dtype}; each conv layer's A_k A_k^T by the patch copy and by shifted products, median of "
          f"up to {args.repeats} runs after a warm-up, interleaved; ratio = patches / shifted")
    t0 = time.perf_counter()
    rows = bench_stats(profile, device=device, dtype=dtype, repeats=args.repeats, budget_s=args.max_seconds,
                       seed=args.seed)
    if not rows:
        print("no conv layer of this model takes the shifted route (stride 1, dilation 1)")
        return 0
    for r in rows:
        r["rounds"] = f"{r['ratio_min']:.3g}-{r['ratio_max']:.3g}"
    print()
    print(format_table(rows, ["layer", "input", "N", "patches_s", "shifted_s", "ratio", "rounds", "max_rel_diff"],
                       ["layer", "input (n x C x H x W)", "N", "patches s", "shifted s", "patches / shifted",
                        "rounds", "max rel diff"]))
    print(f"load average after the run: {load_average()}")
    path = write_csv_atomic(Path(args.out) / "stats.csv", rows, COLUMNS)
    print(f"wrote {display_path(path)} in {time.perf_counter() - t0:.0f}s")
    return 0
