"""The ``bkfac`` command line: ``train``, ``error-study``, ``reproduce``, ``bench``.

Each sub-command lives in the module that owns it; this file only builds the parser and
dispatches, importing lazily so ``bkfac --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, function that adds arguments, function that runs)
COMMANDS = {
    "train": ("bkfac.experiments.cli", "add_train_args", "run_train",
              "train one optimizer on CIFAR-10 with a profile's hyper-parameters"),
    "error-study": ("bkfac.experiments.cli", "add_error_study_args", "run_error_study",
                    "the K-factor error study of Sec. 4.2-4.3 (Fig. 1-2, Table 1)"),
    "reproduce": ("bkfac.book", "add_reproduce_args", "run_reproduce",
                  "execute every chapter with papermill for a profile (figures/, tables/)"),
    "bench": ("bkfac.bench", "add_bench_args", "run_bench",
              "benchmarks: linalg, apply, step, peer, distributed, all"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bkfac",
        description="Brand New K-FACs (Puiu, arXiv:2210.08494): training, error study, "
        "benchmarks and the reproduction of the paper's figures and tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(importlib.import_module(module), add)(p)
        except (ImportError, AttributeError) as exc:  # pragma: no cover - during development
            p.set_defaults(_unavailable=f"'bkfac {name}' is not available: {exc}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    module, _add, run, _help = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bkfac {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
