"""``bkfac train`` and ``bkfac error-study`` (see ``bkfac --help``)."""

from __future__ import annotations

import argparse

from ..book import display_path
from .profiles import PROFILES, load_profile

__all__ = ["add_train_args", "run_train", "add_error_study_args", "run_error_study"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu",
                   help=f"run profile: one of {', '.join(PROFILES)} or a YAML file (default: cpu)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the profile's first seed)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the profile's)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder (torchvision's cifar-10-batches-py or a train/ test/ PNG tree); "
                        "default: $BKFAC_DATA_DIR, else data/cifar10")
    p.add_argument("--out", default=None, help="results root (default: data/results)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Train the profile's model on CIFAR-10 with one optimizer run (or all of them) and write "
                     "history.csv, summary.json and a checkpoint per epoch under data/results/<profile>/<run>/seed<k>/.")
    _common(p)
    p.add_argument("--optimizer", default="b-kfac",
                   help="a run of the profile (k-fac, r-kfac, r-kfac-tinv25, sre-kfac, b-kfac, b-r-kfac, b-kfac-c, "
                        "seng, sgd) or 'all' (default: b-kfac)")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's number of epochs (>= 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in its results folder from its last checkpoint (also to more epochs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run its results folder holds (said on stderr); without --resume or "
                        "--overwrite, training into a folder that holds a run is an error")
    p.add_argument("--synthetic-data", action="store_true",
                   help="train on random CIFAR-shaped images with balanced random labels instead of CIFAR-10, "
                        "for timing where the data set is not at hand (accuracy stays near 10 %%); results go "
                        "under <out>/<profile>-synthetic/")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (gloo on CPU, nccl on CUDA); under torchrun "
                        "(torchrun --nproc-per-node N -m bkfac train ...) leave it at 1")


def run_train(args) -> int:
    """``bkfac train``: every argument, the profile and every results folder the command will
    train into are checked (:func:`~bkfac.experiments.train.check_run_dir`) before anything trains."""
    import os

    from .train import check_run_dir, run_dir, train_distributed, train_run

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.resume and args.overwrite:
        raise ValueError("--resume (continue the run) and --overwrite (replace it) exclude each other")
    profile = load_profile(args.profile)
    runs = profile.run_names() if args.optimizer == "all" else [args.optimizer]
    for run in runs:
        profile.resolve_run(run)  # unknown names fail before any training
    seeds = [args.seed] if args.seed is not None else profile.train["seeds"][:1]
    for run in runs:
        for seed in seeds:
            check_run_dir(run_dir(profile.name, run, seed, args.out, args.synthetic_data), resume=args.resume,
                          overwrite=args.overwrite, epochs=args.epochs or profile.train["epochs"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        from ..distributed import init_distributed

        init_distributed()
    for run in runs:
        for seed in seeds:
            if args.nproc > 1:
                s = train_distributed(args.profile, run, args.nproc, seed=seed, device=args.device,
                                      data_dir=args.data_dir, out_root=args.out, resume=args.resume,
                                      overwrite=args.overwrite, epochs=args.epochs, progress=not args.quiet,
                                      synthetic_data=args.synthetic_data)
                print(f"{run} on {args.nproc} processes: final test acc {s.get('final_test_acc', float('nan')):.4f}")
                continue
            res = train_run(profile, run, seed=seed, device=args.device, data_dir=args.data_dir, out_root=args.out,
                            resume=args.resume, overwrite=args.overwrite, epochs=args.epochs, progress=not args.quiet,
                            synthetic_data=args.synthetic_data)
            s = res.summary
            print(f"{res.label}: final test acc {s.get('final_test_acc', float('nan')):.4f}, "
                  f"t_epoch {s.get('t_epoch_mean', float('nan')):.1f} s -> {display_path(res.out_dir)}")
    return 0


def add_error_study_args(p: argparse.ArgumentParser) -> None:
    p.description = ("The K-factor error study of Sec. 4.2-4.3: along one reference trajectory (k-fac with "
                     "T_inv = T_updt), shadow representations of every compared algorithm receive the same FC0 "
                     "K-factor data; the four error metrics are written per step under "
                     "data/results/<profile>/error_study/.")
    _common(p)


def run_error_study(args) -> int:
    from .error_study import run_error_study as run

    profile = load_profile(args.profile)
    run(profile, seed=args.seed if args.seed is not None else profile.train["seeds"][0], device=args.device,
        data_dir=args.data_dir, out_root=args.out, progress=not args.quiet)
    return 0
