"""The ``bkfac`` command line: ``train``, ``error-study``, ``reproduce``, ``bench``, ``data``, ``results``.

Each sub-command lives in the module that owns it; this file only builds the parser and
dispatches, importing lazily so ``bkfac --help`` is instant. An expected failure -- bad input
(``ValueError``), a file or folder that is missing or cannot be written (``OSError``), a
data-parallel rank that failed or was killed -- prints one paragraph on stderr and exits with
status 2 (an interruption: status 130); a traceback means a bug.
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
              "benchmarks: linalg, apply, step, ab, stats, peer, distributed, all"),
    "data": ("bkfac.experiments.fetch", "add_data_args", "run_data",
             "the CIFAR-10 data: fetch (download it with torchvision where it is not found)"),
    "results": ("bkfac.experiments.manifest", "add_results_args", "run_results",
                "stored results: status (config match with today's profile, code commit, age), backfill"),
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
    except KeyboardInterrupt:
        print(f"bkfac {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _expected(exc):
            raise  # a bug: the traceback is what a report needs
        print(_message(args.command, exc), file=sys.stderr)
        return 2


# failures of a rank of a data-parallel run that are about the input or the machine, not a bug
_RANK_EXPECTED = {"ValueError", "FileNotFoundError", "PermissionError", "OSError", "FloatingPointError",
                  "ProcessDied", "TimeoutError",
                  "CommunicationError", "DistStoreError", "DistNetworkError", "KeyboardInterrupt"}


def _launch_error_type():
    mod = sys.modules.get("bkfac.distributed.launch")  # loaded whenever a launch could have failed
    return getattr(mod, "DistributedLaunchError", None)


def _expected(exc: BaseException) -> bool:
    """An expected failure: bad input (``ValueError``), a file or folder that is missing or cannot
    be written (``OSError``), a diverged run (``FloatingPointError``), or a data-parallel launch
    whose ranks failed or died."""
    launch_error = _launch_error_type()
    return isinstance(exc, (ValueError, OSError, FloatingPointError)) or (
        launch_error is not None and isinstance(exc, launch_error))


def _message(command: str, exc: BaseException) -> str:
    """One paragraph (no blank lines) saying what failed; for a launch where no rank died, the
    traceback of any rank that failed with a bug follows it (where a rank died, the others'
    errors are its consequence)."""
    text = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    out = f"bkfac {command}: error: " + "\n".join(lines or [type(exc).__name__])
    launch_error = _launch_error_type()
    if launch_error is not None and isinstance(exc, launch_error) and not any(
            kind == "ProcessDied" for kind, _, _ in exc.errors.values()):
        for rank, (kind, _msg, tb) in sorted(exc.errors.items()):
            if kind not in _RANK_EXPECTED and tb.strip():
                out += f"\n\nrank {rank} failed with a bug:\n{tb.rstrip()}"
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
