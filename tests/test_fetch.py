"""``bkfac data fetch`` and ``make data``: CIFAR-10 downloaded with torchvision where it is not found.

The network is replaced by a local mirror: an HTTP server on 127.0.0.1 serving a small archive
of torchvision's layout (``cifar-10-batches-py/`` with five training batches, a test batch and
``batches.meta``, pickled as the release pickles them), whose md5 sums are put where torchvision
looks for them (``CIFAR10.tgz_md5``, ``train_list``, ``test_list``, ``meta``). Everything else --
torchvision's download, its redirect check, its archive and per-file checksums, the extraction,
then our decoder and a training run -- runs as it does against the real release.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from bkfac.cli import main
from bkfac.experiments import fetch
from bkfac.experiments.data import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, fingerprint, load_cifar10,
                                    make_loaders, subset)

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN_PER_BATCH, N_TEST = 130, 200  # 650 training images: enough for the smoke profile's 640


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _fake_release(seed: int = 0) -> tuple[bytes, dict, dict]:
    """A small ``cifar-10-python.tar.gz``: (archive bytes, md5 sums as torchvision lists them,
    the images by file name as ``(label, HWC uint8 array)``)."""
    rng = np.random.default_rng(seed)
    files, images = {}, {}
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(batches):
        n = N_TEST if name == "test_batch" else N_TRAIN_PER_BATCH
        labels = [(b * 7 + i) % 10 for i in range(n)]  # every class in every batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fnames = [f"{CIFAR10_CLASSES[lab]}_s_{b:01d}{i:05d}.png" for i, lab in enumerate(labels)]
        for row, lab, fname in zip(data, labels, fnames):
            images[fname] = (lab, row.reshape(3, 32, 32).copy(), name != "test_batch")
        # the release's Python 2 str keys and names read back as str (torchvision: encoding="latin1")
        entry = {"batch_label": f"{name} of 6", "labels": labels, "data": data, "filenames": fnames}
        files[name] = pickle.dumps(entry, protocol=2)
    files["batches.meta"] = pickle.dumps({"num_cases_per_batch": 10000, "num_vis": 3072,
                                          "label_names": list(CIFAR10_CLASSES)}, protocol=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    sums = {"tgz_md5": _md5(archive),
            "train_list": [[f"data_batch_{i}", _md5(files[f"data_batch_{i}"])] for i in range(1, 6)],
            "test_list": [["test_batch", _md5(files["test_batch"])]],
            "meta": {"filename": "batches.meta", "key": "label_names", "md5": _md5(files["batches.meta"])}}
    return archive, sums, images


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # torchvision's redirect probe closes its GET early: a broken pipe here, not an error


class _Mirror:
    """An HTTP server on 127.0.0.1 serving the files of a folder; ``hits`` counts the requests."""

    def __init__(self, folder: Path):
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                mirror.hits += 1
                return super().do_GET()

            def log_message(self, *args):
                pass

        self.hits = 0
        self.server = _Server(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    archive, sums, images = _fake_release()
    folder = tmp_path_factory.mktemp("mirror")
    (folder / "cifar-10-python.tar.gz").write_bytes(archive)
    (folder / "corrupt.tar.gz").write_bytes(archive[:-64] + bytes(64))  # same size, other md5
    mirror = _Mirror(folder)
    yield mirror, sums, images
    mirror.close()


@pytest.fixture
def fake_sums(release, monkeypatch):
    """torchvision's checksums replaced by the fake release's (only they: the rest is real)."""
    _, sums, _ = release
    for key, value in sums.items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, key, value)
    monkeypatch.delenv("BKFAC_DATA_DIR", raising=False)
    monkeypatch.delenv(fetch.URL_ENV, raising=False)
    return sums


def _expected(images: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical order, computed independently: by class, then by file name."""
    chosen = sorted((lab, name) for name, (lab, _, tr) in images.items() if tr == train)
    x = torch.from_numpy(np.stack([images[name][1] for _, name in chosen]))
    return x, torch.tensor([lab for lab, _ in chosen], dtype=torch.int64)


def test_fetch_downloads_verifies_and_the_data_is_decoded_and_used(tmp_path, release, fake_sums, capsys):
    mirror, _, images = release
    data_dir = tmp_path / "data" / "cifar10"  # does not exist yet
    rc = main(["data", "fetch", "--data-dir", str(data_dir), "--url", mirror.url("cifar-10-python.tar.gz")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    hits = mirror.hits
    assert "downloaded and verified" in out.out and hits >= 1
    batches = data_dir / "cifar-10-batches-py"
    assert sorted(p.name for p in batches.iterdir()) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py"]  # the archive is gone
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10"]  # no temporary folder left

    arrays = load_cifar10(data_dir, cache_dir=tmp_path / "cache", expected_counts=None)
    assert arrays.layout == "cifar-10-batches-py" and (arrays.n_train, arrays.n_test) == (650, 200)
    for split, train in (("train", True), ("test", False)):
        x, y = _expected(images, train)
        assert torch.equal(getattr(arrays, f"{split}_x"), x) and torch.equal(getattr(arrays, f"{split}_y"), y)

    # used as the smoke profile uses it: its class-balanced subset, batched by the test loader
    # (no augmentation): each batch is the decoded images normalised, computed here by hand
    small = subset(arrays, 640, 200, seed=0)
    _, test_loader = make_loaders(small, batch_size=64, test_batch_size=50)
    xb, yb = next(iter(test_loader))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.equal(yb, small.test_y[:50])
    assert torch.allclose(xb, (small.test_x[:50].float() / 255 - mean) / std, atol=1e-6)
    assert fingerprint(small) != fingerprint(arrays)

    # a second fetch finds it and downloads nothing
    rc = main(["data", "fetch", "--data-dir", str(data_dir), "--url", mirror.url("cifar-10-python.tar.gz")])
    assert rc == 0 and "nothing fetched" in capsys.readouterr().out and mirror.hits == hits


def test_fetch_into_an_existing_folder_and_load_cifar10_download(tmp_path, release, fake_sums, monkeypatch):
    mirror, _, images = release
    data_dir = tmp_path / "cifar"
    data_dir.mkdir()
    (data_dir / "README").write_text("my notes\n")  # a folder holding other things keeps them
    res = fetch.fetch_cifar10(data_dir, url=mirror.url("cifar-10-python.tar.gz"), progress=False)
    assert res.fetched and res.path == data_dir / "cifar-10-batches-py"
    assert sorted(p.name for p in data_dir.iterdir()) == ["README", "cifar-10-batches-py"]
    assert [p.name for p in tmp_path.iterdir()] == ["cifar"]
    # load_cifar10(download=True) goes through the same fetch ($BKFAC_CIFAR10_URL names the mirror)
    monkeypatch.setenv(fetch.URL_ENV, mirror.url("cifar-10-python.tar.gz"))
    arrays = load_cifar10(tmp_path / "other", cache_dir=tmp_path / "cache", download=True, expected_counts=None)
    x, y = _expected(images, False)
    assert torch.equal(arrays.test_x, x) and torch.equal(arrays.test_y, y)


def test_offline_is_a_clear_message_with_exit_status_2(tmp_path, fake_sums, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tmp_path / "data" / "cifar10"
    rc = main(["data", "fetch", "--data-dir", str(data_dir), "--url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "could not download CIFAR-10" in err and "no network access" in err and "Connection refused" in err
    assert "--data-dir" in err and "BKFAC_DATA_DIR" in err and "class-folder PNG tree" in err  # what to provide
    assert "Traceback" not in err and not [ln for ln in err.splitlines() if not ln.strip()]  # one paragraph
    assert not data_dir.exists() and list((tmp_path / "data").iterdir()) == []  # nothing that looks like data


def test_checksum_mismatch_keeps_nothing(tmp_path, release, fake_sums, capsys):
    mirror, _, _ = release
    data_dir = tmp_path / "d"
    rc = main(["data", "fetch", "--data-dir", str(data_dir), "--url", mirror.url("corrupt.tar.gz")])
    err = capsys.readouterr().err
    assert rc == 2 and "md5" in err and "nothing was kept" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_torchvisions_own_url_unreachable(tmp_path, monkeypatch, capsys):
    """No mirror: torchvision's own URL, every request failing as on a machine without network."""
    import urllib.error

    def refuse(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    monkeypatch.delenv(fetch.URL_ENV, raising=False)
    rc = main(["data", "fetch", "--data-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and torchvision.datasets.CIFAR10.url in err and "Network is unreachable" in err
    assert "Traceback" not in err


def test_a_killed_fetch_leaves_no_data_and_is_cleaned_up(tmp_path, release, fake_sums):
    mirror, _, _ = release
    data_dir = tmp_path / "cifar10"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".cifar10.fetch-{dead.pid}-abc.tmp"
    (stale / "cifar-10-batches-py").mkdir(parents=True)  # a killed download, half extracted
    with pytest.raises(FileNotFoundError):
        load_cifar10(data_dir, cache_dir=tmp_path / "cache")  # never looks like data
    fetch.fetch_cifar10(data_dir, url=mirror.url("cifar-10-python.tar.gz"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10"]


def test_present_data_is_never_fetched(tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the data is there")

    monkeypatch.setattr(fetch, "_torchvision_download", no_download)
    tree = tmp_path / "png"
    for split in ("train", "test"):
        (tree / split / "cat").mkdir(parents=True)
    assert main(["data", "fetch", "--data-dir", str(tree)]) == 0
    assert "png-tree" in capsys.readouterr().out
    (tmp_path / "half" / "train").mkdir(parents=True)  # an incomplete PNG tree is in the way
    assert main(["data", "fetch", "--data-dir", str(tmp_path / "half")]) == 2
    assert "incomplete CIFAR-10 PNG tree" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# make test's data step on a clean clone
# ------------------------------------------------------------------------------------------

SITECUSTOMIZE = """
# the fake release's md5 sums where torchvision looks for them (the test's mirror serves it)
import json, os
import torchvision.datasets
for key, value in json.loads(os.environ["FAKE_CIFAR10_SUMS"]).items():
    setattr(torchvision.datasets.CIFAR10, key, value)
"""


def _make(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_make_data_on_a_clean_clone(tmp_path, release):
    """``make test``'s data step on a fresh clone, BKFAC_DATA_DIR unset, the data reachable only
    through the fetch (the mirror): it downloads into the clone's data/cifar10 before the suite
    would run; a second run fetches nothing; with BKFAC_DATA_DIR set nothing is fetched."""
    mirror, sums, _ = release
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    for rel in ("Makefile", "bkfac/experiments/fetch.py", "bkfac/experiments/data.py", "bkfac/cli.py"):
        shutil.copy2(ROOT / rel, clone / rel)  # the working tree's versions of the files under test
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(SITECUSTOMIZE)
    venv = Path(sys.prefix)  # this interpreter's environment stands in for the clone's .venv
    env = {k: v for k, v in os.environ.items() if k not in ("BKFAC_DATA_DIR", "BKFAC_CACHE_DIR", "PYTHONPATH")}
    env.update(PYTHONPATH=str(patch), FAKE_CIFAR10_SUMS=json.dumps(sums),
               BKFAC_CIFAR10_URL=mirror.url("cifar-10-python.tar.gz"))
    make_vars = [f"VENV={venv}", f"PY={sys.executable}", "-o", f"{venv}/.bkfac-installed"]  # no install
    dry = _make("-n", "test", *make_vars, cwd=clone, env=env)
    assert dry.returncode == 0, dry.stderr
    steps = dry.stdout.splitlines()
    fetch_at = next(i for i, s in enumerate(steps) if "bkfac data fetch" in s)
    assert fetch_at < next(i for i, s in enumerate(steps) if " -m pytest " in s)  # before the suite

    proc = _make("data", *make_vars, cwd=clone, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "downloaded and verified" in proc.stdout and mirror.hits >= 1
    arrays = load_cifar10(clone / "data" / "cifar10", cache_dir=tmp_path / "cache", expected_counts=None)
    assert (arrays.n_train, arrays.n_test) == (650, 200)
    hits = mirror.hits
    again = _make("data", *make_vars, cwd=clone, env=env)
    assert again.returncode == 0 and "nothing fetched" in again.stdout and mirror.hits == hits
    ci = _make("data", *make_vars, cwd=clone, env=dict(env, BKFAC_DATA_DIR=str(tmp_path / "elsewhere")))
    assert ci.returncode == 0 and "nothing fetched" in ci.stdout and not (tmp_path / "elsewhere").exists()
    assert mirror.hits == hits
