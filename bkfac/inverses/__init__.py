"""Factor-inverse representations: one class per method, one interface."""

from .methods import (
    INVERSE_METHODS,
    BrandCorrectedInverse,
    BrandInverse,
    BrandRSVDInverse,
    CholeskyInverse,
    EighInverse,
    FactorInverse,
    RSVDInverse,
    SREVDInverse,
)

__all__ = [
    "INVERSE_METHODS",
    "BrandCorrectedInverse",
    "BrandInverse",
    "BrandRSVDInverse",
    "CholeskyInverse",
    "EighInverse",
    "FactorInverse",
    "RSVDInverse",
    "SREVDInverse",
]
