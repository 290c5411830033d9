"""describe() before the first step, given the batch size, names what the first step then uses;
the table's columns are aligned; unsupported layers warn once per model; SENG's schedule."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bkfac
from bkfac.baselines import SENG, seng_exp_lr


def cnn():
    """Conv (stride 2, so n_M = 16 n), BatchNorm, a wide first FC (d_A = 257), a narrow second."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 16, 40), nn.ReLU(), nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 10),
    )


class Tokens(nn.Module):
    """Linear layers on (batch, 5, features) inputs: 5 positions per sample."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 30), nn.Linear(30, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(1)


KEYS = ("method", "n_M", "width", "rank", "alg8", "dim", "why")
SMALL = dict(rank=8, oversample=2, t_updt=1, t_inv=1, lr=0.01)
CASES = []
for name in ("k-fac", "r-kfac", "sre-kfac"):
    CASES.append((name, {}))
for name in ("b-kfac", "b-r-kfac", "b-kfac-c"):
    for policy in ("mixed", "first-fc", "all"):
        CASES.append((name, {"policy": policy}))


def _rows(opt, **kw):
    return {(r["layer"], r["factor"]): r for r in opt.describe(**kw)}


@pytest.mark.parametrize("batch", [2, 16])
@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}-{e.get('policy', '')}" for n, e in CASES])
def test_describe_before_the_first_step_names_what_it_uses(name, extra, batch):
    hyper = {k: v for k, v in SMALL.items() if k in bkfac.hyper_names(name)}
    for model, shape in ((cnn(), (3, 8, 8)), (Tokens(), (5, 12))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = bkfac.make_optimizer(name, model, defaults=None, **hyper, **extra)
        before = {id(p): p.detach().clone() for p in model.parameters()}
        plan = _rows(opt, batch_size=batch, input_shape=shape)
        assert all(r["planned"] for r in plan.values() if r["kind"] != "unsupported")
        assert all(torch.equal(p, before[id(p)]) for p in model.parameters())  # the plan changes nothing
        assert all(m.training for m in model.modules())
        x = torch.randn(batch, *shape)
        F.cross_entropy(model(x), torch.randint(0, 10, (batch,))).backward()
        opt.step()
        done = _rows(opt)
        assert plan.keys() == done.keys()
        for key, r in done.items():
            assert not r["planned"]
            for k in KEYS:
                assert plan[key][k] == r[k], (key, k, plan[key][k], r[k])
        if name.startswith("b-") and extra["policy"] != "mixed" or batch == 2 and name.startswith("b-"):
            assert any(r["method"].startswith("brand") for r in done.values()), done  # the B-update path occurs


def test_mixed_policy_needs_the_batch_size_and_input_shape():
    opt = bkfac.BKFAC(cnn(), rank=8, oversample=2, policy="mixed")
    rows = _rows(opt)
    fc = rows[("4", "A")]  # d = 65 > r: B-updates iff d > n_M + r
    assert fc["method"] is None and "batch size" in fc["why"]
    assert rows[("0", "G")]["method"] == "eigh"  # d = 4 <= r + r_o: no batch size needed
    with pytest.raises(ValueError, match="input_shape"):
        opt.describe(batch_size=4)
    with pytest.raises(ValueError, match=r"input_shape=\(3, 5\)"):
        opt.describe(batch_size=4, input_shape=(3, 5))
    with pytest.raises(ValueError, match="batch_size"):
        opt.describe(batch_size=0, input_shape=(3, 8, 8))
    planned = _rows(opt, batch_size=4, input_shape=(3, 8, 8))
    assert planned[("0", "A")]["n_M"] == 4 * 16 and planned[("4", "A")]["n_M"] == 4
    assert planned[("4", "A")]["method"] == "brand" and planned[("4", "A")]["width"] == 8 + 4
    assert planned[("4", "A")]["why"] == "d > n_M + r"
    assert planned[("0", "A")]["method"] == "rsvd" and planned[("0", "A")]["why"] == "d <= n_M + r, d > r + r_o"


def test_first_fc_policy_reasons():
    opt = bkfac.BKFAC(cnn(), rank=8, oversample=2, policy="first-fc")
    rows = _rows(opt)  # the paper's policy does not depend on n_M
    assert rows[("4", "A")]["method"] == "brand" and rows[("4", "A")]["why"] == "first FC, d > r"
    assert rows[("4", "A")]["alg8"] and not rows[("4", "G")]["alg8"]
    assert rows[("6", "A")]["method"] == "rsvd" and rows[("6", "A")]["why"] == "not first FC, d > r + r_o"
    assert rows[("8", "G")]["method"] == "eigh" and rows[("8", "G")]["why"] == "d <= r + r_o"


def _columns(header: str) -> dict[str, int]:
    return {m.group(): m.start() for m in re.finditer(r"Alg\. 8|\S+", header)}


def test_describe_table_columns_are_aligned():
    opt = bkfac.make_optimizer("b-kfac", cnn(), defaults=None, rank=8, oversample=2, policy="mixed")
    for table in (opt.describe_table(batch_size=4, input_shape=(3, 8, 8)), None):
        if table is None:
            x = torch.randn(4, 3, 8, 8)
            F.cross_entropy(opt.model(x), torch.randint(0, 10, (4,))).backward()
            opt.step()
            table = opt.describe_table()
        title, header, rule, *body = table.splitlines()
        assert title.startswith("b-kfac, policy mixed, r = 8")
        assert set(rule) == {"-"} and len(rule) == len(header)
        cols = _columns(header)
        for line in body:
            assert len(line) <= len(header), line  # nothing overflows, BatchNorm included
            layer, factor = line.split()[:2]
            assert line[cols["method"]] != " " and line[cols["method"] - 2:cols["method"]] == "  ", line
            assert line[cols["why"]] != " " and line[cols["why"] - 2:cols["why"]] == "  ", line
        bn = [line for line in body if line.startswith("1 ")]
        assert len(bn) == 1 and bn[0][cols["method"]:].startswith("SGD") and "BatchNorm2d" in bn[0]
        fc = next(line for line in body if line.startswith("4 ") and " A " in line)
        # the working width r + n_M of the B-updated factor, under the 'width' header (right-aligned)
        assert fc[:cols["width"] + len("width")].endswith("12")


def test_unsupported_layers_warn_once_per_model():
    model = cnn()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bkfac.KFAC(model)
        bkfac.make_optimizer("b-kfac", model)
        bkfac.RKFAC(model)
    msgs = [str(w.message) for w in seen if "plain SGD step" in str(w.message)]
    assert len(msgs) == 1 and "parameters of: 1 (BatchNorm2d" in msgs[0], msgs
    with pytest.warns(UserWarning, match=r"plain SGD step for parameters of: 1 \(BatchNorm2d"):
        bkfac.RKFAC(cnn())  # another model: its own warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        SENG(model)
        SENG(model)
    msgs = [str(w.message) for w in seen if "plain SGD step" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("SENG preconditions only") and "1 (BatchNorm2d)" in msgs[0]


def test_seng_takes_its_schedule_from_the_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(28, 6), torch.randint(0, 3, (28,))),
                                         batch_size=8)  # 4 batches, the last one short
    opt = bkfac.make_optimizer("seng", model, loader=loader, lr_decay_epoch=3, update_freq=2)
    assert opt.steps_per_epoch == len(loader) == 4
    assert "4 steps per epoch (from len(loader))" in opt.schedule() and opt.schedule() in opt.describe_table()
    opt.set_epoch(2)
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        expected = seng_exp_lr(2 + (k + 1) / 4, lr0=0.05, decay_rate=6, decay_epoch=3)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-15)
    plain = bkfac.make_optimizer("seng", nn.Linear(3, 2))
    assert plain.steps_per_epoch is None and "set_epoch() only" in plain.schedule()
    assert "from steps_per_epoch" in bkfac.make_optimizer("seng", nn.Linear(3, 2), steps_per_epoch=7).schedule()
