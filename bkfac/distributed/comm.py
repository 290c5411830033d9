"""``TorchDistributedComm``: the K-FAC family's communication on ``torch.distributed``.

Data-parallel K-FAC (every process runs the same model on its share of the global batch):

* **statistics** -- the batch matrices ``A_k``, ``G_k`` (Sec. 2.1; ``A_k A_k^T`` is the batch
  factor) of the ranks are all-gathered, ``[M_1 ... M_W] / sqrt(W)``, so the owner of a
  factor sees the *global* batch's columns: ``M M^T`` is the mean of the ranks' batch
  factors, exactly the factor of the concatenated batch when the ranks' batches have equal
  size. The mixed policy of Sec. 3.5 (B-updates where ``d > n_M + r``) then uses the global
  ``n_M`` (the optimizer multiplies its local count by ``world_size``);
* **inverse work sharding** -- each factor ``(layer_name, 'A'|'G')`` is *owned* by exactly
  one rank (:func:`assign_factors`, greedy longest-processing-time on the per-step cost of
  its method, :func:`factor_cost`). Only the owner keeps the dense EA factor (eq. 5) and
  computes the representation (eigh, RSVD/SREVD of Alg. 1 l.13, the B-update of Alg. 3/4,
  the overwrite of Alg. 5, the correction of Alg. 6-7);
* **synchronisation** -- after the inverse phase the owners broadcast the representations
  ``(U, d)`` they updated (one all-gather of a small header, then one broadcast per owner
  carrying all its updated factors), so every rank applies the same preconditioner
  (Alg. 1 l.16-17 or Alg. 8);
* **gradients** -- averaged with one coalesced all-reduce when the model is not wrapped in
  ``DistributedDataParallel`` (a no-op with DDP, which already averages them).

The optimizer's randomized parts use one generator per factor (seeded from the optimizer's
``seed`` and the factor's position), so a run gives the same result on any world size.
"""

from __future__ import annotations

import hashlib
import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "TorchDistributedComm",
    "CommunicationError",
    "assign_factors",
    "factor_cost",
    "hyperparameters",
]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class CommunicationError(RuntimeError):
    """A collective failed: another rank failed or left, or the process group timed out."""


def _v(x, epoch: int = 1):
    return x(epoch) if callable(x) else x


def factor_cost(inv, n_M: int | None) -> float:
    """Estimated flops per step of keeping factor ``inv``'s representation up to date.

    ============================  =====================================================
    method                        cost (per step, amortised over the method's periods)
    ============================  =====================================================
    dense EA update (eq. 5)       ``d^2 n_M / T_updt`` when the method keeps the factor
    ``eigh`` (k-fac)              ``d^3 / T_inv``
    ``rsvd`` / ``srevd``          ``d^2 (r + r_o)(q + 1) / T_inv`` (q power iterations)
    ``brand`` (Alg. 3-4)          ``d (r + n_M)^2 / T_brand``
    ``brand+rsvd`` (Alg. 5)       B-update + ``d^2 (r + r_o)(q + 1) / T_rsvd``
    ``brand+correction`` (Alg. 7) B-update + ``d^2 phi_crc r / T_corct``
    ============================  =====================================================
    """
    d = float(inv.dim)
    n = float(n_M or 1)
    method = inv.method
    cost = d * d * n / inv.t_updt if inv.needs_dense else 0.0
    if method == "eigh":
        return cost + d**3 / inv.t_inv
    r = float(inv.rank)
    ro = float(inv.oversample)
    q = float(inv.power_iters)
    if method in ("rsvd", "srevd"):
        return cost + d * d * (r + ro) * (q + 1) / inv.t_inv
    cost += d * (r + n) ** 2 / inv.t_brand
    if method == "brand+rsvd":
        cost += d * d * (r + ro) * (q + 1) / inv.t_rsvd
    elif method == "brand+correction":
        cost += d * d * inv.phi_crc * r / inv.t_corct
    return cost


def assign_factors(costs: dict, world_size: int) -> dict:
    """Greedy longest-processing-time assignment: factors by decreasing cost (ties: the
    order of ``costs``), each to the least loaded rank (ties: the lowest rank).

    Deterministic: every rank computes the same assignment from the same ``costs``.
    Returns ``{key: rank}``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(enumerate(costs.items()), key=lambda t: (-t[1][1], t[0]))
    load = [0.0] * world_size
    out = {}
    for _, (key, cost) in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[key] = rank
        load[rank] += cost
    return {key: out[key] for key in costs}


def hyperparameters(optimizer) -> dict:
    """The settings that must agree on every rank, as ``{name: repr}`` (for the check at bind)."""
    opt = optimizer
    rows = {
        "algorithm": opt.algorithm,
        "lr": [g["lr"] for g in opt.param_groups],
        "weight_decay": [g["weight_decay"] for g in opt.param_groups],
        "momentum": [g["momentum"] for g in opt.param_groups],
        "damping_phi": opt.damping_phi,
        "rho": opt.rho,
        "t_updt": opt.t_updt,
        "t_inv": opt.t_inv,
        "rank": opt.rank,
        "oversample": opt.oversample,
        "power_iters": opt.power_iters,
        "clip": opt.clip,
        "clip_mode": opt.clip_mode,
        "fisher": opt.fisher,
        "loss_reduction": opt.capture.reduction,
        "spectrum_continuation": opt.continuation,
        "linear_time": opt.linear_time,
        "alg8_backward": opt.alg8_backward,
        "policy": opt.policy,
        "min_damping": opt.min_damping,
        "seed": opt.seed,
        "factor_dtype": opt.factor_dtype,
        "lr_schedule": opt.lr_schedule,
        "layers": [(L.capture.kind, L.capture.d_A, L.capture.d_G) for L in opt.layers],
        "parameters": [tuple(p.shape) for g in opt.param_groups for p in g["params"]],
    }
    for key, value in sorted(opt.method_kw.items()):
        rows[key] = value
    return {k: _canon(v) for k, v in rows.items()}


def _canon(v) -> str:
    """A repr that is equal on every rank for equal settings (a plain function's repr holds
    its address: use its qualified name)."""
    from ..optim.schedules import EpochSchedule

    if callable(v) and not isinstance(v, (EpochSchedule, type)):
        name = getattr(v, "__qualname__", None) or type(v).__qualname__
        return f"<callable {getattr(v, '__module__', '?')}.{name}>"
    return repr(v)


class TorchDistributedComm:
    """The ``comm`` of :class:`~bkfac.optim.kfac.KFACFamily` on an initialised ``torch.distributed``
    process group (gloo on CPU, nccl on CUDA). See the module docstring for the scheme.

    Keyword-only arguments:

    average_gradients: average ``p.grad`` over the ranks in :meth:`all_reduce_gradients`.
        ``None`` (default): yes, unless the optimizer's model is a
        ``DistributedDataParallel`` (which averages them already). Pass ``False`` when the
        optimizer is built on ``ddp.module``.
    group: the process group (default: the world).
    device: where the collectives run (default: the current CUDA device for nccl, else CPU).
    timeout: of the ``monitored_barrier`` at bind (default: the one given to
        :func:`~bkfac.distributed.init_distributed`, else 30 min).
    check_hyperparameters: all-gather :func:`hyperparameters` at :meth:`bind` (when the
        optimizer is built) and raise ``ValueError`` on every rank naming the keys that differ.

    Inspection: :meth:`assignment` (``{(layer, 'A'|'G'): rank}``), ``update_counts``
    (``{key: [updates computed on rank 0, rank 1, ...]}``, identical on every rank),
    ``max_computers`` (the largest number of ranks that computed one factor's update in one
    step: 1 when the sharding is right), ``seconds`` (time in the collectives, per kind).
    """

    def __init__(self, *, average_gradients: bool | None = None, group=None, device=None,
                 check_hyperparameters: bool = True, timeout: float | timedelta | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributedComm needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(...) (bkfac.distributed.init_distributed or "
                "bkfac.distributed.launch do it) before building the optimizer"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = str(dist.get_backend(group))
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        self.average_gradients = average_gradients
        if timeout is None:
            timeout = _TIMEOUT[0]
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self.check_hyperparameters = check_hyperparameters
        self.optimizer = None
        self._assignment: dict | None = None
        self._checked_assignment = False
        self._seen: dict = {}  # key -> (id(inv), inv.updates) after the last sync
        self._uniform = False  # this step's captured shapes agree on every rank
        self.update_counts: dict = {}
        self.max_computers = 0
        self.seconds = {"gather": 0.0, "sync": 0.0, "gradients": 0.0, "checkpoint": 0.0}

    # -- helpers -----------------------------------------------------------------------------------
    def _src(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _collective(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as exc:  # RuntimeError, DistBackendError, DistNetworkError, ...
            raise CommunicationError(
                f"rank {self.rank}/{self.world_size}: collective '{what}' failed -- another rank probably "
                f"failed or left, or the process group timed out: {type(exc).__name__}: {exc}"
            ) from exc

    # -- binding and checks ------------------------------------------------------------------------
    def bind(self, optimizer) -> None:
        """Called by the optimizer at construction (collective): remember it, decide whether
        gradients are averaged here, and check that every rank has the same hyper-parameters."""
        self.optimizer = optimizer
        if self.average_gradients is None:
            from torch.nn.parallel import DistributedDataParallel

            self.average_gradients = not isinstance(optimizer.model, DistributedDataParallel)
        self.reset()
        if self.world_size > 1 and self.check_hyperparameters:
            self.check_same(hyperparameters(optimizer), what="hyper-parameters")

    def check_same(self, values: dict, what: str = "settings") -> None:
        """All-gather ``values`` (``{name: comparable}``) and raise ``ValueError`` on every rank,
        naming each key whose value differs between ranks."""
        if self.world_size == 1:
            return
        if self.backend == "gloo":  # names the ranks that never arrive (gloo only)
            self._collective("monitored_barrier", dist.monitored_barrier, group=self.group,
                             timeout=self.timeout, wait_all_ranks=True)
        gathered = [None] * self.world_size
        self._collective(f"all_gather_object({what})", dist.all_gather_object, gathered, values, group=self.group)
        keys = sorted(set().union(*(g.keys() for g in gathered)))
        diffs = []
        for key in keys:
            vals = [g.get(key, "<missing>") for g in gathered]
            if any(v != vals[0] for v in vals[1:]):
                per_rank = ", ".join(f"rank {r} = {v}" for r, v in enumerate(vals))
                diffs.append(f"{key!r} ({per_rank})")
        if diffs:
            raise ValueError(f"{what} differ across ranks: " + "; ".join(diffs))

    def reset(self) -> None:
        """Forget the assignment and take the current representations as the baseline of the
        update tracking (call after loading a state dict)."""
        self._assignment = None
        self._checked_assignment = False
        self._seen = {}
        if self.optimizer is not None:
            for key, inv in self._inverses().items():
                self._seen[key] = (id(inv), inv.updates)

    def _inverses(self) -> dict:
        out = {}
        for L in self.optimizer.layers:
            for fac, inv in (("A", L.inv_A), ("G", L.inv_G)):
                if inv is not None:
                    out[(L.capture.name, fac)] = inv
        return out

    # -- ownership ---------------------------------------------------------------------------------
    def assignment(self) -> dict:
        """``{(layer_name, 'A'|'G'): owning rank}`` for the factors whose method is known
        (after the optimizer's first step or a loaded state dict); ``{}`` before."""
        if self.optimizer is None:
            return {}
        invs = self._inverses()
        if self._assignment is None or set(self._assignment) != set(invs):
            n_M = {L.capture.name: L.n_M for L in self.optimizer.layers}
            costs = {key: factor_cost(inv, n_M[key[0]]) for key, inv in invs.items()}
            self._assignment = assign_factors(costs, self.world_size)
            self._checked_assignment = False
        return dict(self._assignment)

    def costs(self) -> dict:
        """``{key: estimated flops per step}`` (what :meth:`assignment` balances)."""
        n_M = {L.capture.name: L.n_M for L in self.optimizer.layers}
        return {key: factor_cost(inv, n_M[key[0]]) for key, inv in self._inverses().items()}

    def is_owner(self, key) -> bool:
        if self.world_size == 1:
            return True
        if self.optimizer is None:
            raise RuntimeError("TorchDistributedComm is not bound to an optimizer (pass it as comm= to the optimizer)")
        a = self._assignment if self._assignment is not None and key in self._assignment else self.assignment()
        if key not in a:
            raise KeyError(f"factor {key!r} is not known to the assignment")
        return a[key] == self.rank

    # -- the optimizer's calls ---------------------------------------------------------------------
    def gather_columns(self, M: Tensor) -> Tensor:
        """``[M_1 ... M_W] / sqrt(W)`` of the ranks' ``d x n_r`` batch matrices (ranks may have
        different ``n_r``; the row counts must agree)."""
        if self.world_size == 1:
            return M
        t0 = time.perf_counter()
        rows = M.mT.to(self.device).contiguous()  # n_r x d: the contiguous side of a batch matrix
        if self._uniform:  # this step's captured shapes agree on every rank (see all_reduce_gradients)
            counts = [rows.shape[0]] * self.world_size
        else:
            sizes = torch.tensor([rows.shape[0], rows.shape[1]], dtype=torch.int64, device=self.device)
            all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
            self._collective("all_gather(batch sizes)", dist.all_gather, all_sizes, sizes, group=self.group)
            counts = [int(s[0]) for s in all_sizes]
            dims = {int(s[1]) for s in all_sizes}
            if len(dims) != 1:
                raise ValueError(f"rank {self.rank}: batch matrices have different row counts across ranks: {sorted(dims)}")
        top = max(counts)
        if rows.shape[0] < top:
            rows = torch.cat([rows, rows.new_zeros(top - rows.shape[0], rows.shape[1])])
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        self._collective("all_gather(batch matrix)", dist.all_gather, parts, rows, group=self.group)
        if any(c != top for c in counts):
            parts = [p[:c] for p, c in zip(parts, counts)]
        out = torch.cat(parts).mT.div_(math.sqrt(self.world_size)).to(M.device)
        self.seconds["gather"] += time.perf_counter() - t0
        return out

    def all_reduce_gradients(self, params) -> None:
        """Average ``p.grad`` over the ranks (one all-reduce per dtype); a no-op with DDP.

        Called first in every step, it also all-gathers the shapes of this step's captured
        layer inputs and output gradients (one small collective): when they agree on every
        rank, :meth:`gather_columns` skips its per-call exchange of batch sizes.
        """
        if self.world_size == 1:
            return
        t0 = time.perf_counter()
        self._exchange_shapes()
        if not self.average_gradients:
            self.seconds["gradients"] += time.perf_counter() - t0
            return
        by_dtype: dict = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for dtype in sorted(by_dtype, key=str):
            grads = by_dtype[dtype]
            flat = torch.cat([g.reshape(-1).to(self.device) for g in grads])
            self._collective("all_reduce(gradients)", dist.all_reduce, flat, group=self.group)
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        self.seconds["gradients"] += time.perf_counter() - t0

    def _exchange_shapes(self) -> None:
        self._uniform = False
        if self.optimizer is None:
            return
        sig = []
        for L in self.optimizer.layers:
            for t in (L.capture.inputs, L.capture.grad_outputs):
                shape = list(t.shape) if t is not None else []
                sig += (shape + [-1] * 6)[:6] + [len(shape)]
        sig = torch.tensor(sig or [0], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(sig) for _ in range(self.world_size)]
        self._collective("all_gather(captured shapes)", dist.all_gather, parts, sig, group=self.group)
        self._uniform = all(torch.equal(p, parts[0]) for p in parts[1:])

    def sync_representations(self, invs: dict) -> None:
        """Give every rank the owners' ``(U, d)`` of the factors updated this step.

        One all-gather of a ``W x K x 5`` header (per rank and factor: updated?, rows, cols,
        update count, dtype), then, per owner with updated factors, one broadcast of all of
        them packed. Also counts, per factor, on which rank each update was computed.
        """
        keys = list(invs)
        if self.world_size == 1 or not keys:
            for key in keys:
                computed, _ = self._computed(key, invs[key])
                self.update_counts.setdefault(key, [0] * self.world_size)[0] += int(computed)
                self.max_computers = max(self.max_computers, int(computed))
                self._seen[key] = (id(invs[key]), invs[key].updates)
            return
        t0 = time.perf_counter()
        if not self._checked_assignment:
            self.check_same({"assignment": sorted((repr(k), v) for k, v in self.assignment().items())},
                            what="factor assignments")
            self._checked_assignment = True
        header = torch.zeros(len(keys), 5, dtype=torch.int64)
        for j, key in enumerate(keys):
            inv = invs[key]
            computed, renewed = self._computed(key, inv)
            owner = self.is_owner(key)
            if (computed or (owner and renewed)) and inv.U is not None:
                flag = 1 if computed else 2  # 2: only a re-broadcast, not a computation
                header[j] = torch.tensor([flag, inv.U.shape[0], inv.U.shape[1], inv.updates,
                                          _DTYPES.index(inv.U.dtype)])
        header = header.to(self.device)
        gathered = [torch.empty_like(header) for _ in range(self.world_size)]
        self._collective("all_gather(representation header)", dist.all_gather, gathered, header, group=self.group)
        H = torch.stack(gathered).cpu()  # W x K x 5
        assignment = self.assignment()
        sources: dict = {}
        for j, key in enumerate(keys):
            computed_on = [r for r in range(self.world_size) if int(H[r, j, 0]) == 1]
            counts = self.update_counts.setdefault(key, [0] * self.world_size)
            for r in computed_on:
                counts[r] += 1
            self.max_computers = max(self.max_computers, len(computed_on))
            owner = assignment[key]
            if int(H[owner, j, 0]) > 0:
                sources.setdefault((owner, int(H[owner, j, 4])), []).append(j)
        for (src, code), js in sorted(sources.items()):
            dtype = _DTYPES[code]
            total = sum(int(H[src, j, 1]) * int(H[src, j, 2]) + int(H[src, j, 2]) for j in js)
            if self.rank == src:
                buf = torch.cat([t.reshape(-1).to(device=self.device, dtype=dtype)
                                 for j in js for t in (invs[keys[j]].U, invs[keys[j]].d)])
            else:
                buf = torch.empty(total, dtype=dtype, device=self.device)
            self._collective("broadcast(representations)", dist.broadcast, buf, src=self._src(src), group=self.group)
            if self.rank != src:
                offset = 0
                for j in js:
                    rows, cols, updates = (int(x) for x in H[src, j, 1:4])
                    inv = invs[keys[j]]
                    target = self._target_device(keys[j])
                    inv.U = buf[offset: offset + rows * cols].view(rows, cols).to(target).clone()
                    offset += rows * cols
                    inv.d = buf[offset: offset + cols].to(target).clone()
                    offset += cols
                    inv.updates = updates
        for key in keys:
            self._seen[key] = (id(invs[key]), invs[key].updates)
        self._uniform = False  # the step's gathers are over
        self.seconds["sync"] += time.perf_counter() - t0

    def _computed(self, key, inv) -> tuple[bool, bool]:
        """``(computed here since the last sync, the inverse object is new)``. A new object
        (the optimizer's first step, or a state dict loaded without :meth:`reset`) counts as
        computed here when it holds updates and had no baseline."""
        seen = self._seen.get(key)
        if seen is None:
            return inv.updates > 0, True
        if seen[0] != id(inv):
            return False, True
        return inv.updates != seen[1], False

    def _target_device(self, key):
        if self.optimizer is not None:
            for L in self.optimizer.layers:
                if L.capture.name == key[0]:
                    return L.capture.module.weight.device
        return self.device


#: Timeout recorded by :func:`bkfac.distributed.init_distributed` (used by ``monitored_barrier``).
_TIMEOUT: list = [timedelta(minutes=30)]


def fingerprint(values) -> str:
    """Short stable hash of ``repr(values)`` (for logs)."""
    return hashlib.sha1(repr(values).encode()).hexdigest()[:12]
