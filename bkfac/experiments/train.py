"""The training harness: one loop for every optimizer (Sec. 6, Table 2).

``train_run(profile, run, seed=...)`` trains the profile's model on CIFAR-10 with one
optimizer run of the profile, and records per epoch: test accuracy and loss, training loss,
wall time split into phases (data, forward/backward, and the optimizer's own phases:
statistics, inverse, precondition, rest), and the time and number of epochs to each
target accuracy (on CUDA the optimizer's timer synchronises the GPU at each phase boundary,
``sync_timer=True``, so that asynchronous work is charged to the phase that launched it). A
checkpoint is written at the end of every epoch; ``resume=True`` restarts from the last one and,
since the data order, the augmentation, every random number generator and a run's per-step
learning-rate schedule (``lr_per_step``, :func:`one_cycle`) are restored, finishes with the
same numbers as an uninterrupted run.

Data-parallel (``bkfac train --nproc N`` or under ``torchrun``): with a process group
initialised, every rank draws the same global batches and trains on its ``1/W`` share; the
model is wrapped in ``DistributedDataParallel`` (gradient averaging; BatchNorm buffers from
rank 0); the K-FAC family gets a :class:`~bkfac.distributed.TorchDistributedComm` (global
K-factor statistics, each factor's inverse work on one rank). Rank 0 evaluates, writes the
results and the checkpoint (:func:`~bkfac.distributed.gather_state_dict`), which resumes on
any number of processes. SENG's curvature is then each rank's own (local batch).

Outputs under ``data/results/<profile>/<run>/seed<k>/`` (atomic writes, see
:mod:`~bkfac.experiments.results`): ``history.csv`` (one row per epoch), ``summary.json`` (times/epochs
to targets, t_epoch; written last), ``checkpoint.pt`` (latest epoch, with the run's seed, ``inputs``
and ``inputs_hash``). Timing excludes evaluation on the test set, as the paper's t_epoch does not
say otherwise; evaluation time is recorded separately. ``synthetic_data=True``
(``--synthetic-data``) trains on random CIFAR-shaped images for timing and writes under
``data/results/<profile>-synthetic/``.

Precision (:class:`MixedPrecision`): a profile's ``train.amp`` (``bf16`` or ``fp16``) runs every
optimizer's forward and loss under ``torch.autocast`` (``fp16`` with a ``GradScaler``); on CUDA
``torch.backends.cudnn.benchmark`` is on, as practitioners train. The default trains in float32.

A run folder has one owner: the process training into it holds a lock on it (a second one is
refused), removes the temp files a killed writer left, and checks the folder before anything
trains (:func:`check_run_dir`): a folder holding a run (finished or not) is continued only with
``resume=True`` -- from a checkpoint of the same inputs and seed (the epoch budget may grow) --
or replaced only with ``overwrite=True`` (said on stderr); files of different runs
(:func:`~bkfac.experiments.results.run_state`) are an error naming them. Resuming a finished run
to its own number of epochs returns it as stored; to more epochs removes its summary first, so
an interruption leaves an unfinished run, never a stale summary beside a longer history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..optim.factory import make_optimizer
from .data import (CIFAR10_TEST_SIZE, CIFAR10_TRAIN_SIZE, fingerprint, load_cifar10, make_loaders, subset,
                   synthetic_cifar10)
from .manifest import inputs_hash, provenance, run_inputs
from .models import build_model
from .profiles import Profile
from .results import (CHECKPOINT, HISTORY, RUN_FILES, SUMMARY, atomic_torch_save, check_name, clean_temp_files,
                      inspect_run, load_checkpoint, read_csv, results_dir, write_csv, write_json)

__all__ = ["train_run", "RunResult", "resolve_device", "evaluate", "one_cycle", "run_dir", "check_run_dir",
           "MixedPrecision"]

PHASE_COLUMNS = ("data", "forward_backward", "statistics", "inverse", "precondition", "rest")


def resolve_device(device: str | None, profile: Profile | None = None) -> torch.device:
    """``device`` (or the profile's), checked: a CUDA device that does not exist is an error."""
    name = device or (profile.device if profile is not None else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {name!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine "
                             "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}: use 'cpu' or 'cuda[:N]'")
    return dev


@torch.no_grad()
def evaluate(model, loader) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a loader, in eval mode."""
    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in loader:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    return correct / total, loss / total


@dataclass
class RunResult:
    profile: str
    run: str
    label: str
    optimizer: str
    seed: int
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    out_dir: Path | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rng_state(device):
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st, device):
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class MixedPrecision:
    """The precision of a training step, from the profile's ``train.amp``: ``None`` (float32),
    ``'bf16'`` (forward and loss under ``torch.autocast`` in bfloat16) or ``'fp16'`` (float16
    autocast and a ``torch.amp.GradScaler``, whose overflowed steps change nothing). Every
    optimizer keeps its factors, decompositions and preconditioning in float32 under it
    (``tests/test_autocast.py``); the harness uses the same setting for every optimizer, SGD
    included. Evaluation runs in float32."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, amp: str | None, device: torch.device):
        if amp is not None and amp not in self.DTYPES:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self.device_type = torch.device(device).type
        self.dtype = self.DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device_type) if amp == "fp16" else None

    def autocast(self):
        """The context for the forward pass and the loss."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt) -> None:
        """``opt.step()``, through the scaler under ``fp16`` (the K-FAC family and SENG take the
        loss scale from it and skip an overflowed step)."""
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def summarize(history: list[dict], targets: list[float]) -> dict:
    """Times (cumulative training seconds) and epochs to each target accuracy, t_epoch."""
    out = {"epochs_run": len(history)}
    if history:
        out["final_test_acc"] = history[-1]["test_acc"]
        out["best_test_acc"] = max(h["test_acc"] for h in history)
        out["t_epoch_mean"] = sum(h["epoch_seconds"] for h in history) / len(history)
        sq = sum((h["epoch_seconds"] - out["t_epoch_mean"]) ** 2 for h in history)
        out["t_epoch_std"] = math.sqrt(sq / max(len(history) - 1, 1))
    for a in targets:
        hit = next((h for h in history if h["test_acc"] >= a), None)
        key = f"{a * 100:g}"
        out[f"time_to_{key}"] = hit["train_seconds"] if hit else None
        out[f"epochs_to_{key}"] = hit["epoch"] if hit else None
    return out


def one_cycle(opt, spec: dict, total_steps: int):
    """The per-step learning rate of a run's ``lr_per_step`` (used by our SGD baseline on the
    ``cpu`` profile, not by the paper's optimizers): ``torch.optim.lr_scheduler.OneCycleLR`` with
    linear ramps, ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start`` of the
    run, then down to ``max_lr / (div_factor * final_div_factor)`` at its last step; momentum is
    left alone. It is stepped after every optimizer step and saved in the checkpoint."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec["max_lr"], total_steps=total_steps, pct_start=spec["pct_start"],
        anneal_strategy="linear", div_factor=spec["div_factor"], final_div_factor=spec["final_div_factor"],
        cycle_momentum=False)


def run_dir(profile: str, run: str, seed: int, out_root: str | os.PathLike | None = None,
            synthetic_data: bool = False) -> Path:
    """The folder of run ``run`` of profile ``profile`` with ``seed``: ``<out_root>/<profile>[-synthetic]/<run>/seed<k>``
    (``data/results`` by default). Names that are not safe path components are refused
    (:func:`~bkfac.experiments.results.check_name`), so it never lies outside the root."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = results_dir(profile + ("-synthetic" if synthetic_data else ""), out_root)
    return root / check_name("run name", run) / f"seed{seed}"


def _check_writable(out_dir: Path) -> None:
    """The nearest existing folder on the way to ``out_dir`` is a folder this process may write."""
    p = Path(out_dir).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"cannot write results to {out_dir}: {p} is not a folder (check --out)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write results to {out_dir}: {p} is not writable (check --out)")


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                  epochs: int | None = None) -> dict:
    """Check, changing nothing, that a run may be trained into ``out_dir``: the folder can be
    written; unless ``overwrite``, its files form one run (:func:`~bkfac.experiments.results.inspect_run`,
    whose answer is returned), and a run there (finished or not) is continued only with
    ``resume`` -- and only when it has not passed ``epochs``, and a finished run only from its
    checkpoint. ``ValueError`` otherwise, saying what to do."""
    if resume and overwrite:
        raise ValueError("--resume (continue the run) and --overwrite (replace it) exclude each other")
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    if overwrite:
        return dict(state="overwrite", files=[n for n in RUN_FILES if (out_dir / n).is_file()])
    info = inspect_run(out_dir)
    state, n = info["state"], info["epochs"]
    if state == "empty":
        return info
    what = (f"a finished run ({n} epoch(s))" if state == "done"
            else f"an unfinished run ({n} epoch(s) done; {', '.join(info['files'])})")
    if not resume:
        raise ValueError(f"{out_dir} holds {what}: train with --resume to continue it or --overwrite to replace it")
    reached = info["checkpoint_epoch"] if state == "partial" else n
    if epochs is not None and reached is not None and reached > epochs:
        raise ValueError(f"{out_dir} holds {what}, beyond the {epochs} epoch(s) asked for: resume with at least "
                         f"{reached} epochs, or --overwrite to replace it")
    if state == "done" and epochs is not None and n < epochs and info["checkpoint_epoch"] is None:
        raise ValueError(f"{out_dir} holds {what} but no {CHECKPOINT} to continue it to {epochs} epochs: "
                         "--overwrite to train it again")
    return info


@contextlib.contextmanager
def _own_run_dir(out_dir: Path):
    """Create ``out_dir``, hold an exclusive lock on it while training (another process
    training into it is refused; the kernel drops the lock when a process dies), check that a
    file can be written there, and remove the temp files a killed writer left."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as exc:
        raise ValueError(f"cannot create the results folder {out_dir}: {exc.strerror or exc} (check --out)") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another process is training into {out_dir} now; wait for it to finish") from None
        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as exc:
            raise ValueError(f"cannot write results to {out_dir}: {exc.strerror or exc} (check --out)") from None
        clean_temp_files(out_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(ck: dict, inputs: dict, seed: int, path: Path) -> None:
    """The checkpoint was made by this run: the same seed and the same inputs except the epoch
    budget (a run may be continued to more epochs). Checkpoints without recorded inputs are
    checked by the model and optimizer loads alone."""
    if ck.get("seed") is not None and ck["seed"] != seed:
        raise ValueError(f"checkpoint {path} was made with seed {ck['seed']}, this run's seed is {seed}")
    if ck.get("inputs") is None:
        return
    old, new = _flat(ck["inputs"]), _flat(inputs)
    diff = [k for k in sorted(set(old) | set(new)) if k != "train.epochs" and old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ValueError(f"checkpoint {path} was made with other inputs than this run's ({shown}"
                         f"{'; ...' if len(diff) > 6 else ''}): --overwrite to train the run again")


def _read_history(path) -> list[dict]:
    return [{k: (float(v) if k != "epoch" else int(v)) for k, v in r.items()} for r in read_csv(path)]


def train_run(
    profile: Profile,
    run: str,
    *,
    seed: int = 0,
    device: str | None = None,
    data_dir: str | None = None,
    out_root: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    epochs: int | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,
    synthetic_data: bool = False,
) -> RunResult:
    """Train run ``run`` of ``profile`` (see module docstring). ``resume``: continue the run in
    its folder from its checkpoint; ``overwrite``: replace what the folder holds (one of them is
    needed when the folder holds a run; :func:`check_run_dir`). ``epochs``: the epoch budget
    (default: the profile's). ``stop_after_batches`` simulates an interruption (for tests): the
    run stops after that many batches of the last epoch without writing that epoch.
    ``synthetic_data`` trains on :func:`~bkfac.experiments.data.synthetic_cifar10` (random images
    of the profile's sizes, for timing only) and writes under ``<root>/<profile>-synthetic/`` so
    that real results are never overwritten by a timing run."""
    import torch.distributed as tdist

    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    dev = resolve_device(device, profile)
    opt_name, _, label = profile.resolve_run(run)  # an unknown run fails before anything is written
    distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    lead = not distributed or tdist.get_rank() == 0
    n_epochs = epochs or profile.train["epochs"]
    out_dir = run_dir(profile.name, run, seed, out_root, synthetic_data)
    with contextlib.ExitStack() as owned:
        if lead:
            check_run_dir(out_dir, resume=resume, overwrite=overwrite, epochs=n_epochs)  # before creating anything
            owned.enter_context(_own_run_dir(out_dir))
            info = check_run_dir(out_dir, resume=resume, overwrite=overwrite, epochs=n_epochs)  # now it is ours
            if overwrite and info["files"]:
                for name in info["files"]:
                    (out_dir / name).unlink()
                print(f"bkfac train: --overwrite: replaced the run in {out_dir} (removed {', '.join(info['files'])})",
                      file=sys.stderr, flush=True)
        if distributed:
            tdist.barrier()  # the other ranks read the folder once rank 0 has checked it
            if not lead:
                info = inspect_run(out_dir) if resume else dict(state="empty")
        if resume and info["state"] == "done" and info["epochs"] == n_epochs:
            if progress and lead:
                print(f"[{profile.name}] {run} seed {seed}: already finished ({n_epochs} epochs) in {out_dir}",
                      flush=True)
            return RunResult(profile.name, run, label, opt_name, seed, _read_history(out_dir / HISTORY),
                             json.loads((out_dir / SUMMARY).read_text()), out_dir=out_dir)
        return _train(profile, run, seed=seed, dev=dev, data_dir=data_dir, out_dir=out_dir, resume=resume,
                      n_epochs=n_epochs, progress=progress, stop_after_batches=stop_after_batches,
                      synthetic_data=synthetic_data)


def _train(profile: Profile, run: str, *, seed: int, dev: torch.device, data_dir, out_dir: Path, resume: bool,
           n_epochs: int, progress: bool, stop_after_batches: int | None, synthetic_data: bool) -> RunResult:
    """The training of :func:`train_run` once the run folder is checked (and, on rank 0, owned)."""
    from tqdm import tqdm  # plain text progress: the same in a terminal and a notebook's output

    import torch.distributed as tdist

    opt_name, hyper, label = profile.resolve_run(run)
    distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if distributed else (0, 1)
    lead = rank == 0
    progress = progress and lead
    t = profile.train
    ckpt_path = out_dir / CHECKPOINT
    inputs = run_inputs(profile, run, seed, epochs=n_epochs)
    ihash = inputs_hash(inputs)

    partial = profile.data["n_train"] is not None or profile.data["n_test"] is not None
    if synthetic_data:
        arrays = synthetic_cifar10(profile.data["n_train"] or CIFAR10_TRAIN_SIZE,
                                   profile.data["n_test"] or CIFAR10_TEST_SIZE, seed=0)
    else:
        # a subset profile (smoke) accepts any copy large enough for its subset
        arrays = load_cifar10(data_dir, expected_counts=None) if partial else load_cifar10(data_dir)
        if partial:
            arrays = subset(arrays, profile.data["n_train"] or arrays.n_train, profile.data["n_test"] or arrays.n_test,
                            seed=0)
    train_loader, test_loader = make_loaders(arrays, batch_size=t["batch_size"], test_batch_size=t["test_batch_size"],
                                             seed=seed, device=dev)
    torch.manual_seed(seed)
    model = build_model(profile.model).to(dev)
    net = model  # what the optimizer and the training forward see
    if distributed:
        from ..distributed import TorchDistributedComm, check_batch

        check_batch(t["batch_size"], world)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if opt_name not in ("sgd", "seng"):
            hyper = {**hyper, "comm": TorchDistributedComm(device=dev)}
    mp = MixedPrecision(t.get("amp"), dev)
    if dev.type == "cuda":
        # as practitioners train: cuDNN picks its fastest convolution algorithms for these shapes
        torch.backends.cudnn.benchmark = True
        # phases of a CUDA step are asynchronous: without a synchronisation at each phase boundary
        # the work lands in whichever phase next waits for the GPU (the loop syncs around the step)
        hyper = {**hyper, "sync_timer": True}
    batches = len(train_loader)
    if t["max_batches_per_epoch"]:
        batches = min(batches, t["max_batches_per_epoch"])
    if opt_name == "seng":
        # the official SENG loop decays the lr before every iteration over the epoch's length
        if batches != inputs["hyper"]["steps_per_epoch"]:
            raise RuntimeError(f"the training loader has {batches} steps per epoch, the recorded inputs say "
                               f"{inputs['hyper']['steps_per_epoch']} (manifest.train_steps_per_epoch)")
        hyper = {**hyper, "steps_per_epoch": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported layers (BatchNorm) get SGD: listed by describe()
        opt = make_optimizer(opt_name, net, **hyper)
    step_lr = profile.runs.get(run, {}).get("lr_per_step")
    scheduler = one_cycle(opt, step_lr, n_epochs * batches) if step_lr else None
    history: list[dict] = []
    start_epoch = 1
    train_seconds = 0.0
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=dev)
        _check_resumable(ck, inputs, seed, ckpt_path)
        try:
            model.load_state_dict(ck["model"])
            if distributed and hasattr(opt, "comm"):
                from ..distributed import load_full_state_dict

                load_full_state_dict(opt, ck["optimizer"])
            else:
                opt.load_state_dict(ck["optimizer"])
            if scheduler is not None:
                if not ck.get("lr_scheduler") or ck["lr_scheduler"].get("total_steps") != scheduler.total_steps:
                    raise ValueError(f"its per-step learning-rate schedule does not span {n_epochs} epoch(s) of "
                                     f"{batches} batches (lr_per_step runs cannot change their epoch budget)")
                scheduler.load_state_dict(ck["lr_scheduler"])
            _set_rng_state(ck["rng"], dev)
            mp.load_state_dict(ck.get("grad_scaler"))
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot resume {run} from checkpoint {ckpt_path}: {exc}") from None
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
        train_seconds = history[-1]["train_seconds"] if history else 0.0
    elif resume and progress:
        print(f"[{profile.name}] {run} seed {seed}: no checkpoint in {out_dir}; starting at epoch 1", flush=True)
    if lead and start_epoch <= n_epochs:
        # a finished run continued to more epochs is unfinished until its new summary is written
        (out_dir / SUMMARY).unlink(missing_ok=True)
    result = RunResult(profile.name, run, label, opt_name, seed, history, out_dir=out_dir)
    for epoch in range(start_epoch, n_epochs + 1):
        opt.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        model.train()
        phases = dict.fromkeys(PHASE_COLUMNS, 0.0)
        loss_sum = 0.0
        _sync(dev)
        t_epoch = time.perf_counter()
        it = train_loader.iter_from(0)
        bar = tqdm(range(batches), desc=f"{run} seed{seed} epoch {epoch}/{n_epochs}", disable=not progress,
                   leave=False, mininterval=2.0)
        for b in bar:
            if stop_after_batches is not None and epoch == n_epochs and b >= stop_after_batches:
                bar.close()
                result.summary = {"interrupted": True}
                return result
            t0 = time.perf_counter()
            x, y = next(it)
            _sync(dev)
            t1 = time.perf_counter()
            if distributed:  # this rank's share of the global batch
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad(set_to_none=True)
            with mp.autocast():
                logits = net(x)
                if getattr(opt, "fisher", "empirical") == "mc" and opt.wants_statistics():
                    opt.capture.sampled_fisher_backward(logits)
                loss = F.cross_entropy(logits, y)
            mp.backward(loss)
            _sync(dev)
            t2 = time.perf_counter()
            mp.step(opt)
            if scheduler is not None:
                scheduler.step()
            _sync(dev)
            t3 = time.perf_counter()
            phases["data"] += t1 - t0
            phases["forward_backward"] += t2 - t1
            timed = opt.timer.last
            for p in ("statistics", "inverse", "precondition", "rest"):
                phases[p] += timed.get(p, 0.0)
            phases["rest"] += max(0.0, (t3 - t2) - sum(timed.get(p, 0.0) for p in timed))
            loss_sum += float(loss.detach())
            if b % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"{run}: non-finite training loss at epoch {epoch}, batch {b}")
        bar.close()
        _sync(dev)
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        t_eval = time.perf_counter()
        acc, test_loss = evaluate(model, test_loader)
        row = dict(epoch=epoch, test_acc=acc, test_loss=test_loss, train_loss=loss_sum / batches,
                   epoch_seconds=epoch_seconds, train_seconds=train_seconds,
                   eval_seconds=time.perf_counter() - t_eval, lr=opt.param_groups[0]["lr"],
                   **{f"t_{k}": v for k, v in phases.items()})
        history.append(row)
        if progress:
            print(f"[{profile.name}] {label} seed {seed} epoch {epoch}: test acc {acc:.4f}, "
                  f"loss {test_loss:.4f}, {epoch_seconds:.1f} s", flush=True)
        if distributed and hasattr(opt, "comm"):
            from ..distributed import gather_state_dict

            opt_state = gather_state_dict(opt)  # collective: every rank takes part
        else:
            opt_state = opt.state_dict()
        if lead:
            write_csv(out_dir / HISTORY, history)
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt_state, "history": history,
                               "epoch": epoch, "rng": _rng_state(dev), "world_size": world, "seed": seed,
                               "inputs": inputs, "inputs_hash": ihash, "grad_scaler": mp.state_dict(),
                               "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}, ckpt_path)
    result.summary = summarize(history, t["targets"])
    result.summary.update(profile=profile.name, run=run, label=label, optimizer=opt_name, seed=seed,
                          device=str(dev), torch=torch.__version__, machine=platform.processor() or platform.machine(),
                          batches_per_epoch=batches, world_size=world, data=fingerprint(arrays))
    result.summary.update(inputs=inputs, inputs_hash=ihash, provenance=provenance(dev))
    if lead:
        write_csv(out_dir / HISTORY, history)  # the checkpoint's history, when nothing was left to train
        write_json(out_dir / SUMMARY, result.summary)
    return result


def _train_worker(rank: int, kwargs: dict) -> dict:
    """One rank of ``bkfac train --nproc N`` (the process group is set up by ``launch``)."""
    from .profiles import load_profile

    kwargs = dict(kwargs)
    profile = load_profile(kwargs.pop("profile"))
    res = train_run(profile, kwargs.pop("run"), **kwargs)
    return res.summary


def train_distributed(profile: str, run: str, nproc: int, **kwargs) -> dict:
    """Train with ``nproc`` local processes (gloo on CPU, nccl with one GPU per process);
    returns rank 0's summary."""
    from ..distributed import launch
    from .profiles import load_profile

    p = load_profile(profile)
    dev = resolve_device(kwargs.get("device"), p)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    results = launch(_train_worker, nproc, dict(profile=profile, run=run, **kwargs), backend=backend,
                     timeout=600.0, global_batch=p.train["batch_size"])
    return results[0]


def load_history(profile: str, run: str, seed: int = 0, out_root: str | None = None) -> list[dict]:
    """Read a run's ``history.csv`` back (numbers converted)."""
    return _read_history(run_dir(profile, run, seed, out_root) / HISTORY)
