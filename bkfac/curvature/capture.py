"""K-factor capture: forward/backward hooks on ``nn.Linear`` and ``nn.Conv2d``.

For every supported layer we keep, after each training forward/backward, references to
the layer input and to the gradient of the loss w.r.t. the layer output, and build the
paper's batch matrices from them on demand (Sec. 2.1):

* ``A_k`` (d_A x n_M), with ``A_k A_k^T`` the batch forward factor;
* ``G_k`` (d_G x n_M), with ``G_k G_k^T`` the batch backward factor;
* ``scale`` such that the gradient in matrix form is ``Mat(g) = scale * G_k A_k^T``
  (eq. (20), used by Algorithm 8).

Exact conventions (tested against brute force in ``tests/test_curvature.py``):

Linear ``y = W x + b``. Input ``x`` of shape ``(n, *, in)``; the ``*`` positions (``T`` of
them per sample, ``T = 1`` for an ordinary MLP) are treated like convolution positions.
Augmented input ``a = [x; 1]`` (bias column only when the layer has a bias). With ``N = n T``:

    A_k = [a_{i,t}] / sqrt(N)               so  A_k A_k^T = (1/N) sum_{i,t} a a^T
    G_k = [g_{i,t}] / sqrt(n),  g_{i,t} = n * dL/dy_{i,t}   (loss_reduction='mean')
                                g_{i,t} = dL/dy_{i,t}       (loss_reduction='sum')
    Mat(g) = [dL/dW, dL/db] = scale * G_k A_k^T,  scale = sqrt(T)      (loss_reduction='mean')
                                                  scale = n sqrt(T)    (loss_reduction='sum')

``g_i`` is the gradient of the *per-sample* loss, as in DESIGN.md.

Conv2d (KFC, Grosse and Martens 2016): ``a_{i,t}`` is the unfolded input patch at output
position ``t`` (what ``torch.nn.functional.unfold`` gives, ordered ``(C_in, kh, kw)`` like
``weight.view(C_out, -1)``; built from ``Tensor.unfold`` views with one copy), plus the bias entry; ``T = H_out W_out``, ``n_M = n T``.
The same formulas hold: ``A = mean over samples and positions of a a^T`` and
``Gamma = (1/n) sum_{i,t} g g^T`` (sum over positions), whose Kronecker product equals
KFC's ``Omega (x) Gamma`` (they split the factor ``T`` differently; the product is what
matters). Supported: any stride, padding (ints, ``'valid'``, symmetric ``'same'``),
dilation; ``groups > 1`` and non-zero ``padding_mode`` are reported unsupported (those
layers then get the plain SGD step).

Hooks record only in training mode with gradients enabled; in-place activations after a
layer are fine (the gradient hook sits on the layer's own output). ``remove()`` takes the
hooks away. Monte-Carlo Fisher (eq. 2): :meth:`KFactorCapture.sampled_fisher_backward`.
Under ``torch.autocast`` the recorded tensors are in the autocast dtype; every batch matrix
takes a ``dtype`` to build it in. Output gradients of a loss scaled by a ``GradScaler`` are
divided by the scale given to :meth:`KFactorCapture.set_loss_scale` (until :meth:`clear`).
Methods that only need ``A_k A_k^T`` and ``G_k G_k^T`` get them from
:meth:`LayerCapture.batch_outer_A` / :meth:`LayerCapture.batch_outer_G` without forming the
batch matrices (a stride-1 convolution on the CPU: ``A_k A_k^T`` from shifted products of its
input, :mod:`bkfac.curvature.patches`).

Algorithm 8, line 2 ("modify the back-prop to return ``G_k``, ``A_k`` rather than
``Mat(g_k)``): :meth:`KFactorCapture.defer_weight_grad` makes a layer's training backward skip
its weight gradient (the weight does not require grad while the layer's own forward runs, so
autograd computes the input and bias gradients only; the flag is back on as soon as that
forward returns or raises). Each such call's input and output gradients are kept until
:meth:`LayerCapture.clear`; when the step cannot use Alg. 8 after all (the layer ran twice, as
in gradient accumulation or weight sharing), :meth:`LayerCapture.form_weight_grad` adds
``sum_{i,t} dL/dy_{i,t} x_{i,t}^T`` of every call to ``weight.grad``, as autograd would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..linalg.lowrank import gram
from .patches import conv_patch_gram, shifted_plan

__all__ = ["KFactorCapture", "LayerCapture", "supported_reason", "SHIFTED_MIN_D", "SHIFTED_MIN_WORK"]

#: The statistics take a conv layer's ``A_k A_k^T`` from shifted products of its input
#: (:mod:`bkfac.curvature.patches`) on the CPU when its patch has at least this many entries
#: (``C_in kh kw``) and the explicit product at least ``SHIFTED_MIN_WORK`` multiply-adds
#: (``d^2 N``). Set from ``bkfac bench stats`` on one core of the 2-core build machine: the
#: shifted products were 2.3-3.1x faster for the ``cpu`` model's layers with ``d >= 144``,
#: 1.1-1.3x for its ``d = 27, 72`` layers at batch 256 (``d^2 N`` 1.9e8 to 1.4e9), and 2x
#: slower for the ``smoke`` model's ``d = 27, 72`` layers at batch 64 (``d^2 N`` 4.8e7 and
#: 8.5e7), where their hundred-odd small products cost more than they save.
SHIFTED_MIN_D = 64
SHIFTED_MIN_WORK = 150_000_000


def _conv_padding(module: nn.Conv2d):
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        # 'same' with stride 1: total padding dilation*(k-1) per side pair, symmetric when even.
        total = [module.dilation[i] * (module.kernel_size[i] - 1) for i in range(2)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return tuple(pad)


def supported_reason(module: nn.Module) -> str | None:
    """``None`` when the layer is supported by K-FAC here, else a short reason."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} is not supported"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} is not supported"
        if _conv_padding(module) is None:
            return "Conv2d with asymmetric 'same' padding is not supported"
        return None
    return f"{type(module).__name__}: no Kronecker-factored form"


class Scratch:
    """One reusable block of host memory for the conv statistics' patch matrices (or, for
    stride 1, their shifted input, :func:`~bkfac.curvature.patches.conv_patch_gram`), shared by
    the layers of a :class:`KFactorCapture` (each layer's block is consumed by its Gram
    product before the next layer's is made).

    Why: a patch matrix is large (75 MB for a 3x3 conv over 256 images of 16 x 16 x 32), and
    glibc serves allocations above its mmap threshold (at most 32 MB) with fresh pages, whose
    page faults cost several times the copy itself (60-100 ms against 14 ms for that layer on
    one core). The block grows to the largest patch matrix and is kept. CUDA tensors do not use
    it: PyTorch's caching allocator already reuses device memory, and a block held here would
    stay out of reach of the activations."""

    def __init__(self) -> None:
        self._buf: Tensor | None = None

    def empty(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """An uninitialised ``rows x cols`` tensor of ``like``'s dtype and device, in the shared
        block on the CPU (valid until the next call), freshly allocated elsewhere."""
        if like.device.type != "cpu":
            return like.new_empty(rows, cols)
        n = rows * cols
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self._buf = like.new_empty(n)
        return buf[:n].view(rows, cols)

    def release(self) -> None:
        self._buf = None


@dataclass
class LayerCapture:
    """What one supported layer recorded during the last training forward/backward."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    d_A: int
    d_G: int
    has_bias: bool
    inputs: Tensor | None = None
    grad_outputs: Tensor | None = None
    forward_calls: int = 0
    backward_calls: int = 0
    handles: list = field(default_factory=list)
    #: the factor the loss was multiplied by before the backward that recorded
    #: ``grad_outputs`` (a ``GradScaler``'s scale; :meth:`KFactorCapture.set_loss_scale`):
    #: ``G_k`` divides it out. Back to 1 on :meth:`clear`.
    loss_scale: float = 1.0
    #: host memory for the patch matrices, shared with the other layers of the capture
    scratch: Scratch = field(default_factory=Scratch)
    #: Alg. 8 line 2 (:meth:`KFactorCapture.defer_weight_grad`): training backwards leave the
    #: weight gradient unformed; ``deferred`` holds ``[input, [output gradients]]`` per such call
    defers_weight_grad: bool = False
    deferred: list = field(default_factory=list)
    _frozen: bool = False  # the weight's requires_grad is off for the running forward
    _defer_handles: list = field(default_factory=list)

    @property
    def params(self) -> list[Tensor]:
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps

    def clear(self) -> None:
        self.inputs = None
        self.grad_outputs = None
        self.forward_calls = 0
        self.backward_calls = 0
        self.loss_scale = 1.0
        self.deferred.clear()

    def form_weight_grad(self, done_only: bool = False) -> None:
        """Add to ``weight.grad`` what the deferred calls' backwards left out (Alg. 8 line 2,
        module docstring): ``sum_{i,t} dL/dy_{i,t} x_{i,t}^T`` per call and per backward through
        it, in the recorded dtype and then the weight's, accumulated as autograd accumulates
        (``weight.grad`` is created when it is ``None``). The deferred calls are then dropped;
        with ``done_only`` only those whose backward has run."""
        W = self.module.weight
        keep = []
        for entry in self.deferred:
            x, grads = entry
            if done_only and not grads:
                keep.append(entry)
                continue
            for g in grads:
                cols_g = (g.reshape(-1, g.shape[-1]).mT if self.kind == "linear"
                          else g.transpose(0, 1).reshape(g.shape[1], -1))  # d_G x N
                dW = torch.mm(cols_g, self._input_cols(x.to(g.dtype)).mT).reshape(W.shape).to(W.dtype)
                if W.grad is None:
                    W.grad = dW
                else:
                    W.grad.add_(dW)
        self.deferred[:] = keep

    def drop_deferred_grads(self) -> None:
        """Forget the output gradients the deferred calls have received: what ``zero_grad``
        discards (their weight gradients were never formed). Calls whose backward is still to
        come keep their place."""
        for _, grads in self.deferred:
            grads.clear()

    # -- batch matrices -------------------------------------------------------------------
    def _inputs(self, dtype=None) -> Tensor:
        x = self.inputs
        if x is None:
            raise RuntimeError(
                f"no input recorded for layer '{self.name}': call optimizer.step() after a forward "
                "and backward pass in training mode"
            )
        return x if dtype is None else x.to(dtype)

    def _patch_view(self, x: Tensor) -> Tensor | None:
        """Conv patches as a view ``(C_in, kh, kw, n, H_out, W_out)`` of the padded input.

        ``Tensor.unfold`` views instead of ``F.unfold``: the caller then makes the only copy,
        straight into the ``(d, N)`` layout (the one-copy statistics of commit 4d7939d).
        ``None`` for dilation != 1, where ``F.unfold`` is used.
        """
        m = self.module
        if tuple(m.dilation) != (1, 1):
            return None
        (ph, pw), (kh, kw), (sh, sw) = _conv_padding(m), m.kernel_size, m.stride
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        v = x.unfold(2, kh, sh).unfold(3, kw, sw)  # n, C, H_out, W_out, kh, kw
        return v.permute(1, 4, 5, 0, 2, 3)

    def _patch_rows_nhwc(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Conv patches of a channels_last input as rows: ``(X, perm)`` with ``X`` of shape
        ``(N, kh * kw * C_in)``, columns ordered ``(kh, kw, C_in)``, made with one copy that
        moves runs of ``C_in`` contiguous values (the ``(C_in, kh, kw) x N`` layout of
        :meth:`_input_cols` gathers them one by one); ``perm`` reorders an index of that
        ordering into ``weight.view(C_out, -1)``'s ``(C_in, kh, kw)``. ``None`` where this does
        not apply (not a conv, dilation, or the input not stored channels_last)."""
        m = self.module
        if self.kind != "conv2d" or tuple(m.dilation) != (1, 1) or x.dim() != 4 or x.shape[1] < 2:
            return None
        if x.stride(1) != 1:  # channels not innermost: NCHW storage
            return None
        (ph, pw), (kh, kw), (sh, sw) = _conv_padding(m), m.kernel_size, m.stride
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
            if x.stride(1) != 1:
                return None
        v = x.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 2, 3, 4, 5, 1)  # n, H_out, W_out, kh, kw, C
        C = x.shape[1]
        out = self.scratch.empty(v.shape[0] * v.shape[1] * v.shape[2], kh * kw * C, x)
        out.view(v.shape).copy_(v)
        perm = torch.arange(kh * kw * C, device=x.device).view(kh, kw, C).permute(2, 0, 1).reshape(-1)
        return out, perm

    def _input_cols(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Columns ``a_{i,t}`` without the bias entry, ``(d_A - bias) x N``, ordered like
        ``weight.view(C_out, -1)`` and, over ``N``, like the output-gradient rows (sample,
        then position). Written into ``out`` when given, with at most one copy."""
        m = self.module
        if self.kind == "linear":
            cols = x.reshape(-1, x.shape[-1]).mT  # a view
        else:
            v = self._patch_view(x)
            if v is not None:
                if out is not None:
                    out.view(v.shape).copy_(v)
                    return out
                cols = v.reshape(v.shape[0] * v.shape[1] * v.shape[2], -1)
            else:
                pad = _conv_padding(m)
                patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
                cols = patches.transpose(0, 1).reshape(patches.shape[1], -1)
        if out is not None:
            out.copy_(cols)
            return out
        return cols

    def _n_positions(self, x: Tensor) -> int:
        if self.kind == "linear":
            return x.numel() // x.shape[-1]
        m = self.module
        (ph, pw), (kh, kw), (sh, sw), (dh, dw) = _conv_padding(m), m.kernel_size, m.stride, m.dilation
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x.shape[0] * ho * wo

    def _grad_cols(self, reduction: str, dtype=None) -> tuple[Tensor, int]:
        """Columns ``g_{i,t}`` of the output gradients, ``d_G x N`` (one copy for a conv),
        unscaled, and the batch size ``n``."""
        g = self.grad_outputs
        if g is None:
            raise RuntimeError(
                f"no output gradient recorded for layer '{self.name}': call optimizer.step() after "
                "loss.backward() in training mode"
            )
        if dtype is not None:
            g = g.to(dtype)
        if self.kind == "linear":
            cols = g.reshape(-1, g.shape[-1]).mT
        else:
            cols = g.transpose(0, 1).reshape(g.shape[1], -1)
        return cols, g.shape[0]

    def _g_scale(self, reduction: str, n: int) -> float:
        """``c`` with ``G_k = c * [g_{i,t}]``: ``n / sqrt(n)`` for a mean loss, ``1 / sqrt(n)`` for a sum
        (over ``loss_scale`` when the recorded gradients are of a scaled loss)."""
        return (math.sqrt(n) if reduction == "mean" else 1.0 / math.sqrt(n)) / self.loss_scale

    def batch_A(self, dtype=None) -> Tensor:
        """``A_k`` (d_A x N): the augmented input columns over ``sqrt(N)``."""
        x = self._inputs(dtype)
        N = self._n_positions(x)
        out = x.new_empty(self.d_A, N)
        D = self.d_A - int(self.has_bias)
        self._input_cols(x, out[:D])
        if self.has_bias:
            out[D].fill_(1.0)
        return out.mul_(1.0 / math.sqrt(N))

    def batch_G(self, reduction: str = "mean", dtype=None) -> Tensor:
        """``G_k`` (d_G x n_M) of the module docstring."""
        cols, n = self._grad_cols(reduction, dtype)
        return cols * self._g_scale(reduction, n)

    def grad_scale(self, reduction: str = "mean") -> float:
        """``scale`` with ``Mat(grad) = scale * G_k A_k^T`` (eq. (20), module docstring):
        ``sqrt(T)`` for a mean loss, ``n sqrt(T)`` for a summed one (``T`` positions per sample)."""
        g = self.grad_outputs
        if g is None:
            raise RuntimeError(f"no output gradient recorded for layer '{self.name}'")
        n = g.shape[0]
        T = g.numel() / (n * self.d_G)
        return math.sqrt(T) * (1.0 if reduction == "mean" else n)

    def batch_matrices(self, reduction: str = "mean", dtype=None) -> tuple[Tensor, Tensor, float]:
        """``(A_k, G_k, scale)`` with ``Mat(grad) = scale * G_k A_k^T`` (see module docstring)."""
        A = self.batch_A(dtype)
        G = self.batch_G(reduction, dtype)
        N = A.shape[1]
        if G.shape[1] != N:
            raise RuntimeError(f"layer '{self.name}': input and output-gradient positions differ ({N} vs {G.shape[1]})")
        return A, G, self.grad_scale(reduction)

    def batch_outer_A(self, dtype=None, route: str = "auto") -> Tensor:
        """``A_k A_k^T`` (d_A x d_A) without forming ``A_k``, the bias row and column from the
        column sums. A stride-1 convolution on the CPU, large enough, takes it from shifted
        products of its input (:meth:`_shifted_patch_gram`); other layers copy the patches once and take one
        GEMM (the one-copy statistics of commit 4d7939d), a conv input stored channels_last as
        rows of ``(kh, kw, C_in)`` patches (:meth:`_patch_rows_nhwc`), the small result
        reordered. ``route`` (for comparisons, ``bkfac bench stats``): ``'auto'`` as just
        said (the shifted products where they pay, :data:`SHIFTED_MIN_D` and
        :data:`SHIFTED_MIN_WORK`), ``'shifted'`` the shifted products wherever they apply (any
        device), ``'patches'`` the patch copy always."""
        if route not in ("auto", "shifted", "patches"):
            raise ValueError(f"route must be 'auto', 'shifted' or 'patches', got {route!r}")
        x = self._inputs(dtype)
        shifted = None
        if route == "shifted" or (route == "auto" and self._shifted_pays(x)):
            shifted = self._shifted_patch_gram(x, any_device=route == "shifted")
        rows = None if shifted is not None else self._patch_rows_nhwc(x)
        if shifted is not None:
            XXt, s = shifted
            D, N = XXt.shape[0], self._n_positions(x)
        elif rows is not None:  # channels_last: patches as rows, then the (C_in, kh, kw) order
            Xr, perm = rows
            N, D = Xr.shape
            XXt = gram(Xr.mT)[perm][:, perm]
            s = Xr.sum(0)[perm]
        else:
            X = self._input_cols(x)
            D, N = X.shape
            XXt = gram(X)
            s = X.sum(1)
        if not self.has_bias:
            return XXt.mul_(1.0 / N)
        out = XXt.new_empty(self.d_A, self.d_A)
        out[:D, :D] = XXt
        out[:D, D] = s
        out[D, :D] = s
        out[D, D] = N
        return out.mul_(1.0 / N)

    def _shifted_pays(self, x: Tensor) -> bool:
        """Whether the shifted products beat the patch copy for this layer and batch: a patch
        of at least :data:`SHIFTED_MIN_D` entries and at least :data:`SHIFTED_MIN_WORK`
        multiply-adds in the explicit ``X X^T`` (below that, the shifted route's hundred-odd
        small products cost more than they save)."""
        if self.kind != "conv2d":
            return False
        d = self.d_A - int(self.has_bias)
        return d >= SHIFTED_MIN_D and d * d * self._n_positions(x) >= SHIFTED_MIN_WORK

    def _shifted_patch_gram(self, x: Tensor, any_device: bool = False) -> tuple[Tensor, Tensor] | None:
        """``(X X^T, X 1)`` of a stride-1, dilation-1 convolution's patches from shifted
        products of its input (:func:`~bkfac.curvature.patches.conv_patch_gram`: about 4x
        fewer flops than forming ``X``; 2.2x faster over the ``cpu`` model's 13 conv layers at
        batch 256 on one core, ``bkfac bench stats``). CPU only: its 100-odd small products per
        layer would be launch-bound on a GPU, where it is unmeasured, so CUDA keeps the
        one-GEMM route (``any_device=True`` takes it there too). ``None`` where it does not apply."""
        if not self.shifted_applies(x, any_device):
            return None
        return conv_patch_gram(x, self.module.kernel_size, _conv_padding(self.module), self.scratch.empty)

    def shifted_applies(self, x: Tensor, any_device: bool = False) -> bool:
        """Whether :meth:`_shifted_patch_gram` can take this layer's statistics for input ``x``
        (a stride-1, dilation-1 conv on the CPU, or anywhere with ``any_device``, whose kernel
        columns share an image column: :func:`~bkfac.curvature.patches.shifted_plan`); no
        arithmetic."""
        m = self.module
        if (self.kind != "conv2d" or (x.device.type != "cpu" and not any_device) or x.dim() != 4
                or tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1)):
            return False
        pad = _conv_padding(m)
        return pad is not None and shifted_plan(tuple(x.shape[2:]), m.kernel_size, pad) is not None

    def batch_outer_G(self, reduction: str = "mean", dtype=None) -> Tensor:
        """``G_k G_k^T`` (d_G x d_G) without forming ``G_k`` (a conv's output gradient stored
        channels_last is already ``N x C_out`` rows: no copy at all)."""
        g = self.grad_outputs
        if self.kind == "conv2d" and g is not None and g.dim() == 4 and g.shape[1] > 1 and g.stride(1) == 1:
            g = g if dtype is None else g.to(dtype)
            rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            return gram(rows.mT).mul_(self._g_scale(reduction, g.shape[0]) ** 2)
        cols, n = self._grad_cols(reduction, dtype)
        return gram(cols).mul_(self._g_scale(reduction, n) ** 2)

    def grad_matrix(self) -> Tensor:
        """The gradient in matrix form ``[dL/dW, dL/db]`` (d_G x d_A)."""
        W = self.module.weight
        if W.grad is None:
            raise RuntimeError(f"layer '{self.name}' has no gradient: call loss.backward() before step()")
        J = W.grad.reshape(W.shape[0], -1)
        if self.has_bias:
            b = self.module.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            J = torch.cat([J, gb.reshape(-1, 1)], dim=1)
        return J

    def set_update(self, S: Tensor) -> list[Tensor]:
        """Split a step in matrix form back into parameter-shaped tensors."""
        W = self.module.weight
        if self.has_bias:
            return [S[:, :-1].reshape(W.shape), S[:, -1].reshape(self.module.bias.shape)]
        return [S.reshape(W.shape)]


class KFactorCapture:
    """Install the hooks on every supported layer of ``model``.

    ``layers`` lists the supported layers in model order; ``unsupported`` maps the names of
    other modules that own parameters directly to the reason (those parameters get SGD).
    ``reduction`` is the loss reduction over the batch (``'mean'`` or ``'sum'``).
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", skip: tuple[type, ...] = ()):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model = model
        self.reduction = reduction
        self.layers: list[LayerCapture] = []
        self.unsupported: dict[str, str] = {}
        self._record_grads = True
        #: the patch matrices' host memory, one block for all layers (:class:`Scratch`)
        self.scratch = Scratch()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            reason = supported_reason(module) if not isinstance(module, skip) else "excluded"
            if reason is not None:
                self.unsupported[name or type(module).__name__] = reason
                continue
            lc = self._make(name, module)
            lc.scratch = self.scratch
            lc.handles.append(module.register_forward_hook(self._forward_hook(lc)))
            self.layers.append(lc)

    @staticmethod
    def _make(name: str, module: nn.Module) -> LayerCapture:
        has_bias = module.bias is not None and module.bias.requires_grad
        if isinstance(module, nn.Linear):
            return LayerCapture(name, module, "linear", module.in_features + has_bias, module.out_features, has_bias)
        kh, kw = module.kernel_size
        d_A = module.in_channels * kh * kw + has_bias
        return LayerCapture(name, module, "conv2d", d_A, module.out_channels, has_bias)

    def _forward_hook(self, lc: LayerCapture):
        def hook(module, inputs, output):
            # ``module is not lc.module``: a deep copy of the model carries this hook along
            if module is not lc.module or not (module.training and torch.is_grad_enabled()):
                return
            lc.inputs = inputs[0].detach()
            lc.forward_calls += 1
            entry = None
            if lc._frozen:  # this call's backward leaves the weight gradient to Alg. 8
                # another call since the last step (gradient accumulation): Alg. 8 cannot take
                # this step, so the earlier calls' gradients are formed now (memory stays bounded)
                lc.form_weight_grad(done_only=True)
                entry = [lc.inputs, []]
                lc.deferred.append(entry)
            if output.requires_grad:
                def grad_hook(g):
                    if self._record_grads:
                        lc.grad_outputs = g.detach()
                        lc.backward_calls += 1
                        if entry is not None:
                            entry[1].append(lc.grad_outputs)
                output.register_hook(grad_hook)

        return hook

    def defer_weight_grad(self, lc: LayerCapture, on: bool = True) -> None:
        """Algorithm 8 line 2 for layer ``lc`` (module docstring): with ``on``, its training
        forwards (training mode, gradients enabled, the input or the bias requiring grad) run
        with the weight's ``requires_grad`` off, so the backward forms no weight gradient; the
        calls are kept in ``lc.deferred``. ``on=False`` goes back to PyTorch's backward."""
        lc.defers_weight_grad = bool(on)
        if not on or lc._defer_handles:
            return

        def freeze(module, inputs):
            if module is not lc.module or not (lc.defers_weight_grad and module.training and torch.is_grad_enabled()):
                return
            W, b = module.weight, module.bias
            x = inputs[0] if inputs else None
            feeds_grad = (isinstance(x, Tensor) and x.requires_grad) or (b is not None and b.requires_grad)
            if W.requires_grad and feeds_grad:
                W.requires_grad_(False)
                lc._frozen = True

        def thaw(module, inputs, output):
            if module is lc.module and lc._frozen:
                module.weight.requires_grad_(True)
                lc._frozen = False

        pre = lc.module.register_forward_pre_hook(freeze)
        post = lc.module.register_forward_hook(thaw, always_call=True)  # after the recording hook
        lc._defer_handles = [pre, post]
        lc.handles.extend(lc._defer_handles)

    def clear(self) -> None:
        for lc in self.layers:
            lc.clear()

    def set_loss_scale(self, loss_scale: float) -> None:
        """The recorded output gradients are of the loss times ``loss_scale`` (mixed precision
        with ``torch.amp.GradScaler``): ``G_k`` and ``G_k G_k^T`` divide it out until
        :meth:`clear`."""
        if not (isinstance(loss_scale, float) and math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a positive finite float, got {loss_scale!r}")
        for lc in self.layers:
            lc.loss_scale = loss_scale

    def remove(self) -> None:
        """Remove every hook (the model is then an ordinary model again)."""
        for lc in self.layers:
            for h in lc.handles:
                h.remove()
            lc.handles.clear()
            lc._defer_handles = []
            lc.defers_weight_grad = False
            lc.clear()
        self.scratch.release()

    def sampled_fisher_backward(self, logits: Tensor, generator: torch.Generator | None = None) -> None:
        """Monte-Carlo Fisher (eq. 2): record ``G`` from labels sampled from the model.

        Samples ``y ~ softmax(logits)`` and back-propagates the mean cross-entropy against
        them with ``torch.autograd.grad`` (parameter ``.grad`` is left untouched, the graph is
        retained for the real backward). The real ``loss.backward()`` that follows does not
        overwrite the recorded ``G``.
        """
        probs = torch.softmax(logits.detach().float(), dim=-1)
        y = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
        loss = F.cross_entropy(logits, y, reduction=self.reduction)
        outs = [p for lc in self.layers for p in lc.params]
        self._record_grads = True
        torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        self._record_grads = False

    def resume_recording(self) -> None:
        self._record_grads = True
