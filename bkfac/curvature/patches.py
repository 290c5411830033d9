"""The patch Gram matrix of a stride-1 convolution from shifted products of its input.

A conv layer's K-factor statistics (Grosse & Martens's KFC, the ``A`` factor of Alg. 1 line 5
for a convolution) need ``X X^T`` and ``X 1`` for the patch matrix ``X`` (``d x N``, a column
per sample and output position, ``d = C kh kw``). Formed explicitly that is a copy of
``kh kw`` times the input and ``(C kh kw)^2 N`` multiply-adds (5/8 of it as the blocked SYRK
of :func:`bkfac.linalg.lowrank.gram`). For stride 1 the patch of output position ``o`` holds
the input at ``o + a - p`` for each kernel offset ``a``, so the ``C x C`` block of kernel
offsets ``(a, b)`` is

    B(a, b) = sum over the image pixels q with q - (a - p) an output position of x(q) x(q + d)^T,
    d = b - a,

a product of the input with itself shifted by ``d``. It depends on ``a`` only through which
rows and columns of the image ``q`` may take (all but at most ``k - 1`` rows and columns at
the edges), so the image is cut into bands of rows (and of columns) on which every ``a`` agrees,
each shift's product is taken once per row band over whole rows and once per (row band, edge
column band), and each block is the sum of its row bands less its excluded edge columns. Blocks
with ``b`` before ``a`` are transposes, so ``(2 kh - 1)(2 kw - 1) / 2`` shifts are needed
(13 for 3 x 3), each about ``C^2 N`` multiply-adds: about 4x fewer flops than the explicit form
and no patch copy.

The shifted operands are plain row ranges of one buffer: the input is copied once into
``(H + kh - 1, W + kw - 1, n, C)`` with zero rows and columns after the image, so a shift
``d = (dy, dx)`` is the row offset ``(dy (W + kw - 1) + dx) n``, and a pixel shifted past an
edge of its row lands on a zero column, never on the next row's pixels.

Exact (float64 against the explicit ``X X^T``: ``tests/test_patches.py``). Written by hand:
PyTorch has no symmetric product of shifted views, and ``F.unfold`` forms ``X``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["conv_patch_gram", "shifted_plan"]


def _bands(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut at every end of ``ranges``: the bands on which all ranges agree."""
    cuts = sorted({0, length} | {v for r in ranges for v in r})
    return [(cuts[t], cuts[t + 1]) for t in range(len(cuts) - 1)]


def _clip(lo: int, hi: int, length: int) -> tuple[int, int]:
    """``[lo, hi)`` intersected with ``[0, length)``; an empty result as ``(lo, lo)``."""
    lo = min(length, max(0, lo))
    return lo, max(lo, min(length, hi))


def _inside(band: tuple[int, int], rng: tuple[int, int]) -> bool:
    return rng[0] <= band[0] and band[1] <= rng[1]


def shifted_plan(image: tuple[int, int], kernel_size: tuple[int, int], padding: tuple[int, int]):
    """``(rows, cols, row_bands, edge_bands)`` of :func:`conv_patch_gram` for an ``H x W``
    image: the image rows (columns) each kernel row (column) reaches, the row bands on which
    all kernel rows agree and the column bands outside the columns every kernel column takes.
    ``None`` where the shifted route does not apply (no output position, or no shared column)."""
    H, W = image
    kh, kw = kernel_size
    ph, pw = padding
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if Ho < 1 or Wo < 1:
        return None
    # the image rows / columns q may take for kernel row i / column j (empty: (lo, lo))
    rows = [_clip(i - ph, i - ph + Ho, H) for i in range(kh)]
    cols = [_clip(j - pw, j - pw + Wo, W) for j in range(kw)]
    shared = (max(c[0] for c in cols), min(c[1] for c in cols))  # columns every offset takes
    if shared[1] <= shared[0]:
        return None
    return rows, cols, _bands(rows, H), [c for c in _bands(cols, W) if c != shared]


def conv_patch_gram(x: Tensor, kernel_size: tuple[int, int], padding: tuple[int, int],
                    empty: Callable[[int, int, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
    """``(X X^T, X 1)`` of the patch matrix ``X`` of a stride-1, dilation-1, zero-padded
    convolution with ``kernel_size`` and ``padding`` over ``x`` (``n x C x H x W``, any memory
    format): ``d x d`` and ``d``, ``d = C kh kw``, in ``weight.view(C_out, -1)``'s
    ``(C, kh, kw)`` order; the columns of ``X`` are the ``n H_out W_out`` output positions
    (module docstring). ``None`` where no output position exists or where the kernel offsets
    share no column of the image (an image narrower than the kernel's reach). ``empty(rows,
    cols, like)`` gives the shifted-input buffer (default: a fresh tensor; the statistics pass
    their reused host block, :class:`~bkfac.curvature.capture.Scratch`)."""
    plan = shifted_plan(x.shape[2:], kernel_size, padding)
    if plan is None:
        return None
    rows, cols, row_bands, edge_bands = plan
    n, C, H, W = x.shape
    kh, kw = kernel_size
    Wc, Hc = W + kw - 1, H + kh - 1
    # shifts d = b - a with b after a in (row, column) order: dy > 0, or dy = 0 and dx >= 0
    shifts = [(dy, dx) for dy in range(kh) for dx in range(-(kw - 1), kw) if dy > 0 or dx >= 0]
    size = (Hc * Wc + (kh - 1) * Wc + kw - 1) * n
    flat = (x.new_empty(size, C) if empty is None else empty(size, C, x)).zero_()
    grid = flat[: Hc * Wc * n].view(Hc, Wc, n, C)
    grid[:H, :W].copy_(x.permute(2, 3, 0, 1))
    whole: dict = {}  # (shift, row band) -> C x C over whole rows
    edge: dict = {}  # (shift, row band, edge column band) -> C x C
    edge_rows = {(r, c): grid[r[0]:r[1], c[0]:c[1]].reshape(-1, C) for r in row_bands for c in edge_bands}
    for d in shifts:
        off = (d[0] * Wc + d[1]) * n
        moved = flat[off: off + Hc * Wc * n].view(Hc, Wc, n, C)
        for r in row_bands:
            lo, hi = r[0] * Wc * n, r[1] * Wc * n
            whole[d, r] = flat[lo:hi].mT @ flat[lo + off: hi + off]
            for c in edge_bands:
                edge[d, r, c] = edge_rows[r, c].mT @ moved[r[0]:r[1], c[0]:c[1]].reshape(-1, C)
    K = kh * kw
    blocks = x.new_zeros(K, K, C, C)
    for ia in range(K):
        i, j = divmod(ia, kw)
        for ib in range(ia, K):
            d = (ib // kw - i, ib % kw - j)
            for r in row_bands:
                if not _inside(r, rows[i]):
                    continue
                blocks[ia, ib] += whole[d, r]
                for c in edge_bands:
                    if not _inside(c, cols[j]):
                        blocks[ia, ib] -= edge[d, r, c]
            if ib != ia:
                blocks[ib, ia] = blocks[ia, ib].mT
    XXt = blocks.permute(2, 0, 3, 1).reshape(C * K, C * K)
    per_pixel = x.sum(0)  # C x H x W
    s = [per_pixel[:, rows[i][0]:rows[i][1], cols[j][0]:cols[j][1]].sum((1, 2)) for i in range(kh) for j in range(kw)]
    return XXt, torch.stack(s, 1).reshape(-1)

