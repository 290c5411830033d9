"""CIFAR-10 for the paper's experiments (Sec 6): loading, caching, augmentation, batching.

The paper trains a modified VGG16_bn on CIFAR-10 with batch size 256 (Sec 6). This module

* finds the data (:func:`resolve_data_dir`: argument > ``BKFAC_DATA_DIR`` > ``data/cifar10``),
* reads either real-world layout -- torchvision's download ``cifar-10-batches-py/`` or the
  class-folder PNG tree ``train/<class>/*.png``, ``test/<class>/*.png`` -- and decodes it once
  into a cached uint8 tensor file (:func:`load_cifar10`),
* batches it on a device with the standard CIFAR augmentation, random crop 32 with zero
  padding 4 and a horizontal flip per sample, then per-channel normalisation
  (:class:`CIFARLoader`); deterministic given ``(seed, epoch)`` so a run resumes mid-epoch,
* draws class-balanced subsets for the ``smoke`` profile (:func:`subset`).

Canonical order. Both layouts are put in one order: by class (official label order), then by
file name -- the order ``torchvision.datasets.ImageFolder`` gives a PNG tree. The pickled
batches carry the original file names, so the same release read from either layout gives
bit-identical tensors, and a seeded shuffle picks the same images.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive_int
from .results import atomic_torch_save, clean_temp_files

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TRAIN_SIZE",
    "CIFAR10_TEST_SIZE",
    "synthetic_cifar10",
    "DATA_DIR_ENV",
    "CACHE_DIR_ENV",
    "CIFAR10Arrays",
    "fingerprint",
    "CIFARLoader",
    "resolve_data_dir",
    "resolve_cache_dir",
    "load_cifar10",
    "subset",
    "make_loaders",
    "random_crop_flip",
    "normalize",
]

#: The official label order of the release (``batches.meta``); ImageFolder's alphabetical
#: sort of the class folders gives the same order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: Per-channel mean and standard deviation of the training images (pixel values in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_TEST_SIZE = 10_000
IMAGE_SHAPE = (3, 32, 32)

DATA_DIR_ENV = "BKFAC_DATA_DIR"
CACHE_DIR_ENV = "BKFAC_CACHE_DIR"
DEFAULT_DATA_DIR = Path("data") / "cifar10"
DEFAULT_CACHE_DIR = Path("data") / "cache"

_BATCHES_DIR = "cifar-10-batches-py"
# The file list of torchvision's download (``torchvision.datasets.CIFAR10.train_list`` etc.).
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCHES = ("test_batch",)
_META_FILE = "batches.meta"
_CACHE_FORMAT = 1
_PNG_TREE = "png-tree"
_PICKLE = "cifar-10-batches-py"
_PARALLEL_MIN_FILES = 4096  # fewer PNGs decode faster in-process than with a worker pool


# --------------------------------------------------------------------------------------
# the arrays
# --------------------------------------------------------------------------------------


@dataclass
class CIFAR10Arrays:
    """The decoded data set, on the CPU.

    ``train_x``/``test_x``: uint8 ``(N, 3, 32, 32)`` (channels first, RGB);
    ``train_y``/``test_y``: int64 ``(N,)`` labels in the official order ``classes``;
    ``source``: the directory it was read from; ``layout``: ``"png-tree"`` or
    ``"cifar-10-batches-py"`` (a subset notes itself in ``source``).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    source: str
    layout: str = ""

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        _validate_arrays(self, where=self.source or "CIFAR10Arrays")

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])


def _validate_arrays(a: CIFAR10Arrays, where: str) -> None:
    if tuple(a.classes) != CIFAR10_CLASSES:
        raise ValueError(
            f"{where}: classes must be the 10 CIFAR-10 classes in the official order "
            f"{list(CIFAR10_CLASSES)}, got {list(a.classes)}"
        )
    for split in ("train", "test"):
        x = getattr(a, f"{split}_x")
        y = getattr(a, f"{split}_y")
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"{where}: {split}_x must be a uint8 tensor (N, 3, 32, 32)")
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"{where}: {split}_x images must be 3x32x32 (channels first), got {tuple(x.shape[1:])}"
            )
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1:
            raise ValueError(f"{where}: {split}_y must be an int64 vector")
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{where}: {split}_y has {y.shape[0]} labels for {x.shape[0]} images"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(CIFAR10_CLASSES)):
            raise ValueError(f"{where}: {split}_y has labels outside 0..9")


def _check_counts(a: CIFAR10Arrays, expected_counts: tuple[int, int] | None, where: str) -> None:
    if expected_counts is None:
        return
    n_train, n_test = expected_counts
    if a.n_train != n_train or a.n_test != n_test:
        raise ValueError(
            f"{where}: expected {n_train} training and {n_test} test images, found "
            f"{a.n_train} and {a.n_test} (an incomplete copy? pass expected_counts=None to "
            f"accept a partial data set)"
        )


def fingerprint(arrays: CIFAR10Arrays) -> str:
    """The data set by layout and content: ``"<layout> <n_train>+<n_test> sha256:<hex>"``.

    The SHA-256 covers the class names and the decoded arrays (train and test images and
    labels, with their dtypes and shapes), never where they were read from: two copies of
    CIFAR-10 that decode to the same tensors have the same fingerprint wherever they live, and
    a copy that differs in one pixel or label has another. Training runs record it in
    ``summary.json`` (``"data"``). It takes about 0.3 s for the full data set, once per arrays
    object (kept on it; arrays changed in place afterwards keep the old value).
    """
    if not isinstance(arrays, CIFAR10Arrays):
        raise TypeError(f"arrays must be CIFAR10Arrays, got {type(arrays).__name__}")
    cached = arrays.__dict__.get("_fingerprint")
    if cached is None:
        h = hashlib.sha256(("classes:" + ",".join(arrays.classes) + "\n").encode())
        for name in ("train_x", "train_y", "test_x", "test_y"):
            t = getattr(arrays, name).detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(memoryview(t.numpy()).cast("B"))
        cached = f"{arrays.layout or 'unknown-layout'} {arrays.n_train}+{arrays.n_test} sha256:{h.hexdigest()}"
        arrays.__dict__["_fingerprint"] = cached
    return cached


# --------------------------------------------------------------------------------------
# where the data is
# --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The CIFAR-10 directory: ``data_dir`` if given, else ``$BKFAC_DATA_DIR`` if set and
    non-empty, else ``data/cifar10`` relative to the current working directory.

    Returned as an absolute path (symlinks are not resolved).
    """
    if data_dir is not None:
        if isinstance(data_dir, str) and not data_dir.strip():
            raise ValueError("data_dir must be a non-empty path (or None)")
        path = Path(data_dir)
    elif os.environ.get(DATA_DIR_ENV, "").strip():
        path = Path(os.environ[DATA_DIR_ENV].strip())
    else:
        path = DEFAULT_DATA_DIR
    return path.expanduser().absolute()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir`` > ``$BKFAC_CACHE_DIR`` > ``data/cache`` (cwd)."""
    if cache_dir is not None:
        path = Path(cache_dir)
    elif os.environ.get(CACHE_DIR_ENV, "").strip():
        path = Path(os.environ[CACHE_DIR_ENV].strip())
    else:
        path = DEFAULT_CACHE_DIR
    return path.expanduser().absolute()


@dataclass(frozen=True)
class _Found:
    layout: str
    path: Path  # the pickle folder itself, or the root of the PNG tree


def _detect(root: Path) -> tuple[_Found | None, list[str]]:
    """Find a layout under ``root``; return it (or None) and the paths looked at."""
    looked: list[str] = []
    candidates = [root / _BATCHES_DIR]
    if root.name == _BATCHES_DIR:
        candidates.insert(0, root)
    for cand in candidates:
        looked.append(f"{cand}/ (torchvision's download: data_batch_1..5, test_batch, batches.meta)")
        if cand.is_dir():
            return _Found(_PICKLE, cand), looked
    train, test = root / "train", root / "test"
    looked.append(f"{train}/<class>/*.png and {test}/<class>/*.png (class-folder PNG tree)")
    if train.is_dir() and test.is_dir():
        return _Found(_PNG_TREE, root), looked
    if train.is_dir() or test.is_dir():
        missing = test if train.is_dir() else train
        raise FileNotFoundError(
            f"incomplete CIFAR-10 PNG tree under {root}: {missing} is missing "
            f"(the layout needs both train/<class>/*.png and test/<class>/*.png)"
        )
    return None, looked


def _how_to_provide() -> str:
    return (
        "Provide CIFAR-10 with --data-dir DIR or the environment variable "
        f"{DATA_DIR_ENV}=DIR, where DIR holds either torchvision's download "
        f"({_BATCHES_DIR}/ with data_batch_1..5, test_batch, batches.meta) or the class-folder "
        "PNG tree (train/<class>/*.png and test/<class>/*.png, classes "
        f"{', '.join(CIFAR10_CLASSES)}); or download it with torchvision where the network "
        "permits: `bkfac data fetch [--data-dir DIR]` (load_cifar10(download=True) does the same)."
    )


def _download(root: Path) -> None:
    """Download with torchvision into ``root`` (:func:`bkfac.experiments.fetch.fetch_cifar10`:
    atomic, checksums checked); raise FileNotFoundError when it fails."""
    from .fetch import FetchError, fetch_cifar10

    try:
        fetch_cifar10(root, progress=False)
    except FetchError as exc:
        raise FileNotFoundError(f"CIFAR-10 was not found under {root} and the download failed: {exc}") from exc


# --------------------------------------------------------------------------------------
# decoding: the pickled batches
# --------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a batch file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 moved it
        return super().find_class(module, name)


def _str(v: object) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _load_pickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file missing: {path}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise ValueError(f"cannot read CIFAR-10 batch file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR-10 batch file {path} does not hold a dict")
    return {_str(k): v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    entry = _load_pickle(path)
    if "data" not in entry or "labels" not in entry:
        raise ValueError(f"CIFAR-10 batch file {path} lacks the 'data' or 'labels' entry")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch file {path}: 'data' must be uint8 rows of 3072 = 3x32x32 values, "
            f"got dtype {data.dtype} shape {data.shape} (wrong image size?)"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 batch file {path}: {labels.shape} labels for {data.shape[0]} images")
    names = entry.get("filenames")
    fnames = [_str(n) for n in names] if names is not None else None  # type: ignore[union-attr]
    if fnames is not None and len(fnames) != data.shape[0]:
        raise ValueError(f"CIFAR-10 batch file {path}: {len(fnames)} file names for {data.shape[0]} images")
    return data.reshape(-1, *IMAGE_SHAPE), labels, fnames


def _decode_batches_py(folder: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], tuple[str, ...]]:
    """Read torchvision's download layout.

    Hand-written rather than ``torchvision.datasets.CIFAR10``: that reader refuses any copy
    whose md5 differs from the official release (so a hand-made or re-packed copy cannot be
    read) and drops the file names we need for the canonical order. We follow its format
    exactly (its file list, ``label_names`` meta key, row layout R, G, B planes of 32x32).
    """
    meta = _load_pickle(folder / _META_FILE)
    if "label_names" not in meta:
        raise ValueError(f"CIFAR-10 meta file {folder / _META_FILE} lacks 'label_names'")
    classes = tuple(_str(c) for c in meta["label_names"])  # type: ignore[union-attr]
    if classes != CIFAR10_CLASSES:
        raise ValueError(
            f"{folder / _META_FILE}: label_names must be {list(CIFAR10_CLASSES)}, got {list(classes)}"
        )
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for split, files in (("train", _TRAIN_BATCHES), ("test", _TEST_BATCHES)):
        xs, ys, names = [], [], []
        for name in files:
            x, y, fn = _read_batch(folder / name)
            xs.append(x)
            ys.append(y)
            names.extend(fn if fn is not None else [""] * len(y))
        x_all = np.concatenate(xs)
        y_all = np.concatenate(ys)
        if y_all.size and (y_all.min() < 0 or y_all.max() >= len(CIFAR10_CLASSES)):
            raise ValueError(f"{folder}: {split} labels outside 0..9")
        # canonical order: class, then file name (stable, so nameless batches keep their order)
        order = sorted(range(len(y_all)), key=lambda i: (int(y_all[i]), names[i]))
        idx = np.asarray(order, dtype=np.int64)
        out[split] = (torch.from_numpy(np.ascontiguousarray(x_all[idx])), torch.from_numpy(y_all[idx]))
    return out, classes


# --------------------------------------------------------------------------------------
# decoding: the PNG tree
# --------------------------------------------------------------------------------------

def _decode_png(data: bytes, path: str) -> np.ndarray:
    """Decode one PNG file's bytes with PIL to a uint8 ``(3, 32, 32)`` array, or raise
    ``ValueError`` naming the file (unreadable, not RGB, not 32x32).

    PIL rather than ``torchvision.io.decode_png`` (about 1.5x faster on these tiny files):
    torchvision deprecated its image decoders in 0.29 and will remove them.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode == "RGB" and size == (32, 32):
                return np.asarray(im).transpose(2, 0, 1).copy()
    except Exception as exc:
        raise ValueError(f"cannot decode PNG file {path}: {type(exc).__name__}: {exc}") from exc
    raise ValueError(
        f"PNG file {path}: expected a 32x32 RGB image, got {size[0]}x{size[1]} (width x height) "
        f"mode {mode}"
    )


def _decode_chunk(paths: Sequence[str]) -> np.ndarray:
    out = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read PNG file {p}: {exc}") from exc
        out[i] = _decode_png(data, p)
    return out


def _list_png_split(split_dir: Path) -> tuple[list[str], list[int]]:
    """The ``*.png`` files of ``split_dir/<class>/`` with their labels, in ImageFolder's order
    (classes in the official order, which is also their sorted order; file names sorted).

    Hand-written rather than ``torchvision.datasets.folder.make_dataset``: its ``os.walk``
    stats every entry and takes about 4 s for the 50,000 training files on this file system,
    a sorted ``os.listdir`` takes 0.05 s and gives the same order.
    """
    missing = [c for c in CIFAR10_CLASSES if not (split_dir / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 PNG tree {split_dir}: class folder(s) missing: "
            + ", ".join(str(split_dir / c) for c in missing)
        )
    extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in CIFAR10_CLASSES)
    if extra:
        raise ValueError(f"CIFAR-10 PNG tree {split_dir}: unexpected class folder(s) {extra}")
    paths: list[str] = []
    labels: list[int] = []
    for label, c in enumerate(CIFAR10_CLASSES):
        folder = split_dir / c
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png"))
        if not names:
            raise FileNotFoundError(f"CIFAR-10 PNG tree: no .png file in class folder {folder}")
        paths.extend(str(folder / n) for n in names)
        labels.extend([label] * len(names))
    return paths, labels


def _decode_paths(paths: list[str], num_workers: int) -> np.ndarray:
    if num_workers <= 1 or len(paths) < _PARALLEL_MIN_FILES:
        return _decode_chunk(paths) if paths else np.empty((0, *IMAGE_SHAPE), np.uint8)
    import multiprocessing as mp

    chunk = max(256, math.ceil(len(paths) / (num_workers * 8)))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context(method)) as ex:
        parts = list(ex.map(_decode_chunk, chunks))
    return np.concatenate(parts)


def _decode_png_tree(root: Path, num_workers: int) -> dict[str, tuple[Tensor, Tensor]]:
    listings = {split: _list_png_split(root / split) for split in ("train", "test")}
    all_paths = listings["train"][0] + listings["test"][0]
    x = _decode_paths(all_paths, num_workers)
    n_train = len(listings["train"][0])
    out = {}
    for split, xs in (("train", x[:n_train]), ("test", x[n_train:])):
        out[split] = (torch.from_numpy(np.ascontiguousarray(xs)), torch.tensor(listings[split][1], dtype=torch.int64))
    return out


# --------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _fingerprint(found: _Found) -> list[str]:
    """Change detector of the source: the size, modification time and inode change time of
    every source file -- the batch files, or every ``*.png`` of the tree (one entry per class
    folder: its file count and a SHA-256 of its files' names and stat keys). A file rewritten in
    place, added, removed or renamed changes it; stat-ing the 60,000 PNGs takes about 0.2 s.
    A cache whose fingerprint differs is decoded again."""
    out = []
    if found.layout == _PICKLE:
        for n in (*_TRAIN_BATCHES, *_TEST_BATCHES, _META_FILE):
            try:
                out.append(f"{n}:{_stat_key((found.path / n).stat())}")
            except OSError:
                out.append(f"{n}:missing")
        return out
    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            folder = found.path / split / c
            try:
                with os.scandir(folder) as it:
                    entries = sorted((e.name, _stat_key(e.stat())) for e in it if e.name.lower().endswith(".png"))
            except OSError:
                out.append(f"{split}/{c}:missing")
                continue
            digest = hashlib.sha256("\n".join(f"{n}:{k}" for n, k in entries).encode()).hexdigest()[:32]
            out.append(f"{split}/{c}:{len(entries)}:{digest}")
    return out


def _cache_path(cache_dir: Path, found: _Found) -> Path:
    key = hashlib.sha1(f"{found.layout}|{found.path.resolve()}".encode()).hexdigest()[:16]
    return cache_dir / f"cifar10-{found.layout}-{key}.pt"


def _load_cache(path: Path, found: _Found, fingerprint: list[str]) -> CIFAR10Arrays | None:
    """The cached arrays, or None (with a warning) if the file is corrupt or stale."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
            raise ValueError("not a bkfac CIFAR-10 cache of the current format")
        arrays = CIFAR10Arrays(
            train_x=blob["train_x"],
            train_y=blob["train_y"],
            test_x=blob["test_x"],
            test_y=blob["test_y"],
            classes=tuple(blob["classes"]),
            source=str(found.path),
            layout=found.layout,
        )
    except Exception as exc:
        warnings.warn(
            f"CIFAR-10 cache {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
            "decoding the data again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if list(blob.get("fingerprint", [])) != fingerprint:
        warnings.warn(
            f"CIFAR-10 cache {path} is stale (the source {found.path} changed); decoding again",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return arrays


def _save_cache(path: Path, arrays: CIFAR10Arrays, fingerprint: list[str]) -> None:
    """Write atomically (:func:`~bkfac.experiments.results.atomic_torch_save`); a failure to
    write is a warning. Temp files a killed writer left there over an hour ago are removed."""
    blob = {
        "format": _CACHE_FORMAT,
        "layout": arrays.layout,
        "source": arrays.source,
        "fingerprint": fingerprint,
        "classes": list(arrays.classes),
        "train_x": arrays.train_x,
        "train_y": arrays.train_y,
        "test_x": arrays.test_x,
        "test_y": arrays.test_y,
    }
    try:
        atomic_torch_save(blob, path)
        clean_temp_files(path.parent, older_than=3600.0)
    except OSError as exc:
        warnings.warn(f"could not write the CIFAR-10 cache {path}: {exc}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# the loader entry point
# --------------------------------------------------------------------------------------


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    num_workers: int | None = None,
    expected_counts: tuple[int, int] | None = (CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE),
    use_cache: bool = True,
    verbose: bool = False,
) -> CIFAR10Arrays:
    """Load CIFAR-10 as uint8 tensors, decoding once into a cache.

    Args:
        data_dir: where the data is (see :func:`resolve_data_dir`). Either
            ``<data_dir>/cifar-10-batches-py/`` (torchvision's download; ``data_dir`` may also be
            that folder itself) or ``<data_dir>/train/<class>/*.png`` + ``<data_dir>/test/...``.
            Never written to, except by a download.
        cache_dir: where the decoded tensors are cached (:func:`resolve_cache_dir`, default
            ``data/cache``). The cache file is keyed by the layout and the resolved source
            path, holds a fingerprint of the source -- size and times of every source file,
            so data edited in place is decoded again -- and is written atomically. A corrupt
            or stale cache is re-decoded with a ``RuntimeWarning``.
        download: where neither layout exists, try ``torchvision.datasets.CIFAR10(download=True)``
            into ``data_dir``; without network this raises ``FileNotFoundError``.
        num_workers: processes decoding the PNG tree (default: the number of CPUs, at most 8).
        expected_counts: ``(n_train, n_test)`` to insist on (the full release by default);
            ``None`` accepts any non-empty count (tests, hand-made subsets).
        use_cache: read and write the cache (False: always decode, write nothing).
        verbose: print where the data came from and how long decoding took.

    Raises:
        FileNotFoundError: no data (the message lists every path looked at and how to provide
            the data), a missing batch file or class folder (named).
        ValueError: an unreadable/corrupt file or a wrong image size (the file is named),
            wrong classes, wrong counts.
    """
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if expected_counts is not None and (
        len(expected_counts) != 2 or any(int(c) < 0 for c in expected_counts)
    ):
        raise ValueError(f"expected_counts must be (n_train, n_test) or None, got {expected_counts!r}")
    root = resolve_data_dir(data_dir)
    found, looked = _detect(root)
    if found is None:
        if download:
            _download(root)
            found, looked = _detect(root)
        if found is None:
            origin = (
                "the data_dir argument"
                if data_dir is not None
                else (f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV, "").strip() else "the default")
            )
            raise FileNotFoundError(
                f"CIFAR-10 not found in {root} (from {origin}). Looked for:\n"
                + "".join(f"  - {p}\n" for p in looked)
                + _how_to_provide()
            )
    where = f"CIFAR-10 at {found.path} ({found.layout})"
    fingerprint = _fingerprint(found)
    cache_file = _cache_path(resolve_cache_dir(cache_dir), found)
    if use_cache and cache_file.exists():
        t0 = time.perf_counter()
        cached = _load_cache(cache_file, found, fingerprint)
        if cached is not None:
            _check_counts(cached, expected_counts, where)
            if verbose:
                print(f"{where}: loaded cache {cache_file} in {time.perf_counter() - t0:.2f}s")
            return cached
    t0 = time.perf_counter()
    if found.layout == _PICKLE:
        splits, classes = _decode_batches_py(found.path)
    else:
        splits, classes = _decode_png_tree(found.path, num_workers), CIFAR10_CLASSES
    arrays = CIFAR10Arrays(
        train_x=splits["train"][0],
        train_y=splits["train"][1],
        test_x=splits["test"][0],
        test_y=splits["test"][1],
        classes=classes,
        source=str(found.path),
        layout=found.layout,
    )
    if arrays.n_train == 0 or arrays.n_test == 0:
        raise ValueError(f"{where}: no training or no test images")
    _check_counts(arrays, expected_counts, where)
    if verbose:
        print(f"{where}: decoded {arrays.n_train}+{arrays.n_test} images in {time.perf_counter() - t0:.1f}s")
    if use_cache:
        _save_cache(cache_file, arrays, fingerprint)
    return arrays


def subset(arrays: CIFAR10Arrays, n_train: int, n_test: int, seed: int = 0) -> CIFAR10Arrays:
    """A deterministic class-balanced subset (for the ``smoke`` profile).

    Each class gets ``n // 10`` images and the first ``n % 10`` classes one more; the images
    of a class are drawn without replacement by a generator seeded with ``seed`` (train and
    test from one stream), and kept in the canonical order.
    """
    for name, n, avail in (("n_train", n_train, arrays.n_train), ("n_test", n_test, arrays.n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
        if n > avail:
            raise ValueError(f"{name}={n} exceeds the {avail} images available")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    k = len(CIFAR10_CLASSES)

    def pick(y: Tensor, n: int, name: str) -> Tensor:
        chosen = []
        for c in range(k):
            want = n // k + (1 if c < n % k else 0)
            members = torch.nonzero(y == c).flatten()
            if want > members.numel():
                raise ValueError(
                    f"{name}={n} needs {want} images of class {CIFAR10_CLASSES[c]!r}, only "
                    f"{members.numel()} available"
                )
            chosen.append(members[torch.randperm(members.numel(), generator=g)[:want]])
        return torch.sort(torch.cat(chosen)).values

    tr = pick(arrays.train_y, n_train, "n_train")
    te = pick(arrays.test_y, n_test, "n_test")
    return CIFAR10Arrays(
        train_x=arrays.train_x[tr].clone(),
        train_y=arrays.train_y[tr].clone(),
        test_x=arrays.test_x[te].clone(),
        test_y=arrays.test_y[te].clone(),
        classes=arrays.classes,
        source=f"{arrays.source} [subset n_train={n_train} n_test={n_test} seed={seed}]",
        layout=arrays.layout,
    )


def synthetic_cifar10(
    n_train: int = CIFAR10_TRAIN_SIZE, n_test: int = CIFAR10_TEST_SIZE, seed: int = 0
) -> CIFAR10Arrays:
    """Random CIFAR-shaped data for timing runs where the real images are not at hand.

    Uniform uint8 pixels and class-balanced labels in random order (``i % 10`` permuted), both
    from a generator seeded with ``seed``: the same shapes, dtypes and sizes as CIFAR-10, so a
    training step costs what it costs on the real data, but the labels carry no signal (test
    accuracy stays near 10 %). Used by ``bkfac train --synthetic-data`` (the paper profile's
    one-epoch CUDA timings, on a GPU machine the 180 MB data set cannot travel to).
    """
    check_positive_int("n_train", n_train)
    check_positive_int("n_test", n_test)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    k = len(CIFAR10_CLASSES)

    def split(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 256, (n, *IMAGE_SHAPE), generator=g, dtype=torch.uint8)
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        return x, y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return CIFAR10Arrays(train_x, train_y, test_x, test_y, classes=CIFAR10_CLASSES,
                         source=f"synthetic [n_train={n_train} n_test={n_test} seed={seed}]", layout="synthetic")


# --------------------------------------------------------------------------------------
# augmentation and batching
# --------------------------------------------------------------------------------------


def random_crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """Per-sample random crop with zero padding, then horizontal flip, on a whole batch.

    ``x``: ``(B, C, H, W)`` (any dtype); ``offsets``: int ``(B, 2)`` with the crop's top-left
    corner ``(dy, dx)`` in the padded image, each in ``0..2*padding``; ``flips``: bool ``(B,)``.
    Output ``out[b, c, i, j] = pad(x)[b, c, dy_b + i, dx_b + j']`` with ``j' = W-1-j`` when
    ``flips[b]`` else ``j`` -- torchvision's ``RandomCrop(H, padding)`` followed by
    ``RandomHorizontalFlip``, sample by sample.

    Hand-written because torchvision's transforms draw one crop per call (per image or per
    whole batch); per-sample crops of a batch on the device are one gather on the padded
    batch with per-sample row/column indices.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if offsets.shape != (b, 2):
        raise ValueError(f"offsets must have shape ({b}, 2), got {tuple(offsets.shape)}")
    if flips.shape != (b,):
        raise ValueError(f"flips must have shape ({b},), got {tuple(flips.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding):
        raise ValueError(f"offsets must lie in 0..{2 * padding}")
    dev = x.device
    offsets = offsets.to(dev, torch.int64)
    flips = flips.to(dev, torch.bool)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets[:, :1] + ar_h  # (B, H)
    cols = offsets[:, 1:] + torch.where(flips[:, None], (w - 1) - ar_w, ar_w)  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(
    x: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """uint8 ``(B, 3, H, W)`` pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed from ``(seed, epoch)`` (numpy's SeedSequence mixing, so nearby
    pairs give unrelated streams)."""
    lo, hi = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32 | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF


class CIFARLoader:
    """Batches of ``(x float32 normalised (B, 3, 32, 32), y int64 (B,))`` on ``device``.

    Training (``train=True``): shuffle, the paper's augmentation -- random crop 32 with zero
    padding 4 and a horizontal flip with probability 1/2, per sample
    (:func:`random_crop_flip`) -- then normalisation with ``CIFAR10_MEAN``/``CIFAR10_STD``,
    and ``drop_last=True`` so every batch has the same size (K-FAC's statistics assume it).
    Test (``train=False``): in order, no augmentation, the last partial batch kept.

    Determinism and resuming: the order and the augmentation of epoch ``e`` are drawn at
    the start of the epoch on the CPU from a generator seeded with ``(seed, e)``, so they do
    not depend on the device or on how far earlier epochs ran. Select the epoch with
    :meth:`set_epoch` (like ``DistributedSampler``: iterating twice without it repeats the
    epoch); :meth:`iter_from` ``(k)`` yields exactly the batches ``k, k+1, ...`` of a full
    pass, so a run resumes in the middle of an epoch.

    The images are moved to ``device`` once (uint8: 150 MB for the training set).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        device: str | torch.device | None = None,
        drop_last: bool | None = None,
        shuffle: bool | None = None,
        augment: bool | None = None,
        padding: int = 4,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        epoch: int = 0,
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a vector of {images.shape[0]} class indices")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1] or min(std) <= 0:
            raise ValueError(f"mean and std must have {images.shape[1]} entries, std positive")
        self.train = bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        if self.drop_last and images.shape[0] < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {images.shape[0]} images with drop_last=True"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.padding = padding
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._plan: tuple[int, Tensor, Tensor | None, Tensor | None] | None = None
        self.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next pass uses."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def epoch_plan(self, epoch: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(order, offsets, flips)`` of an epoch (CPU tensors): the permutation of the
        samples, and per slot of that order the crop corner ``(dy, dx)`` and the flip."""
        e = self._epoch if epoch is None else epoch
        if self._plan is not None and self._plan[0] == e:
            return self._plan[1], self._plan[2], self._plan[3]
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, e))
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
            flips = torch.randint(0, 2, (n,), generator=g).bool()
        self._plan = (e, order, offsets, flips)
        return order, offsets, flips

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches ``start_batch, ..., len(self) - 1`` of the current epoch."""
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in 0..{len(self)}, got {start_batch!r}")
        order, offsets, flips = self.epoch_plan()
        return self._batches(start_batch, order, offsets, flips)

    def _batches(
        self, start: int, order: Tensor, offsets: Tensor | None, flips: Tensor | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batch_size
        for k in range(start, len(self)):
            sl = slice(k * b, min((k + 1) * b, self.num_samples))
            idx = order[sl].to(self.device)
            x = self.images[idx]
            if offsets is not None and flips is not None:
                x = random_crop_flip(x, offsets[sl], flips[sl], self.padding)
            x = (x.to(torch.float32) / 255.0 - self._mean) / self._std
            yield x, self.labels[idx]


def make_loaders(
    arrays: CIFAR10Arrays,
    *,
    batch_size: int = 256,
    test_batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[CIFARLoader, CIFARLoader]:
    """The training loader (shuffled, augmented, ``drop_last``) and the test loader."""
    train = CIFARLoader(arrays.train_x, arrays.train_y, batch_size=batch_size, train=True, seed=seed, device=device)
    test = CIFARLoader(arrays.test_x, arrays.test_y, batch_size=test_batch_size, train=False, seed=seed, device=device)
    return train, test
