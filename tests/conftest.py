"""Suite-wide settings.

The tests work on small tensors, where intra-op threading costs more than it gives, and on a
shared 2-core machine two LAPACK threads per process can run 10-20x slower than one. One
thread also makes timings of the checkpoint tests independent of the machine's load.
"""

import torch

torch.set_num_threads(1)
