"""bkfac.baselines: optimizers the paper compares against (Sec 6, Table 2).

* :class:`SENG` -- sketch-based empirical natural gradient (Yang et al. 2022), the paper's
  "Benchmark 0", with the hyper-parameters of the paper's Appendix D as defaults.
"""

from .seng import SENG, seng_exp_lr

__all__ = ["SENG", "seng_exp_lr"]
