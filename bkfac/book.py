"""The book's machinery: chapter list, run profiles, papermill execution, nbval copies, preview.

The book (``_quarto.yml``) lists the chapter notebooks; every chapter has one cell tagged
``parameters`` (papermill's convention) whose plain assignments are its knobs. The values
for a *profile* live in ``chapters/params/<profile>.yaml``::

    common:                 # applied to every chapter whose parameters cell defines the name
      device: cpu
    02-brand:               # keyed by the chapter's file stem
      dims: [256, 512]

``profile`` itself is always set to the profile's name (where the chapter defines it).

* :func:`chapters` -- the chapter notebooks, in book order (chapters, then appendices).
* :func:`load_params` -- the validated parameters of one chapter for one profile.
* ``bkfac reproduce --profile P [--chapters ...]`` (:func:`add_reproduce_args`,
  :func:`run_reproduce`) -- execute every chapter with papermill (kernel ``python3``, working
  directory ``chapters/``). ``cpu`` and ``paper`` execute *in place* (the committed notebooks
  are executed with ``cpu``); ``smoke`` writes to the git-ignored ``.nbrun/smoke/``. First it
  says what it does with the stored results the chapters read (training runs, error study):
  reuse those whose recorded inputs are the profile's, train the others -- with the estimated
  cost, before anything trains (``--plan``: only say it; ``--reuse-stale``: use results of
  another configuration, marked in the stamps of what is drawn from them; ``--from-scratch``:
  train everything again).
* :func:`prepare` -- papermill ``prepare_only`` copies (parameters injected, stored outputs
  kept) for nbval: ``python -m bkfac.book prepare --profile smoke --out .nbrun/smoke``.
* :func:`preview` -- a readable stand-in for the rendered book, built with pandoc into
  ``.preview/`` (no Quarto needed; :mod:`bkfac.preview`): ``python -m bkfac.book preview``.

Chapters locate the repository with :func:`repo_root` and write their figures, tables and
data through :func:`output_dir` / :func:`save_figure` / :func:`save_table`, so relative
paths never depend on the kernel's working directory (papermill runs in ``chapters/``,
nbval in the directory of the copy). :func:`save_figure` and :func:`save_table` enter each
file in ``manifest.json`` beside it (:func:`bkfac.experiments.manifest.record_output`: the
notebook, the file's hash, the profile, the commit, and the stored results the kernel had read,
which importing this module starts recording); :func:`run_stamp` and :func:`stamp_figure` say
so when any of those results is not of the profile's current configuration, and, given the
provenance the results record, how they were made (device, threads, torch, code: :func:`made_stamp`).
The ``smoke`` profile writes to ``.nbrun/smoke/`` instead of ``figures/``, ``tables/`` and
``data/``, so a test run never overwrites the committed results.

Never set ``MPLBACKEND=Agg`` for notebook runs: it removes the figure outputs.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

__all__ = [
    "PROFILES",
    "KERNEL",
    "repo_root",
    "chapters",
    "chapter_path",
    "parameters_cell",
    "load_params",
    "validate_params",
    "output_dir",
    "save_figure",
    "save_table",
    "markdown_table",
    "run_stamp",
    "made_stamp",
    "stale_note",
    "stamp_figure",
    "execute_chapter",
    "prepare",
    "preview",
    "add_reproduce_args",
    "run_reproduce",
    "main",
]

#: The run profiles (DESIGN "Run profiles"): smoke (tests), cpu (default, committed), paper (GPU).
PROFILES = ("smoke", "cpu", "paper")
#: Profiles whose runs replace the committed notebooks and results.
IN_PLACE_PROFILES = ("cpu", "paper")
#: The Jupyter kernel every chapter runs on.
KERNEL = "python3"
COMMON = "common"
NBRUN = ".nbrun"


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The repository root (the directory holding ``_quarto.yml``).

    Looked up from ``$BKFAC_ROOT``, then upwards from this package (editable install), then
    upwards from the working directory. Raises ``FileNotFoundError`` when none holds it.
    """
    env = os.environ.get("BKFAC_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if (root / "_quarto.yml").is_file():
            return root
        raise FileNotFoundError(f"BKFAC_ROOT={env!r} does not contain _quarto.yml")
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for cand in (start, *start.parents):
            if (cand / "_quarto.yml").is_file():
                return cand
    raise FileNotFoundError(
        "could not find the book's _quarto.yml above the bkfac package or the working directory; "
        "run from the repository or set BKFAC_ROOT"
    )


def _relative_posix(path: str | os.PathLike, *bases: Path) -> str | None:
    """``path`` (resolved) relative to the first of ``bases`` it lies under, as a POSIX path;
    None when it lies under none."""
    p = Path(path).resolve()
    for base in bases:
        base = Path(base).resolve()
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return None


def display_path(path: str | os.PathLike, root: Path | None = None) -> str:
    """``path`` as the commands print it: relative to the working directory where it lies under
    it, else relative to the repository (``root``, default :func:`repo_root`) where it lies
    there, else as given -- so printed lines and the logs that keep them name no directory of
    the machine above the repository."""
    bases = [Path.cwd()]
    try:
        bases.append(Path(root or repo_root()))
    except FileNotFoundError:  # an installed package run outside any checkout
        pass
    return _relative_posix(path, *bases) or str(path)


def _quarto_config(root: Path) -> dict:
    path = root / "_quarto.yml"
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg.get("book"), dict):
        raise ValueError(f"{path}: no 'book:' section")
    return cfg


def _flatten(entries: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            if "href" in entry:
                out.append(str(entry["href"]))
            out.extend(_flatten(entry.get("chapters", [])))
    return out


def book_files(root: Path | None = None) -> list[str]:
    """Every file of the book (chapters, then appendices) as written in ``_quarto.yml``."""
    root = root or repo_root()
    book = _quarto_config(root)["book"]
    return _flatten(book.get("chapters", [])) + _flatten(book.get("appendices", []))


def chapters(root: Path | None = None) -> list[Path]:
    """The chapter notebooks (``.ipynb``) listed in ``_quarto.yml``, in book order, as absolute paths."""
    root = root or repo_root()
    return [root / f for f in book_files(root) if f.endswith(".ipynb")]


def chapter_path(chapter: str | os.PathLike, root: Path | None = None) -> Path:
    """Resolve a chapter given by file stem (``'02-brand'``), file name or path."""
    root = root or repo_root()
    known = chapters(root)
    name = Path(chapter).name
    stem = name[: -len(".ipynb")] if name.endswith(".ipynb") else name
    for path in known:
        if path.stem == stem:
            return path
    raise ValueError(f"unknown chapter {str(chapter)!r}; the book's chapters are: {', '.join(p.stem for p in known)}")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _read_nb(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameters_cell(nb_or_path: dict | str | os.PathLike) -> dict[str, Any]:
    """The names and default values assigned in the chapter's cell tagged ``parameters``.

    Only plain assignments of literals (``name = 3``, ``dims = [64, 128]``) are allowed, so
    the values can be read without executing anything. Raises ``ValueError`` when there is
    not exactly one such cell or it holds anything else.
    """
    nb = nb_or_path if isinstance(nb_or_path, dict) else _read_nb(Path(nb_or_path))
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code" and "parameters" in _tags(c)]
    if len(cells) != 1:
        raise ValueError(f"a chapter needs exactly one code cell tagged 'parameters', found {len(cells)}")
    out: dict[str, Any] = {}
    for node in ast.parse(_source(cells[0])).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"the parameters cell may only hold 'name = literal' lines, got: {ast.unparse(node)!r}")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError as exc:
            raise ValueError(f"parameter {node.targets[0].id!r} must be a literal, got {ast.unparse(node.value)!r}") from exc
    return out


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")


def _params_file(profile: str, root: Path) -> dict:
    path = root / "chapters" / "params" / f"{profile}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"missing parameter file {path}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of sections ('{COMMON}', chapter stems) to mappings")
    return data


def load_params(profile: str, chapter: str | os.PathLike, root: Path | None = None) -> dict[str, Any]:
    """The parameters to inject into ``chapter`` for ``profile``.

    ``profile`` must be one of :data:`PROFILES` (else ``ValueError`` listing them). The values
    are the ``common`` section restricted to the names the chapter's parameters cell defines,
    overridden by the chapter's own section (keyed by its file stem), plus
    ``profile=<profile>``. A name in the chapter's section that its parameters cell does not
    define raises ``ValueError`` naming it.
    """
    _check_profile(profile)
    root = root or repo_root()
    path = chapter_path(chapter, root)
    names = parameters_cell(path)
    data = _params_file(profile, root)
    params = {k: v for k, v in data.get(COMMON, {}).items() if k in names}
    section = data.get(path.stem, {})
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise ValueError(
            f"chapters/params/{profile}.yaml, section {path.stem!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"the chapter's parameters cell defines: {', '.join(names)}"
        )
    params.update(section)
    if "profile" in names:
        params["profile"] = profile
    return params


def validate_params(root: Path | None = None) -> list[str]:
    """Every problem with the parameter files, as messages (empty list: all good).

    Each profile file exists; its sections are ``common`` or a chapter stem of the book; every
    chapter's section only names parameters its cell defines; every ``common`` name is
    defined by at least one chapter.
    """
    root = root or repo_root()
    problems: list[str] = []
    cells = {p.stem: parameters_cell(p) for p in chapters(root)}
    for profile in PROFILES:
        try:
            data = _params_file(profile, root)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
            continue
        for section, values in data.items():
            if section == COMMON:
                for key in values:
                    if not any(key in names for names in cells.values()):
                        problems.append(f"{profile}.yaml: common parameter {key!r} is defined by no chapter")
            elif section not in cells:
                problems.append(f"{profile}.yaml: section {section!r} is not a chapter of the book")
            else:
                for key in values:
                    if key not in cells[section]:
                        problems.append(f"{profile}.yaml: {section}: unknown parameter {key!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Helpers for the chapters: outputs and provenance
# --------------------------------------------------------------------------------------------


def output_dir(kind: str, profile: str) -> Path:
    """Where a chapter writes ``kind`` (``'figures'``, ``'tables'`` or ``'data'``) for ``profile``.

    ``cpu``/``paper``: the repository's ``figures/``, ``tables/``, ``data/``; ``smoke``:
    ``.nbrun/smoke/<kind>/`` (git-ignored), so tests never overwrite committed results.
    """
    if kind not in ("figures", "tables", "data"):
        raise ValueError(f"kind must be 'figures', 'tables' or 'data', got {kind!r}")
    _check_profile(profile)
    root = repo_root()
    base = root if profile in IN_PLACE_PROFILES else root / NBRUN / profile
    out = base / kind
    out.mkdir(parents=True, exist_ok=True)
    return out


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> Path:
    """Write through a temporary file in the same directory, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig, name: str, profile: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<output_dir('figures')>/<name>.png`` atomically and enter
    it in ``figures/manifest.json`` (:func:`bkfac.experiments.manifest.record_output`)."""
    from .experiments.manifest import record_output

    path = output_dir("figures", profile) / f"{name}.png"
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    record_output(path, profile)
    return path


def _fmt(value: Any, floatfmt: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


# TeX math as pandoc reads it ($...$: no space inside either dollar, no digit after the closing
# one; $$...$$) and code spans: passed through a table cell as they are
_CELL_VERBATIM = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)|\$\$.+?\$\$|\$(?=\S)(?:\\.|[^$\\])*?(?<=\S)\$(?!\d)")
# characters pandoc's Markdown reads as markup inside a line (emphasis, super/subscript, links,
# citations, raw HTML/TeX, math, code, the pipe table's cell separator)
_CELL_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#@$|^~&])")


def _cell_text(text: str) -> str:
    """``text`` as one pipe-table cell that pandoc reads back as the same text: markup
    characters backslash-escaped, line breaks made spaces; ``$...$`` math and code spans kept."""
    text = " ".join(text.splitlines())
    out, pos = [], 0
    for m in _CELL_VERBATIM.finditer(text):
        out += [_CELL_SPECIAL.sub(r"\\\1", text[pos:m.start()]), m.group(0)]
        pos = m.end()
    out.append(_CELL_SPECIAL.sub(r"\\\1", text[pos:]))
    return "".join(out)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None,
                   floatfmt: str = ".3g") -> str:
    """A pandoc pipe table of ``rows``: the one escaping helper for every table of the book.

    Cells and headers are text: floats formatted with ``floatfmt``, every character pandoc would
    read as markup (``|`` above all, which would split the cell and lose the row's last cells,
    and ``* _ ^ ~ [ ] < @ $`` ...) backslash-escaped, so pandoc reads back exactly the text;
    spans written as TeX math (``$...$``) or code (backticks) are kept as math and code. A
    column is right-aligned when all its values are numbers, missing ones (``None``, ``""``,
    ``"-"``) aside.
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    headers = list(headers or columns)

    def numeric(c):
        values = [v for v in (r.get(c) for r in rows) if not (v is None or (isinstance(v, str) and v in ("", "-")))]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    lines = ["| " + " | ".join(_cell_text(str(h)) for h in headers) + " |",
             "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell_text(_fmt(r.get(c, ""), floatfmt)) for c in columns) + " |")
    return "\n".join(lines)


def save_table(rows: Sequence[dict], name: str, profile: str, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to ``<output_dir('tables')>/<name>.csv`` atomically and enter it in
    ``tables/manifest.json`` (:func:`bkfac.experiments.manifest.record_output`); returns the path."""
    from .experiments.manifest import record_output

    columns = list(columns or (rows[0].keys() if rows else []))
    path = output_dir("tables", profile) / f"{name}.csv"

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c, "") for c in columns})

    _atomic_write(path, write)
    record_output(path, profile)
    return path


def _cpu_model() -> str:
    from .bench.common import cpu_model

    return cpu_model()


def made_stamp(provenance: Sequence[dict]) -> str:
    """How stored results were made, from their recorded provenance (``summary.json``'s or
    ``run.json``'s ``provenance``: ``device``, ``threads``, ``torch``, ``commit``): e.g. ``"3
    results made on cpu with 1 thread, torch 2.14.1+cu130, code f4b1f8e"``. Results that record
    no thread count (made before it was recorded) are counted as such, never guessed."""
    provs = [p or {} for p in provenance]
    if not provs:
        raise ValueError("provenance is empty: pass the provenance of at least one stored result")
    n = len(provs)
    devices = sorted({str(p["device"]) for p in provs if p.get("device")})
    threads = sorted({int(p["threads"]) for p in provs if p.get("threads") is not None})
    unrecorded = sum(p.get("threads") is None for p in provs)
    if threads:
        t = " or ".join(str(x) for x in threads) + (" thread" if threads == [1] else " threads")
        t = f"with {t}" + (f" ({unrecorded} of {n} record no thread count)" if unrecorded else "")
    else:
        t = "(no thread count recorded)"
    torch_v = sorted({str(p["torch"]) for p in provs if p.get("torch")})
    commits = sorted({str(p["commit"])[:7] for p in provs if p.get("commit")})
    parts = [f"{n} result{'s' if n != 1 else ''} made on {'/'.join(devices) or 'an unrecorded device'} {t}"]
    if torch_v:
        parts.append("torch " + "/".join(torch_v))
    if commits:
        parts.append("code " + ", ".join(commits))
    return ", ".join(parts)


def _hardware_stamp(profile: str, device: str, made: Sequence[dict] | None = None) -> str:
    """``profile | hardware | torch``: the hardware this process computes on (its thread
    count included); with ``made`` (the provenance of the stored results drawn on), the
    machine that draws them without its threads, then :func:`made_stamp`."""
    import torch

    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        hw = f"GPU {torch.cuda.get_device_name(torch.device(dev))}"
    elif made is not None:
        hw = f"drawn on CPU {_cpu_model()} ({os.cpu_count()} cores)"
    else:
        hw = f"CPU {_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    if made is not None:
        return f"profile '{profile}' | {hw} | {made_stamp(made)}"
    return f"profile '{profile}' | {hw} | torch {torch.__version__}"


def stale_note(profile: str) -> str:
    """Empty, or one line saying that stored results this process has read are not of the
    profile's current configuration (:func:`bkfac.experiments.manifest.stale_reads`), naming
    them and why (``bkfac reproduce --reuse-stale`` uses such results)."""
    from .experiments.manifest import stale_reads

    stale = stale_reads(profile)
    if not stale:
        return ""
    shown = "; ".join(f"{r} ({why})" for r, why in list(stale.items())[:3])
    more = f"; and {len(stale) - 3} more" if len(stale) > 3 else ""
    return f"DRAWN FROM RESULTS OF ANOTHER CONFIGURATION: {shown}{more} (see `bkfac results status`)"


def run_stamp(profile: str, device: str = "cpu", *, made: Sequence[dict] | None = None) -> str:
    """One line naming the profile and the hardware a result was computed on -- or, with
    ``made`` (the recorded provenance of the stored results drawn on), how those were made
    (:func:`made_stamp`: device, threads, torch, code); when stored results read so far are not
    of the profile's current configuration, it ends with :func:`stale_note`."""
    note = stale_note(profile)
    return _hardware_stamp(profile, device, made) + (f" | {note}" if note else "")


def stamp_figure(fig, profile: str, device: str = "cpu", *, made: Sequence[dict] | None = None) -> None:
    """Write the profile and hardware of :func:`run_stamp` (with ``made``: how the stored
    results drawn were made) in small print under a matplotlib figure's axes, and above it, in
    red, :func:`stale_note` when the figure is drawn from stored results of another
    configuration.

    Lays the figure out with ``tight_layout`` leaving a strip at the bottom for the stamp
    (wrapped to the figure's width, so the stamp never widens the saved figure), so call it
    after the axes are complete. A figure-level legend (``fig.legend``, placed below the
    panels) is moved up onto that strip, and the panels above it, so the stamp never covers it.
    """
    import textwrap

    note = stale_note(profile)
    size = 6.5  # points; a character is about 0.55 of that wide
    chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * size)) - 4)
    stamp = textwrap.fill(_hardware_stamp(profile, device, made), chars, subsequent_indent="  ")
    line = 1.25 * size / 72 / fig.get_figheight()  # one line of the stamp, as a fraction of the height
    base = (stamp.count("\n") + 1) * line + 0.012
    strip = base + (0.04 if note else 0.0)
    legend_h = 0.0
    if fig.legends:
        renderer = fig.canvas.get_renderer()
        height = fig.get_figheight() * fig.dpi
        for leg in fig.legends:
            leg.set_loc("lower center")
            leg.set_bbox_to_anchor((0.5, strip), transform=fig.transFigure)
            legend_h = max(legend_h, leg.get_window_extent(renderer).height / height)
    fig.tight_layout(rect=(0, strip + legend_h + (0.01 if legend_h else 0.0), 1, 1))
    fig.text(0.01, 0.004, stamp, fontsize=size, color="0.35", ha="left", va="bottom")
    if note:
        fig.text(0.01, base, note, fontsize=size, color="#b00000", ha="left", va="bottom", wrap=True)


# --------------------------------------------------------------------------------------------
# Execution (papermill), nbval copies, preview (pandoc)
# --------------------------------------------------------------------------------------------


def _selected(names: Sequence[str] | None, root: Path) -> list[Path]:
    if not names:
        return chapters(root)
    return [chapter_path(n, root) for n in names]


def _failed_path(root: Path, profile: str, path: Path) -> Path:
    return root / NBRUN / "failed" / profile / path.name


def execute_chapter(path: Path, profile: str, out_path: Path, root: Path | None = None) -> float:
    """Execute one chapter with papermill and ``profile``'s parameters; returns the seconds.

    Kernel :data:`KERNEL`, working directory ``chapters/``. The result is written to a
    temporary file under ``.nbrun/tmp/`` and moved into place only on success, so a failing
    run never replaces a committed notebook; the failed notebook is kept under
    ``.nbrun/failed/<profile>/`` for inspection and the papermill error is re-raised. The
    notebook's ``papermill.input_path``/``output_path`` metadata name ``path`` and ``out_path``
    relative to the repository (absolute only outside it), never the scratch file or the
    machine's directories.
    """
    import papermill as pm

    root = root or repo_root()
    params = load_params(profile, path, root)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = root / NBRUN / "tmp"  # git-ignored; same file system as the repository for os.replace
    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{out_path.stem}.", suffix=".ipynb", dir=scratch)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(
            str(path),
            tmp,
            parameters=params,
            kernel_name=KERNEL,
            cwd=str(root / "chapters"),
            progress_bar=False,
            log_output=False,
        )
    except BaseException:
        failed = _failed_path(root, profile, path)
        failed.parent.mkdir(parents=True, exist_ok=True)
        if Path(tmp).exists():
            os.replace(tmp, failed)
        raise
    _record_repo_paths(Path(tmp), path, out_path, root)
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, out_path)
    return time.perf_counter() - t0


def _record_repo_paths(notebook: Path, input_path: Path, output_path: Path, root: Path) -> None:
    """Papermill's ``input_path``/``output_path`` in ``notebook``'s metadata rewritten as paths
    relative to the repository ``root`` (absolute only for a file outside it), so an executed
    chapter records no directory of the machine that ran it."""
    import nbformat

    nb = nbformat.reads(Path(notebook).read_text(encoding="utf-8"), as_version=nbformat.NO_CONVERT)
    meta = nb.metadata.setdefault("papermill", {})
    for key, where in (("input_path", input_path), ("output_path", output_path)):
        meta[key] = _relative_posix(where, root) or str(Path(where).resolve())
    Path(notebook).write_text(nbformat.writes(nb), encoding="utf-8")  # as papermill writes it


def prepare(profile: str, out_dir: str | os.PathLike, chapters_: Sequence[str] | None = None,
            root: Path | None = None) -> list[Path]:
    """Papermill ``prepare_only`` copies of the chapters into ``out_dir`` (for nbval).

    The parameters of ``profile`` are injected (an ``injected-parameters`` cell after the
    ``parameters`` cell); the stored outputs are kept, so ``pytest --nbval-lax`` executes
    each copy and compares the cells tagged ``nbval-check-output`` with the committed run.
    """
    import papermill as pm

    _check_profile(profile)
    root = root or repo_root()
    out = Path(out_dir)
    out = out if out.is_absolute() else root / out
    out.mkdir(parents=True, exist_ok=True)
    selected = _selected(chapters_, root)
    if chapters_ is None:  # a full preparation: drop copies of chapters that left the book
        names = {p.name for p in selected}
        for stale in out.glob("*.ipynb"):
            if stale.name not in names:
                stale.unlink()
    written = []
    for path in selected:
        target = out / path.name
        pm.execute_notebook(
            str(path), str(target), parameters=load_params(profile, path, root), kernel_name=KERNEL,
            prepare_only=True, progress_bar=False,
        )
        written.append(target)
    return written


_OPT = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")


def cell_options(cell: dict) -> dict[str, str]:
    """Quarto's ``#| key: value`` cell options at the top of a code cell."""
    opts = {}
    for line in _source(cell).splitlines():
        m = _OPT.match(line)
        if not m:
            break
        opts[m.group(1)] = m.group(2).strip().strip("\"'")
    return opts


def preview(out_dir: str | os.PathLike = ".preview", chapters_: Sequence[str] | None = None,
            root: Path | None = None) -> list[Path]:
    """A readable stand-in for the rendered book, built with pandoc (no Quarto needed).

    Every page of ``_quarto.yml`` in book order -- ``index.html`` the front page, ``<stem>.html``
    for each chapter -- read as Quarto reads it (:func:`bkfac.quarto_md.notebook_markdown`, then
    pandoc), with numbered sections, figures, tables and propositions, cross-references as
    links, citations resolved against the bibliography into the references page, navigation
    between the pages; each page a self-contained HTML file (figures embedded, math as MathML).
    See :mod:`bkfac.preview`.

    ``chapters_``: the chapters whose pages are written (file stems; default all; the ``.qmd``
    pages and the front page are always written). Returns those chapter pages, then
    ``<out_dir>/index.html``.
    """
    from .preview import build_preview

    root = root or repo_root()
    out = Path(out_dir)
    out = out if out.is_absolute() else root / out
    return build_preview(root, out, _selected(chapters_, root) if chapters_ else None)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_reproduce_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bkfac reproduce``."""
    parser.add_argument("--profile", default="cpu", help=f"run profile, one of {', '.join(PROFILES)} (default: cpu)")
    parser.add_argument("--chapters", nargs="+", metavar="CHAPTER", default=None,
                        help="only these chapters (file stems, e.g. 03-brand-kfacs); default: all, in book order")
    parser.add_argument("--list", action="store_true", help="list the chapters and their parameters, run nothing")
    parser.add_argument("--plan", action="store_true",
                        help="say what would be done with the stored results the chapters read (reuse, train, "
                             "retrain) and what training would cost; train and execute nothing")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--reuse-stale", action="store_true",
                     help="use stored results whose recorded configuration is not the profile's (or unrecorded) "
                          "instead of training them again; what is drawn from them says so in its stamp")
    how.add_argument("--from-scratch", action="store_true",
                     help="ignore the stored results: train every run and the error study again (cpu profile: "
                          "about 5-6 hours on 2 cores)")


def _results_needed(selected: Sequence[Path], profile: str, root: Path) -> dict:
    """The stored results the ``selected`` chapters read, from their code and parameters: the
    training runs of a chapter that calls ``ensure_runs`` or ``ensure_seed_runs`` (its ``runs``
    parameter, empty: all of the profile; every seed of the profile), the error study of one that
    calls ``load_error_study``; with the seed, device and threads those chapters use."""
    need = dict(runs=[], error_study=False, seed=None, device=None, threads=None)
    for path in selected:
        code = "\n".join(_source(c) for c in _read_nb(path).get("cells", []) if c.get("cell_type") == "code")
        reads_runs = "ensure_runs(" in code or "ensure_seed_runs(" in code
        reads_es = "load_error_study(" in code
        if not (reads_runs or reads_es):
            continue
        params = {**parameters_cell(path), **load_params(profile, path, root)}
        need["seed"] = params.get("seed", need["seed"])
        need["device"] = params.get("device", need["device"])
        if reads_runs:
            need["runs"] += [r for r in (params.get("runs") or [None]) if r not in need["runs"]]
            need["threads"] = params.get("threads", need["threads"])
        need["error_study"] = need["error_study"] or reads_es
    return need


def _prepare_results(args: argparse.Namespace, selected: Sequence[Path], root: Path) -> int | None:
    """Decide, say and (unless ``--plan``) carry out what is done with the stored results the
    chapters read (:func:`bkfac.experiments.report.plan_results`). Returns an exit status to
    stop with, or None to go on to the chapters."""
    need = _results_needed(selected, args.profile, root)
    reuse_stale, from_scratch = getattr(args, "reuse_stale", False), getattr(args, "from_scratch", False)
    if not need["runs"] and not need["error_study"]:
        return 0 if getattr(args, "plan", False) else None
    import torch

    from .experiments import report
    from .experiments.profiles import load_profile

    prof = load_profile(args.profile)
    runs = prof.run_names() if None in need["runs"] else need["runs"]
    # the chapters read every seed of the profile (Table 2 over seeds), the chapter's own first
    seeds = list(dict.fromkeys(([need["seed"]] if need["seed"] is not None else []) + list(prof.train["seeds"])))
    items = []
    for i, seed in enumerate(seeds):
        items += report.plan_results(prof, runs=runs, seed=seed, error_study=need["error_study"] and i == 0,
                                     reuse_stale=reuse_stale, from_scratch=from_scratch)
    where = report.results_root(args.profile) / args.profile
    print(f"bkfac reproduce: the stored results the chapters read ({_shown(where, root)}):", flush=True)
    print(report.format_plan(prof, items), flush=True)
    if not any(it.trains for it in items):
        print(f"  nothing to train; profile '{args.profile}' from scratch (--from-scratch): "
              f"{report.FROM_SCRATCH_COST.get(args.profile, 'unknown')}", flush=True)
    if getattr(args, "plan", False):
        return 0
    threads = need["threads"]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report.execute_plan(prof, items, device=need["device"], progress=True)
    finally:
        torch.set_num_threads(before)
    return None


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def run_reproduce(args: argparse.Namespace) -> int:
    """Execute the chapters for ``args.profile``; one progress line per chapter with timing.

    First the stored results the chapters read (:func:`_results_needed`) are compared with what
    the profile runs today and the plan is printed with its cost: identical inputs are reused,
    others trained (``args.reuse_stale``: used as they are, the stamps of what is drawn from
    them saying so; ``args.from_scratch``: everything trained again); ``args.plan`` stops there.
    ``cpu``/``paper``: in place (the notebook, ``figures/``, ``tables/``, ``data/`` are
    replaced on success); ``smoke``: into ``.nbrun/smoke/``. Each chapter's kernel gets
    ``$BKFAC_CHAPTER`` (recorded in the figures' and tables' manifest) and
    ``$BKFAC_STALE_RESULTS`` (``reuse`` with ``--reuse-stale``, else ``retrain``). Returns 0 when
    every chapter ran, 1 when any failed (the others still run).
    """
    from .experiments.report import STALE_ENV

    _check_profile(args.profile)
    root = repo_root()
    selected = _selected(args.chapters, root)
    if getattr(args, "list", False):
        for path in selected:
            print(f"{path.relative_to(root)}: {load_params(args.profile, path, root)}")
        return 0
    # validate everything before running anything
    for path in selected:
        load_params(args.profile, path, root)
    stop = _prepare_results(args, selected, root)
    if stop is not None:
        return stop
    in_place = args.profile in IN_PLACE_PROFILES
    where = "in place" if in_place else f"into {NBRUN}/{args.profile}/"
    print(f"bkfac reproduce: profile '{args.profile}', {len(selected)} chapter(s), executed {where}", flush=True)
    saved = {k: os.environ.get(k) for k in ("BKFAC_CHAPTER", STALE_ENV)}
    os.environ[STALE_ENV] = "reuse" if getattr(args, "reuse_stale", False) else "retrain"
    failures, total = [], 0.0
    try:
        for i, path in enumerate(selected, 1):
            out = path if in_place else root / NBRUN / args.profile / path.name
            print(f"[{i}/{len(selected)}] {path.stem} ...", end=" ", flush=True)
            os.environ["BKFAC_CHAPTER"] = path.stem
            t0 = time.perf_counter()
            try:
                secs = execute_chapter(path, args.profile, out, root)
            except Exception as exc:  # papermill's execution error, a kernel death, ...
                secs = time.perf_counter() - t0
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                failed = _failed_path(root, args.profile, path)
                kept = f" (notebook kept in {failed.relative_to(root)})" if failed.exists() else ""
                print(f"FAILED after {secs:.1f} s: {lines[-1] if lines else type(exc).__name__}{kept}", flush=True)
                failures.append(path.stem)
            else:
                print(f"ok ({secs:.1f} s) -> {out.relative_to(root)}", flush=True)
            total += time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    status = "all chapters ran" if not failures else f"FAILED: {', '.join(failures)}"
    print(f"bkfac reproduce: {status} in {total:.1f} s", flush=True)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bkfac.book {reproduce,prepare,preview,list}``."""
    parser = argparse.ArgumentParser(prog="python -m bkfac.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_reproduce_args(sub.add_parser("reproduce", help="execute the chapters for a profile (as `bkfac reproduce`)"))
    p = sub.add_parser("prepare", help="papermill prepare_only copies for nbval")
    p.add_argument("--profile", default="smoke")
    p.add_argument("--out", default=f"{NBRUN}/smoke")
    p.add_argument("--chapters", nargs="+", default=None)
    p = sub.add_parser("preview", help="a readable stand-in for the rendered book, built with pandoc (no Quarto)")
    p.add_argument("--out", default=".preview")
    p.add_argument("--chapters", nargs="+", default=None)
    sub.add_parser("list", help="list the chapters in book order")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "reproduce":
            return run_reproduce(args)
        if args.cmd == "prepare":
            paths = prepare(args.profile, args.out, args.chapters)
            print(f"prepared {len(paths)} chapter(s) with profile '{args.profile}' in {args.out}")
            return 0
        if args.cmd == "preview":
            paths = preview(args.out, args.chapters)
            print(f"wrote the preview: {len(paths) - 1} chapter page(s) and the front page {paths[-1]}")
            return 0
        for path in chapters():
            print(path.relative_to(repo_root()))
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _watch_reads() -> None:
    """Record the stored results this process reads (the sources of what a chapter saves)."""
    from .experiments.manifest import watch_reads

    watch_reads()


_watch_reads()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
