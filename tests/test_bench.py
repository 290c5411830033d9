"""The ``bkfac bench linalg`` and ``bkfac bench apply`` parts run end to end (``--quick``) and
write their tables; the shared helpers do what they say. No timing is asserted."""

from __future__ import annotations

import csv
import math

import pytest

from bkfac import bench
from bkfac.bench import apply as bench_apply_mod
from bkfac.bench import linalg as bench_linalg_mod
from bkfac.bench.common import format_table, loglog_slope, machine_info, time_fn, time_interleaved, write_csv_atomic
from bkfac.cli import main


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_bench_linalg_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "linalg", "--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    cols, rows = _read(tmp_path / "linalg.csv")
    assert cols == bench_linalg_mod.ROW_COLUMNS
    dims = bench_linalg_mod.QUICK["dims"]
    assert sorted({int(r["dim"]) for r in rows}) == dims
    assert {r["method"] for r in rows} == {"bupdate", "rsvd", "srevd", "eigh"}
    assert len(rows) == 4 * len(dims)
    for r in rows:
        assert float(r["seconds"]) > 0 and float(r["min_seconds"]) > 0
        assert float(r["state_bytes"]) > 0
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        if r["method"] == "bupdate":
            assert float(r["ratio_to_bupdate"]) == 1.0
        else:
            # every method with a dense factor keeps more state than the B-update at the same dim
            b = next(x for x in rows if x["dim"] == r["dim"] and x["method"] == "bupdate")
            assert int(r["state_bytes"]) > int(b["state_bytes"])
        # all four decompose the same EA factor: leading eigenvalues agree (B-update up to truncation)
        assert float(r["top_eig_rel_diff"]) < 0.05
    scols, slopes = _read(tmp_path / "linalg_slopes.csv")
    assert scols == bench_linalg_mod.SLOPE_COLUMNS
    assert {s["method"] for s in slopes} == {"bupdate", "rsvd", "srevd", "eigh"}
    assert all(math.isfinite(float(s["slope"])) for s in slopes)
    tcols, targets = _read(tmp_path / "linalg_targets.csv")
    assert [t["verdict"] for t in targets][0] == "n/a"  # dim 16385 is not part of --quick
    assert (tmp_path / "linalg.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "float32 (what training uses)" in out and "log-log slope" in out
    # the files written are named relative to the working directory, not by the machine's directories
    assert "wrote linalg.csv, linalg_slopes.csv, linalg_targets.csv, linalg.png" in out and str(tmp_path) not in out


def test_bench_apply_quick(tmp_path):
    rc = main(["bench", "apply", "--quick", "--repeats", "1", "--out", str(tmp_path), "--dtype", "float64",
               "--dims", "40,80"])
    assert rc == 0
    cols, rows = _read(tmp_path / "apply.csv")
    assert cols == bench_apply_mod.ROW_COLUMNS
    assert sorted({int(r["d_A"]) for r in rows}) == [40, 80]
    assert {r["method"] for r in rows} == {"alg8", "lowrank", "dense"}
    for r in rows:
        assert float(r["precondition_s"]) > 0 and float(r["total_s"]) > 0
        # the three applications compute the same step (float64)
        assert float(r["rel_diff_vs_lowrank"]) < 1e-10
    _, targets = _read(tmp_path / "apply_targets.csv")
    assert targets[0]["verdict"] == "n/a"
    assert (tmp_path / "apply.png").stat().st_size > 0


def test_bench_part_not_built_yet(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.PARTS, "ghost", "bkfac.bench.no_such_module_xyz:main")
    assert main(["bench", "ghost", "--out", str(tmp_path)]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_bench_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    with pytest.raises(SystemExit):
        main(["bench", "linalg", "--dims", "12,x"])
    with pytest.raises(SystemExit):
        main(["bench", "linalg", "--repeats", "0"])
    # an unavailable device is a clear error (exit 2), not a crash
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "linalg", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2


def test_helpers(tmp_path):
    assert loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    assert math.isnan(loglog_slope([5], [1]))
    path = write_csv_atomic(tmp_path / "sub" / "t.csv", [{"a": 1, "b": 0.5}, {"a": 2, "b": float("nan")}])
    assert _read(path) == (["a", "b"], [{"a": "1", "b": "0.5"}, {"a": "2", "b": ""}])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.csv"]  # no temp file left behind
    table = format_table([{"x": 1, "y": 2.5}], ["x", "y"], ["X", "Why"])
    assert table.splitlines()[0].split() == ["X", "Why"] and table.splitlines()[2].split() == ["1", "2.5"]
    calls = []
    t = time_fn(lambda: calls.append(1), repeats=3, warmup=1)
    assert len(t.runs) == 3 and len(calls) == 4 and t.median >= 0
    order = []
    ts = time_interleaved({"a": lambda: order.append("a") or "A", "b": lambda: order.append("b")}, repeats=2,
                          keep=True)
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then round-robin
    assert len(ts["a"].runs) == 2 and ts["a"].result == "A"
    info = machine_info("cpu")
    assert info["cpu_cores"] >= 1 and info["torch_version"] and info["cpu_model"]
