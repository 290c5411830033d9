"""bkfac: Brand New K-FACs (Puiu, arXiv:2210.08494) in PyTorch.

Public API (implementation in the subpackages ``linalg`` <- ``inverses`` <- ``optim`` <-
``experiments``; nothing lower imports anything higher)::

    import bkfac
    opt = bkfac.make_optimizer("b-kfac", model)          # the paper's defaults
    opt = bkfac.BKFAC(model, lr=0.1, t_brand=5, rank=64)  # or explicit hyper-parameters
    bkfac.check_hyper("b-r-kfac", {"t_brand": 10, "t_rsvd": 25})  # ValueError: not a multiple
    print(opt.describe_table(batch_size=256, input_shape=(3, 32, 32)))  # what each factor will use
    A = opt.k_factor("fc0", "A").dense()                  # a K-factor, after the first step

Every hyper-parameter is checked when an optimizer is built (``bkfac.check_hyper`` runs the
same checks without a model; ``bkfac.hyper_names`` lists what a method uses).
"""

from . import linalg
from .optim import (
    BKFAC,
    BKFACC,
    BRKFAC,
    KFAC,
    OPTIMIZERS,
    PAPER_DEFAULTS,
    RKFAC,
    SGD,
    SREKFAC,
    EpochSchedule,
    KFactor,
    check_hyper,
    hyper_names,
    make_optimizer,
    paper_defaults,
)

__version__ = "0.1.0"


def __getattr__(name):
    if name == "SENG":  # lazy: the baseline lives in bkfac.baselines
        from .baselines import SENG

        return SENG
    raise AttributeError(f"module 'bkfac' has no attribute {name!r}")


__all__ = [
    "linalg", "KFAC", "RKFAC", "SREKFAC", "BKFAC", "BRKFAC", "BKFACC", "SENG", "SGD",
    "make_optimizer", "paper_defaults", "check_hyper", "hyper_names", "KFactor", "OPTIMIZERS", "PAPER_DEFAULTS",
    "EpochSchedule", "__version__",
]
