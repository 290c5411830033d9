"""``bkfac bench linalg``: the B-update against RSVD, SREVD and eigh across the factor size.

What is timed, side by side in one process, for each factor dimension ``dim``:

* **B-update** (Alg. 4 lines 3-6): ``truncate`` the running b-kfac representation to rank
  ``r``, then :func:`~bkfac.linalg.brand_update` (Alg. 3) with ``rho * d`` and
  ``sqrt(1 - rho) * A_k``. It needs no dense factor: ``O(dim (r+n)^2 + (r+n)^3)``.
* **RSVD** (rs-kfac, Alg. 1 line 13) and **SREVD** (sre-kfac) of the dense EA factor at
  rank ``r`` with ``q = r + oversample`` and ``power_iters`` power iterations:
  ``O(dim^2 q)``.
* **eigh** of the dense EA factor (k-fac), only where ``dim <= eigh_max_dim``:
  ``O(dim^3)``.

The factor is built like the paper's FC0 A-factor (Sec. 6: 16384 inputs plus the bias
column, batch ``n = 256``): ``A_k = [relu(h_1) .. relu(h_n); 1 .. 1] / sqrt(n)`` with
pre-activations ``h_i`` drawn around a latent subspace of decaying scale, so the EA
``M_k = rho M_{k-1} + (1 - rho) A_k A_k^T`` has a decaying spectrum. The B-update's
input representation is the one b-kfac itself maintains over the same EA steps (B-updates
from scratch, truncating to ``r`` before each), so no dense factor or eigh is needed to
start it.

State memory: bytes of the tensors a method keeps between inversions. RSVD/SREVD keep
the dense ``dim x dim`` EA factor plus their rank-``r`` result; eigh keeps the factor plus
its full eigenbasis; the B-update keeps only its ``dim x (r+n)`` representation (the batch
``A_k`` comes from the forward pass). On CUDA the peak memory allocated during a run is
measured too.

DESIGN's targets: B-update at least 40x faster than RSVD at ``dim = 16385``, and a
log-log slope of B-update time against ``dim`` of at most 1.2.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..book import display_path
from ..linalg import brand_update, rsvd, safe_eigh, srevd, truncate
from .common import (
    format_table,
    load_average,
    round_ratios,
    loglog_slope,
    machine_info,
    machine_line,
    resolve_device,
    resolve_dtype,
    save_figure_atomic,
    set_threads,
    tensor_bytes,
    time_interleaved,
    verdict,
    write_csv_atomic,
)

__all__ = ["DEFAULT_DIMS", "QUICK", "fc0_like_batches", "build_problem", "bench_linalg",
           "fit_slopes", "check_targets", "plot_linalg", "main"]

#: The issue's range 1024 .. 16385 (16385 = FC0's 16384 inputs + bias).
DEFAULT_DIMS = [1024, 2048, 4096, 8192, 16385]
#: Small sizes for tests (``--quick``): proves every code path, says nothing about speed.
QUICK = {"dims": [96, 192, 384], "n": 16, "r": 12, "oversample": 4, "power_iters": 2, "ea_steps": 3}

METHODS = ("bupdate", "rsvd", "srevd", "eigh")
LABELS = {"bupdate": "B-update", "rsvd": "RSVD", "srevd": "SREVD", "eigh": "eigh"}
ROW_COLUMNS = ["dim", "method", "seconds", "min_seconds", "runs", "ratio_to_bupdate", "ratio_min", "ratio_max",
               "state_bytes",
               "peak_bytes", "top_eig_rel_diff", "n", "r", "q", "power_iters", "dtype", "device", "threads"]
SLOPE_COLUMNS = ["method", "slope", "dim_min", "dim_max", "points"]
TARGET_COLUMNS = ["target", "value", "threshold", "verdict"]
SPEEDUP_TARGET = 40.0
SPEEDUP_DIM = 16385
SLOPE_TARGET = 1.2
SLOPE_MIN_DIM = 2048  # DESIGN's scaling range starts here


def fc0_like_batches(dim: int, n: int, *, dtype=torch.float32, device="cpu", seed: int = 0,
                     latent: int | None = None, noise: float = 0.1):
    """Return a function drawing batch matrices ``A_k`` (dim x n) like FC0's A-factor input.

    ``A_k = [relu(h_i); 1] / sqrt(n)``: the last row is the bias column of the augmented
    activations (DESIGN conventions), ``h_i = B z_i + noise * e_i`` with ``B`` (dim-1 x
    latent) of column scales ``1/j`` so the EA factor's spectrum decays.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    latent = latent or min(2 * n, dim - 1)
    scales = torch.arange(1, latent + 1, dtype=dtype, device=device).reciprocal()
    basis = torch.randn(dim - 1, latent, dtype=dtype, device=device, generator=gen) * scales
    ones = torch.ones(1, n, dtype=dtype, device=device)

    def draw() -> torch.Tensor:
        z = torch.randn(latent, n, dtype=dtype, device=device, generator=gen)
        h = torch.addmm(torch.randn(dim - 1, n, dtype=dtype, device=device, generator=gen), basis, z,
                        beta=noise)
        return torch.cat([h.relu_(), ones], dim=0) / math.sqrt(n)

    return draw


def build_problem(dim: int, n: int, r: int, *, rho: float = 0.95, ea_steps: int = 4,
                  dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """The EA factor ``M`` after ``ea_steps + 1`` batches, the b-kfac representation ``(U, d)``
    after ``ea_steps`` (B-updates from scratch), and the last batch ``A`` still to add.

    ``M`` already contains ``A``: the B-update of ``(U, d)`` with ``A`` and the RSVD/SREVD/
    eigh of ``M`` both produce a decomposition of the same EA factor.
    """
    draw = fc0_like_batches(dim, n, dtype=dtype, device=device, seed=seed)
    A = draw()
    M = A @ A.mT
    U, d = brand_update(A.new_zeros(dim, 0), A.new_zeros(0), A)
    for _ in range(ea_steps - 1):
        A = draw()
        M.addmm_(A, A.mT, beta=rho, alpha=1 - rho)
        U, d = truncate(U, d, min(r, U.shape[1]))
        U, d = brand_update(U, rho * d, math.sqrt(1 - rho) * A)
    A = draw()
    M.addmm_(A, A.mT, beta=rho, alpha=1 - rho)
    return {"M": M, "U": U, "d": d, "A": A, "rho": rho}


def _top_diff(d: torch.Tensor, ref: torch.Tensor, k: int = 10) -> float:
    k = min(k, d.numel(), ref.numel())
    return float((d[:k] - ref[:k]).abs().max() / ref[0]) if k else float("nan")


def bench_linalg(
    dims=DEFAULT_DIMS,
    n: int = 256,
    r: int = 220,
    oversample: int = 10,
    power_iters: int = 4,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    repeats: int = 3,
    eigh_max_dim: int = 8192,
    *,
    rho: float = 0.95,
    ea_steps: int = 4,
    seed: int = 0,
    budget_s: float = 120.0,
    log=print,
) -> list[dict]:
    """Time the B-update, RSVD, SREVD and eigh for every ``dim``; one row per (dim, method).

    Row keys: :data:`ROW_COLUMNS`. ``ratio_to_bupdate`` is the method's median time over the
    B-update's; ``ratio_min`` .. ``ratio_max`` the spread of the per-round ratios (the i-th run
    of the method over the i-th run of the B-update: the runs are interleaved round-robin, so
    a round's two runs saw the same load); ``top_eig_rel_diff`` compares the 10 leading
    eigenvalues with eigh's (or SREVD's where eigh is skipped), relative to the largest.
    """
    device = torch.device(device)
    rows: list[dict] = []
    q = r + oversample
    for dim in dims:
        if r > dim or q > dim:
            raise ValueError(f"dims: rank r={r} (+ oversample {oversample}) exceeds dim={dim}")
        t0 = time.perf_counter()
        prob = build_problem(dim, n, r, rho=rho, ea_steps=ea_steps, dtype=dtype, device=device, seed=seed + dim)
        log(f"[linalg] dim={dim}: factor built in {time.perf_counter() - t0:.1f}s; timing ...", flush=True)
        rows += _bench_one(prob, dim, n, r, oversample, power_iters, dim <= eigh_max_dim, dtype, device, repeats,
                           budget_s, log)
        del prob
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bench_one(prob, dim, n, r, oversample, power_iters, with_eigh, dtype, device, repeats, budget_s, log):
    """The rows of one ``dim`` (a function of its own so every tensor is freed on return)."""
    M, U, d, A, rho = prob["M"], prob["U"], prob["d"], prob["A"], prob["rho"]
    c = math.sqrt(1 - rho)
    q = r + oversample

    def bupdate():  # as the optimizers call it (BrandInverse): the batch was checked upstream
        Ur, dr = truncate(U, d, r)
        return brand_update(Ur, rho * dr, c * A, check=False)

    fns = {
        "bupdate": bupdate,
        "rsvd": lambda: rsvd(M, r, oversample, power_iters),
        "srevd": lambda: srevd(M, r, oversample, power_iters),
    }
    if with_eigh:
        fns["eigh"] = lambda: safe_eigh(M)
    timings = time_interleaved(fns, device=device, repeats=repeats, budget_s=budget_s, keep=True)
    results = {}
    for method, timing in timings.items():
        if method == "eigh":  # (evals, evecs) ascending -> (U, d) descending
            do, Uo = timing.result
            Uo, do = Uo.flip(1), do.flip(0)
        else:
            Uo, do = timing.result
        timing.result = None
        results[method] = (timing, (Uo, do))
        log(f"[linalg]   {LABELS[method]:8s} {timing.median:9.4f}s (runs {len(timing.runs)})", flush=True)
    ref = results["eigh"][1][1] if "eigh" in results else results["srevd"][1][1]
    base = results["bupdate"][0].median
    base_runs = results["bupdate"][0].runs
    rows = []
    for method, (timing, (Uo, do)) in results.items():
        spread = round_ratios(timing.runs, base_runs)
        randomized = method in ("rsvd", "srevd")
        # the B-update keeps only its representation; the others also keep the dense factor
        state = tensor_bytes(Uo, do) if method == "bupdate" else tensor_bytes(M, Uo, do)
        rows.append({
            "dim": dim, "method": method, "seconds": timing.median, "min_seconds": timing.min,
            "runs": len(timing.runs), "ratio_to_bupdate": timing.median / base, "ratio_min": min(spread),
            "ratio_max": max(spread), "state_bytes": state,
            "peak_bytes": timing.peak_bytes, "top_eig_rel_diff": _top_diff(do, ref), "n": n, "r": r,
            "q": q if randomized else "", "power_iters": power_iters if randomized else "",
            "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(),
        })
    return rows


def fit_slopes(rows: list[dict], min_dim: int = SLOPE_MIN_DIM) -> list[dict]:
    """Log-log slope of time against dim per method, over dims ``>= min_dim`` (all dims when
    fewer than two qualify)."""
    out = []
    for method in METHODS:
        pts = sorted((r["dim"], r["seconds"]) for r in rows if r["method"] == method)
        use = [p for p in pts if p[0] >= min_dim]
        if len(use) < 2:
            use = pts
        if not use:
            continue
        out.append({"method": method, "slope": loglog_slope([p[0] for p in use], [p[1] for p in use]),
                    "dim_min": use[0][0], "dim_max": use[-1][0], "points": len(use)})
    return out


def check_targets(rows: list[dict], slopes: list[dict]) -> list[dict]:
    """DESIGN's two linalg targets as rows with a PASS / FAIL / n/a verdict."""
    ratio = next((r["ratio_to_bupdate"] for r in rows if r["method"] == "rsvd" and r["dim"] == SPEEDUP_DIM), None)
    slope = next((s["slope"] for s in slopes if s["method"] == "bupdate"), float("nan"))
    return [
        {"target": f"RSVD time / B-update time at dim {SPEEDUP_DIM}", "value": float("nan") if ratio is None else ratio,
         "threshold": f">= {SPEEDUP_TARGET:g}", "verdict": verdict(None if ratio is None else ratio >= SPEEDUP_TARGET)},
        {"target": "log-log slope of B-update time vs dim", "value": slope, "threshold": f"<= {SLOPE_TARGET:g}",
         "verdict": verdict(None if math.isnan(slope) else slope <= SLOPE_TARGET)},
    ]


def wide_table(rows: list[dict]) -> tuple[list[dict], list[str], list[str]]:
    """One line per dim: seconds, ratios to the B-update (RSVD's with the spread of its
    per-round ratios), state memory in MiB."""
    by_dim: dict[int, dict] = {}
    for r in rows:
        line = by_dim.setdefault(r["dim"], {"dim": r["dim"]})
        line[f"{r['method']}_s"] = r["seconds"]
        if r["method"] != "bupdate":
            line[f"{r['method']}_x"] = r["ratio_to_bupdate"]
            line[f"{r['method']}_range"] = f"{r['ratio_min']:.3g}-{r['ratio_max']:.3g}"
        line[f"{r['method']}_mib"] = r["state_bytes"] / 2**20
    cols = ["dim", "bupdate_s", "rsvd_s", "srevd_s", "eigh_s", "rsvd_x", "rsvd_range", "srevd_x", "eigh_x",
            "bupdate_mib", "rsvd_mib", "eigh_mib"]
    heads = ["dim", "B-upd s", "RSVD s", "SREVD s", "eigh s", "RSVD/B", "RSVD/B runs", "SREVD/B", "eigh/B",
             "B state MiB", "RSVD state MiB", "eigh state MiB"]
    lines = [{c: line.get(c, "" if c.endswith("_range") else float("nan")) for c in cols} for line in by_dim.values()]
    return lines, cols, heads


def plot_linalg(rows: list[dict], slopes: list[dict], path, title: str = "") -> Path:
    """Log-log time against dim per method (matplotlib's object API with the Agg canvas:
    no pyplot, so the caller's backend is left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    slope_of = {s["method"]: s["slope"] for s in slopes}
    for method in METHODS:
        pts = sorted((r["dim"], r["seconds"]) for r in rows if r["method"] == method)
        if not pts:
            continue
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o",
                  label=f"{LABELS[method]} (slope {slope_of.get(method, float('nan')):.2f})")
    ax.set_xlabel("factor dimension d")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title or "Decomposition update time vs factor dimension")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench linalg``."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    cfg = dict(QUICK) if args.quick else {"dims": DEFAULT_DIMS, "n": 256, "r": 220, "oversample": 10,
                                           "power_iters": 4, "ea_steps": 4}
    dims = args.dims or cfg["dims"]
    out = Path(args.out)
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    print(f"bkfac bench linalg  ({'quick sizes' if args.quick else 'paper sizes'})")
    print(machine_line(info))
    print(f"dtype: {args.dtype}{' (what training uses)' if dtype == torch.float32 else ''}; n={cfg['n']}, "
          f"r={cfg['r']}, q=r+{cfg['oversample']}, power iterations {cfg['power_iters']}, rho 0.95, "
          f"eigh for dim <= 8192; median of up to {args.repeats} runs, interleaved")
    rows = bench_linalg(dims, n=cfg["n"], r=cfg["r"], oversample=cfg["oversample"], power_iters=cfg["power_iters"],
                        dtype=dtype, device=device, repeats=args.repeats, eigh_max_dim=8192,
                        ea_steps=cfg["ea_steps"], seed=args.seed, budget_s=args.max_seconds)
    slopes = fit_slopes(rows)
    targets = check_targets(rows, slopes)
    lines, cols, heads = wide_table(rows)
    print()
    print(format_table(lines, cols, heads))
    print()
    print(format_table([{**s, "method": LABELS[s["method"]]} for s in slopes], SLOPE_COLUMNS,
                       ["method", "log-log slope", "dim from", "dim to", "points"], floatfmt=".3f"))
    print()
    for t in targets:
        print(f"target {t['verdict']:4s}  {t['target']}: {t['value']:.3g} (want {t['threshold']})")
    print(f"load average after the run: {load_average()}")
    write_csv_atomic(out / "linalg.csv", rows, ROW_COLUMNS)
    write_csv_atomic(out / "linalg_slopes.csv", slopes, SLOPE_COLUMNS)
    write_csv_atomic(out / "linalg_targets.csv", targets, TARGET_COLUMNS)
    written = [out / "linalg.csv", out / "linalg_slopes.csv", out / "linalg_targets.csv"]
    if not getattr(args, "no_figure", False):
        written.append(plot_linalg(rows, slopes, out / "linalg.png",
                                   title=f"B-update vs RSVD/SREVD/eigh ({args.dtype}, {info['device_name']})"))
    print("wrote " + ", ".join(display_path(p) for p in written))
    return 0
