"""bkfac: Brand New K-FACs (Puiu, arXiv:2210.08494) in PyTorch.

The public API is re-exported here; the implementation lives in the subpackages
``linalg`` <- ``inverses`` <- ``optim`` <- ``experiments`` (nothing lower imports higher).
"""

from . import linalg

__version__ = "0.1.0"
__all__ = ["linalg", "__version__"]
