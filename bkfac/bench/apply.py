"""``bkfac bench apply``: Alg. 8 against the standard low-rank and the dense inverse application.

For a linear layer with A-factor dimension ``d_A``, Gamma-factor dimension ``d_G``, batch
``n`` and low-rank representations of rank ``r`` of both factors (damping ``lambda``), three
ways of computing the K-FAC step ``S = (Gamma + lamG I)^{-1} J (A + lamA I)^{-1}`` of the
gradient ``J = G A^T`` (``G``: d_G x n, ``A``: d_A x n) are timed side by side:

* **Alg. 8** (linear time): the *preconditioning part* is
  :func:`~bkfac.linalg.linear_time_factors`, ``G_hat = Gamma^{-1} G`` and
  ``A_hat = A^{-1} A`` in ``O(r (d_A + d_G) n)``; the *total* adds forming
  ``S = G_hat A_hat^T`` (``O(d_A d_G n)``).
* **standard low-rank** (Alg. 1 lines 15-17): given ``J``, the preconditioning part is
  :func:`~bkfac.linalg.kfac_precondition` in ``O(r d_A d_G)``; the total adds forming
  ``J = G A^T``.
* **dense**: explicit ``d x d`` inverses (built once from the same representations, not
  timed), preconditioning part ``Gamma^{-1} J A^{-1}`` in ``O(d_G d_A (d_A + d_G))``; the
  total adds forming ``J``. Skipped above ``dense_max_dim``.

The default shapes are the paper's FC0 (Sec. 6: d_A = 16384 + 1, d_G = 2048, n = 256,
r = 220), with a sweep over d_A. DESIGN's target: Alg. 8 at least 5x faster than the
standard low-rank application for the preconditioning part at FC0's shapes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..book import display_path
from ..linalg import kfac_precondition, linear_time_factors
from .common import (
    format_table,
    machine_info,
    resolve_device,
    resolve_dtype,
    save_figure_atomic,
    set_threads,
    time_interleaved,
    verdict,
    write_csv_atomic,
)

__all__ = ["DEFAULT_DA", "FC0", "QUICK", "make_layer", "bench_apply", "check_targets", "plot_apply", "main"]

FC0 = {"d_A": 16385, "d_G": 2048, "n": 256, "r": 220}
DEFAULT_DA = [1025, 2049, 4097, 8193, 16385]
QUICK = {"dims": [65, 130, 260], "d_G": 48, "n": 12, "r": 8}
METHODS = ("alg8", "lowrank", "dense")
LABELS = {"alg8": "Alg. 8", "lowrank": "standard low-rank", "dense": "dense inverses"}
ROW_COLUMNS = ["d_A", "d_G", "n", "r", "method", "precondition_s", "total_s", "precondition_ratio_to_alg8",
               "total_ratio_to_alg8", "runs", "rel_diff_vs_lowrank", "peak_bytes", "dtype", "device", "threads"]
TARGET_COLUMNS = ["target", "value", "threshold", "verdict"]
SPEEDUP_TARGET = 5.0


def make_layer(d_A: int, d_G: int, n: int, r: int, *, dtype=torch.float32, device="cpu", seed: int = 0,
               lam: float = 0.1) -> dict:
    """Random orthonormal rank-``r`` representations of both factors, a batch ``A`` (with a
    bias row) and ``G``, and the damping. Eigenvalues decay geometrically from 1; ``lam``
    is relative to the largest (DESIGN: ``lambda = phi * lambda_max``)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rep(dim):
        U = torch.linalg.qr(torch.randn(dim, r, dtype=dtype, device=device, generator=gen)).Q
        d = 0.97 ** torch.arange(r, dtype=dtype, device=device)
        return U, d

    UA, dA = rep(d_A)
    UG, dG = rep(d_G)
    A = torch.randn(d_A, n, dtype=dtype, device=device, generator=gen).relu_()
    A[-1] = 1.0
    A /= math.sqrt(n)
    G = torch.randn(d_G, n, dtype=dtype, device=device, generator=gen) / math.sqrt(n)
    return {"UA": UA, "dA": dA, "UG": UG, "dG": dG, "A": A, "G": G, "lamA": lam, "lamG": lam}


def _dense_inverse(U, d, lam):
    # (U diag(d) U^T + lam I)^{-1} = U diag(1/(d+lam) - 1/lam) U^T + I/lam, formed explicitly
    inv = (U * (1.0 / (d + lam) - 1.0 / lam)) @ U.mT
    inv.diagonal().add_(1.0 / lam)
    return inv


def bench_apply(
    dims=DEFAULT_DA,
    d_G: int = 2048,
    n: int = 256,
    r: int = 220,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    repeats: int = 3,
    dense_max_dim: int = 16385,
    *,
    seed: int = 0,
    budget_s: float = 120.0,
    log=print,
) -> list[dict]:
    """Time the three applications for every ``d_A`` in ``dims``; one row per (d_A, method).

    Row keys: :data:`ROW_COLUMNS`. Ratios are the method's median over Alg. 8's (so > 1 means
    Alg. 8 is faster); ``rel_diff_vs_lowrank`` is ``||S - S_lowrank||_F / ||S_lowrank||_F``.
    """
    device = torch.device(device)
    rows = []
    for d_A in dims:
        if r > min(d_A, d_G):
            raise ValueError(f"dims: rank r={r} exceeds d_A={d_A} or d_G={d_G}")
        log(f"[apply] d_A={d_A}, d_G={d_G}: timing ...", flush=True)
        rows += _bench_one(d_A, d_G, n, r, dtype, device, repeats, d_A <= dense_max_dim, seed + d_A, budget_s, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bench_one(d_A, d_G, n, r, dtype, device, repeats, dense, seed, budget_s, log) -> list[dict]:
    """The rows of one ``d_A`` (a function of its own so every tensor is freed on return)."""
    L = make_layer(d_A, d_G, n, r, dtype=dtype, device=device, seed=seed)
    UA, dA, UG, dG, A, G = L["UA"], L["dA"], L["UG"], L["dG"], L["A"], L["G"]
    lamA, lamG = L["lamA"], L["lamG"]
    J = G @ A.mT

    def alg8_pre():
        return linear_time_factors(G, A, UA, dA, lamA, UG, dG, lamG)

    def alg8_total():
        G_hat, A_hat = linear_time_factors(G, A, UA, dA, lamA, UG, dG, lamG)
        return G_hat @ A_hat.mT

    def lowrank_pre():
        return kfac_precondition(J, UA, dA, lamA, UG, dG, lamG)

    def lowrank_total():
        return kfac_precondition(G @ A.mT, UA, dA, lamA, UG, dG, lamG)

    fns = {"alg8": (alg8_pre, alg8_total), "lowrank": (lowrank_pre, lowrank_total)}
    if dense:
        Ainv = _dense_inverse(UA, dA, lamA)
        Ginv = _dense_inverse(UG, dG, lamG)
        fns["dense"] = (lambda: Ginv @ J @ Ainv, lambda: Ginv @ (G @ A.mT) @ Ainv)
    flat = {}
    for method, (pre, total) in fns.items():
        flat[f"{method}:pre"] = pre
        flat[f"{method}:total"] = total
    timings = time_interleaved(flat, device=device, repeats=repeats, budget_s=budget_s, keep=True)
    res = {}
    for method in fns:
        t_pre, t_tot = timings[f"{method}:pre"], timings[f"{method}:total"]
        res[method] = (t_pre, t_tot, t_tot.result)
        t_pre.result = t_tot.result = None
        log(f"[apply]   {LABELS[method]:18s} precondition {t_pre.median:9.4f}s  total {t_tot.median:9.4f}s",
            flush=True)
    S_ref = res["lowrank"][2]
    ref_norm = float(torch.linalg.matrix_norm(S_ref))
    rows = []
    for method, (t_pre, t_tot, S) in res.items():
        peak = max(t_pre.peak_bytes, t_tot.peak_bytes) if device.type == "cuda" else float("nan")
        rows.append({
            "d_A": d_A, "d_G": d_G, "n": n, "r": r, "method": method,
            "precondition_s": t_pre.median, "total_s": t_tot.median,
            "precondition_ratio_to_alg8": t_pre.median / res["alg8"][0].median,
            "total_ratio_to_alg8": t_tot.median / res["alg8"][1].median,
            "runs": len(t_pre.runs),
            "rel_diff_vs_lowrank": float(torch.linalg.matrix_norm(S - S_ref)) / ref_norm,
            "peak_bytes": peak, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(),
        })
    return rows


def check_targets(rows: list[dict], d_A: int = FC0["d_A"], d_G: int = FC0["d_G"]) -> list[dict]:
    """DESIGN's apply target at FC0's shapes (``n/a`` when that shape was not run)."""
    ratio = next((r["precondition_ratio_to_alg8"] for r in rows
                  if r["method"] == "lowrank" and r["d_A"] == d_A and r["d_G"] == d_G), None)
    return [{"target": f"standard low-rank / Alg. 8, preconditioning part, d_A={d_A}, d_G={d_G}",
             "value": float("nan") if ratio is None else ratio, "threshold": f">= {SPEEDUP_TARGET:g}",
             "verdict": verdict(None if ratio is None else ratio >= SPEEDUP_TARGET)}]


def plot_apply(rows: list[dict], path, title: str = "") -> Path:
    """Log-log time against d_A: preconditioning part (solid) and total (dashed) per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for i, method in enumerate(METHODS):
        pts = sorted((r["d_A"], r["precondition_s"], r["total_s"]) for r in rows if r["method"] == method)
        if not pts:
            continue
        color = f"C{i}"
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                  label=f"{LABELS[method]}: preconditioning")
        ax.loglog([p[0] for p in pts], [p[2] for p in pts], marker="s", ls="--", color=color,
                  label=f"{LABELS[method]}: total (with forming S or J)")
    ax.set_xlabel("d_A (A-factor dimension)")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title or "Inverse application: Alg. 8 vs standard")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench apply``."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.quick:
        dims, d_G, n, r = QUICK["dims"], QUICK["d_G"], QUICK["n"], QUICK["r"]
    else:
        dims, d_G, n, r = DEFAULT_DA, FC0["d_G"], FC0["n"], FC0["r"]
    dims = args.dims or dims
    out = Path(args.out)
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    print(f"bkfac bench apply  ({'quick sizes' if args.quick else 'paper FC0 sizes'})")
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']} "
          f"({info['torch_threads']} threads), device {info['device']} [{info['device_name']}]")
    print(f"dtype: {args.dtype}{' (what training uses)' if dtype == torch.float32 else ''}; d_G={d_G}, n={n}, "
          f"r={r}; d_A in {dims}; median of up to {args.repeats} runs, interleaved")
    t0 = time.perf_counter()
    rows = bench_apply(dims, d_G=d_G, n=n, r=r, dtype=dtype, device=device, repeats=args.repeats,
                       seed=args.seed, budget_s=args.max_seconds)
    targets = check_targets(rows)
    cols = ["d_A", "method", "precondition_s", "total_s", "precondition_ratio_to_alg8", "total_ratio_to_alg8",
            "rel_diff_vs_lowrank"]
    heads = ["d_A", "method", "precond s", "total s", "precond / Alg8", "total / Alg8", "rel diff"]
    print()
    print(format_table([{**r, "method": LABELS[r["method"]]} for r in rows], cols, heads))
    print()
    for t in targets:
        print(f"target {t['verdict']:4s}  {t['target']}: {t['value']:.3g} (want {t['threshold']})")
    write_csv_atomic(out / "apply.csv", rows, ROW_COLUMNS)
    write_csv_atomic(out / "apply_targets.csv", targets, TARGET_COLUMNS)
    written = [out / "apply.csv", out / "apply_targets.csv"]
    if not getattr(args, "no_figure", False):
        written.append(plot_apply(rows, out / "apply.png",
                                  title=f"Alg. 8 vs standard application ({args.dtype}, {info['device_name']})"))
    print(f"wrote {', '.join(display_path(p) for p in written)} in {time.perf_counter() - t0:.0f}s")
    return 0
