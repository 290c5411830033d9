"""Shared helpers of the benchmarks: machine description, timing, atomic CSV/figure output,
plain-text tables and log-log slope fits.

Timings are wall-clock medians of repeated runs after a warm-up, with
``torch.cuda.synchronize`` around every run on CUDA so that asynchronous kernels are
counted. Speed is only ever *reported* (and compared with targets as ratios measured side
by side in one process); no test asserts a timing.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "Timing",
    "cpu_model",
    "machine_info",
    "resolve_device",
    "resolve_dtype",
    "sync",
    "time_fn",
    "time_interleaved",
    "set_threads",
    "tensor_bytes",
    "write_csv_atomic",
    "save_figure_atomic",
    "format_table",
    "loglog_slope",
    "verdict",
]


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> CUDA when available else CPU; ``'cuda'`` without CUDA raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: unknown device {name!r} ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model, core count, torch version and threads, and the device's name."""
    device = torch.device(device)
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = info["cpu_model"]
    return info


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of the runs of one measurement; ``median`` is what the tables report."""

    runs: list[float] = field(default_factory=list)
    peak_bytes: float = float("nan")  # CUDA only: peak extra memory allocated during a run
    result: object = None  # the last run's return value when ``keep=True``

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)


def _run_once(fn: Callable[[], object], timing: Timing, device: torch.device, keep: bool) -> float:
    """One run of ``fn`` (synchronised on CUDA); records CUDA peak memory, returns seconds."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    elapsed = time.perf_counter() - t0
    if keep:
        timing.result = out
    del out
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
        timing.peak_bytes = peak if math.isnan(timing.peak_bytes) else max(timing.peak_bytes, peak)
    return elapsed


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    budget_s: float = 120.0,
    slow_s: float = 2.0,
    keep: bool = False,
) -> dict[str, Timing]:
    """Time several functions side by side: the runs are interleaved round-robin.

    Interleaving makes the *ratios* between the functions robust to a machine whose load
    drifts while the benchmark runs (a shared machine): every round runs each function once.
    Per function: ``warmup`` discarded runs, except that a run slower than ``slow_s`` makes
    warm-up effects negligible and is kept as a sample; then up to ``repeats`` samples,
    stopping early once its samples total ``budget_s`` (at least one run is always made).
    On CUDA every run is bracketed by ``torch.cuda.synchronize`` and the peak memory
    allocated on top of what was live before the run is recorded. With ``keep=True`` each
    function's last return value is kept in ``Timing.result``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    timings = {name: Timing() for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            elapsed = _run_once(fn, timings[name], device, keep)
            if elapsed >= slow_s:
                timings[name].runs.append(elapsed)
                break
    for _ in range(repeats):
        for name, fn in fns.items():
            t = timings[name]
            if len(t.runs) >= repeats or (t.runs and sum(t.runs) >= budget_s):
                continue
            t.runs.append(_run_once(fn, t, device, keep))
    return timings


def round_ratios(runs: Sequence[float], base_runs: Sequence[float]) -> list[float]:
    """Per-round ratios ``runs[i] / base_runs[i]`` of two functions timed by
    :func:`time_interleaved` (round ``i`` ran both once, under the same load): their min and
    max are the spread reported beside the ratio of the medians."""
    pairs = [(a, b) for a, b in zip(runs, base_runs) if b > 0]
    if not pairs:
        raise ValueError("round_ratios needs at least one run of each function")
    return [a / b for a, b in pairs]


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    budget_s: float = 120.0,
    slow_s: float = 2.0,
    keep: bool = False,
) -> Timing:
    """Median-of-``repeats`` wall time of one function (see :func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, device=device, repeats=repeats, warmup=warmup, budget_s=budget_s,
                            slow_s=slow_s, keep=keep)["fn"]


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (``None``: leave the default); return the count in use.

    On a shared, oversubscribed machine one thread can be many times faster for LAPACK
    calls (eigh, QR, SVD) than two threads that wait on each other.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by the given tensors (``numel * element_size``)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to ``path`` as CSV atomically.

    The file is written to a temporary file in the same directory and moved into place with
    ``os.replace``, so an interrupted run never leaves a half-written table.
    """
    path = Path(path)
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    tmp = _atomic_target(path)
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then
    ``os.replace``)."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class TeeStdout(io.TextIOBase):
    """``with TeeStdout() as tee:`` -- everything printed to ``sys.stdout`` inside the block
    still reaches it, and is also kept in ``tee.text()`` (a benchmark's log, written next to
    its tables)."""

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self._out = None

    def write(self, s: str) -> int:
        self._buf.write(s)
        return self._out.write(s) if self._out is not None else len(s)

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def text(self) -> str:
        return self._buf.getvalue()

    def __enter__(self) -> "TeeStdout":
        self._out, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout = self._out
        self._out = None


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def save_figure_atomic(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` to a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fmt(v, floatfmt: str) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return format(v, floatfmt)
    return str(v)


def format_table(rows: Iterable[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                 floatfmt: str = ".4g") -> str:
    """A plain-text, right-aligned table (hand-written: a dozen lines, no extra dependency)."""
    headers = list(headers or columns)
    body = [[_fmt(row.get(c, ""), floatfmt) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (``nan`` with fewer than 2 points)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0 and math.isfinite(b)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan")
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def load_bench_profile(args, device: torch.device):
    """The run profile of ``bench step``/``bench peer``: ``--profile``, else ``smoke`` with
    ``--quick``, else ``paper`` on CUDA and ``cpu`` otherwise."""
    from ..experiments.profiles import load_profile

    name = getattr(args, "profile", None)
    if args.quick:
        name = name or "smoke"
    return load_profile(name or ("paper" if device.type == "cuda" else "cpu"))


def load_average() -> str:
    """The machine's 1/5/15-minute load averages (``n/a`` where /proc is missing)."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def machine_line(info: dict) -> str:
    """The ``machine:`` line every benchmark prints (and its log keeps; chapters read it):
    CPU, cores, torch and its threads, the device, the load average now."""
    return (f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']} "
            f"({info['torch_threads']} threads), device {info['device']} [{info['device_name']}]; "
            f"load average {load_average()}")


def verdict(ok: bool | None) -> str:
    """``PASS`` / ``FAIL`` / ``n/a`` (target not measurable in this run)."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")
