"""Piecewise-constant schedules by (1-indexed) epoch, and the paper's schedules (Sec. 6)."""

from __future__ import annotations

__all__ = [
    "EpochSchedule",
    "PAPER_LR",
    "PAPER_PHI",
    "PAPER_RANK",
    "PAPER_OVERSAMPLE",
    "as_schedule",
]


class EpochSchedule:
    """A value that changes at given epochs: ``EpochSchedule({1: 0.3, 2: 0.2, 13: 0.03})``.

    ``schedule(epoch)`` returns the value of the largest key ``<= epoch``. Epochs count
    from 1 as in the paper ("nce(k) is the number of the current epoch").
    """

    def __init__(self, values: dict):
        if not values:
            raise ValueError("an EpochSchedule needs at least one (epoch, value) pair")
        items = sorted((int(k), v) for k, v in values.items())
        if items[0][0] > 1:
            raise ValueError(f"an EpochSchedule must define its value from epoch 1, got first key {items[0][0]}")
        self.items = items

    def __call__(self, epoch: int):
        value = self.items[0][1]
        for start, v in self.items:
            if epoch >= start:
                value = v
        return value

    def scaled(self, factor: float) -> "EpochSchedule":
        return EpochSchedule({k: v * factor for k, v in self.items})

    def values(self) -> list:
        return [v for _, v in self.items]

    def to_dict(self) -> dict:
        return dict(self.items)

    def __repr__(self) -> str:
        return f"EpochSchedule({dict(self.items)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, EpochSchedule) and self.items == other.items


def as_schedule(x):
    """A number stays a number; a dict becomes an :class:`EpochSchedule`."""
    if isinstance(x, dict):
        return EpochSchedule(x)
    return x


#: Learning rate (Sec. 6): 0.3, 0.2 from epoch 2, 0.1 from 3, 0.03 from 13, 0.01 from 18,
#: 0.003 from 27, 0.001 from 40.
PAPER_LR = EpochSchedule({1: 0.3, 2: 0.2, 3: 0.1, 13: 0.03, 18: 0.01, 27: 0.003, 40: 0.001})
#: Damping factor phi (lambda = phi * lambda_max): 0.1, 0.05 from epoch 25, 0.01 from 35.
PAPER_PHI = EpochSchedule({1: 0.1, 25: 0.05, 35: 0.01})
#: r-kfac target rank (and b-kfac truncation rank): 220, 230 from epoch 15.
PAPER_RANK = EpochSchedule({1: 220, 15: 230})
#: RSVD oversampling: 10, 11 from epoch 22, 12 from epoch 30.
PAPER_OVERSAMPLE = EpochSchedule({1: 10, 22: 11, 30: 12})
