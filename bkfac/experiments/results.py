"""Results I/O and the state of a run folder.

Every file is written atomically (a temp file ``.<name>.<random>.tmp`` in the same folder,
fsynced, then ``os.replace``), so an interrupted run never leaves a half-written table; the
file gets the usual mode (``0666`` less the umask), not ``mkstemp``'s ``0600``. A process
killed during a write leaves only its temp file, which :func:`clean_temp_files` removes (and
``.gitignore`` ignores).

Files from disk that torch unpickles are loaded with ``weights_only=True``
(:func:`load_checkpoint`): tensors and plain containers only, so a crafted file cannot run code.

A training run folder ``<root>/<profile>/<run>/seed<k>/`` holds ``summary.json`` (written last,
when the run has finished), ``history.csv`` (one row per finished epoch) and ``checkpoint.pt``
(the latest epoch; not committed with the results). :func:`run_state` says whether they form a
finished run, an unfinished one, or nothing, and refuses a mix of files from different runs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "write_csv", "write_json", "atomic_torch_save", "read_csv", "results_dir",
           "check_name", "clean_temp_files", "load_checkpoint", "run_state", "inspect_run", "RUN_FILES"]

SUMMARY, HISTORY, CHECKPOINT = "summary.json", "history.csv", "checkpoint.pt"
#: The files of a training run folder.
RUN_FILES = (SUMMARY, HISTORY, CHECKPOINT)
_TEMP_GLOB = ".*.tmp"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(kind: str, name) -> str:
    """``name`` if it is safe as one component of a results path (letters, digits, ``.``,
    ``_``, ``-``; not starting with ``.``/``-``; at most 100 characters), else ``ValueError``
    naming ``kind``: a profile or run name never reaches outside the results root."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} is not a safe name: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 100 characters); it names a results folder")
    return name


def results_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """``data/results/<profile>`` (or under ``root``); ``profile`` must pass :func:`check_name`."""
    base = Path(root) if root is not None else Path("data") / "results"
    return base / check_name("profile name", profile)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator:
    """Write ``path`` through a temp file in its folder: fsynced, given the usual mode and
    moved into place on success; removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _default_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with _atomic_file(path, "w") as f:
        f.write(text)
    return path


def write_csv(path, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    if fieldnames is None:
        fieldnames = []
        for r in rows:
            for k in r:
                if k not in fieldnames:
                    fieldnames.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return atomic_write_text(path, buf.getvalue())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path) -> Path:
    path = Path(path)
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)
    return path


def clean_temp_files(folder: str | os.PathLike, older_than: float | None = None) -> list[Path]:
    """Remove the temp files ``.<name>.<random>.tmp`` that a killed writer left in ``folder``
    (only those older than ``older_than`` seconds, if given: a folder other processes may be
    writing to). Returns the removed paths."""
    removed = []
    now = time.time()
    for p in Path(folder).glob(_TEMP_GLOB):
        try:
            if p.is_file() and (older_than is None or now - p.stat().st_mtime > older_than):
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # its writer finished or removed it meanwhile
            pass
    return removed


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, mmap: bool = False) -> dict:
    """A training checkpoint loaded with ``torch.load(weights_only=True)``: tensors and plain
    containers only. A file that holds anything else (a crafted one could run code when
    unpickled), a truncated or corrupt one, or one that is not a bkfac training checkpoint
    raises ``ValueError`` naming it. ``mmap``: map the tensors instead of reading them (for
    looking at the epoch and the recorded inputs)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a non-torch pickle
            # mmap needs torch's zip format; anything else is read (and refused) the plain way
            ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; name only what the file asked for
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?: was not an allowed global[^\n]*)?(?:\n|$)", str(exc))
        what = m.group(1).strip() if m else type(exc).__name__
        raise ValueError(f"refusing to load checkpoint {path}: it holds objects other than tensors and plain "
                         f"containers ({what}), which a bkfac checkpoint never does -- a crafted file could run "
                         "code when unpickled; delete it, or start the run again with --overwrite") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); delete it to "
                         "resume from nothing, or start the run again with --overwrite") from None
    if not isinstance(ck, dict) or not {"model", "optimizer", "history", "epoch", "rng"} <= set(ck):
        raise ValueError(f"{path} is not a bkfac training checkpoint (expected a dict with model, optimizer, "
                         "history, epoch and rng)")
    return ck


def _history_rows(path: Path) -> list[tuple[int, float]]:
    """``(epoch, test_acc)`` of each row of a ``history.csv``; ``ValueError`` naming it."""
    try:
        rows = read_csv(path)
        return [(int(r["epoch"]), float(r["test_acc"])) for r in rows]
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as exc:
        raise ValueError(f"cannot read {path} as a run history ({type(exc).__name__}: {exc})") from None


def inspect_run(run_dir: str | os.PathLike) -> dict:
    """What :func:`run_state` decides, with the numbers it decided from: ``state``
    (``"done"``, ``"partial"``, ``"empty"``), ``epochs`` (finished epochs: the summary's, else
    the checkpoint's, else the history's), ``checkpoint_epoch`` (or None), ``seed`` and
    ``inputs_hash`` (recorded ones, or None), ``files`` (those present)."""
    d = Path(run_dir)
    s_path, h_path, c_path = d / SUMMARY, d / HISTORY, d / CHECKPOINT
    present = [n for n in RUN_FILES if (d / n).is_file()]
    info = dict(state="empty", epochs=0, checkpoint_epoch=None, seed=None, inputs_hash=None, files=present)
    if not present:
        return info
    m = re.fullmatch(r"seed(\d+)", d.name)
    folder_seed = int(m.group(1)) if m else None
    hist = _history_rows(h_path) if h_path.is_file() else None
    if hist is not None and [e for e, _ in hist] != list(range(1, len(hist) + 1)):
        raise ValueError(f"{h_path}: the epochs are {[e for e, _ in hist]}, not 1, 2, ...")
    ck = None
    if c_path.is_file():
        ck = load_checkpoint(c_path, mmap=True)
        ck_hist = [(int(h["epoch"]), float(h["test_acc"])) for h in ck["history"]]
        info["checkpoint_epoch"] = int(ck["epoch"])
        if len(ck_hist) != info["checkpoint_epoch"]:
            raise ValueError(f"checkpoint {c_path} is at epoch {ck['epoch']} but holds {len(ck_hist)} history rows")
        if hist is not None:
            # history.csv is written just before the checkpoint: it may be one epoch ahead
            n = min(len(hist), len(ck_hist))
            if len(hist) - len(ck_hist) not in (0, 1) or hist[:n] != ck_hist[:n]:
                raise ValueError(f"run folder {d} mixes files of different runs: {h_path.name} has {len(hist)} "
                                 f"epoch(s), {c_path.name} is at epoch {len(ck_hist)}, and their test accuracies "
                                 f"{'agree' if hist[:n] == ck_hist[:n] else 'differ'}; remove the stale file(s), "
                                 "or train the run again with --overwrite")
        for key in ("seed", "inputs_hash"):
            info[key] = ck.get(key)
        if folder_seed is not None and info["seed"] is not None and info["seed"] != folder_seed:
            raise ValueError(f"checkpoint {c_path} was made with seed {info['seed']}, the folder is {d.name}")
    if not s_path.is_file():
        info.update(state="partial", epochs=info["checkpoint_epoch"] if ck is not None else len(hist))
        return info
    try:
        summary = json.loads(s_path.read_text())
        epochs_run = int(summary["epochs_run"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {s_path} as a run summary ({type(exc).__name__}: {exc})") from None
    problems = []
    counts = []
    if hist is None:
        problems.append(f"there is no {h_path.name}")
    elif len(hist) != epochs_run:
        counts.append(f"{h_path.name} has {len(hist)}")
    elif hist and summary.get("final_test_acc") is not None and float(summary["final_test_acc"]) != hist[-1][1]:
        problems.append(f"{s_path.name}'s final test accuracy {summary['final_test_acc']} is not the last "
                        f"of {h_path.name} ({hist[-1][1]})")
    if ck is not None and info["checkpoint_epoch"] != epochs_run:
        counts.append(f"{c_path.name} is at epoch {info['checkpoint_epoch']}")
    if counts:
        problems.insert(0, f"{s_path.name} says {epochs_run} epoch(s), " + ", ".join(counts))
    seeds = {"the folder": folder_seed, s_path.name: summary.get("seed"), c_path.name: info["seed"]}
    seeds = {k: v for k, v in seeds.items() if v is not None}
    if len(set(seeds.values())) > 1:
        problems.append("the seeds differ: " + ", ".join(f"{k} {v}" for k, v in seeds.items()))
    hashes = {k: v for k, v in ((s_path.name, summary.get("inputs_hash")), (c_path.name, info["inputs_hash"]))
              if v is not None}
    if len(set(hashes.values())) > 1:
        problems.append("the recorded inputs differ (inputs_hash " + ", ".join(f"{k} {v[:12]}" for k, v in hashes.items())
                        + ")")
    if problems:
        raise ValueError(f"run folder {d} mixes files of different runs: " + "; ".join(problems)
                         + "; remove the stale file(s), or train the run again with --overwrite")
    info.update(state="done", epochs=epochs_run, seed=seeds.get(s_path.name, info["seed"]),
                inputs_hash=summary.get("inputs_hash", info["inputs_hash"]))
    return info


def run_state(run_dir: str | os.PathLike) -> str:
    """The state of a training run folder:

    * ``"done"`` -- ``summary.json`` is there and agrees with ``history.csv`` and, where present,
      ``checkpoint.pt``: the same number of epochs, the same final accuracy, the same seed (also
      the folder's ``seed<k>``) and the same recorded ``inputs_hash``;
    * ``"partial"`` -- no summary, but a history and/or checkpoint of an unfinished run (the
      history may be one epoch ahead of the checkpoint: it is written first);
    * ``"empty"`` -- none of the three files (left-over temp files do not count).

    Files that disagree (a stale summary beside a newer history, a checkpoint of another run)
    raise ``ValueError`` naming them: a mix is never reported as a finished run. Only a
    :func:`load_checkpoint` (``weights_only``, memory-mapped) reads the checkpoint."""
    return inspect_run(run_dir)["state"]
