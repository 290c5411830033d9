"""The SGD baseline with the same conveniences as the K-FAC family (timer, epoch schedule,
hyper-parameter checks at construction, an error on a non-finite gradient)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_positive_int
from .kfac import (
    _lr,
    _params,
    _weight_decay,
    check_bool,
    check_lr_schedule,
    check_names,
    check_number,
    check_param_state,
    nonfinite_gradient,
    signature_defaults,
)
from .schedules import as_schedule
from .timer import PhaseTimer

__all__ = ["SGD"]

_CHECKS = {
    "lr": _lr,
    "momentum": lambda n, v: check_number(n, v, high=1.0),
    "weight_decay": _weight_decay,
    "nesterov": check_bool,
    "lr_schedule": check_lr_schedule,
    "params": _params,
    "timer": check_bool,
    "sync_timer": check_bool,
    "check_finite": check_bool,
}


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` taking the model, with ``set_epoch`` (for ``lr_schedule``, an
    :class:`~bkfac.optim.schedules.EpochSchedule` or ``{epoch: lr}``) and a :class:`PhaseTimer`
    (all of its time is in the ``rest`` phase; ``sync_timer`` synchronises CUDA at its
    boundaries, as for the other optimizers). Hyper-parameters are checked at construction
    (:meth:`check_hyper`); ``momentum`` in [0, 1), ``nesterov`` needs ``momentum > 0``. With
    ``check_finite`` (default) a NaN/inf gradient raises ``FloatingPointError`` naming the
    parameter before anything is updated, as in the K-FAC family."""

    algorithm = "sgd"
    _unused: dict = {}

    def __init__(self, model: nn.Module, *, lr=0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, lr_schedule=None, params=None, timer: bool = True,
                 sync_timer: bool = False, check_finite: bool = True, **unused):
        given = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, lr_schedule=lr_schedule,
                     params=params, timer=timer, sync_timer=sync_timer, check_finite=check_finite, **unused)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.check_hyper(given)
        self.lr_schedule = as_schedule(lr_schedule)
        lr0 = self.lr_schedule(1) if self.lr_schedule is not None else lr
        _lr("lr" if self.lr_schedule is None else "lr_schedule(1)", lr0)
        super().__init__(params if params is not None else [p for p in model.parameters() if p.requires_grad],
                         lr=lr0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.model = model
        self.epoch = 1
        self.steps = 0
        self.check_finite = check_finite
        self.timer = PhaseTimer(enabled=timer, sync=sync_timer)

    @classmethod
    def hyper_parameters(cls) -> dict:
        """``{name: class default}`` of every keyword argument SGD uses."""
        return signature_defaults(cls.__init__)

    @classmethod
    def check_hyper(cls, hyper: dict) -> None:
        """Check keyword arguments without a model (``ValueError`` naming the argument)."""
        check_names(cls, hyper)
        for key, value in hyper.items():
            _CHECKS[key](key, value)
        if hyper.get("nesterov") and not hyper.get("momentum", cls.hyper_parameters()["momentum"]) > 0:
            raise ValueError("nesterov=True needs momentum > 0")

    def set_epoch(self, epoch: int) -> None:
        """Set the current (1-indexed) epoch: the lr of every group from ``lr_schedule``."""
        check_positive_int("epoch", epoch)
        self.epoch = epoch
        if self.lr_schedule is not None:
            for g in self.param_groups:
                g["lr"] = self.lr_schedule(epoch)

    def step(self, closure=None):
        """``torch.optim.SGD.step`` after the finiteness check of the gradients, timed."""
        self.timer.start_step()
        with self.timer.phase("rest"):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if self.check_finite:
                nonfinite_gradient(self.model, self.param_groups, self.steps, who="SGD: ")
            super().step()
            self.steps += 1
            return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.SGD.load_state_dict`` after checking the parameter groups and the
        momentum buffers' shapes against this model (nothing changes on a mismatch)."""
        check_param_state(self, state_dict)
        super().load_state_dict(state_dict)

    def describe(self, batch_size: int | None = None, *, input_shape=None) -> list[dict]:
        """No K-factors: every parameter takes the plain SGD step."""
        return []

    def describe_table(self, batch_size: int | None = None, *, input_shape=None) -> str:
        """One line: SGD keeps no K-factors."""
        return "sgd: every parameter takes the plain SGD step (no K-factors)"

    def remove_hooks(self) -> None:
        """Nothing to remove (SGD puts no hooks on the model)."""
