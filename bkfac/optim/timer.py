"""Per-phase wall-clock timer shared by every optimizer (readable after each step)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

__all__ = ["PhaseTimer", "PHASES"]

#: The phases of an optimizer step, as reported by ``optimizer.timer``.
PHASES = ("statistics", "inverse", "precondition", "rest")


class PhaseTimer:
    """Accumulate wall time per phase.

    ``last`` holds the seconds of the most recent step per phase, ``total`` the sum since
    construction (or :meth:`reset`). With ``sync=True`` CUDA is synchronised at phase
    boundaries so the numbers are honest on a GPU (that costs a host sync per phase; the
    timer is off the hot path when ``enabled=False``).
    """

    def __init__(self, enabled: bool = True, sync: bool = False, phases=PHASES):
        self.enabled = enabled
        self.sync = sync
        self.phases = tuple(phases)
        self.reset()

    def reset(self) -> None:
        self.total = {p: 0.0 for p in self.phases}
        self.last = {p: 0.0 for p in self.phases}
        self.steps = 0

    def start_step(self) -> None:
        self.last = {p: 0.0 for p in self.phases}
        self.steps += 1

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.last[name] = self.last.get(name, 0.0) + dt
            self.total[name] = self.total.get(name, 0.0) + dt

    def as_dict(self) -> dict:
        return {"last": dict(self.last), "total": dict(self.total), "steps": self.steps}
