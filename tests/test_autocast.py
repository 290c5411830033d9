"""Mixed precision: every optimizer under ``torch.autocast`` on the CPU, and with ``GradScaler``.

The model is the smoke profile's (SmallCNN, channels (8, 16), FC0 1024 -> 64, so FC0 is
B-updated by the b-variants) on a small learnable synthetic task (class means plus noise),
batch 32, the smoke profile's periods (T_updt 2, T_inv 4, T_brand 2, ...), lr 0.02.

Reference: the same optimizer in float32 on the same batches. What is pinned:

* bfloat16 autocast: over the first 20 steps the parameter change ``theta_k - theta_0``
  stays within ``TOL`` (relative, 2-norm over all parameters) of the float32 run's at every
  step. The size of the tolerance: rounding only the *inputs* to bfloat16 in a float32 run
  moves the K-FAC runs' first steps by 3-6 % on this task, and the autocast runs stay within
  5-10 % (measured when the test was written); a step built from factors polluted by a loss
  scale, or run in bfloat16, is off by far more (a scale ``S`` left in ``G_k`` shrinks the step
  by ``S^2``);
* the factors, representations and SENG's curvature are float32 after autocast training,
  and a step called *inside* an autocast region gives exactly the step called outside;
* float16 autocast with ``torch.amp.GradScaler`` starting at ``2**20`` (so the first scaled
  backwards overflow): an overflowed step changes no parameter, no factor and no step count;
  after 20 taken steps the parameters are within ``TOL`` of the float32 run's;
* ``GradScaler`` in float32 (no autocast) gives the unscaled run's parameters to float32
  rounding: the optimizers divide the scale out of the gradients *and* of their captured
  output gradients (empirical and Monte-Carlo Fisher);
* ``scaler.unscale_(optimizer)`` before ``scaler.step`` is refused with a ``RuntimeError``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from bkfac.experiments.models import SmallCNN
from bkfac.optim.factory import make_optimizer
from bkfac.optim.kfac import KFACFamily

NAMES = ("k-fac", "r-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c", "seng", "sgd")
STEPS = 20
BATCH = 32
TOL = 0.2
_K = dict(t_updt=2, t_inv=4, lr_schedule={1: 0.02}, damping_phi=0.1)
_R = dict(rank=16, oversample=4)
HYPER = {
    "k-fac": _K,
    "r-kfac": {**_K, **_R},
    "sre-kfac": {**_K, **_R},
    "b-kfac": {**_K, **_R, "t_brand": 2},
    "b-r-kfac": {**_K, **_R, "t_brand": 2, "t_rsvd": 4},
    "b-kfac-c": {**_K, **_R, "t_brand": 2, "t_corct": 4},
    "seng": dict(update_freq=4, col_sample_size=16, lr_scheme=None, lr=0.02),
    "sgd": dict(lr=0.02),
}


def _data():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (STEPS, BATCH), generator=g)
    x = means[y] + torch.randn(STEPS, BATCH, 3, 32, 32, generator=g)
    return x, y


X, Y = _data()


def _build(name, **extra):
    torch.manual_seed(0)
    model = SmallCNN(channels=(8, 16), fc_hidden=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = make_optimizer(name, model, **{**HYPER[name], **extra})
    return model, opt


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _factor_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer's curvature state (K-FAC factors and representations,
    SENG's stored curvature), as clones."""
    if isinstance(opt, KFACFamily):
        if not opt._initialized:
            return []
        return [t.clone() for f in opt.k_factors().values() for t in (f.ea, f.U, f.d) if t is not None]
    if hasattr(opt, "_curvature"):
        return [v.clone() for e in opt._curvature.values() for v in e.values() if isinstance(v, torch.Tensor)
                and v.is_floating_point()]
    return []


def _steps_taken(opt) -> int:
    return opt._step_count if hasattr(opt, "_step_count") else opt.steps


def _train(name, mode, steps=STEPS, init_scale=2.0**20, fisher=None):
    """Parameter changes ``theta_k - theta_0`` after each taken step, the skipped steps and the
    optimizer. ``mode``: 'fp32', 'bf16' (autocast), 'fp16' (autocast + GradScaler) or
    'fp32-scaled' (GradScaler without autocast)."""
    extra = {} if fisher is None else dict(fisher=fisher)
    model, opt = _build(name, **extra)
    theta0 = _flat(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if mode in ("fp16", "fp32-scaled") else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    moves, skipped, i = [], 0, 0
    while i < steps:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(X[i])
            loss = F.cross_entropy(logits, Y[i])
        if fisher == "mc" and opt.wants_statistics():
            opt.capture.sampled_fisher_backward(logits, generator=torch.Generator().manual_seed(i))
        if scaler is None:
            loss.backward()
            opt.step()
            i += 1
            moves.append(_flat(model) - theta0)
            continue
        before, facs, taken = _flat(model), _factor_tensors(opt), _steps_taken(opt)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:  # GradScaler found inf/NaN and skipped the step
            skipped += 1
            assert torch.equal(_flat(model), before), f"{name}: a skipped step changed the parameters"
            after = _factor_tensors(opt)
            assert len(after) == len(facs) and all(torch.equal(a, b) for a, b in zip(after, facs)), \
                f"{name}: a skipped step changed the curvature"
            assert _steps_taken(opt) == taken, f"{name}: a skipped step advanced the step count"
            assert skipped < 40, "the scale never came down"
            continue
        assert _steps_taken(opt) == taken + 1
        i += 1
        moves.append(_flat(model) - theta0)
    return moves, skipped, opt


_REFERENCE: dict[str, list[torch.Tensor]] = {}


def _reference(name):
    if name not in _REFERENCE:
        _REFERENCE[name] = _train(name, "fp32")[0]
    return _REFERENCE[name]


def _deviation(moves, ref) -> list[float]:
    return [float((a - b).norm() / b.norm()) for a, b in zip(moves, ref)]


def _assert_float32(opt):
    tensors = _factor_tensors(opt)
    assert tensors, "no curvature state was built"
    assert {t.dtype for t in tensors} == {torch.float32}


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast_tracks_float32(name):
    moves, _, opt = _train(name, "bf16")
    dev = _deviation(moves, _reference(name))
    assert len(dev) == STEPS
    assert max(dev) <= TOL, f"{name}: bf16 autocast deviates from float32 by {max(dev):.3f} (step {dev.index(max(dev))})"
    assert min(dev) > 0  # the autocast run did run in bfloat16
    if name != "sgd":
        _assert_float32(opt)


@pytest.mark.parametrize("name", NAMES)
def test_float16_gradscaler_skips_overflow_and_tracks_float32(name):
    moves, skipped, opt = _train(name, "fp16")
    assert skipped >= 1  # the 2**20 start overflows float16
    dev = _deviation(moves, _reference(name))
    assert max(dev) <= TOL, f"{name}: fp16 + GradScaler deviates from float32 by {max(dev):.3f}"
    if name != "sgd":
        _assert_float32(opt)


@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_in_float32_changes_nothing(name):
    steps = 6
    ref = _reference(name)[:steps]
    moves, skipped, _ = _train(name, "fp32-scaled", steps=steps, init_scale=2.0**12)
    assert skipped == 0
    dev = _deviation(moves, ref)
    assert max(dev) < 1e-4, f"{name}: the loss scale leaks into the step ({max(dev):.2e})"


def test_gradscaler_monte_carlo_fisher():
    ref, _, _ = _train("b-kfac", "fp32", steps=6, fisher="mc")
    moves, skipped, _ = _train("b-kfac", "fp32-scaled", steps=6, init_scale=2.0**12, fisher="mc")
    assert skipped == 0
    assert max(_deviation(moves, ref)) < 1e-4


@pytest.mark.parametrize("name", ("k-fac", "b-kfac", "seng"))
def test_step_inside_autocast_is_the_float32_step(name):
    results = []
    for inside in (False, True):
        model, opt = _build(name)
        for i in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X[i]), Y[i]).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", ("b-kfac", "seng"))
def test_unscale_before_step_is_refused(name):
    model, opt = _build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(F.cross_entropy(model(X[0]), Y[0])).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
