"""Pure tensor functions: the linear algebra of the paper (device- and dtype-agnostic).

=============================  ===============================================
paper                          function
=============================  ===============================================
Alg. 2 (Brand 2006)            :func:`brand_update_general`
Alg. 3 (symmetric Brand)       :func:`brand_update`
Alg. 1 l.13 (rs-kfac)          :func:`rsvd`
Alg. 1 l.13 (sre-kfac)         :func:`srevd`
Alg. 4 l.3-4                   :func:`truncate`
Alg. 6                         :func:`light_correction`
Alg. 1 l.16-17                 :func:`damped_inverse_apply`, :func:`kfac_precondition`
Sec. 3.5                       :func:`spectrum_continuation`
Alg. 8                         :func:`linear_time_factors`, :func:`linear_time_precondition`
=============================  ===============================================
"""

from .brand import brand_update, brand_update_general, orthonormal_extension
from .eig import EighError, lambda_max, safe_eigh
from .lowrank import (
    damped_inverse_apply,
    dense_from_lowrank,
    gram,
    kfac_precondition,
    light_correction,
    linear_time_factors,
    linear_time_precondition,
    spectrum_continuation,
    truncate,
)
from .randomized import range_finder, rsvd, srevd

__all__ = [
    "brand_update",
    "brand_update_general",
    "orthonormal_extension",
    "EighError",
    "safe_eigh",
    "lambda_max",
    "damped_inverse_apply",
    "dense_from_lowrank",
    "gram",
    "kfac_precondition",
    "light_correction",
    "linear_time_factors",
    "linear_time_precondition",
    "spectrum_continuation",
    "truncate",
    "range_finder",
    "rsvd",
    "srevd",
]
