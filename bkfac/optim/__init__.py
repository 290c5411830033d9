"""Optimizers named as in the paper (``torch.optim.Optimizer`` subclasses)."""

from .factory import (
    OPTIMIZERS,
    PAPER_DEFAULTS,
    check_hyper,
    hyper_names,
    make_optimizer,
    optimizer_class,
    paper_defaults,
    resolve_hyper,
)
from .kfac import BKFAC, BKFACC, BRKFAC, KFAC, RKFAC, SREKFAC, KFACFamily, KFactor
from .schedules import PAPER_LR, PAPER_OVERSAMPLE, PAPER_PHI, PAPER_RANK, EpochSchedule
from .sgd import SGD
from .timer import PHASES, PhaseTimer

__all__ = [
    "OPTIMIZERS", "PAPER_DEFAULTS", "make_optimizer", "optimizer_class", "paper_defaults", "check_hyper",
    "hyper_names", "resolve_hyper", "BKFAC", "BKFACC", "BRKFAC", "KFAC", "RKFAC", "SREKFAC", "KFACFamily",
    "KFactor", "SGD",
    "PAPER_LR", "PAPER_OVERSAMPLE", "PAPER_PHI", "PAPER_RANK", "EpochSchedule", "PHASES", "PhaseTimer",
]
