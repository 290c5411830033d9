"""``bkfac data fetch``: CIFAR-10 downloaded with torchvision where it is not found.

:func:`fetch_cifar10` looks for either layout :func:`~bkfac.experiments.data.load_cifar10` reads
(torchvision's ``cifar-10-batches-py/`` or the class-folder PNG tree) in the data folder
(:func:`~bkfac.experiments.data.resolve_data_dir`: ``--data-dir`` > ``$BKFAC_DATA_DIR`` >
``data/cifar10``). Where neither is there it downloads the release with
``torchvision.datasets.CIFAR10(download=True)``, which checks the archive's md5 and then every
extracted batch file's md5 against the ones torchvision ships.

The download is atomic: it goes into a temporary sibling of the data folder
(``.<name>.fetch-<pid>-<random>.tmp``, which neither layout matches), and only once torchvision
has verified it is the verified ``cifar-10-batches-py/`` renamed into place (the archive itself
is deleted, 163 MB). A download that fails or is killed never looks like data; the temporary
folder of a killed fetch is removed by the next one.

Failing to download -- no network, a checksum mismatch, an unwritable folder -- raises
:class:`FetchError` (an ``OSError``) whose message says what failed and how to provide the data
instead; ``bkfac data fetch`` prints it as one paragraph and exits with status 2.

``$BKFAC_CIFAR10_URL`` (or ``--url``) names a mirror of the official archive
(``cifar-10-python.tar.gz``); the same checksums apply to it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .data import _BATCHES_DIR, _detect, _how_to_provide, resolve_data_dir

__all__ = ["URL_ENV", "FetchError", "Fetched", "fetch_cifar10", "add_data_args", "run_data"]

#: Environment variable naming a mirror of the archive (checked against the same md5 sums).
URL_ENV = "BKFAC_CIFAR10_URL"
#: Seconds a network read may stall before the download is abandoned (torchvision sets none).
SOCKET_TIMEOUT_S = 60.0


class FetchError(OSError):
    """The download failed; the message says why and how to provide CIFAR-10 instead."""


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_cifar10` found or wrote: ``path`` is the folder of the layout
    (``.../cifar-10-batches-py`` or the root of the PNG tree), ``fetched`` whether it was
    downloaded now, ``seconds`` how long that took."""

    path: Path
    layout: str
    fetched: bool
    seconds: float = 0.0


def _temp_prefix(root: Path) -> str:
    return f".{root.name}.fetch-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Remove the temporary folders that a killed fetch into ``root`` left beside it."""
    for p in root.parent.glob(_temp_prefix(root) + "*.tmp"):
        try:
            pid = int(p.name[len(_temp_prefix(root)):].split("-", 1)[0])
        except ValueError:
            continue
        if p.is_dir() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the downloaded files and their folder to disk before the rename publishes them."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torchvision_download(into: Path, url: str | None) -> None:
    """``torchvision.datasets.CIFAR10(download=True)`` into ``into``, from ``url`` if given
    (torchvision's own checksums, archive and extracted files, are checked either way)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10
    if url:
        cls = type("CIFAR10Mirror", (cls,), {"url": url})
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    try:
        cls(str(into), train=False, download=True)  # the test split: the smaller one to load after the checks
    finally:
        socket.setdefaulttimeout(before)


def _failure(exc: BaseException, url: str, root: Path) -> FetchError:
    import urllib.error

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout)):
        why = f"could not download CIFAR-10 from {url} (no network access?): {text}"
    elif isinstance(exc, RuntimeError) and "corrupt" in str(exc):
        why = (f"the CIFAR-10 download from {url} did not match torchvision's md5 checksums ({text}); "
               "nothing was kept")
    else:
        why = f"downloading CIFAR-10 from {url} into {root} failed: {text}"
    return FetchError(f"{why}.\n{_how_to_provide()}")


def fetch_cifar10(data_dir: str | os.PathLike[str] | None = None, *, url: str | None = None,
                  progress: bool = True) -> Fetched:
    """CIFAR-10 in ``data_dir`` (:func:`~bkfac.experiments.data.resolve_data_dir`), downloaded
    with torchvision where neither layout is there.

    Args:
        data_dir: the data folder; default ``$BKFAC_DATA_DIR``, else ``data/cifar10``.
        url: a mirror of ``cifar-10-python.tar.gz`` (default ``$BKFAC_CIFAR10_URL``, else
            torchvision's URL); its archive and files must match torchvision's md5 sums.
        progress: print what is done (torchvision's progress bar included) on stderr.

    Returns:
        :class:`Fetched`: where the data is, its layout, whether it was downloaded now.

    Raises:
        FetchError: the download or its checksum failed (nothing is left behind).
        FileNotFoundError: an incomplete PNG tree is in the way (only one of train/ and test/).
        OSError: the data folder's parent cannot be created or written.
    """
    root = resolve_data_dir(data_dir)
    found, _ = _detect(root)
    if found is not None:
        return Fetched(found.path, found.layout, fetched=False)
    import torchvision

    url = url or os.environ.get(URL_ENV, "").strip() or torchvision.datasets.CIFAR10.url
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(root)}{os.getpid()}-", suffix=".tmp", dir=root.parent))
    t0 = time.perf_counter()
    try:
        if progress:
            print(f"bkfac data fetch: downloading CIFAR-10 from {url} (163 MB) with torchvision into {root} ...",
                  file=sys.stderr, flush=True)
        try:
            _torchvision_download(tmp, url)
        except Exception as exc:  # torchvision's network, checksum and archive errors
            raise _failure(exc, url, root) from exc
        downloaded = tmp / _BATCHES_DIR
        (tmp / torchvision.datasets.CIFAR10.filename).unlink(missing_ok=True)  # the archive, extracted
        _fsync_tree(downloaded)
        _fsync_tree(tmp)
        if not root.exists() or (root.is_dir() and not any(root.iterdir())):
            os.replace(tmp, root)  # one rename: replaces a missing or empty folder
        else:
            try:
                os.rename(downloaded, root / _BATCHES_DIR)
            except OSError:
                if _detect(root)[0] is None:  # not a concurrent fetch that got there first
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    found, _ = _detect(root)
    if found is None:  # pragma: no cover - the rename above put it there
        raise FetchError(f"CIFAR-10 was downloaded but is not found under {root}")
    return Fetched(found.path, found.layout, fetched=True, seconds=secs)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bkfac data``: the ``fetch`` action."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("fetch", help="download CIFAR-10 with torchvision where neither layout is found",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--data-dir", default=None,
                   help="the data folder (default: $BKFAC_DATA_DIR, else data/cifar10)")
    p.add_argument("--url", default=None,
                   help=f"a mirror of cifar-10-python.tar.gz (default: ${URL_ENV}, else torchvision's URL); "
                        "checked against torchvision's md5 sums")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run_data(args: argparse.Namespace) -> int:
    """``bkfac data fetch``: say where the data is, downloading it first where it is not."""
    res = fetch_cifar10(args.data_dir, url=args.url, progress=not args.quiet)
    if not args.quiet:
        if res.fetched:
            print(f"bkfac data fetch: CIFAR-10 downloaded and verified (torchvision's md5 sums) in "
                  f"{res.seconds:.0f} s: {res.path}")
        else:
            print(f"bkfac data fetch: CIFAR-10 found at {res.path} ({res.layout}); nothing fetched")
    return 0
