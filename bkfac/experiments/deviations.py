"""Where a profile departs from the paper's setup (Sec. 4.2, 6 and Appendix D): one table.

:func:`deviations` reads the profile as the harness would run it (its sections, the runs'
resolved hyper-parameters, the model it builds) and sets each aspect beside the paper's value;
``differs`` says whether they disagree. The report chapter shows it once and chapters 4 and 6
refer to it; :func:`write_deviations` writes ``tables/deviations.csv``. Nothing here is typed
by hand but the paper's side (:data:`PAPER_SETUP`), which quotes the paper.
"""

from __future__ import annotations

from pathlib import Path

from ..optim.schedules import PAPER_LR, PAPER_OVERSAMPLE, PAPER_PHI, PAPER_RANK, EpochSchedule, as_schedule
from .manifest import _resolved_hyper
from .profiles import Profile

__all__ = ["PAPER_SETUP", "deviations", "write_deviations"]


def _sched(x) -> str:
    x = as_schedule(x)
    if isinstance(x, EpochSchedule):
        return ", ".join(f"{v:g} from epoch {e}" if e > 1 else f"{v:g}" for e, v in sorted(x.to_dict().items()))
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


#: The paper's setup, as the paper states it (section in brackets).
PAPER_SETUP: dict[str, str] = {
    "Fisher": "true Fisher, labels sampled from the model, eq. (2) [Sec. 2.1]",
    "B-update policy": "first FC layer only, r-kfac for every other layer [Sec. 3.5, 4.2, 6]",
    "K-factor start": "M_0 from the first batch, eq. (5) (the author's code starts the EA from the identity)",
    "learning rate (K-FACs)": _sched(PAPER_LR) + " [Sec. 6]",
    "damping phi": _sched(PAPER_PHI) + " [Sec. 6]",
    "rank r": _sched(PAPER_RANK) + " [Sec. 6]",
    "oversampling": _sched(PAPER_OVERSAMPLE) + " [Sec. 6]",
    "epochs": "50 [Table 2]",
    "model": "VGG16_bn, 2x1/1x2 pools; FC0 16384 -> 2048 [footnote 21]",
    "batch size": "256 [Sec. 6]",
    "Table 2 targets": "91 %, 93 %, 93.5 % test accuracy [Table 2]",
    "Table 2 runs per optimizer": "10 [Table 2]",
    "error-study windows": "300 steps from epochs 15 and 30 of 50 [Sec. 4.2]",
    "error-study runs": "5 [Fig. 1]",
    "hardware": "one NVIDIA Tesla V100-SXM2-16GB [Sec. 6]",
}


def _fc0(model_spec: dict) -> str:
    from .models import build_model

    model = build_model(model_spec)
    fc0 = getattr(model, "fc0", None)
    width = model_spec.get("width", 1.0)
    if fc0 is None:
        return f"{model_spec.get('arch')} (width {width:g})"
    return f"{model_spec.get('arch')} width {width:g}; FC0 {fc0.in_features} -> {fc0.out_features}"


def deviations(profile: Profile) -> list[dict]:
    """Rows ``aspect, paper, ours, differs`` for ``profile`` (module docstring)."""
    opt, hyper, _ = profile.resolve_run("b-kfac")
    b = _resolved_hyper(opt, hyper)
    t, es = profile.train, profile.error_study
    fisher = {"empirical": "empirical Fisher, true labels", "mc": "true Fisher, labels sampled from the model, eq. (2)"}[b["fisher"]]
    policy = {"first-fc": "first FC layer only, r-kfac for every other layer",
              "mixed": "every factor with d > n_M + r", "all": "every factor with d > r"}[b.get("policy", "mixed")]
    start = {"batch": "M_0 from the first batch, eq. (5)", "identity": "the EA starts from the identity, as the author's code does"}[
        b.get("factor_init", "batch")]
    ours = {
        "Fisher": fisher,
        "B-update policy": policy,
        "K-factor start": start,
        "learning rate (K-FACs)": _sched(b.get("lr_schedule", b.get("lr"))),
        "damping phi": _sched(b["damping_phi"]),
        "rank r": _sched(b["rank"]),
        "oversampling": _sched(b["oversample"]),
        "epochs": str(t["epochs"]),
        "model": _fc0(profile.model),
        "batch size": str(t["batch_size"]),
        "Table 2 targets": ", ".join(f"{100 * a:g} %" for a in t["targets"]) + " test accuracy",
        "Table 2 runs per optimizer": str(len(t["seeds"])),
        "error-study windows": f"{es['window']} steps from epochs "
                               + " and ".join(str(e) for e in es["window_epochs"]) + f" of {t['epochs']}",
        "error-study runs": str(es["repeats"]),
        "hardware": profile.device,
    }
    rows = []
    for aspect, paper in PAPER_SETUP.items():
        paper_value = paper.split(" [")[0]
        mine = ours[aspect]
        if aspect == "hardware":
            differs = not mine.startswith("cuda")
        elif aspect == "model":
            differs = not (mine.endswith("FC0 16384 -> 2048") and profile.model.get("width", 1.0) == 1.0)
        elif aspect == "K-factor start":
            differs = not paper_value.startswith(mine)
        else:
            differs = mine != paper_value
        rows.append(dict(aspect=aspect, paper=paper, ours=mine, differs=differs))
    return rows


def write_deviations(profile: Profile, path) -> Path:
    """Write :func:`deviations` to ``path`` (CSV, atomic)."""
    from .results import write_csv

    return write_csv(Path(path), deviations(profile), ["aspect", "paper", "ours", "differs"])
