"""The communication interface of the K-FAC family (single process by default).

:class:`KFACFamily` talks to other processes only through these calls, so that
``bkfac.distributed`` can provide a ``torch.distributed`` implementation without touching
the optimizer:

* ``gather_columns(M)`` -- the global batch's columns of a batch matrix ``M`` (d x n_M):
  ``[M_1, ..., M_W] / sqrt(W)``, so that ``M M^T`` is the mean of the ranks' batch factors
  and ``scale * G A^T`` the averaged gradient;
* ``is_owner(key)`` -- whether this process updates the representation of factor ``key``
  (``(layer_name, 'A' | 'G')``);
* ``sync_representations(invs)`` -- after the inverse phase: make every process hold the
  owners' representations (``invs`` maps key -> FactorInverse);
* ``all_reduce_gradients(params)`` -- average gradients when the model is not wrapped in
  ``DistributedDataParallel``.
"""

from __future__ import annotations

__all__ = ["LocalComm"]


class LocalComm:
    """One process: every call is the identity."""

    world_size = 1
    rank = 0

    def gather_columns(self, M):
        return M

    def is_owner(self, key) -> bool:
        return True

    def sync_representations(self, invs: dict) -> None:
        return None

    def all_reduce_gradients(self, params) -> None:
        return None

    def assignment(self) -> dict:
        return {}
