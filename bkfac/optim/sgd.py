"""The SGD baseline with the same conveniences as the K-FAC family (timer, epoch schedule)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive_int
from .schedules import as_schedule
from .timer import PhaseTimer

__all__ = ["SGD"]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` taking the model, with ``set_epoch`` (for ``lr_schedule``) and a
    :class:`PhaseTimer` (all of its time is in the ``rest`` phase; ``sync_timer`` synchronises
    CUDA at its boundaries, as for the other optimizers)."""

    algorithm = "sgd"

    def __init__(self, model: nn.Module, *, lr=0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, lr_schedule=None, params=None, timer: bool = True,
                 sync_timer: bool = False, **unused):
        if unused:
            raise ValueError(f"SGD got unknown hyper-parameters: {sorted(unused)}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.lr_schedule = as_schedule(lr_schedule)
        lr0 = self.lr_schedule(1) if self.lr_schedule is not None else lr
        super().__init__(params if params is not None else [p for p in model.parameters() if p.requires_grad],
                         lr=lr0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.model = model
        self.epoch = 1
        self.timer = PhaseTimer(enabled=timer, sync=sync_timer)

    def set_epoch(self, epoch: int) -> None:
        check_positive_int("epoch", epoch)
        self.epoch = epoch
        if self.lr_schedule is not None:
            for g in self.param_groups:
                g["lr"] = self.lr_schedule(epoch)

    def step(self, closure=None):
        self.timer.start_step()
        with self.timer.phase("rest"):
            return super().step(closure)

    def describe(self) -> list[dict]:
        return []

    def remove_hooks(self) -> None:
        pass
