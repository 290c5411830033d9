"""Data-parallel K-FACs on torch.distributed (gloo, CPU, loopback): 2 ranks with batch n each
follow the same trajectory as one process with batch 2n (float64), each factor's representation
is computed on exactly one rank, checkpoints resume across world sizes, and bad configurations
end with a clear error on every rank."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.distributed import (
    CommunicationError,
    DistributedLaunchError,
    TorchDistributedComm,
    assign_factors,
    check_batch,
    gather_state_dict,
    launch,
    load_full_state_dict,
)

N_LOCAL = 4  # per-rank batch
WORLD = 2
STEPS = 10
CKPT = 5
PG_TIMEOUT = 30.0
HANG_TIMEOUT = 3.0

COMMON = dict(lr=0.05, weight_decay=1e-3, momentum=0.5, damping_phi=0.1, rank=16, oversample=4, power_iters=2,
              t_updt=1, t_inv=3, seed=7)
# method -> (extra hyper-parameters, wrap the model in DDP?)
METHODS = {
    "k-fac": ({}, True),
    "r-kfac": ({}, False),  # explicit gradient all-reduce by the comm
    "b-kfac": ({"t_brand": 1}, True),
    "b-r-kfac": ({"t_brand": 1, "t_rsvd": 3}, False),
}


def make_model(device="cpu"):
    """Conv (A: d=28 -> r-kfac path; G: eigh) and a wide FC layer (d=257 > n_M + r -> B-updates)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10),
    ).double().to(device)


def batch(k):
    """The global batch of step k (2n samples); rank r takes rows [r n, (r+1) n)."""
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(WORLD * N_LOCAL, 3, 8, 8, generator=g, dtype=torch.float64), \
        torch.randint(0, 10, (WORLD * N_LOCAL,), generator=g)


def build(name, model, comm=None):
    extra, _ = METHODS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        common = {k: v for k, v in COMMON.items() if k in bkfac.hyper_names(name)}  # k-fac: no rank
        return bkfac.make_optimizer(name, model, defaults=None, comm=comm, **common, **extra)


def run(model, opt, start, stop, rank=None):
    device = next(model.parameters()).device
    for k in range(start, stop):
        x, y = (t.to(device) for t in batch(k))
        if rank is not None:
            x, y = x[rank * N_LOCAL:(rank + 1) * N_LOCAL], y[rank * N_LOCAL:(rank + 1) * N_LOCAL]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def single_process(name, device="cpu"):
    """Reference: one process, LocalComm, the concatenated batch. Returns the final parameters,
    the per-factor update counts, and a checkpoint at step CKPT."""
    model = make_model(device)
    opt = build(name, model)
    run(model, opt, 0, CKPT)
    ckpt = copy.deepcopy({"model": params(model), "opt": opt.state_dict()})  # state_dict() aliases live tensors
    run(model, opt, CKPT, STEPS)
    updates = {(L.capture.name, f): inv.updates for L in opt.layers for f, inv in (("A", L.inv_A), ("G", L.inv_G))}
    methods = {(r["layer"], r["factor"]): r["method"] for r in opt.describe()}
    return params(model), updates, methods, ckpt


def _train_worker(rank, names, ckpts, device="cpu"):
    out = {}
    for name in names:
        _, use_ddp = METHODS[name]
        model = make_model(device)
        net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
        comm = TorchDistributedComm()
        opt = build(name, net, comm)
        run(net, opt, 0, CKPT, rank)
        full = copy.deepcopy(gather_state_dict(opt))  # like state_dict(), it aliases live tensors
        model_at_ckpt = params(model)
        run(net, opt, CKPT, STEPS, rank)
        dense_elsewhere = [
            (L.capture.name, f) for L in opt.layers for f, inv in (("A", L.inv_A), ("G", L.inv_G))
            if not comm.is_owner((L.capture.name, f)) and inv.factor is not None
        ]
        # resume the one-process checkpoint of step CKPT on this world size
        model2 = make_model(device)
        model2.load_state_dict(ckpts[name]["model"])
        net2 = nn.parallel.DistributedDataParallel(model2) if use_ddp else model2
        comm2 = TorchDistributedComm()
        opt2 = build(name, net2, comm2)
        load_full_state_dict(opt2, ckpts[name]["opt"])
        dense_elsewhere2 = [
            (L.capture.name, f) for L in opt2.layers for f, inv in (("A", L.inv_A), ("G", L.inv_G))
            if not comm2.is_owner((L.capture.name, f)) and inv.factor is not None
        ]
        run(net2, opt2, CKPT, STEPS, rank)
        out[name] = dict(
            params=params(model), assignment=comm.assignment(), counts=comm.update_counts,
            max_computers=comm.max_computers, dense_elsewhere=dense_elsewhere + dense_elsewhere2,
            full=full, model_at_ckpt=model_at_ckpt, resumed=params(model2),
            prefix="module." if use_ddp else "",
        )
    return out


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_two_ranks(names, device):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with the ranks
    try:
        refs = {name: single_process(name, device) for name in names}
    finally:
        torch.set_num_threads(threads)
    ckpts = {name: refs[name][3] for name in names}
    t0 = time.perf_counter()
    out = launch(_train_worker, WORLD, names, ckpts, device, timeout=PG_TIMEOUT, threads=1)
    print(f"2-rank run: {time.perf_counter() - t0:.1f}s")
    for name in names:
        ref_params, ref_updates, ref_methods, _ = refs[name]
        r0, r1 = out[0][name], out[1][name]
        prefix = r0["prefix"]
        # 1. same trajectory as one process on the concatenated batch (float64)
        for r in (r0, r1):
            assert _max_diff(r["params"], ref_params) < 1e-8, (name, _max_diff(r["params"], ref_params))
        # both code paths ran: B-updates (b-variants) / RSVD (r-kfac and the conv A-factor)
        methods = set(ref_methods.values())
        if name.startswith("b-"):
            assert methods & {"brand", "brand+rsvd"} and "rsvd" in methods, methods
        if name == "r-kfac":
            assert "rsvd" in methods, methods
        # 2. each factor's updates were computed on exactly one rank: its owner, as often as in one process
        a = r0["assignment"]
        assert a == r1["assignment"] and set(a.values()) == {0, 1}, a
        assert r0["counts"] == r1["counts"]
        assert r0["max_computers"] == 1 and r1["max_computers"] == 1
        for key, counts in r0["counts"].items():
            owner = a[key]
            assert counts[owner] == ref_updates[(key[0][len(prefix):], key[1])] > 0, (name, key, counts)
            assert counts[1 - owner] == 0, (name, key, counts)
        assert set(r0["counts"]) == set(a) and len(a) == len(ref_updates)
        # non-owners never keep the dense factor
        assert r0["dense_elsewhere"] == [] and r1["dense_elsewhere"] == [], (name, r0["dense_elsewhere"])
        # 3. checkpoint of the 2-rank run (gathered on rank 0) resumes in one process
        assert r1["full"] is None
        model = make_model(device)
        model.load_state_dict(r0["model_at_ckpt"])
        opt = build(name, model)
        load_full_state_dict(opt, r0["full"])
        run(model, opt, CKPT, STEPS)
        assert _max_diff(params(model), ref_params) < 1e-8, name
        # ... and the one-process checkpoint resumes on 2 ranks
        for r in (r0, r1):
            assert _max_diff(r["resumed"], ref_params) < 1e-8, name


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_and_sharding():
    _check_two_ranks(list(METHODS), "cpu")


def _nccl_worker(rank):
    comm = TorchDistributedComm()
    model = make_model("cuda")
    opt = build("b-r-kfac", model, comm)
    run(model, opt, 0, STEPS)  # world size 1: the whole batch
    return dict(device=str(comm.device), backend=comm.backend, params=params(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(240)
def test_cuda_two_gloo_ranks_and_nccl():
    """On a CUDA machine: 2 gloo ranks with the model on the GPU (the comm stages through the
    CPU) match one process; nccl (one rank per GPU; here one) runs and matches too."""
    _check_two_ranks(["b-kfac", "b-r-kfac"], "cuda")
    (res,) = launch(_nccl_worker, 1, backend="nccl", timeout=PG_TIMEOUT)
    assert res["backend"] == "nccl" and res["device"].startswith("cuda"), res
    model = make_model("cuda")
    opt = build("b-r-kfac", model)
    run(model, opt, 0, STEPS)
    assert _max_diff(res["params"], params(model)) < 1e-8


def test_assignment_is_greedy_lpt_and_deterministic():
    costs = {("a", "A"): 10.0, ("a", "G"): 1.0, ("b", "A"): 7.0, ("b", "G"): 5.0, ("c", "A"): 4.0}
    a = assign_factors(costs, 2)
    # LPT by hand: 10 -> r0; 7 -> r1; 5 -> r1 (7 < 10); 4 -> r0 (10 < 12); 1 -> r1 (12 < 14)
    assert a == {("a", "A"): 0, ("b", "A"): 1, ("b", "G"): 1, ("c", "A"): 0, ("a", "G"): 1}
    assert assign_factors(costs, 2) == a
    assert set(assign_factors(costs, 1).values()) == {0}
    with pytest.raises(ValueError, match="world_size"):
        assign_factors(costs, 0)


def test_check_batch():
    assert check_batch(256, 4) == 64
    with pytest.raises(ValueError, match="global_batch=9 is not divisible by world_size=2"):
        check_batch(9, 2)
    with pytest.raises(ValueError, match="world_size"):
        check_batch(8, 0)


def test_comm_needs_a_process_group():
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributedComm()


# -- bad configurations end with a clear error on every rank --------------------------------------------

def _batch_worker(rank, global_batch):
    local = check_batch(global_batch, dist.get_world_size())
    return local


def _hyper_worker(rank):
    model = make_model()
    bkfac.make_optimizer("b-kfac", model, defaults=None, comm=TorchDistributedComm(), rank=16, t_brand=1,
                         rho=0.95 if rank == 0 else 0.9)
    return "built"


def _failing_worker(rank, mode):
    model = make_model()
    opt = build("b-kfac", model, TorchDistributedComm())
    for k in range(STEPS):
        if rank == 1 and k == 2:
            if mode == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(HANG_TIMEOUT + 2.0)  # 'hang' longer than the process group's timeout, then leave
            raise RuntimeError("rank 1 woke up after hanging")
        run(model, opt, k, k + 1, rank)
    return "finished"


@pytest.mark.timeout(60)
def test_batch_not_divisible_fails_on_every_rank():
    with pytest.raises(ValueError, match="not divisible"):
        launch(_batch_worker, 2, 9, global_batch=9)  # checked before any process starts
    with pytest.raises(DistributedLaunchError) as info:
        launch(_batch_worker, 2, 9, timeout=PG_TIMEOUT)
    errors = info.value.errors
    assert sorted(errors) == [0, 1]  # every rank ends with an error, none hangs
    for kind, msg, _ in errors.values():  # each rank raises the clear error itself
        assert kind == "ValueError" and "not divisible by world_size=2" in msg, (kind, msg)
    assert launch(_batch_worker, 2, 8, timeout=PG_TIMEOUT) == [4, 4]


@pytest.mark.timeout(60)
def test_mismatched_hyperparameters_fail_on_every_rank():
    with pytest.raises(DistributedLaunchError) as info:
        launch(_hyper_worker, 2, timeout=PG_TIMEOUT)
    errors = info.value.errors
    assert sorted(errors) == [0, 1], errors
    for kind, msg, _ in errors.values():
        assert kind == "ValueError" and "'rho'" in msg and "rank 0 = 0.95" in msg and "rank 1 = 0.9" in msg, msg
        assert "'lr'" not in msg  # only the differing key is named


@pytest.mark.timeout(60)
def test_failing_rank_ends_every_rank():
    t0 = time.perf_counter()
    with pytest.raises(DistributedLaunchError) as info:
        launch(_failing_worker, 2, "raise", timeout=PG_TIMEOUT)
    elapsed = time.perf_counter() - t0
    errors = info.value.errors
    assert sorted(errors) == [0, 1], errors
    assert errors[1][0] == "RuntimeError" and "injected failure on rank 1" in errors[1][1]
    assert errors[0][0] == CommunicationError.__name__ and "another rank probably failed" in errors[0][1], errors[0]
    assert elapsed < PG_TIMEOUT  # the peer's exit is noticed at once, not after the timeout


@pytest.mark.timeout(60)
def test_hanging_rank_times_out():
    t0 = time.perf_counter()
    with pytest.raises(DistributedLaunchError) as info:
        launch(_failing_worker, 2, "hang", timeout=HANG_TIMEOUT)
    elapsed = time.perf_counter() - t0
    errors = info.value.errors
    assert sorted(errors) == [0, 1], errors
    # rank 0 gave up on its own, by the process group's timeout, while rank 1 was still asleep
    assert errors[0][0] == CommunicationError.__name__ and "Timed out" in errors[0][1], errors[0]
    assert errors[1][0] == "RuntimeError" and "woke up" in errors[1][1]
    assert elapsed < 40, elapsed


def _gather_worker(rank):
    comm = TorchDistributedComm()  # not bound to an optimizer: exchanges the column counts per call
    g = torch.Generator().manual_seed(rank)
    M = torch.randn(5, 3 + 2 * rank, dtype=torch.float64, generator=g)  # ranks with 3 and 5 columns
    return comm.gather_columns(M)


@pytest.mark.timeout(60)
def test_gather_columns_with_uneven_batches():
    out = launch(_gather_worker, 2, timeout=PG_TIMEOUT)
    blocks = [torch.randn(5, 3 + 2 * r, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
              for r in range(2)]
    expected = torch.cat(blocks, dim=1) / 2**0.5  # [M_1 M_2] / sqrt(W): M M^T = mean of the ranks' factors
    for got in out:
        assert got.shape == (5, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got @ got.mT, 0.5 * sum(b @ b.mT for b in blocks))


@pytest.mark.timeout(120)
def test_bench_distributed_quick(tmp_path):
    """``bkfac bench distributed``'s measurement runs on 1 and 2 ranks and fills every column
    (no timing is asserted)."""
    from bkfac.bench.common import write_csv_atomic
    from bkfac.bench.distributed import PHASES, ROW_COLUMNS, bench_distributed

    rows = bench_distributed(configs=((1, 1), (2, 1)), quick=True, steps=1, methods=("sgd", "b-kfac"))
    assert [(r["method"], r["world_size"]) for r in rows] == [("sgd", 1), ("b-kfac", 1), ("sgd", 2), ("b-kfac", 2)]
    for r in rows:
        assert r["local_batch"] * r["world_size"] == r["global_batch"]
        assert all(r[f"{p}_s"] >= 0 for p in PHASES) and r["step_s"] > 0 and r["samples_per_s"] > 0
        if r["method"] == "b-kfac":
            assert "brand" in r["methods"] and r["inverse_s"] > 0 and r["statistics_s"] > 0
            assert (r["comm_s"] > 0) == (r["world_size"] > 1) and r["balance"] >= 1.0
    path = write_csv_atomic(tmp_path / "distributed.csv", rows, ROW_COLUMNS)
    assert path.read_text().splitlines()[0].split(",") == ROW_COLUMNS
