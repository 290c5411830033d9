"""Start data-parallel runs: :func:`launch` (spawned local processes), :func:`init_distributed`
(inside a process, e.g. under ``torchrun``), :func:`check_batch`.

``launch(fn, nproc, *args)`` spawns ``nproc`` processes on this machine with
``torch.multiprocessing`` (start method ``spawn``), initialises a process group over the
loopback interface (``MASTER_ADDR=127.0.0.1``, a free port) with a timeout, and runs
``fn(rank, *args)`` in each. It waits for *every* rank and returns their return values
(rank order); if any rank raised, it raises :class:`DistributedLaunchError` listing the
error of every rank that failed -- the ranks left waiting on a failed peer end with a
:class:`~bkfac.distributed.comm.CommunicationError` (connection closed, or the process
group's timeout) instead of hanging. Why hand-written rather than ``torch.multiprocessing.spawn``:
``spawn`` terminates the other ranks as soon as one fails, so their own errors (what a
user needs to see for a bad configuration) are lost, and it returns no values.

Under ``torchrun`` (``torchrun --nproc-per-node N -m bkfac train ...``), call
:func:`init_distributed` instead: it reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` from the environment.
"""

from __future__ import annotations

import io
import os
import pickle
import queue as queue_mod
import signal
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import comm as _comm

__all__ = [
    "launch",
    "init_distributed",
    "check_batch",
    "free_port",
    "DistributedLaunchError",
]


class DistributedLaunchError(RuntimeError):
    """One or more ranks of :func:`launch` failed. ``errors`` maps rank -> ``(type name,
    message, traceback text)``; ``results`` holds the return values of the ranks that did not."""

    def __init__(self, errors: dict, results: dict, world_size: int):
        self.errors = errors
        self.results = results
        self.world_size = world_size
        lines = [f"{len(errors)} of {world_size} ranks failed:"]
        for rank in sorted(errors):
            kind, msg, _ = errors[rank]
            lines.append(f"  rank {rank}: {kind}: {msg.strip().splitlines()[0] if msg.strip() else ''}")
        super().__init__("\n".join(lines))


def check_batch(global_batch: int, world_size: int) -> int:
    """The per-rank batch ``global_batch // world_size``; ``ValueError`` unless ``world_size``
    divides ``global_batch`` (each rank must see an equal share, so that the gathered batch
    matrices are the global batch's)."""
    for name, v in (("global_batch", global_batch), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if global_batch % world_size:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world_size={world_size}: every rank must get "
            f"an equal share (use a batch that is a multiple of {world_size}, e.g. "
            f"{(global_batch // world_size + 1) * world_size})"
        )
    return global_batch // world_size


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_name() -> str | None:
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:  # pragma: no cover
        return None
    for cand in ("lo", "lo0"):
        if cand in names:
            return cand
    return None


def _as_timedelta(timeout) -> timedelta:
    if isinstance(timeout, timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timedelta(seconds=float(timeout))


def init_distributed(backend: str | None = None, *, timeout: float | timedelta = 300.0, rank: int | None = None,
                     world_size: int | None = None) -> tuple[int, int]:
    """Initialise the default process group from the environment (``torchrun`` sets
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``), with a
    timeout so that a failed rank makes the others raise instead of hang.

    ``backend``: ``'gloo'`` (CPU) or ``'nccl'`` (CUDA; the process uses GPU ``LOCAL_RANK``);
    default nccl when CUDA is available, else gloo. Returns ``(rank, world_size)``; already
    initialised: returns the existing group's.
    """
    td = _as_timedelta(timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    rank = int(os.environ["RANK"]) if rank is None and "RANK" in os.environ else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None and "WORLD_SIZE" in os.environ else world_size
    if rank is None or world_size is None:
        raise ValueError("init_distributed: RANK and WORLD_SIZE are not set (run under torchrun, or pass rank= and "
                         "world_size=, with MASTER_ADDR and MASTER_PORT in the environment)")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"init_distributed: {var} is not set in the environment")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank}: LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and os.environ["MASTER_ADDR"] in ("127.0.0.1", "localhost"):
        lo = _loopback_name()
        if lo:
            os.environ["GLOO_SOCKET_IFNAME"] = lo  # stay on loopback for a single-machine run
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=td)
    _comm._TIMEOUT[0] = td
    return rank, world_size


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    # bytes made by this launch's own processes (the multiprocessing queue that carries them
    # unpickles anyway), never a file from disk: those load with weights_only=True
    return torch.load(io.BytesIO(data), weights_only=False)


_FINISHED = "bkfac/launch/finished"


def _how_it_ended(exitcode: int) -> str:
    """``'was killed by SIGKILL'`` for a negative exit code (a signal), else ``'exited with code N'``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _wait_for_peers(ok: bool, timeout: float) -> None:
    """Count this rank as finished in the default store; rank 0, which hosts the store, then
    waits until every rank has finished -- at most ``timeout`` after a success, a short grace
    (10 s) after a failure -- before the process group goes away. Without this, a peer that was
    about to raise its own error (a bad batch, say) could instead see rank 0's store vanish and
    report a connection error; a peer stuck in a collective still fails soon after the grace."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(_FINISHED, 1)
        if dist.get_rank() != 0:
            return
        deadline = time.monotonic() + (timeout if ok else min(10.0, timeout))
        while store.add(_FINISHED, 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # best effort: a peer's connection may be gone already
        pass


def _worker(rank, world_size, port, backend, timeout, threads, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    if threads:
        torch.set_num_threads(threads)
    try:
        init_distributed(backend, timeout=timeout)
        payload = ("ok", _dumps(fn(rank, *_loads(args))))
    except BaseException as exc:  # report every failure, including KeyboardInterrupt/SystemExit
        payload = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
    if dist.is_initialized():
        if payload[0] == "ok":
            try:  # do not close the connections under a peer that is still using them
                dist.barrier()
            except Exception:  # a peer failed: its own report says why
                pass
        _wait_for_peers(payload[0] == "ok", timeout)
        try:
            dist.destroy_process_group()  # closes the connections: waiting peers fail at once
        except Exception:  # pragma: no cover - best effort on the way out
            pass
    try:
        results.put((rank, payload))
    except Exception as exc:  # pragma: no cover - e.g. an unpicklable result
        results.put((rank, ("error", (type(exc).__name__, f"could not return the result: {exc}", ""))))


def launch(fn, nproc: int, *args, backend: str = "gloo", timeout: float = 120.0, global_batch: int | None = None,
           threads: int | None = None, join_timeout: float | None = None,
           start_method: str | None = None) -> list:
    """Run ``fn(rank, *args)`` in ``nproc`` spawned processes joined in a process group.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). ``backend``:
    ``'gloo'`` (CPU, loopback) or ``'nccl'`` (one CUDA device per rank). ``timeout``
    (seconds): the process group's, so a rank waiting on a failed peer raises after at most
    this long. ``global_batch``: checked with :func:`check_batch` before anything starts.
    ``threads``: ``torch.set_num_threads`` per process (default: the cores divided among the
    ranks). ``join_timeout``: how long to wait for all ranks (default ``3 * timeout + 60``);
    ranks still running then are terminated and reported as failed. ``start_method``:
    ``'forkserver'`` (default where available: a server process imports torch and bkfac
    once, then every launch forks fresh ranks from it in well under a second) or ``'spawn'``
    (a fresh interpreter per rank, several seconds each). Neither forks a process that has
    initialised CUDA or threads.

    Returns the ranks' return values (rank order); raises :class:`DistributedLaunchError`
    if any rank failed.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"backend='nccl' with nproc={nproc} needs {nproc} CUDA devices, found {torch.cuda.device_count()}")
    td = _as_timedelta(timeout)
    if global_batch is not None:
        check_batch(global_batch, nproc)
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ValueError(f"fn must be a picklable module-level function, got {fn!r}: {exc}") from exc
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # torch._dynamo: torch.optim.Optimizer.__init__ imports it lazily (seconds per process)
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "bkfac", "bkfac.distributed"])
    results = ctx.Queue()
    port = free_port()
    # Arguments travel as torch.save bytes: pickling tensors through a multiprocessing queue
    # would put them in shared memory, and in-place updates on one rank would leak into the others.
    blob = _dumps(tuple(args))
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, td.total_seconds(), threads, fn, blob, results),
                         name=f"bkfac-rank{r}") for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + (join_timeout if join_timeout is not None else 3 * td.total_seconds() + 60)
    got: dict = {}
    try:
        while len(got) < nproc:
            try:
                rank, payload = results.get(timeout=0.2)
                got[rank] = payload
                continue
            except queue_mod.Empty:
                pass
            # a process that died without reporting (killed, segfault) will never report
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
            if dead:
                time.sleep(0.5)  # let a report that is in flight arrive
                while True:
                    try:
                        rank, payload = results.get_nowait()
                        got[rank] = payload
                    except queue_mod.Empty:
                        break
                for r in dead:
                    if r not in got:
                        got[r] = ("error", ("ProcessDied", f"rank {r} {_how_it_ended(procs[r].exitcode)} "
                                            "without reporting", ""))
            if time.monotonic() > deadline:
                for r, p in enumerate(procs):
                    if r not in got:
                        got[r] = ("error", ("TimeoutError", f"rank {r} did not finish within the launch's join "
                                            "timeout and was terminated", ""))
                break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    errors = {r: payload[1] for r, payload in got.items() if payload[0] == "error"}
    values = {r: _loads(payload[1]) for r, payload in got.items() if payload[0] == "ok"}
    if errors:
        raise DistributedLaunchError(errors, values, nproc)
    return [values[r] for r in range(nproc)]
