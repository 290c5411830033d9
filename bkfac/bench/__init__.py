"""Benchmarks: ``bkfac bench {linalg,apply,step,ab,stats,peer,distributed,all}``.

Each part lives in its own module with a ``main(args) -> int`` entry point, registered in
:data:`PARTS` as ``"module:function"`` and imported only when that part runs. A part whose
module does not exist (yet) is reported as "not built yet" with exit status 2.

=========  =====================================================================
part       what it measures
=========  =====================================================================
linalg     B-update (Alg. 3, 4) against RSVD, SREVD (Alg. 1 l.13) and eigh across
           the factor dimension (DESIGN's 40x and slope <= 1.2 targets)
apply      Alg. 8 against the standard low-rank and the dense inverse application
           for FC0's shapes (DESIGN's 5x target)
step       per-step time breakdown of every optimizer
ab         one optimizer against itself with hyper-parameters changed (``--set``)
stats      the conv layers' K-factor statistics: shifted products against the patch copy
peer       comparison against peer implementations
distributed  data-parallel statistics and inverse-work sharding
=========  =====================================================================

Speed is reported, never asserted by tests; targets are printed as PASS/FAIL. Each part that
ends with exit status 0 also writes what it printed to ``<--out>/<part>.log`` (``step.log``,
``linalg.log``, ...): its tables, the machine and the load average.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from ..book import display_path
from .common import TeeStdout, write_text_atomic

__all__ = ["PARTS", "add_bench_args", "run_bench", "parse_dims"]

#: part -> "module:function"; ``function(args) -> int`` runs the part.
PARTS: dict[str, str] = {
    "linalg": "bkfac.bench.linalg:main",
    "apply": "bkfac.bench.apply:main",
    "step": "bkfac.bench.step:main",
    "ab": "bkfac.bench.ab:main",
    "stats": "bkfac.bench.stats:main",
    "peer": "bkfac.bench.peer:main",
    "distributed": "bkfac.bench.distributed:main",
}


def parse_dims(text: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]`` (argparse type for ``--dims``)."""
    try:
        dims = [int(tok) for tok in text.replace(" ", "").split(",") if tok]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--dims must be comma-separated integers, got {text!r}") from exc
    if not dims or min(dims) < 2:
        raise argparse.ArgumentTypeError(f"--dims must be integers >= 2, got {text!r}")
    return dims


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's positional ``part`` and the options common to all parts."""
    parser.add_argument("part", choices=list(PARTS) + ["all"], help="which benchmark to run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="floating-point type (default float32, what training uses)")
    parser.add_argument("--repeats", type=_positive_int, default=3,
                        help="timed runs per measurement, median reported (default 3)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop repeating a measurement once its runs total this many seconds (default 120)")
    parser.add_argument("--out", default="data/results/bench", help="output directory (default data/results/bench)")
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests): proves the code paths run")
    parser.add_argument("--dims", type=parse_dims, default=None,
                        help="comma-separated factor dimensions for linalg / d_A values for apply "
                        "(default linalg 1024,2048,4096,8192,16385; DESIGN's scaling range is 2048..32768)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives steadier numbers on a "
                        "shared, oversubscribed machine")
    parser.add_argument("--no-figure", action="store_true", help="do not write the matplotlib figure")
    parser.add_argument("--profile", default=None,
                        help="run profile whose model/hyper-parameters the step, stats and peer parts use "
                        "(their default: cpu; smoke with --quick; paper on CUDA)")
    parser.add_argument("--optimizer", default=None,
                        help="ab: the run (or optimizer) of the profile to compare with itself (default b-kfac)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="ab: a hyper-parameter of variant B (repeatable; YAML values: false, 25, 0.1)")


def _resolve(part: str):
    """Return the part's entry point, or ``None`` when its module does not exist yet."""
    module_name, func_name = PARTS[part].split(":")
    if importlib.util.find_spec(module_name) is None:
        return None
    return getattr(importlib.import_module(module_name), func_name)


def run_bench(args: argparse.Namespace) -> int:
    """Run one part (or every part, in order, for ``all``); return the worst exit status."""
    # ``ab`` compares settings given on the command line: not part of ``all``
    parts = [p for p in PARTS if p != "ab"] if args.part == "all" else [args.part]
    status = 0
    for part in parts:
        entry = _resolve(part)
        if entry is None:
            print(f"bkfac bench {part}: not built yet (module {PARTS[part].split(':')[0]} does not exist)",
                  file=sys.stderr)
            status = max(status, 2)
            continue
        if len(parts) > 1:
            print(f"\n=== bkfac bench {part} ===")
        with TeeStdout() as tee:
            code = int(entry(args) or 0)
        status = max(status, code)
        if code == 0 and getattr(args, "out", None):
            # what the part printed (its tables, the machine and the load) beside its CSV files
            print(f"wrote {display_path(write_text_atomic(Path(args.out) / f'{part}.log', tee.text()))}")
    return status
