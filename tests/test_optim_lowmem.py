"""Low-memory b-kfac (Sec. 3.5): no d_A x d_A tensor is ever allocated for a 16384 -> 2048 layer."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bkfac

D_IN, D_OUT = 16384, 2048


class LargestAllocation(TorchDispatchMode):
    """Record the largest tensor produced by any operator (CPU allocation tracking)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_pure_bkfac_never_forms_a_dense_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.ReLU(inplace=True), nn.Linear(D_OUT, 10))
    opt = bkfac.BKFAC(model, lr=0.01, t_updt=1, t_brand=1, t_inv=1, rank=220, rho=0.95)
    n = 64  # 5 steps: widths 64, 128, 192, 256, then truncate to 220 and add 64
    tracker = LargestAllocation()
    with tracker:
        for k in range(5):
            x, y = torch.randn(n, D_IN), torch.randint(0, 10, (n,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    d_A = D_IN + 1
    # the largest tensor ever produced is the weight-sized gradient/update, far below d_A^2
    assert tracker.largest < d_A * d_A // 4, tracker.shape
    assert tracker.largest <= D_OUT * (D_IN + 1)  # the step in matrix form [dW, db]
    rows = {(r["layer"], r["factor"]): r for r in opt.describe()}
    fc0_A, fc0_G = rows[("0", "A")], rows[("0", "G")]
    assert fc0_A["method"] == "brand" and fc0_G["method"] == "brand" and fc0_A["alg8"]
    kf = opt.k_factor("0", "A")
    assert kf.ea is None and kf.U.shape == (d_A, 220 + n) and kf.d.shape == (220 + n,)
    # state memory: the tall-skinny U and d only (reported by describe())
    assert fc0_A["state_bytes"] == (d_A * (220 + n) + 220 + n) * 4
    print(f"low-memory b-kfac state for FC0's A-factor: {fc0_A['state_bytes'] / 2**20:.1f} MiB "
          f"(a dense factor would need {d_A * d_A * 4 / 2**20:.0f} MiB)")
