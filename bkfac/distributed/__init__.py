"""Data-parallel K-FACs on ``torch.distributed`` (statistics gathering and inverse-work sharding).

Usage inside each process (``launch`` spawns them on one machine; under ``torchrun`` call
:func:`init_distributed` first)::

    from bkfac.distributed import TorchDistributedComm, init_distributed
    rank, world = init_distributed("gloo", timeout=300)          # nccl on CUDA
    model = torch.nn.parallel.DistributedDataParallel(model)      # or not: see average_gradients
    opt = bkfac.make_optimizer("b-kfac", model, comm=TorchDistributedComm())
    ...                                                           # each rank: global_batch / world
    full = gather_state_dict(opt)                                 # collective; the full dict on rank 0

On one machine, ``launch(fn, nproc, *args)`` runs ``fn(rank, *args)`` in ``nproc`` processes
(loopback, a free port, a process-group timeout) and returns their results; under torchrun
(``torchrun --nproc-per-node N -m bkfac train ...``) each process calls :func:`init_distributed`,
which reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from the environment.
Split the global batch with :func:`check_batch` (``ValueError`` unless W divides it).

With equal per-rank batches, ``W`` ranks with batch ``n`` each follow the same trajectory as
one process with batch ``W n`` (up to rounding): see ``tests/test_distributed.py``.
"""

from .checkpoint import gather_state_dict, load_full_state_dict
from .comm import CommunicationError, TorchDistributedComm, assign_factors, factor_cost, hyperparameters
from .launch import DistributedLaunchError, check_batch, free_port, init_distributed, launch

__all__ = [
    "TorchDistributedComm",
    "CommunicationError",
    "assign_factors",
    "factor_cost",
    "hyperparameters",
    "gather_state_dict",
    "load_full_state_dict",
    "launch",
    "init_distributed",
    "check_batch",
    "free_port",
    "DistributedLaunchError",
]
