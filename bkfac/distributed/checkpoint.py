"""Checkpoints of data-parallel K-FAC that resume on any world size.

On ``W`` ranks each factor's full state (the dense EA factor where the method keeps one, its
representation, its update count, its generator) lives only on its owner. :func:`gather_state_dict`
(collective) returns, on rank 0, the optimizer's ``state_dict()`` with every factor's entry
taken from its owner -- the same dictionary a one-process run would save. :func:`load_full_state_dict`
loads such a dictionary (saved on any world size, by a one-process run included) into an
optimizer on any world size: every rank loads it, then drops the dense factors it does not own.

Layer names may differ by a ``module.`` prefix (an optimizer built on a
``DistributedDataParallel`` wrapper versus one built on the bare model); both functions map
them by position.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

__all__ = ["gather_state_dict", "load_full_state_dict"]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _distributed(optimizer):
    comm = getattr(optimizer, "comm", None)
    return comm is not None and getattr(comm, "world_size", 1) > 1 and hasattr(comm, "assignment")


def gather_state_dict(optimizer, dst: int = 0) -> dict | None:
    """Collective: the complete ``optimizer.state_dict()`` on rank ``dst`` (``None`` elsewhere).

    Each rank sends the state of the factors it owns (moved to CPU for the transfer);
    ``dst`` puts every entry back on the device of its layer. The optimizer itself is not
    changed. Like ``state_dict()``, the entries of the factors this rank owns are its live
    tensors (updated in place by later steps): save or copy the result before stepping on.
    With one process (or a :class:`~bkfac.optim.comm.LocalComm`) this is
    ``optimizer.state_dict()``.
    """
    sd = optimizer.state_dict()
    if not _distributed(optimizer):
        return sd
    comm = optimizer.comm
    t0 = time.perf_counter()
    assignment = comm.assignment()
    owned = {}
    for L in optimizer.layers:
        for fac, inv in (("A", L.inv_A), ("G", L.inv_G)):
            key = (L.capture.name, fac)
            if inv is not None and assignment.get(key) == comm.rank:
                owned[key] = (inv.method, _to(inv.state_dict(), "cpu"), inv.generator.get_state())
    gathered = [None] * comm.world_size if comm.rank == dst else None
    comm._collective("gather_object(state dict)", dist.gather_object, owned, gathered,
                     dst=comm._src(dst), group=comm.group)
    comm.seconds["checkpoint"] += time.perf_counter() - t0
    if comm.rank != dst:
        return None
    device_of = {L.capture.name: L.capture.module.weight.device for L in optimizer.layers}
    layers = sd["kfac"]["layers"]
    for part in gathered:
        for (name, fac), (method, state, gen) in part.items():
            entry = layers[name]
            entry[fac] = (method, _to(state, device_of[name]))
            entry.setdefault("generators", {})[fac] = gen
    missing = [key for key in assignment if not any(key in part for part in gathered)]
    if missing:  # pragma: no cover - the assignment covers every factor by construction
        raise RuntimeError(f"gather_state_dict: no rank owns {missing}")
    return sd


def _match_layer_names(optimizer, state_dict: dict) -> dict:
    """Rename the state dict's layers to the optimizer's when they differ only by a
    ``module.`` prefix (DDP wrapper), by position in model order."""
    kfac = state_dict.get("kfac")
    if kfac is None:
        return state_dict
    names = [L.capture.name for L in optimizer.layers]
    saved = list(kfac["layers"])
    if set(saved) == set(names) or len(saved) != len(names):
        return state_dict

    def bare(n):
        return n[len("module."):] if n.startswith("module.") else n

    if [bare(n) for n in saved] != [bare(n) for n in names]:
        return state_dict  # let the optimizer report the mismatch
    state_dict = dict(state_dict)
    kfac = dict(kfac)
    kfac["layers"] = {new: kfac["layers"][old] for old, new in zip(saved, names)}
    state_dict["kfac"] = kfac
    return state_dict


def load_full_state_dict(optimizer, state_dict: dict, *, keep_unowned: bool = False) -> None:
    """Load a complete optimizer state dict (from :func:`gather_state_dict` or a one-process
    run) on any world size. Every rank loads all of it; then, unless ``keep_unowned``, each
    rank frees the dense EA factors it does not own (they are the owners' business) and the
    comm takes the loaded representations as its baseline. Not a collective, but every
    rank must call it before the next step."""
    state_dict = _match_layer_names(optimizer, copy.copy(state_dict))
    optimizer.load_state_dict(state_dict)
    comm = getattr(optimizer, "comm", None)
    if comm is not None and hasattr(comm, "reset"):
        comm.reset()
    if not keep_unowned and _distributed(optimizer):
        for L in optimizer.layers:
            for fac, inv in (("A", L.inv_A), ("G", L.inv_G)):
                if inv is not None and not comm.is_owner((L.capture.name, fac)):
                    inv.factor = None
