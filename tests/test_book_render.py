"""The book as Quarto renders it, read by the engine Quarto runs.

Quarto turns each executed chapter into Markdown and hands it to pandoc; the Quarto CLI is not
installed on the build machines, so :func:`bkfac.quarto_md.notebook_markdown` rebuilds that
Markdown and pandoc (the ``pypandoc-binary`` wheel of the ``book`` extra) parses it as a reader
of the rendered book would see it. Every chapter -- the committed notebooks (executed with the
``cpu`` profile) and the smoke copies ``make test`` prepares in ``.nbrun/smoke/``, executed here
with the ``smoke`` profile so that a chapter whose code changed is read as it now prints -- must
have:

* no table row with more cells than its header (pandoc drops the cells beyond the header's
  count silently: an unescaped ``|`` in a cell loses the row's numbers);
* no ``$`` that pandoc did not read as math, no TeX outside math (pandoc keeps it as raw TeX,
  which an HTML page drops);
* every citation key in ``references.bib`` and every ``@fig-``/``@tbl-``/``@prp-``/``@sec-``/
  ``@eq-`` reference resolved to a figure, table or labelled block of the book;
* no absolute path or home directory anywhere on the page;
* no output line over :data:`MAX_OUTPUT_CHARS` characters (it would scroll sideways), no figure
  wider than :data:`MAX_FIGURE_PX` pixels (it would be scaled down, its legend with it), no
  heading inside an output (it would enter the table of contents), no parameters cell shown
  next to the one papermill injected, no section titled "Appendix ..." in the appendix (Quarto
  numbers it "A.n" already).

A last test reads every committed file of the repository for absolute paths of the machine that
made it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pypandoc
import pytest
import torch

from bkfac import book
from bkfac.experiments.propositions import Statement, PropositionCheck
from bkfac.quarto_md import code_cell_options, notebook_markdown

ROOT = book.repo_root()
CHAPTERS = book.chapters(ROOT)
SMOKE_COPIES = ROOT / book.NBRUN / "smoke"
XREF_PREFIXES = ("fig-", "tbl-", "prp-", "sec-", "eq-", "thm-", "lem-", "def-", "cor-")
MAX_OUTPUT_CHARS = 100
MAX_FIGURE_PX = 850  # the body column of Quarto's HTML book; a wider PNG is scaled down
SENTINEL = "ENDOFROWSENTINEL"

#: Absolute paths: under the usual roots of a machine's directories, or ``~/``; the
#: repository's and the home directory's own paths are added where the test runs.
ABS_PATH_RE = re.compile(
    r"(?<![\w.~/\\-])(?:/(?:home|root|Users|tmp|work|mnt|opt|srv|scratch|media|private|nfs|gpfs|lustre|var/folders)/"
    r"|~/)"
)


def _local_paths() -> list[str]:
    out = {str(ROOT), str(ROOT.resolve())}
    home = str(Path.home())
    if len(home) > 1:
        out.add(home.rstrip("/") + "/")
    data = os.environ.get("BKFAC_DATA_DIR", "").strip()
    if data.startswith("/"):
        out.add(data)
    return sorted(out)


def absolute_paths(text: str) -> list[str]:
    """Every absolute path (or home directory) in ``text``, each once, with a little context."""
    starts = {m.start() for m in ABS_PATH_RE.finditer(text)}
    for p in _local_paths():
        starts |= {m.start() for m in re.finditer(re.escape(p), text)}
    return [text[max(0, i - 30):i + 80].replace("\n", " ") for i in sorted(starts)]


# ------------------------------------------------------------------------------------------
# pandoc
# ------------------------------------------------------------------------------------------


def pandoc_ast(markdown: str) -> dict:
    """pandoc's AST (JSON) of ``markdown`` read as pandoc Markdown, Quarto's input format."""
    return json.loads(pypandoc.convert_text(markdown, "json", format="markdown"))


def _nodes(node, skip=()):
    """Every pandoc element under ``node`` (depth first), not entering element types ``skip``."""
    if isinstance(node, dict):
        if "t" in node:
            yield node
            if node["t"] in skip:
                return
        for v in node.values():
            yield from _nodes(v, skip)
    elif isinstance(node, list):
        for v in node:
            yield from _nodes(v, skip)


def _text(node) -> str:
    """The plain text of an element (Str, Space, Code and Math contents)."""
    parts = []
    for n in _nodes(node):
        t, c = n["t"], n.get("c")
        if t == "Str":
            parts.append(c)
        elif t in ("Space", "SoftBreak", "LineBreak"):
            parts.append(" ")
        elif t == "Code":
            parts.append(c[1])
        elif t == "Math":
            parts.append(f"${c[1]}$")
    return "".join(parts)


def _attr(node) -> list | None:
    """The ``[id, classes, key-values]`` of an element that has one."""
    t, c = node["t"], node.get("c")
    if t in ("Div", "Span", "CodeBlock", "Code", "Table", "Figure"):
        return c[0]
    if t in ("Image", "Link"):
        return c[0]
    if t == "Header":
        return c[1]
    return None


def _ids(ast: dict) -> dict[str, dict]:
    out = {}
    for n in _nodes(ast["blocks"]):
        a = _attr(n)
        if a and a[0]:
            out.setdefault(a[0], n)
    return out


def bib_keys() -> set[str]:
    """The keys of ``references.bib`` as pandoc's BibTeX reader (citeproc's input) reads them."""
    entries = json.loads(pypandoc.convert_file(str(ROOT / "references.bib"), "csljson", format="bibtex"))
    return {e["id"] for e in entries}


# ------------------------------------------------------------------------------------------
# the checks: each returns the problems found, as messages
# ------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def _pipe_tables(markdown: str) -> list[list[str]]:
    """The pipe tables of ``markdown`` (header, separator, rows) as lists of source lines,
    outside fenced code blocks."""
    lines = markdown.splitlines()
    tables, fence, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                fence = None
            i += 1
            continue
        if m:
            fence = m.group(1)
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and "-" in lines[i + 1] and _SEPARATOR.match(lines[i + 1]):
            block = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].strip() and "|" in lines[i]:
                block.append(lines[i])
                i += 1
            tables.append(block)
            continue
        i += 1
    return tables


def _with_sentinel(line: str, cell: str) -> str:
    line = line.rstrip()
    return f"{line} {cell} |" if re.search(r"(?<!\\)\|$", line) else f"{line} | {cell} |"


def table_problems(markdown: str, where: str) -> list[str]:
    """Rows with more cells than their table's header, as pandoc splits them.

    A sentinel column is appended to every line of every pipe table and the tables are parsed
    by pandoc: a row whose sentinel is missing or sits after the header's had cells that pandoc
    drops.
    """
    tables = _pipe_tables(markdown)
    if not tables:
        return []
    doc = []
    for block in tables:
        doc += [_with_sentinel(block[0], SENTINEL), _with_sentinel(block[1], "---")]
        doc += [_with_sentinel(row, SENTINEL) for row in block[2:]] + [""]
    parsed = [n for n in _nodes(pandoc_ast("\n".join(doc))["blocks"]) if n["t"] == "Table"]
    assert len(parsed) == len(tables), f"{where}: pandoc read {len(parsed)} of {len(tables)} pipe tables"
    problems = []
    for block, table in zip(tables, parsed):
        head_rows, bodies = table["c"][3][1], table["c"][4]
        header = [_text(cell[4]) for cell in head_rows[0][1]]
        width = header.index(SENTINEL)
        for src, row in zip(block[2:], [r for body in bodies for r in body[3]]):
            cells = [_text(cell[4]) for cell in row[1]]
            if SENTINEL not in cells or cells.index(SENTINEL) > width:
                problems.append(f"{where}: table row has more cells than its header ({width}); pandoc drops "
                                f"the rest: {src.strip()[:160]}")
    return problems


def math_problems(ast: dict, where: str) -> list[str]:
    """``$`` signs pandoc did not read as math, and TeX it kept raw outside math."""
    problems = []
    for block in ast["blocks"]:
        for n in _nodes(block, skip=("Math", "Code", "CodeBlock", "RawBlock")):
            if n["t"] == "Str" and "$" in n["c"]:
                problems.append(f"{where}: '$' not read as math near: {_text(block)[:200]}")
            elif n["t"] in ("RawInline", "RawBlock") and n["c"][0] in ("tex", "latex"):
                problems.append(f"{where}: TeX not read as math (raw TeX, dropped from an HTML page): {n['c'][1][:80]!r} in: "
                                f"{_text(block)[:200]}")
    return problems


def reference_problems(asts: dict[str, dict], keys: set[str]) -> list[str]:
    """Citations missing from the bibliography, cross-references that resolve to nothing."""
    ids = {}
    for ast in asts.values():
        ids.update(_ids(ast))
    problems = []
    for where, ast in asts.items():
        for n in _nodes(ast["blocks"], skip=("Code", "CodeBlock")):
            if n["t"] != "Cite":
                continue
            for citation in n["c"][0]:
                key = citation["citationId"]
                if key.startswith(XREF_PREFIXES):
                    target = ids.get(key)
                    if target is None:
                        problems.append(f"{where}: @{key} does not resolve to any label of the book")
                    elif key.startswith("tbl-") and not any(m["t"] == "Table" for m in _nodes(target)):
                        problems.append(f"{where}: @{key} labels a block holding no table")
                    elif key.startswith("fig-") and not any(m["t"] == "Image" for m in _nodes(target)):
                        problems.append(f"{where}: @{key} labels a block holding no figure")
                elif key not in keys:
                    problems.append(f"{where}: citation @{key} is not in references.bib")
    return problems


def layout_problems(ast: dict, where: str, appendix: bool) -> list[str]:
    """Long output lines, headings inside outputs, a shown parameters cell next to the injected
    one, "Appendix ..." section titles in an appendix."""
    problems = []
    cells = [n for n in _nodes(ast["blocks"]) if n["t"] == "Div" and "cell" in n["c"][0][1]]
    tags = [dict(c["c"][0][2]).get("tags", "[]") for c in cells]
    if any('"injected-parameters"' in t for t in tags) and any('"parameters"' in t for t in tags):
        problems.append(f"{where}: the default parameters cell is shown next to the injected one "
                        "(tag it remove-cell)")
    for n in _nodes(ast["blocks"]):
        if n["t"] != "Div" or "cell-output" not in n["c"][0][1]:
            continue
        for m in _nodes(n["c"][1]):
            if m["t"] == "CodeBlock":
                for line in m["c"][1].splitlines():
                    if len(line) > MAX_OUTPUT_CHARS:
                        problems.append(f"{where}: output line of {len(line)} characters (over "
                                        f"{MAX_OUTPUT_CHARS}, it scrolls sideways): {line[:120]}")
            elif m["t"] == "Header":
                problems.append(f"{where}: heading inside an output enters the table of contents: {_text(m)[:80]}")
    if appendix:
        for n in _nodes(ast["blocks"]):
            if n["t"] == "Header" and _text(n["c"][2]).lower().startswith("appendix"):
                problems.append(f"{where}: section titled {_text(n['c'][2])[:60]!r} in an appendix "
                                "(Quarto numbers it A.n already)")
    return problems


def figure_problems(nb: dict, where: str) -> list[str]:
    """PNG outputs wider than the page's column (Quarto scales them down, text included)."""
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code" or code_cell_options(cell).get("include") is False:
            continue
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                head = base64.b64decode("".join(png)[:64])
                width, height = struct.unpack(">II", head[16:24])
                if width > MAX_FIGURE_PX:
                    problems.append(f"{where} cell {i}: figure {width}x{height} px is scaled down to the "
                                    f"{MAX_FIGURE_PX} px column (choose figsize for the column)")
    return problems


def book_problems(notebooks: list[Path], qmd_files: list[Path]) -> list[str]:
    """Every problem of the book made of ``notebooks`` and ``qmd_files``."""
    keys = bib_keys()
    appendices = {Path(f).stem for f in book._flatten(book._quarto_config(ROOT)["book"].get("appendices", []))}
    asts, problems = {}, []
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        md = notebook_markdown(nb, figures_dir=f"{path.stem}_files/figure-html")
        ast = pandoc_ast(md)
        asts[path.name] = ast
        problems += table_problems(md, path.name)
        problems += math_problems(ast, path.name)
        problems += layout_problems(ast, path.name, appendix=path.stem in appendices)
        problems += figure_problems(nb, path.name)
        problems += [f"{path.name}: absolute path on the page: {p}" for p in absolute_paths(md)]
    for path in qmd_files:
        md = path.read_text(encoding="utf-8")
        asts[path.name] = ast = pandoc_ast(md)
        problems += table_problems(md, path.name) + math_problems(ast, path.name)
        problems += [f"{path.name}: absolute path on the page: {p}" for p in absolute_paths(md)]
    return list(dict.fromkeys(problems + reference_problems(asts, keys)))


QMD_FILES = [ROOT / f for f in book.book_files(ROOT) if f.endswith(".qmd")]


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------
# the book
# ------------------------------------------------------------------------------------------


def test_committed_book_reads_as_written():
    problems = book_problems(CHAPTERS, QMD_FILES)
    assert not problems, _report(problems)


@pytest.fixture(scope="module")
def smoke_executed(tmp_path_factory) -> list[Path]:
    """The smoke copies (``.nbrun/smoke/``, made by ``make test``; prepared here when missing),
    executed with papermill into a temporary folder."""
    import papermill as pm

    out = tmp_path_factory.mktemp("smoke-executed")
    copies = [SMOKE_COPIES / p.name for p in CHAPTERS]
    if not all(c.is_file() for c in copies):
        copies = book.prepare("smoke", out / "prepared", root=ROOT)
    executed = []
    for copy in copies:
        target = out / copy.name
        pm.execute_notebook(str(copy), str(target), kernel_name=book.KERNEL, cwd=str(ROOT / "chapters"),
                            progress_bar=False, log_output=False)
        executed.append(target)
    return executed


@pytest.mark.slow
def test_book_exec_smoke_copies_read_as_written(smoke_executed):
    for path in smoke_executed:
        assert "injected-parameters" in path.read_text(encoding="utf-8"), f"{path.name}: not a smoke copy"
    problems = book_problems(smoke_executed, QMD_FILES)
    assert not problems, _report(problems)


# ------------------------------------------------------------------------------------------
# the checks find what they look for
# ------------------------------------------------------------------------------------------


def _chapter(*cells: dict) -> dict:
    raw = {"cell_type": "raw", "metadata": {}, "source": '---\ntitle: "T"\n---'}
    return {"cells": [raw, *cells], "metadata": {"kernelspec": {"language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def _md_cell(src: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": src}


def _code_cell(src: str, outputs=(), tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": src, "execution_count": 1,
            "outputs": list(outputs)}


def _markdown_out(text: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": text, "text/plain": "<md>"}}


def _problems_of(tmp_path, nb: dict, name: str = "T.ipynb") -> list[str]:
    path = tmp_path / name
    path.write_text(json.dumps(nb), encoding="utf-8")
    return book_problems([path], [])


def test_checks_catch_each_defect(tmp_path):
    """Each defect the issue names, planted in a one-chapter book, is reported -- and only it."""
    clean = _chapter(_md_cell("Some $x^2$ text [@puiu2022brand]."),
                     _code_cell("#| label: tbl-x\n#| tbl-cap: 'A table.'\nshow()",
                                [_markdown_out("| a | b |\n|---|---:|\n| x \\| y | 1 |")]),
                     _md_cell("See @tbl-x."))
    assert _problems_of(tmp_path, clean) == []
    cases = {
        "more cells than its header": _markdown_out("| a | b |\n|---|---:|\n| ||M|| >= 0 | 1 |"),
        "not read as math": _md_cell("where $\\mathrm{T}(X) = X - $ its truncation"),
        "not in references.bib": _md_cell("as in [@nosuchkey2099]"),
        "does not resolve": _md_cell("see @fig-nowhere"),
        "absolute path": {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
                          "data": {"text/plain": "PosixPath('/home/someone/tables/x.csv')"}},
        "scrolls sideways": {"output_type": "stream", "name": "stdout", "text": "x" * 140 + "\n"},
        "table of contents": _markdown_out("# Notes\n\ntext"),
    }
    for expected, item in cases.items():
        cell = _code_cell("show()", [item]) if "output_type" in item else item
        problems = _problems_of(tmp_path, _chapter(cell))
        assert problems and all(expected in p for p in problems), (expected, problems)
    both = _chapter(_code_cell("a = 1", tags=["parameters"]), _code_cell("a = 2", tags=["injected-parameters"]))
    assert any("injected one" in p for p in _problems_of(tmp_path, both))
    both["cells"][1]["metadata"]["tags"].append("remove-cell")
    assert _problems_of(tmp_path, both) == []


def test_table_check_counts_cells_as_pandoc_splits_them():
    ok = "| a | b |\n|---|---|\n| `x|y` | $|x|$ |\n| x \\| y | 2 |\n| one |\n"
    assert table_problems(ok, "t") == []
    bad = "| a | b |\n|---|---|\n| x | y | z |\n"
    assert len(table_problems(bad, "t")) == 1
    fenced = "```\n| a | b |\n|---|---|\n| x | y | z |\n```\n"
    assert table_problems(fenced, "t") == []


def test_absolute_path_detector():
    assert absolute_paths("wrote /tmp/bench5/step.csv") and absolute_paths("read from ~/data")
    assert absolute_paths(f"at {ROOT}/tables")
    assert not absolute_paths("wrote data/results/bench/step.csv; ratio 3/4; see https://host/tmp/x")


# ------------------------------------------------------------------------------------------
# the tables of the chapters: one escaping helper, cells read back exactly
# ------------------------------------------------------------------------------------------

STATEMENTS = [
    "(11) ||M_k - B_k|| >= ||M_k - M~_R;k,r|| [fro]",
    "(12) M~^R@i_B,i+j - B^R@i_i+j is sym. PSD",
    "(17) is an upper bound: ||E_j||_F <= sqrt(||M_j M_j^T||_F^2 + ||M~_R;0,r||_F^2) (no update)",
    "erratum (S.9) with X_i <- M~_B,i: first term rho^q (M_i - M~_B,i)",
    "a *b* _c_ `d [e](f) <g> \\h $5 and $6 #7 @key",
]


def _table_cells(markdown: str) -> tuple[list[str], list[list[dict]]]:
    table = next(n for n in _nodes(pandoc_ast(markdown)["blocks"]) if n["t"] == "Table")
    header = [_text(c[4]) for c in table["c"][3][1][0][1]]
    rows = [[c[4] for c in r[1]] for body in table["c"][4] for r in body[3]]
    return header, rows


def test_markdown_table_cells_read_back_as_plain_text():
    rows = [{"statement": s, "n": i} for i, s in enumerate(STATEMENTS)]
    header, parsed = _table_cells(book.markdown_table(rows))
    assert header == ["statement", "n"]
    for src, cells in zip(rows, parsed):
        kinds = {n["t"] for n in _nodes(cells)} - {"Plain", "Para", "Str", "Space"}
        assert not kinds, (src["statement"], kinds)  # no emphasis, super/subscript, link, code, math, cite
        assert _text(cells[0]) == src["statement"] and _text(cells[1]) == str(src["n"])


def test_markdown_table_keeps_math_and_code_cells():
    header, parsed = _table_cells(book.markdown_table([{"$|x|^2$": "$\\|A\\|_F$ and `a|b`", "n": 1.5}]))
    assert header == ["$|x|^2$", "n"]
    nodes = list(_nodes(parsed[0][0]))
    assert [n["c"][1] for n in nodes if n["t"] == "Math"] == ["\\|A\\|_F"]
    assert [n["c"][1] for n in nodes if n["t"] == "Code"] == ["a|b"]


def test_markdown_table_aligns_numbers_with_missing_values_right():
    text = book.markdown_table([{"a": 1, "b": "x", "c": 2.5}, {"a": "-", "b": "y", "c": None}])
    assert text.splitlines()[1] == "|---:|---|---:|"


def test_proposition_table_rows_keep_every_column():
    res = PropositionCheck(proposition="Proposition T", instances=3, tol=1e-10, ranges={})
    for i, name in enumerate(STATEMENTS):
        st = Statement(name=name, kind="claim" if i % 2 else "proof")
        st.add(1e-15 * (i + 1), res.tol, 0)
        res.statements.append(st)
    err = Statement(name="erratum ||X|| = 0", kind="erratum")
    err.add(0.5, res.tol, 0)
    res.errata.append(err)
    header, parsed = _table_cells(res.table())
    assert header == ["statement", "kind", "checks", "violations", "refuted", "worst defect"]
    assert len(parsed) == len(STATEMENTS) + 1
    for st, cells in zip(res.statements + res.errata, parsed):
        text = [_text(c) for c in cells]
        erratum = st.kind == "erratum"
        assert text == [st.name, st.kind, str(st.checks), "-" if erratum else str(st.violations),
                        str(st.refuted) if erratum else "-", f"{st.worst:.2e}"]


# ------------------------------------------------------------------------------------------
# the repository: no committed file names a directory of the machine that made it
# ------------------------------------------------------------------------------------------


def _committed_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("the repository check needs git and a git checkout (git ls-files)")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / n for n in names.decode().split("\0") if n]


def test_no_committed_file_holds_an_absolute_path():
    found = []
    this = Path(__file__).resolve()
    for path in _committed_files():
        if not path.is_file() or path.resolve() == this:
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary (figures, checkpoints)
        text = data.decode("utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {hit}" for hit in absolute_paths(text)]
    assert not found, _report(found)


# ------------------------------------------------------------------------------------------
# results name their data by layout and content, never by where it was read from
# ------------------------------------------------------------------------------------------

FINGERPRINT_RE = re.compile(r"^(?P<layout>[\w-]+) (?P<train>\d+)\+(?P<test>\d+) sha256:(?P<hex>[0-9a-f]{64})$")


def _arrays(source: str, seed: int = 0):
    from bkfac.experiments.data import CIFAR10_CLASSES, CIFAR10Arrays

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (30, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(30) % 10
    return CIFAR10Arrays(x[:20].clone(), y[:20].clone(), x[20:].clone(), y[20:].clone(), CIFAR10_CLASSES,
                         source=source, layout="png-tree")


def test_fingerprint_is_the_content_not_the_place():
    from bkfac.experiments.data import fingerprint

    a, b = _arrays("/somewhere/cifar10"), _arrays("elsewhere")
    fa = fingerprint(a)
    m = FINGERPRINT_RE.match(fa)
    assert m and m["layout"] == "png-tree" and (m["train"], m["test"]) == ("20", "10")
    assert fingerprint(b) == fa and "somewhere" not in fa  # same content, other place
    # an independent digest: the documented byte layout, hashed from .tobytes()
    h = hashlib.sha256(("classes:" + ",".join(a.classes) + "\n").encode())
    for name in ("train_x", "train_y", "test_x", "test_y"):
        t = getattr(a, name)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode() + t.numpy().tobytes())
    assert m["hex"] == h.hexdigest()
    c = _arrays("elsewhere")
    c.train_x[7, 1, 3, 4] ^= 1  # one bit of one pixel
    d = _arrays("elsewhere")
    d.test_y[0] = 3  # one label
    e = _arrays("elsewhere")
    e.layout = "cifar-10-batches-py"
    assert len({fa, fingerprint(c), fingerprint(d), fingerprint(e)}) == 4
    assert fingerprint(a) is fingerprint(a)  # computed once per arrays object
    with pytest.raises(TypeError, match="arrays"):
        fingerprint(a.train_x)


def test_training_records_the_data_fingerprint(tmp_path):
    from bkfac.cli import main
    from bkfac.experiments.data import fingerprint, synthetic_cifar10
    from bkfac.experiments.profiles import load_profile

    prof = load_profile("smoke")
    rc = main(["train", "--profile", "smoke", "--optimizer", "sgd", "--out", str(tmp_path), "--quiet",
               "--epochs", "1", "--synthetic-data"])
    assert rc == 0
    summary = json.loads((tmp_path / "smoke-synthetic" / "sgd" / "seed0" / "summary.json").read_text())
    expected = fingerprint(synthetic_cifar10(prof.data["n_train"], prof.data["n_test"], seed=0))
    assert summary["data"] == expected and expected.startswith("synthetic ")


def test_committed_results_name_their_data_by_content():
    summaries = [p for p in _committed_files() if p.name == "summary.json" and p.is_file()]
    assert summaries
    full = set()
    for path in summaries:
        data = json.loads(path.read_text(encoding="utf-8")).get("data")
        if data is None:
            continue  # older runs recorded no data field
        assert not absolute_paths(data), f"{path.relative_to(ROOT)}: data named by a path: {data}"
        m = FINGERPRINT_RE.match(data)
        assert m or data.startswith("synthetic ["), f"{path.relative_to(ROOT)}: data is {data!r}"
        if m and m["layout"] != "synthetic" and (m["train"], m["test"]) == ("50000", "10000"):
            full.add(data)
    assert len(full) <= 1, f"the runs on the full CIFAR-10 name different data: {full}"


# ------------------------------------------------------------------------------------------
# bkfac.quarto_md: the Markdown of a notebook as Quarto builds it
# ------------------------------------------------------------------------------------------

PNG_1x1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_quarto_markdown_of_a_notebook(tmp_path):
    image = {"output_type": "display_data", "metadata": {},
             "data": {"image/png": PNG_1x1, "text/plain": "<Figure size 640x480 with 1 Axes>"}}
    nb = _chapter(
        _md_cell("Text with $x$."),
        _code_cell("a = 1", tags=["parameters", "remove-cell"]),
        _code_cell("#| include: false\nhidden = 1"),
        _code_cell("#| echo: false\nprint('only the output')",
                   [{"output_type": "stream", "name": "stdout", "text": "first\n"},
                    {"output_type": "stream", "name": "stderr", "text": "a warning\n"},
                    {"output_type": "stream", "name": "stdout", "text": "second\n"}]),
        _code_cell("#| warning: false\nwarn()", [{"output_type": "stream", "name": "stderr", "text": "dropped\n"},
                                                  {"output_type": "stream", "name": "stdout", "text": "kept\n"}]),
        _code_cell("#| output: false\nshown_code = 1", [{"output_type": "stream", "name": "stdout", "text": "no\n"}]),
        _code_cell("#| label: fig-one\n#| fig-cap: 'One pixel.'\n\nplt.show()", [image]),
        _code_cell("#| label: tbl-two\n#| tbl-cap: 'Two cells.'\nshow()", [_markdown_out("| a | b |\n|---|---|\n| 1 | 2 |")]),
    )
    md = notebook_markdown(nb, figures_dir="ch_files/figure-html", write_figures=tmp_path)
    assert md.startswith('---\ntitle: "T"\n---\n') and "#|" not in md
    for gone in ("a = 1", "hidden = 1", "print('only the output')", "dropped", "\nno\n"):
        assert gone not in md, gone
    assert "```\nfirst\nsecond\n```" in md and "a warning" in md and "kept" in md and "shown_code = 1" in md
    assert "![One pixel.](ch_files/figure-html/fig-one-output-1.png){#fig-one}" in md
    assert (tmp_path / "ch_files/figure-html/fig-one-output-1.png").read_bytes() == base64.b64decode(PNG_1x1)
    assert "::: {#tbl-two .cell tags='[]' tbl-cap='Two cells.' execution_count=1}" in md
    ast = pandoc_ast(md)
    ids = _ids(ast)
    assert ids["fig-one"]["t"] == "Figure" and any(n["t"] == "Image" for n in _nodes(ids["fig-one"]))
    assert any(n["t"] == "Table" for n in _nodes(ids["tbl-two"]))
    assert [n["c"][1] for n in _nodes(ast["blocks"]) if n["t"] == "Math"] == ["x"]
    code = [n["c"] for n in _nodes(ast["blocks"]) if n["t"] == "CodeBlock" and "cell-code" in n["c"][0][1]]
    assert [c[1] for c in code] == ["warn()", "shown_code = 1", "plt.show()", "show()"]
    assert code[0][0][1] == ["python", "cell-code"]


def test_quarto_cell_options_and_bad_input(tmp_path):
    cell = _code_cell("#| echo: false\n#| fig-cap: \"a: b\"\nx = 1", tags=["hide-output", "show-code"])
    assert code_cell_options(cell) == {"echo": False, "output": False, "fig-cap": "a: b"}
    with pytest.raises(ValueError, match="code cell"):
        code_cell_options(_md_cell("text"))
    with pytest.raises(ValueError, match="YAML mapping"):
        notebook_markdown(_chapter(_code_cell("#| - a list\nx = 1")))
    with pytest.raises(ValueError, match="cells"):
        notebook_markdown({"metadata": {}})
    with pytest.raises(TypeError, match="notebook"):
        notebook_markdown(42)
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(_chapter(_code_cell("#| label: fig-p\n#| fig-cap: P\nf()", [
        {"output_type": "display_data", "metadata": {}, "data": {"image/png": PNG_1x1}}]))), encoding="utf-8")
    assert "(nb_files/figure-html/fig-p-output-1.png){#fig-p}" in notebook_markdown(path)
