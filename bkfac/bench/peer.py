"""``bkfac bench peer``: our k-fac step against an independent public K-FAC implementation.

The peer is **ASDL** (Osawa et al., "ASDL: A Unified Interface for Gradient Preconditioning
in PyTorch", 2023), PyPI package ``asdfghjkl`` (import name ``asdl``; needs only torch and
numpy), whose ``KfacGradientMaker`` computes a plain K-FAC step. Install it with
``pip install asdfghjkl==0.1a5``; without it this part prints how and exits with status 2.

What is compared, in one process, on the profile's model (``cpu`` by default, ``paper`` on
CUDA, ``smoke`` with ``--quick``), from the same initial weights and on the same batch:

* **ours**: :class:`bkfac.KFAC` with the profile's k-fac hyper-parameters but
  ``t_updt = t_inv = 1`` -- every step rebuilds the batch factors, updates the EA factors and
  recomputes their inverses (what a per-step K-FAC does); step = forward/backward +
  ``optimizer.step()`` (statistics, inverse, precondition, rest from ``optimizer.timer``).
  Twice: with the paper's ``eigh`` (``bkfac k-fac``), and with ``inverse="cholesky"``
  (``bkfac k-fac (cholesky)``: lambda_max by power iteration, then a Cholesky inverse of the
  damped factor -- the kind of inverse ASDL computes).
* **ASDL**: ``KfacGradientMaker(model, PreconditioningConfig(data_size=n, damping,
  ema_decay=1-rho, curvature/preconditioner interval 1, BatchNorm ignored),
  fisher_type='fisher_emp')``; step = ``forward_and_backward()`` (forward, backward and
  the Kronecker factors in one pass, then Cholesky inverses of the damped factors, then the
  preconditioned gradient) + ``torch.optim.SGD.step()``. Its phases are timed by wrapping
  the gradient maker's ``update_curvature`` (forward/backward *with* the factor statistics:
  ASDL computes them in its hooks), ``update_preconditioner`` and ``precondition``.

The three do the same work per step except for the factor inverse: the paper's k-fac takes
an ``eigh`` of each factor (its damping ``lambda = phi * lambda_max`` and the spectrum
continuation need the spectrum), ours with ``inverse="cholesky"`` a Cholesky inverse damped
with ``phi * lambda_max`` from power iteration, ASDL a Cholesky inverse with Tikhonov damping
split between the factors (``pi``-damping). BatchNorm parameters get the plain gradient in all.

Factor check (conventions, ours in :mod:`bkfac.curvature.capture`): with ASDL's
``data_size = n`` its Kronecker factors are ``A = (1/(n T)) sum_{i,t} a a^T`` (T = output
positions of a conv, 1 for a Linear layer) and ``B = (1/n) sum_{i,t} g g^T`` with ``g`` the
per-sample-loss output gradient -- our ``A`` and ``Gamma``. Differences: ASDL's ``A`` has no
bias row/column (the bias is preconditioned with ``B`` alone), so we compare our
``A[:-1, :-1]``; and ASDL's EA starts from zero, ``F_1 = ema_decay * F_batch``, where ours
starts from the batch factor (``kappa(0) = 1``), so ASDL's first factors are divided by
``ema_decay``. The max relative difference ``max|ours - peer| / max|ours|`` after the first
step (same weights, batch and dropout mask) is printed per layer for one Conv2d and one
Linear layer (all layers in the CSV).

Target: our k-fac step at least as fast as the peer's (PASS/FAIL), with the same kind of
inverse (``bkfac k-fac (cholesky)`` against ASDL); the ``eigh`` row is printed beside it. Writes ``peer.csv``
(timings), ``peer_factors.csv`` and ``peer_targets.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
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
    set_threads,
    sync,
    time_interleaved,
    verdict,
    write_csv_atomic,
)

__all__ = ["PEER_MODULE", "PEER_PACKAGE", "PEER_VERSION", "load_peer", "ours_kfac", "peer_kfac", "compare_factors",
           "bench_peer", "main"]

PEER_MODULE = "asdl"
PEER_PACKAGE = "asdfghjkl"
PEER_VERSION = "0.1a5"
PHASES = ("forward_backward", "statistics", "inverse", "precondition", "rest")
OURS, OURS_CHOLESKY, PEER = "bkfac k-fac", "bkfac k-fac (cholesky)", "ASDL k-fac"  # the timed rows
PEER_DAMPING = 1e-3  # ASDL's Tikhonov damping (cost does not depend on it)
TIMING_COLUMNS = (["implementation", "runs"] + [f"{p}_s" for p in PHASES]
                  + ["step_s", "min_step_s", "ratio_to_ours", "device", "dtype", "profile"])
FACTOR_COLUMNS = ["layer", "kind", "factor", "dim", "max_rel_diff", "peer_scale"]
TARGET_COLUMNS = ["target", "value", "threshold", "verdict"]


def load_peer():
    """The peer's module (``asdl``), or ``None`` when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its import warns about deprecated torch.jit.script
            return importlib.import_module(PEER_MODULE)
    except ImportError:
        return None


def not_installed_message() -> str:
    return (f"bkfac bench peer: the peer K-FAC implementation ASDL (PyPI package '{PEER_PACKAGE}', import name "
            f"'{PEER_MODULE}') is not installed.\nInstall it with:  pip install {PEER_PACKAGE}=={PEER_VERSION}")


def ours_kfac(model: nn.Module, profile, *, sync_timer: bool = False, inverse: str = "eigh"):
    """Our k-fac with the profile's hyper-parameters and ``t_updt = t_inv = 1``."""
    from ..optim.factory import make_optimizer

    _, hyper, _ = profile.resolve_run("k-fac")
    hyper.update(t_updt=1, t_inv=1, sync_timer=sync_timer, inverse=inverse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm: plain SGD step
        opt = make_optimizer("k-fac", model, **hyper)
    opt.set_epoch(1)
    return opt


class peer_kfac:
    """ASDL's K-FAC step with the same EA decay and learning rate as ours; phases timed by
    wrapping the gradient maker's methods (``last`` holds the latest step's seconds)."""

    def __init__(self, asdl, model: nn.Module, *, batch_size: int, rho: float, lr: float, weight_decay: float,
                 device):
        self.asdl = asdl
        self.model = model
        self.device = device
        self.ema_decay = 1.0 - rho
        config = asdl.PreconditioningConfig(
            data_size=batch_size, damping=PEER_DAMPING, ema_decay=self.ema_decay,
            preconditioner_upd_interval=1, curvature_upd_interval=1,
            ignore_modules=[nn.BatchNorm1d, nn.BatchNorm2d])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.last = dict.fromkeys(PHASES, 0.0)
        for method, phase in (("update_curvature", "forward_backward"), ("update_preconditioner", "inverse"),
                              ("precondition", "precondition")):
            setattr(self.gm, method, self._timed(getattr(self.gm, method), phase))

    def _timed(self, fn, phase):
        def wrapper(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.last[phase] += time.perf_counter() - t0
        return wrapper

    def step(self, x, y) -> torch.Tensor:
        self.last = dict.fromkeys(PHASES, 0.0)
        sync(self.device)
        t0 = time.perf_counter()
        self.sgd.zero_grad(set_to_none=True)
        dummy = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(F.cross_entropy, dummy, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its module hooks warn about non-full backward hooks
            _, loss = self.gm.forward_and_backward()
        sync(self.device)
        t1 = time.perf_counter()
        self.sgd.step()
        sync(self.device)
        self.last["rest"] += time.perf_counter() - t1
        inner = sum(self.last.values()) - self.last["rest"]
        self.last["rest"] += max(0.0, (t1 - t0) - inner)  # set-up calls, zero_grad, the maker's own overhead
        return loss

    def factors(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``module`` in our scaling after the FIRST step (``/ ema_decay``)."""
        kron = module.fisher.kron
        return kron.A / self.ema_decay, kron.B / self.ema_decay


def _our_step(model, opt, x, y, device) -> tuple[torch.Tensor, dict]:
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    sync(device)
    t2 = time.perf_counter()
    phases = {"forward_backward": t1 - t0}
    for p in ("statistics", "inverse", "precondition", "rest"):
        phases[p] = float(opt.timer.last.get(p, 0.0))
    phases["rest"] += max(0.0, (t2 - t1) - sum(float(v) for v in opt.timer.last.values()))
    return loss, phases


def compare_factors(opt, peer: peer_kfac) -> list[dict]:
    """Per supported layer and factor: max relative difference of our EA factor and the
    peer's (weight block of A; see the module docstring), after the first step of each."""
    rows = []
    peer_modules = dict(peer.model.named_modules())
    for L in opt.layers:
        lc = L.capture
        pa, pb = peer.factors(peer_modules[lc.name])
        A = L.inv_A.factor
        A = A[:-1, :-1] if lc.has_bias else A
        for fac, ours, theirs in (("A", A, pa), ("G", L.inv_G.factor, pb)):
            ours, theirs = ours.double(), theirs.double()
            diff = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-300))
            rows.append({"layer": lc.name, "kind": lc.kind, "factor": fac, "dim": ours.shape[0],
                         "max_rel_diff": diff, "peer_scale": 1.0 / peer.ema_decay})
    return rows


def bench_peer(profile, asdl, *, device="cpu", dtype=torch.float32, repeats: int = 3, budget_s: float = 120.0,
               seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Factor check after one step of each, then interleaved timing of further steps on the
    same batch. Returns ``(timing_rows, factor_rows)``."""
    from ..experiments.models import build_model

    device = torch.device(device)
    spec = profile.model
    # ASDL reshapes gradients with ``view``, which NHWC weights refuse: all three run on NCHW
    # storage (the same arithmetic; main() says so when the profile asks for channels_last)
    spec.pop("channels_last", None)
    torch.manual_seed(seed)
    base = build_model(spec).to(device=device, dtype=dtype)
    n = profile.train["batch_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, int(spec.get("in_channels", 3)), *tuple(spec.get("input_size", (32, 32))), generator=g)
    y = torch.randint(0, int(spec.get("num_classes", 10)), (n,), generator=g)
    x, y = x.to(device=device, dtype=dtype), y.to(device)

    ours_model, chol_model, peer_model = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    for m in (ours_model, chol_model, peer_model):
        m.train()
    opt = ours_kfac(ours_model, profile, sync_timer=device.type == "cuda")
    chol = ours_kfac(chol_model, profile, sync_timer=device.type == "cuda", inverse="cholesky")
    lr = opt.param_groups[0]["lr"]
    peer = peer_kfac(asdl, peer_model, batch_size=n, rho=opt.rho, lr=lr, weight_decay=opt.param_groups[0][
        "weight_decay"], device=device)

    # first step of each with the same dropout mask: the EA factors are then the batch factors
    torch.manual_seed(seed + 1)
    _our_step(ours_model, opt, x, y, device)
    torch.manual_seed(seed + 1)
    _our_step(chol_model, chol, x, y, device)
    torch.manual_seed(seed + 1)
    peer.step(x, y)
    factor_rows = compare_factors(opt, peer)

    names = (OURS, OURS_CHOLESKY, PEER)
    samples = {name: [] for name in names}

    def ours_fn():
        _, ph = _our_step(ours_model, opt, x, y, device)
        samples[OURS].append(ph)

    def chol_fn():
        _, ph = _our_step(chol_model, chol, x, y, device)
        samples[OURS_CHOLESKY].append(ph)

    def peer_fn():
        peer.step(x, y)
        samples[PEER].append(dict(peer.last))

    timings = time_interleaved({OURS: ours_fn, OURS_CHOLESKY: chol_fn, PEER: peer_fn}, device=device,
                               repeats=repeats, budget_s=budget_s)
    rows = []
    for name, t in timings.items():
        kept = samples[name][-len(t.runs):]  # drop the discarded warm-up run's phases
        rows.append({"implementation": name, "runs": len(t.runs),
                     **{f"{p}_s": statistics.median(s[p] for s in kept) for p in PHASES},
                     "step_s": t.median, "min_step_s": t.min, "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "profile": profile.name})
    ours_s = rows[0]["step_s"]
    for r in rows:
        r["ratio_to_ours"] = r["step_s"] / ours_s
    opt.remove_hooks()
    chol.remove_hooks()
    return rows, factor_rows


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bkfac bench peer`` (exit status 2 when the peer is not installed)."""
    asdl = load_peer()
    if asdl is None:
        print(not_installed_message(), file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    profile = load_bench_profile(args, device)
    out = Path(args.out)
    set_threads(getattr(args, "threads", None))
    info = machine_info(device)
    try:
        from importlib.metadata import version

        peer_version = version(PEER_PACKAGE)
    except Exception:  # pragma: no cover - metadata missing
        peer_version = "?"
    print(f"bkfac bench peer  (profile {profile.name}: model {profile.model}, batch {profile.train['batch_size']})")
    if profile.model.get("channels_last"):
        print("storage: NCHW for all three, not the profile's channels_last (ASDL's K-FAC reshapes gradients with "
              "view, which channels_last weights refuse)")
    print(f"peer: ASDL ({PEER_PACKAGE} {peer_version}) KfacGradientMaker, empirical Fisher, factors and Cholesky "
          "inverses every step; ours: k-fac with t_updt = t_inv = 1, eigh (the paper's) or Cholesky inverses every step")
    print(machine_line(info))
    t0 = time.perf_counter()
    rows, factors = bench_peer(profile, asdl, device=device, dtype=dtype, repeats=args.repeats,
                               budget_s=args.max_seconds, seed=args.seed)
    print()
    print(format_table(rows, ["implementation", "runs"] + [f"{p}_s" for p in PHASES] + ["step_s", "ratio_to_ours"],
                       ["implementation", "runs", "fwd/bwd", "stats", "inverse", "precond", "rest", "step s",
                        "/ ours"]))
    print("(ASDL computes its factor statistics inside forward/backward: its 'fwd/bwd' includes them)")
    print()
    shown = []
    for kind in ("conv2d", "linear"):
        layer = next((f["layer"] for f in factors if f["kind"] == kind), None)
        shown += [f for f in factors if f["layer"] == layer]
    print("Kronecker factors after the first step, ours vs ASDL (A: weight block; ASDL / ema_decay):")
    print(format_table(shown, ["layer", "kind", "factor", "dim", "max_rel_diff"],
                       ["layer", "kind", "factor", "dim", "max rel diff"]))
    worst = max(f["max_rel_diff"] for f in factors)
    print(f"max relative difference over all {len(factors)} factors: {worst:.3g}")
    step = {r["implementation"]: r["step_s"] for r in rows}
    ratio = step[PEER] / step[OURS_CHOLESKY]
    targets = [{"target": "ASDL step / our k-fac (cholesky) step", "value": ratio, "threshold": ">= 1",
                "verdict": verdict(ratio >= 1.0)}]
    print()
    for t in targets:
        print(f"target {t['verdict']:4s}  our k-fac step (Cholesky inverse, as the peer's) at least as fast as the "
              f"peer's: peer / ours = {t['value']:.3g} (want {t['threshold']})")
    print(f"             (with the paper's eigh inverse: peer / ours = {step[PEER] / step[OURS]:.3g})")
    print(f"load average after the run: {load_average()}")
    written = [write_csv_atomic(out / "peer.csv", rows, TIMING_COLUMNS),
               write_csv_atomic(out / "peer_factors.csv", factors, FACTOR_COLUMNS),
               write_csv_atomic(out / "peer_targets.csv", targets, TARGET_COLUMNS)]
    print(f"wrote {', '.join(display_path(p) for p in written)} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised by hand
    from .step import _parser

    sys.exit(main(_parser("peer").parse_args(["peer"] + sys.argv[1:])))
