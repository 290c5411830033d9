"""CIFAR-10 loading, caching, augmentation and batching (bkfac.experiments.data).

Synthetic data sets are written in both real-world layouts -- the class-folder PNG tree
(with PIL) and torchvision's pickled batches (by hand, in the format of the official
``data_batch_1..5``/``test_batch``/``batches.meta``) -- and must load to identical tensors.
One test reads the real data set when it is present.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bkfac.experiments import data as D
from bkfac.experiments.data import (
    CIFAR10_CLASSES,
    CIFARLoader,
    load_cifar10,
    random_crop_flip,
    resolve_data_dir,
    subset,
)

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


# ------------------------------------------------------------------ synthetic data sets


def _synthetic(n_per_class: int, seed: int):
    """Random images with unique file names, in a shuffled (release-like) order."""
    rng = np.random.default_rng(seed)
    n = 10 * n_per_class
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = np.repeat(np.arange(10), n_per_class)
    # names not monotone in the class-wise order, so the canonical sort is exercised
    names = [f"{CLASSES[c]}_s_{int(k):06d}.png" for c, k in zip(y, rng.permutation(n))]
    perm = rng.permutation(n)
    return x[perm], y[perm], [names[i] for i in perm]


def _canonical(x, y, names):
    order = sorted(range(len(y)), key=lambda i: (int(y[i]), names[i]))
    return torch.from_numpy(x[order]), torch.from_numpy(y[order].astype(np.int64))


def _write_png(path: Path, img_chw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img_chw.transpose(1, 2, 0)), mode="RGB").save(path)


def write_png_tree(root: Path, train, test) -> None:
    for split, (x, y, names) in (("train", train), ("test", test)):
        for img, c, name in zip(x, y, names):
            _write_png(root / split / CLASSES[c] / name, img)


def write_batches_py(root: Path, train, test) -> Path:
    """The official format: Python-2 style pickles with bytes keys, 'data' uint8 rows of
    3072 (R, G, B planes of 32x32), 'labels' a list, 'filenames' bytes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, x, y, names, label):
        entry = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in y],
            b"data": x.reshape(len(y), 3072),
            b"filenames": [n.encode() for n in names],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    x, y, names = train
    chunks = np.array_split(np.arange(len(y)), 5)
    for i, idx in enumerate(chunks, start=1):
        dump(f"data_batch_{i}", x[idx], y[idx], [names[j] for j in idx], f"training batch {i} of 5")
    dump("test_batch", *test, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": len(chunks[0]), b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


@pytest.fixture()
def synth():
    return _synthetic(3, seed=1), _synthetic(2, seed=2)  # 30 train, 20 test


@pytest.fixture()
def png_root(tmp_path, synth):
    root = tmp_path / "png"
    write_png_tree(root, *synth)
    return root


def _load(root, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("expected_counts", None)
    return load_cifar10(root, **kw)


# ------------------------------------------------------------------ layouts


def test_both_layouts_load_identical_canonical_tensors(tmp_path, synth, png_root):
    pk_root = tmp_path / "pk"
    write_batches_py(pk_root, *synth)
    a = _load(png_root, tmp_path)
    b = _load(pk_root, tmp_path)
    c = _load(pk_root / "cifar-10-batches-py", tmp_path)  # the folder itself also works
    assert (a.layout, b.layout) == ("png-tree", "cifar-10-batches-py")
    assert a.classes == b.classes == CLASSES
    train_x, train_y = _canonical(*synth[0])
    test_x, test_y = _canonical(*synth[1])
    for arr in (a, b, c):
        assert arr.train_x.dtype == torch.uint8 and arr.train_x.shape == (30, 3, 32, 32)
        assert arr.train_y.dtype == torch.int64
        assert torch.equal(arr.train_x, train_x) and torch.equal(arr.train_y, train_y)
        assert torch.equal(arr.test_x, test_x) and torch.equal(arr.test_y, test_y)


def test_png_tree_order_is_imagefolder_order(png_root, tmp_path):
    from torchvision.datasets import ImageFolder

    a = _load(png_root, tmp_path)
    ref = ImageFolder(str(png_root / "train"))
    assert ref.classes == list(CLASSES)
    assert a.train_y.tolist() == [t for _, t in ref.samples]
    for i in (0, 7, 29):
        img = np.asarray(Image.open(ref.samples[i][0])).transpose(2, 0, 1)
        assert torch.equal(a.train_x[i], torch.from_numpy(img.copy()))


def test_parallel_decode_agrees_with_serial(png_root, tmp_path, monkeypatch):
    ref = _load(png_root, tmp_path, use_cache=False, num_workers=0)
    monkeypatch.setattr(D, "_PARALLEL_MIN_FILES", 0)
    par = _load(png_root, tmp_path, use_cache=False, num_workers=2)
    assert torch.equal(par.train_x, ref.train_x) and torch.equal(par.test_x, ref.test_x)
    assert torch.equal(par.train_y, ref.train_y)


# ------------------------------------------------------------------ cache


def test_cache_written_atomically_and_reused_without_decoding(png_root, tmp_path, monkeypatch):
    first = _load(png_root, tmp_path)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and "png-tree" in files[0].name  # no temp left

    def boom(*a, **k):
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(D, "_decode_png_tree", boom)
    monkeypatch.setattr(D, "_decode_chunk", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _load(png_root, tmp_path)
    assert torch.equal(second.train_x, first.train_x) and torch.equal(second.test_y, first.test_y)
    # use_cache=False decodes (and here fails loudly through the patched decoder)
    with pytest.raises(AssertionError, match="decoded"):
        _load(png_root, tmp_path, use_cache=False)


def test_cache_keyed_by_source_path(tmp_path, synth, png_root):
    other = tmp_path / "png2"
    write_png_tree(other, _synthetic(1, seed=5), _synthetic(1, seed=6))
    a = _load(png_root, tmp_path)
    b = _load(other, tmp_path)
    assert a.n_train == 30 and b.n_train == 10
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_corrupt_cache_is_redecoded_with_warning(png_root, tmp_path):
    first = _load(png_root, tmp_path)
    (cache,) = (tmp_path / "cache").iterdir()
    blob = cache.read_bytes()
    cache.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = _load(png_root, tmp_path)
    assert torch.equal(again.train_x, first.train_x)
    with warnings.catch_warnings():  # rewritten: no warning the next time
        warnings.simplefilter("error")
        _load(png_root, tmp_path)
    cache.write_bytes(b"not a torch file at all")
    with pytest.warns(RuntimeWarning, match=str(cache.name)):
        assert torch.equal(_load(png_root, tmp_path).test_x, first.test_x)


def test_stale_cache_is_redecoded(png_root, tmp_path):
    first = _load(png_root, tmp_path)
    extra = np.full((3, 32, 32), 7, dtype=np.uint8)
    _write_png(png_root / "train" / "ship" / "zzz_extra.png", extra)
    os.utime(png_root / "train" / "ship", ns=(1, 1))  # make sure the folder's mtime changed
    with pytest.warns(RuntimeWarning, match="stale"):
        again = _load(png_root, tmp_path)
    assert again.n_train == first.n_train + 1
    last_ship = int(torch.nonzero(again.train_y == CLASSES.index("ship")).max())
    assert torch.equal(again.train_x[last_ship], torch.from_numpy(extra))


def test_png_rewritten_in_place_is_decoded_again(png_root, tmp_path):
    """A PNG rewritten in place -- same name, same folder listing, even with its old modification
    time put back (as ``cp -p`` or ``rsync -t`` do) -- invalidates the cache: the fingerprint holds
    the size and times of every file."""
    first = _load(png_root, tmp_path)
    target = sorted((png_root / "train" / "cat").iterdir())[0]
    st = target.stat()
    new = np.full((3, 32, 32), 200, dtype=np.uint8)
    assert not torch.equal(first.train_x[int(torch.nonzero(first.train_y == CLASSES.index("cat")).min())],
                           torch.from_numpy(new))
    _write_png(target, new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(RuntimeWarning, match="stale"):
        again = _load(png_root, tmp_path)
    first_cat = int(torch.nonzero(again.train_y == CLASSES.index("cat")).min())
    assert torch.equal(again.train_x[first_cat], torch.from_numpy(new))
    (cache,) = (tmp_path / "cache").iterdir()
    umask = os.umask(0o022)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# ------------------------------------------------------------------ missing / corrupted data


def test_missing_data_lists_paths_and_remedies(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(root, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert str(root / "cifar-10-batches-py") in msg
    assert str(root / "train") in msg and str(root / "test") in msg
    assert "--data-dir" in msg and "BKFAC_DATA_DIR" in msg and "download" in msg
    assert not (tmp_path / "cache").exists()


def test_download_failure_is_graceful(tmp_path, monkeypatch):
    import torchvision

    def no_network(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(FileNotFoundError, match="download.*failed.*no network") as info:
        load_cifar10(tmp_path / "dl", cache_dir=tmp_path / "cache", download=True)
    assert "BKFAC_DATA_DIR" in str(info.value)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BKFAC_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path / "data" / "cifar10"
    monkeypatch.setenv("BKFAC_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir("rel") == tmp_path / "rel"


def test_env_var_is_used_by_load(png_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BKFAC_DATA_DIR", str(png_root))
    a = load_cifar10(cache_dir=tmp_path / "cache", expected_counts=None)
    assert a.source == str(png_root) and a.n_test == 20


def test_corrupted_png_names_the_file(png_root, tmp_path):
    bad = sorted((png_root / "test" / "deer").iterdir())[1]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=bad.name):
        _load(png_root, tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing cached from a failed decode


def test_wrong_image_size_names_the_file(png_root, tmp_path):
    bad = sorted((png_root / "train" / "cat").iterdir())[0]
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=f"{bad.name}.*32x32"):
        _load(png_root, tmp_path)


def test_grayscale_png_rejected(png_root, tmp_path):
    bad = sorted((png_root / "train" / "dog").iterdir())[0]
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(bad)
    with pytest.raises(ValueError, match=f"{bad.name}.*mode L"):
        _load(png_root, tmp_path, use_cache=False)


def test_missing_class_folder_and_split(png_root, tmp_path):
    import shutil

    shutil.rmtree(png_root / "test" / "frog")
    with pytest.raises(FileNotFoundError, match=str(png_root / "test" / "frog")):
        _load(png_root, tmp_path)
    shutil.rmtree(png_root / "test")
    with pytest.raises(FileNotFoundError, match=str(png_root / "test")):
        _load(png_root, tmp_path)


def test_unexpected_class_folder(png_root, tmp_path):
    (png_root / "train" / "unicorn").mkdir()
    with pytest.raises(ValueError, match="unicorn"):
        _load(png_root, tmp_path)


def test_broken_batch_files_are_named(tmp_path, synth):
    folder = write_batches_py(tmp_path / "pk", *synth)
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[:100])
    with pytest.raises(ValueError, match="data_batch_3"):
        _load(tmp_path / "pk", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        _load(tmp_path / "pk", tmp_path)


def test_batch_with_wrong_image_size(tmp_path, synth):
    folder = write_batches_py(tmp_path / "pk", *synth)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((20, 1024), np.uint8), b"labels": [0] * 20}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch.*3072"):
        _load(tmp_path / "pk", tmp_path)


def test_pickle_that_runs_code_is_refused(tmp_path, synth):
    folder = write_batches_py(tmp_path / "pk", *synth)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="batches.meta.*refusing"):
        _load(tmp_path / "pk", tmp_path)


def test_expected_counts_enforced(png_root, tmp_path):
    with pytest.raises(ValueError, match="50000"):
        load_cifar10(png_root, cache_dir=tmp_path / "cache")  # default: the full release
    assert _load(png_root, tmp_path, expected_counts=(30, 20)).n_train == 30


# ------------------------------------------------------------------ subset


def test_subset_is_class_balanced_and_deterministic(png_root, tmp_path):
    a = _load(png_root, tmp_path)
    s1 = subset(a, 23, 10, seed=3)
    s2 = subset(a, 23, 10, seed=3)
    assert torch.equal(s1.train_x, s2.train_x) and torch.equal(s1.test_y, s2.test_y)
    counts = torch.bincount(s1.train_y, minlength=10).tolist()
    assert counts == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert torch.bincount(s1.test_y, minlength=10).tolist() == [1] * 10
    # each chosen image is one of the originals with its own label
    for img, lab in zip(s1.train_x, s1.train_y):
        match = (a.train_x == img).flatten(1).all(1).nonzero().flatten()
        assert match.numel() == 1 and a.train_y[match[0]] == lab
    others = [subset(a, 10, 10, seed=s).train_x for s in range(4)]
    assert any(not torch.equal(others[0], o) for o in others[1:])
    with pytest.raises(ValueError, match="n_train"):
        subset(a, 31, 10, seed=0)
    with pytest.raises(ValueError, match="n_test"):
        subset(a, 10, 0, seed=0)


def test_synthetic_data_has_cifar_shapes_balanced_labels_and_is_seeded():
    a = D.synthetic_cifar10(50, 20, seed=1)
    assert a.train_x.shape == (50, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (20, 3, 32, 32) and a.test_y.dtype == torch.int64
    assert torch.bincount(a.train_y, minlength=10).tolist() == [5] * 10
    assert torch.bincount(a.test_y, minlength=10).tolist() == [2] * 10
    assert a.layout == "synthetic" and "synthetic" in a.source
    b = D.synthetic_cifar10(50, 20, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, D.synthetic_cifar10(50, 20, seed=2).train_x)
    assert int(a.train_x.min()) < 10 and int(a.train_x.max()) > 245  # the full uint8 range is used
    with pytest.raises(ValueError, match="n_train"):
        D.synthetic_cifar10(0, 20)
    with pytest.raises(ValueError, match="seed"):
        D.synthetic_cifar10(10, 10, seed=-1)


# ------------------------------------------------------------------ augmentation


def _brute_crop_flip(x, offsets, flips, pad):
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        big = torch.zeros(x.shape[1], x.shape[2] + 2 * pad, x.shape[3] + 2 * pad, dtype=x.dtype)
        big[:, pad : pad + x.shape[2], pad : pad + x.shape[3]] = x[b]
        dy, dx = int(offsets[b, 0]), int(offsets[b, 1])
        crop = big[:, dy : dy + x.shape[2], dx : dx + x.shape[3]]
        out[b] = crop.flip(-1) if flips[b] else crop
    return out


def test_random_crop_flip_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (12, 2), generator=g)
    offsets[0] = torch.tensor([0, 0])
    offsets[1] = torch.tensor([8, 8])
    offsets[2] = torch.tensor([4, 4])
    flips = torch.randint(0, 2, (12,), generator=g).bool()
    flips[0] = False
    flips[2] = False
    flips[3] = True
    out = random_crop_flip(x, offsets, flips, padding=4)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, _brute_crop_flip(x, offsets, flips, 4))
    assert torch.equal(out[2], x[2])  # centred, unflipped: identity
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()  # zero padding
    assert torch.equal(out[0, :, 4:, 4:], x[0, :, :28, :28])  # a shift of the padded image
    # a flip with a centred crop is the mirror image
    o = random_crop_flip(x[:1], torch.tensor([[4, 4]]), torch.tensor([True]), padding=4)
    assert torch.equal(o[0], x[0].flip(-1))
    with pytest.raises(ValueError, match="offsets"):
        random_crop_flip(x[:1], torch.tensor([[9, 0]]), torch.tensor([False]), padding=4)


def _tiny_images(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_normalization_constants_and_test_loader():
    x, y = _tiny_images()
    loader = CIFARLoader(x, y, batch_size=16, train=False)
    assert len(loader) == 4 and not loader.drop_last
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    torch.testing.assert_close(xs, (x.double() / 255 - mean.double()) / std.double(), check_dtype=False)
    assert torch.equal(ys, y)
    assert D.CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and D.CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def _batches(loader, start=0):
    return [(bx.clone(), by.clone()) for bx, by in loader.iter_from(start)]


def test_train_loader_applies_the_planned_augmentation():
    x, y = _tiny_images()
    loader = CIFARLoader(x, y, batch_size=16, train=True, seed=5)
    loader.set_epoch(3)
    assert len(loader) == 3 and loader.drop_last
    order, offsets, flips = loader.epoch_plan()
    assert sorted(order.tolist()) == list(range(50))
    assert offsets.min() >= 0 and offsets.max() <= 8
    for k, (bx, by) in enumerate(loader):
        assert bx.shape == (16, 3, 32, 32)
        sl = slice(16 * k, 16 * (k + 1))
        idx = order[sl]
        expect = D.normalize(_brute_crop_flip(x[idx], offsets[sl], flips[sl], 4))
        torch.testing.assert_close(bx, expect)
        assert torch.equal(by, y[idx])
    # over many samples, about half are flipped and all 9 offsets occur
    big = CIFARLoader(*_tiny_images(2000), batch_size=100, train=True, seed=1)
    _, off, fl = big.epoch_plan()
    assert 0.45 < fl.float().mean() < 0.55
    assert set(off.flatten().tolist()) == set(range(9))


def test_loader_determinism_and_epochs():
    x, y = _tiny_images()
    a = CIFARLoader(x, y, batch_size=16, train=True, seed=7)
    b = CIFARLoader(x, y, batch_size=16, train=True, seed=7)
    c = CIFARLoader(x, y, batch_size=16, train=True, seed=8)
    ba, bb, bc = _batches(a), _batches(b), _batches(c)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ba, bb))
    assert not torch.equal(ba[0][0], bc[0][0])
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ba, _batches(a)))  # same epoch repeats
    a.set_epoch(1)
    e1 = _batches(a)
    assert not torch.equal(e1[0][1], ba[0][1])
    a.set_epoch(0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ba, _batches(a)))


def test_resume_from_batch_index_gives_the_remaining_batches():
    x, y = _tiny_images(70)
    full = CIFARLoader(x, y, batch_size=16, train=True, seed=3)
    full.set_epoch(2)
    ref = _batches(full)
    resumed = CIFARLoader(x, y, batch_size=16, train=True, seed=3, epoch=2)  # a fresh process
    rest = _batches(resumed, start=2)
    assert len(rest) == len(ref) - 2 == 2
    for p, q in zip(ref[2:], rest):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
    assert _batches(resumed, start=len(resumed)) == []
    with pytest.raises(ValueError, match="start_batch"):
        resumed.iter_from(len(resumed) + 1)


def test_drop_last_covers_distinct_samples():
    x, y = _tiny_images(50)
    loader = CIFARLoader(x, torch.arange(50), batch_size=16, train=True, seed=0)
    seen = torch.cat([b[1] for b in loader])
    assert seen.numel() == 48 and seen.unique().numel() == 48
    nodrop = CIFARLoader(x, torch.arange(50), batch_size=16, train=True, seed=0, drop_last=False)
    assert len(nodrop) == 4 and sorted(torch.cat([b[1] for b in nodrop]).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="batch_size"):
        CIFARLoader(x, y, batch_size=64, train=True)


# ------------------------------------------------------------------ the real data set

_REAL = Path(os.environ.get("BKFAC_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")


@pytest.mark.slow
@pytest.mark.skipif(not (_REAL / "train").is_dir(), reason=f"real CIFAR-10 not present at {_REAL}")
def test_real_cifar10(monkeypatch):
    monkeypatch.setenv("BKFAC_DATA_DIR", str(_REAL))
    cache = Path(__file__).resolve().parents[1] / "data" / "cache"
    a = load_cifar10(cache_dir=cache)  # decoded once (~25 s on 2 cores), then cached
    assert a.classes == CIFAR10_CLASSES
    assert a.train_x.shape == (50_000, 3, 32, 32) and a.test_x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(a.train_y).tolist() == [5000] * 10
    assert torch.bincount(a.test_y).tolist() == [1000] * 10
    n = a.train_x.shape[0] * 32 * 32
    mean = a.train_x.sum(dim=(0, 2, 3), dtype=torch.float64) / (255.0 * n)
    assert [round(v, 3) for v in mean.tolist()] == [0.491, 0.482, 0.447]
    assert torch.allclose(mean, torch.tensor(D.CIFAR10_MEAN, dtype=torch.float64), atol=5e-4)
    sq = sum(c.to(torch.int32).pow(2).sum(dim=(0, 2, 3), dtype=torch.int64) for c in a.train_x.split(5000))
    std = (sq.double() / (255.0**2 * n) - mean**2).sqrt()
    assert torch.allclose(std, torch.tensor(D.CIFAR10_STD, dtype=torch.float64), atol=5e-4)
    test_mean = a.test_x.sum(dim=(0, 2, 3), dtype=torch.float64) / (255.0 * a.test_x.shape[0] * 1024)
    assert torch.allclose(test_mean, torch.tensor([0.4942, 0.4851, 0.4504], dtype=torch.float64), atol=5e-4)
    train, _ = D.make_loaders(a, batch_size=256, seed=0)
    assert len(train) == 195
    bx, by = next(iter(train))
    assert bx.shape == (256, 3, 32, 32) and by.shape == (256,)
    assert abs(float(bx.mean())) < 0.3  # normalised (padding pulls it slightly negative)
