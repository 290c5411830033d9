"""Fault injection: ``bkfac train`` killed with SIGKILL at five random moments -- in the middle of a
training step, in the middle of writing ``checkpoint.pt``, just before ``history.csv`` is moved into
place -- and resumed with ``--resume`` each time ends with the results of the uninterrupted run, bit
for bit, and leaves no temp file.

Each attempt is a fresh ``python`` process running this file as a script (``_child``): it arms its
own kill at the chosen moment, then runs ``bkfac.cli.main``; the kill is ``os.kill(pid, SIGKILL)``,
so nothing of Python's clean-up runs. The smoke profile on its synthetic data (640 images, 10 batches
per epoch), b-kfac, 3 epochs: about 40 s on 2 cores in all.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EPOCHS = 3
BATCHES = 10  # smoke: 640 training images in batches of 64
RUN = "b-kfac"
ARGS = ["train", "--profile", "smoke", "--optimizer", RUN, "--synthetic-data", "--quiet", "--epochs", str(EPOCHS),
        "--resume"]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _child(moment: str, out: str) -> None:
    """Arm the kill described by ``moment``, then train (resuming whatever ``out`` holds)."""
    torch.set_num_threads(1)
    kind, _, arg = moment.partition(":")
    count = [0]
    if kind == "step":  # during the forward pass of the n-th training step of this process
        import torch.nn.functional as F

        real_ce, n = F.cross_entropy, int(arg)

        def ce(*a, **k):
            if k.get("reduction", "mean") == "mean":  # a training step (evaluation sums)
                count[0] += 1
                if count[0] == n:
                    _die()
            return real_ce(*a, **k)

        F.cross_entropy = ce
    elif kind == "save":  # after a fraction of the bytes of the k-th checkpoint have reached its temp file
        k, frac = int(arg.split(",")[0]), float(arg.split(",")[1])
        real_save = torch.save

        def save(obj, f, *a, **kw):
            count[0] += 1
            if count[0] != k:
                return real_save(obj, f, *a, **kw)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            f.write(buf.getvalue()[: int(frac * len(buf.getvalue()))])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = save
    elif kind == "replace":  # the k-th history.csv fully written to its temp file, not yet moved into place
        k = int(arg)
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if Path(dst).name == "history.csv":
                count[0] += 1
                if count[0] == k:
                    _die()
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    from bkfac.cli import main

    sys.exit(main([*ARGS, "--out", out]))


def _train(moment: str, out: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, __file__, moment, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode


def _same(a, b, where="") -> None:
    """Recursive bitwise equality of checkpoint contents (tensors with torch.equal)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


TIMING = ("epoch_seconds", "train_seconds", "eval_seconds", "t_data", "t_forward_backward", "t_statistics",
          "t_inverse", "t_precondition", "t_rest")


def _untimed(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.mark.timeout(600)
def test_kill_9_at_five_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    from bkfac.experiments.results import inspect_run, load_checkpoint, read_csv

    rng = random.Random(21)
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    assert _train("none", ref_root) == 0
    folder = root / "smoke-synthetic" / RUN / "seed0"
    kinds = ["save", "step", "replace", "save", "step"]
    rng.shuffle(kinds)
    moments, leftovers = [], []
    for kind in kinds:
        done = inspect_run(folder)["checkpoint_epoch"] or 0 if folder.exists() else 0
        remaining = EPOCHS - done
        assert remaining >= 1
        if kind == "step":
            moment = f"step:{rng.randint(1, remaining * BATCHES)}"
        elif kind == "save":
            moment = f"save:{rng.randint(1, remaining)},{rng.uniform(0.05, 0.95):.3f}"
        else:
            moment = f"replace:{rng.randint(1, remaining)}"
        moments.append(moment)
        assert _train(moment, root) == -signal.SIGKILL, moment  # the kill landed before the run ended
        assert inspect_run(folder)["state"] in ("partial", "empty"), moment  # never a mix, never 'done'
        leftovers += [p.name for p in folder.glob(".*.tmp")]
    assert any(k == "save" for k in kinds) and any(n.startswith(".checkpoint.pt.") for n in leftovers), leftovers
    assert any(n.startswith(".history.csv.") for n in leftovers), leftovers
    assert _train("none", root) == 0
    assert inspect_run(folder)["state"] == "done"
    assert not list(folder.glob(".*.tmp")), list(folder.iterdir())  # the resumed run cleaned up
    ref_folder = ref_root / "smoke-synthetic" / RUN / "seed0"
    ref_hist, hist = read_csv(ref_folder / "history.csv"), read_csv(folder / "history.csv")
    assert len(hist) == EPOCHS and _untimed(hist) == _untimed(ref_hist), moments
    ref_ck, ck = load_checkpoint(ref_folder / "checkpoint.pt"), load_checkpoint(folder / "checkpoint.pt")
    for key in ("model", "optimizer", "rng", "epoch", "seed", "inputs_hash", "lr_scheduler"):
        _same(ck[key], ref_ck[key], key)
    _same(_untimed(ck["history"]), _untimed(ref_ck["history"]), "history")
    import json

    ref_s, s = (json.loads((f / "summary.json").read_text()) for f in (ref_folder, folder))
    for key in ("epochs_run", "final_test_acc", "best_test_acc", "epochs_to_15", "epochs_to_20", "inputs_hash"):
        assert s[key] == ref_s[key], key


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
