"""Structure of the book: chapters, front matter, parameters, labels, cross-references, citations.

These tests read the committed files only (no chapter is executed here; nbval does that over
the smoke-profile copies). The one test that needs the Quarto CLI is skipped where ``quarto``
is not on PATH -- the only skip allowed in this file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from bkfac import book
from bkfac.quarto_md import QUARTO_TAG_OPTIONS

ROOT = book.repo_root()
CHAPTERS = book.chapters(ROOT)
LABEL_RE = re.compile(r"^#\|\s*label:\s*((fig|tbl)-[\w-]+)\s*$", re.M)
DIV_LABEL_RE = re.compile(r"\{#((?:prp|fig|tbl|sec|thm|lem|def)-[\w-]+)[^}]*\}")
XREF_RE = re.compile(r"(?<![\w@])@((?:fig|tbl|prp|sec|thm|lem|def)-[\w-]*[\w])")
CITE_RE = re.compile(r"(?<![\w@/.])@([A-Za-z][\w:.-]*[\w])")
XREF_PREFIXES = ("fig-", "tbl-", "prp-", "sec-", "thm-", "lem-", "def-", "eq-")


def _nb(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _strip_code(md: str) -> str:
    """Markdown without fenced code blocks and inline code spans (no citations live there)."""
    md = re.sub(r"```.*?```", "", md, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", md)


def _markdown_texts() -> list[tuple[str, str]]:
    """(where, text) of every markdown cell of the book and of its .qmd files."""
    out = []
    for path in CHAPTERS:
        for i, cell in enumerate(_nb(path)["cells"]):
            if cell["cell_type"] == "markdown":
                out.append((f"{path.name} cell {i}", _strip_code(_src(cell))))
    for f in book.book_files(ROOT):
        if f.endswith(".qmd"):
            out.append((f, _strip_code((ROOT / f).read_text(encoding="utf-8"))))
    return out


def _bib_keys() -> set[str]:
    text = (ROOT / "references.bib").read_text(encoding="utf-8")
    return set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", text))


# ------------------------------------------------------------------------------------------
# _quarto.yml and the chapter files
# ------------------------------------------------------------------------------------------


def test_quarto_config_is_a_book_that_does_not_execute():
    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text(encoding="utf-8"))
    assert cfg["project"]["type"] == "book"
    assert cfg["book"]["title"] and cfg["book"]["author"]
    assert cfg["bibliography"] == "references.bib"
    assert cfg["execute"]["enabled"] is False  # Quarto renders the stored outputs
    assert "html" in cfg["format"]
    files = book.book_files(ROOT)
    assert files[0] == "index.qmd" and "references.qmd" in files
    assert len(CHAPTERS) >= 5


def test_every_book_file_exists_and_chapters_are_valid_notebooks():
    for f in book.book_files(ROOT):
        assert (ROOT / f).is_file(), f"{f} is listed in _quarto.yml but missing"
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == book.KERNEL, path.name


def test_chapters_reads_parts_and_appendices(tmp_path):
    (tmp_path / "_quarto.yml").write_text(
        "project: {type: book}\nbook:\n  chapters:\n    - index.qmd\n"
        "    - part: One\n      chapters: [chapters/a.ipynb, chapters/b.ipynb]\n"
        "  appendices: [chapters/z.ipynb]\n",
        encoding="utf-8",
    )
    assert [p.name for p in book.chapters(tmp_path)] == ["a.ipynb", "b.ipynb", "z.ipynb"]
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="book"):
        book.chapters(tmp_path)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_front_matter_and_parameters_cell(path):
    nb = _nb(path)
    first = nb["cells"][0]
    assert first["cell_type"] == "raw", "the first cell must be a raw cell with YAML front matter"
    m = re.match(r"^---\s*\n(.*?)\n---\s*$", _src(first).strip(), re.S)
    assert m, "the raw first cell must be '---' YAML '---'"
    assert yaml.safe_load(m.group(1)).get("title"), "front matter needs a title"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    params = book.parameters_cell(nb)
    assert "profile" in params and "device" in params and "seed" in params


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_committed_chapter_is_executed_with_an_in_place_profile(path):
    nb = _nb(path)
    injected = [c for c in nb["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(injected) == 1, "commit chapters executed by `bkfac reproduce` (papermill injects the parameters)"
    m = re.search(r"^profile = \"(\w+)\"", _src(injected[0]), re.M)
    assert m and m.group(1) in book.IN_PLACE_PROFILES
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("execution_count") is not None, f"cell {i} was not executed"
        assert not any(o.get("output_type") == "error" for o in cell.get("outputs", [])), f"cell {i} failed"
        if "nbval-check-output" in cell.get("metadata", {}).get("tags", []):
            assert cell.get("outputs"), f"verdict cell {i} has no stored output to compare"


# ------------------------------------------------------------------------------------------
# Labels, captions, cross-references, citations
# ------------------------------------------------------------------------------------------


def _labels() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in CHAPTERS:
        for i, cell in enumerate(_nb(path)["cells"]):
            src = _src(cell)
            here = []
            if cell["cell_type"] == "code":
                opts = book.cell_options(cell)
                if "label" in opts:
                    here.append(opts["label"])
                here += [m.group(1) for m in LABEL_RE.finditer(src) if m.group(1) not in here]
            elif cell["cell_type"] == "markdown":
                here += DIV_LABEL_RE.findall(src)
            for label in here:
                assert label not in found, f"label {label} defined twice: {found[label]} and {path.name} cell {i}"
                found[label] = f"{path.name} cell {i}"
    for f in book.book_files(ROOT):
        if f.endswith(".qmd"):
            for label in DIV_LABEL_RE.findall((ROOT / f).read_text(encoding="utf-8")):
                assert label not in found, f"label {label} defined twice"
                found[label] = f
    return found


def test_labels_are_unique_and_figures_tables_have_captions():
    labels = _labels()
    assert any(k.startswith("fig-") for k in labels) and any(k.startswith("tbl-") for k in labels)
    assert any(k.startswith("prp-") for k in labels)
    for path in CHAPTERS:
        for i, cell in enumerate(_nb(path)["cells"]):
            if cell["cell_type"] != "code":
                continue
            opts = book.cell_options(cell)
            label = opts.get("label", "")
            if label.startswith("fig-"):
                assert opts.get("fig-cap"), f"{path.name} cell {i}: {label} needs a fig-cap"
                outs = cell.get("outputs", [])
                assert any("image/png" in o.get("data", {}) for o in outs), f"{label}: no stored figure"
            elif label.startswith("tbl-"):
                assert opts.get("tbl-cap"), f"{path.name} cell {i}: {label} needs a tbl-cap"
            else:
                assert "fig-cap" not in opts and "tbl-cap" not in opts, f"{path.name} cell {i}: caption without label"


def test_cross_references_resolve():
    labels = _labels()
    refs = 0
    for where, text in _markdown_texts():
        for ref in XREF_RE.findall(text):
            refs += 1
            assert ref in labels, f"{where}: @{ref} does not resolve"
    assert refs > 0


def test_citations_exist_in_the_bibliography():
    keys = _bib_keys()
    assert {"martens2015kfac", "grosse2016kfc", "puiu2022randomized", "puiu2022brand", "brand2006fast",
            "halko2011finding", "yang2022seng", "amari1998natural"} <= keys
    cited = set()
    for where, text in _markdown_texts():
        for key in CITE_RE.findall(text):
            if key.startswith(XREF_PREFIXES):
                continue
            cited.add(key)
            assert key in keys, f"{where}: citation @{key} is not in references.bib"
    assert "puiu2022brand" in cited and "brand2006fast" in cited


# ------------------------------------------------------------------------------------------
# Parameters and profiles
# ------------------------------------------------------------------------------------------


def test_params_files_match_the_chapters():
    assert book.validate_params(ROOT) == []
    for profile in book.PROFILES:
        for path in CHAPTERS:
            params = book.load_params(profile, path.stem, ROOT)
            assert params["profile"] == profile
            defaults = book.parameters_cell(path)
            assert set(params) <= set(defaults)
            for key, value in params.items():  # same kind of value as the chapter's default
                if defaults[key] is not None and key != "profile":
                    assert isinstance(value, (int, float)) if isinstance(defaults[key], float) else \
                        isinstance(value, type(defaults[key])), f"{profile}/{path.stem}: {key}={value!r}"
    # the committed notebooks ran with the cpu parameters
    for path in CHAPTERS:
        injected = next(c for c in _nb(path)["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
        ns: dict = {}
        exec(_src(injected), ns)  # noqa: S102 - papermill's injected cell holds literals only
        for key, value in book.load_params("cpu", path.stem, ROOT).items():
            assert ns[key] == value, f"{path.stem}: committed with {key}={ns[key]!r}, cpu.yaml says {value!r}"


def _toy_book(tmp_path: Path, section: dict) -> Path:
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\nbook:\n  chapters: [chapters/c1.ipynb]\n")
    (tmp_path / "chapters" / "params").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('profile = "cpu"\nsize = 3\n')])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, tmp_path / "chapters" / "c1.ipynb")
    for p in book.PROFILES:
        (tmp_path / "chapters" / "params" / f"{p}.yaml").write_text(yaml.safe_dump({"common": {"size": 1}, "c1": section}))
    return tmp_path


def test_load_params_validates_profile_and_names(tmp_path):
    root = _toy_book(tmp_path, {"size": 5})
    assert book.load_params("smoke", "c1", root) == {"size": 5, "profile": "smoke"}
    with pytest.raises(ValueError, match="smoke, cpu, paper"):
        book.load_params("fast", "c1", root)
    with pytest.raises(ValueError, match="unknown chapter"):
        book.load_params("cpu", "c9", root)
    (root / "chapters" / "params" / "cpu.yaml").write_text(yaml.safe_dump({"c1": {"sise": 5}}))
    with pytest.raises(ValueError, match="'sise'"):
        book.load_params("cpu", "c1", root)
    assert any("sise" in p for p in book.validate_params(root))


def test_parameters_cell_accepts_only_literals():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1\nb = a + 1\n")])
    nb.cells[0].metadata["tags"] = ["parameters"]
    with pytest.raises(ValueError, match="literal"):
        book.parameters_cell(nb)
    nb.cells[0].source = "import os\n"
    with pytest.raises(ValueError, match="name = literal"):
        book.parameters_cell(nb)
    nb.cells[0].metadata["tags"] = []
    with pytest.raises(ValueError, match="exactly one"):
        book.parameters_cell(nb)


def test_reproduce_cli_rejects_an_unknown_profile(capsys):
    from bkfac.cli import main

    assert main(["reproduce", "--profile", "turbo"]) == 2
    assert "smoke, cpu, paper" in capsys.readouterr().err


def test_output_dirs_keep_smoke_runs_out_of_the_committed_results():
    assert book.output_dir("figures", "cpu") == ROOT / "figures"
    assert book.output_dir("tables", "smoke") == ROOT / ".nbrun" / "smoke" / "tables"
    with pytest.raises(ValueError, match="kind"):
        book.output_dir("plots", "cpu")


# ------------------------------------------------------------------------------------------
# nbval copies and the nbconvert preview
# ------------------------------------------------------------------------------------------


def test_prepare_injects_the_profile_and_keeps_the_outputs(tmp_path):
    path = CHAPTERS[0]
    (out,) = book.prepare("smoke", tmp_path, [path.stem], ROOT)
    nb = _nb(out)
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and 'profile = "smoke"' in _src(injected[0])
    ns: dict = {}
    exec(_src(injected[0]), ns)  # noqa: S102 - papermill's injected cell holds literals only
    for key, value in book.load_params("smoke", path.stem, ROOT).items():
        assert ns[key] == value
    stored = [c for c in nb["cells"] if "nbval-check-output" in c["metadata"].get("tags", [])]
    assert stored and all(c.get("outputs") for c in stored)


def test_preview_renders_html_without_hidden_inputs(tmp_path):
    path = CHAPTERS[0]
    written = book.preview(tmp_path, [path.stem], ROOT)
    html = (tmp_path / f"{path.stem}.html").read_text(encoding="utf-8")
    assert (tmp_path / "index.html").is_file() and len(written) == 2
    assert "#| label" not in html and "#| fig-cap" not in html
    assert "data:image/png;base64" in html
    title = yaml.safe_load(re.match(r"^---\s*\n(.*?)\n---", _src(_nb(path)["cells"][0]).strip(), re.S).group(1))["title"]
    assert title.split(":")[0] in html


def test_preview_hides_what_quarto_hides(tmp_path):
    """The cell tags and options Quarto honours (``QUARTO_TAG_OPTIONS``, ``#| echo/include/output``)
    hide the same parts in the preview; ``remove-input`` is not one of them (Quarto ignores it)."""
    code = nbformat.v4.new_code_cell
    out = nbformat.v4.new_output
    cells = [
        nbformat.v4.new_raw_cell('---\ntitle: "T"\n---'),
        code("tagged_hide_code = 1", outputs=[out("stream", text="output-of-hide-code\n")]),
        code("#| echo: false\noption_echo_false = 2", outputs=[out("stream", text="output-of-echo-false\n")]),
        code("tagged_remove_cell = 3", outputs=[out("stream", text="output-of-remove-cell\n")]),
        code("#| include: false\noption_include_false = 4", outputs=[out("stream", text="output-of-include-false\n")]),
        code("#| output: false\noption_output_false = 5", outputs=[out("stream", text="output-of-output-false\n")]),
        code("tagged_remove_input = 6", outputs=[out("stream", text="output-of-remove-input\n")]),
    ]
    cells[1].metadata["tags"] = ["hide-code"]
    cells[3].metadata["tags"] = ["remove-cell"]
    cells[6].metadata["tags"] = ["remove-input"]
    (tmp_path / "chapters").mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=cells), tmp_path / "chapters" / "t.ipynb")
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\nbook:\n  chapters: [chapters/t.ipynb]\n")
    book.preview(tmp_path / "out", None, tmp_path)
    html = (tmp_path / "out" / "t.html").read_text(encoding="utf-8")
    for shown in ("output-of-hide-code", "output-of-echo-false", "option_output_false", "tagged_remove_input",
                  "output-of-remove-input"):
        assert shown in html, shown
    for hidden in ("tagged_hide_code", "option_echo_false", "tagged_remove_cell", "output-of-remove-cell",
                   "option_include_false", "output-of-include-false", "output-of-output-false"):
        assert hidden not in html, hidden


def test_chapters_hide_cells_only_with_what_quarto_knows():
    """Every cell tag of a chapter is one Quarto maps to a cell option or one of papermill's and
    nbval's; tags from other tools (``remove-input``, ``hide-input``, ``remove-output``) would be
    shown by Quarto as if absent."""
    tools = {"parameters", "injected-parameters", "nbval-ignore-output", "nbval-check-output", "nbval-skip",
             "nbval-raises-exception"}
    for path in CHAPTERS:
        for i, cell in enumerate(_nb(path)["cells"]):
            for tag in cell["metadata"].get("tags", []):
                assert tag in QUARTO_TAG_OPTIONS or tag in tools, (
                    f"{path.name} cell {i}: tag {tag!r} is not one Quarto honours; use one of "
                    f"{sorted(QUARTO_TAG_OPTIONS)} or a '#| echo/include/output: false' line")


# ------------------------------------------------------------------------------------------
# Quarto (only where the CLI is installed)
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("quarto") is None, reason="the Quarto CLI is not on PATH (install it to render the book)")
def test_quarto_renders_the_book(tmp_path):
    out = tmp_path / "book"
    proc = subprocess.run(["quarto", "render", "--to", "html", "--output-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (out / "index.html").is_file()
    assert "unable to resolve crossref" not in log.lower(), log[-4000:]
    assert "citation" not in log.lower() or "not found" not in log.lower(), log[-4000:]


# ------------------------------------------------------------------------------------------
# `bkfac reproduce` on a two-chapter toy book (papermill, real kernel)
# ------------------------------------------------------------------------------------------


def test_reproduce_executes_in_place_or_into_nbrun_and_survives_a_failure(tmp_path, monkeypatch, capsys):
    import argparse

    (tmp_path / "chapters" / "params").mkdir(parents=True)
    (tmp_path / "_quarto.yml").write_text(
        "project: {type: book}\nbook:\n  chapters: [chapters/ok.ipynb, chapters/bad.ipynb]\n")
    for name, body in (("ok", "print(size * 2)"), ("bad", "raise RuntimeError('boom')")):
        nb = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_raw_cell('---\ntitle: "x"\n---'),
            nbformat.v4.new_code_cell('profile = "cpu"\nsize = 1'),
            nbformat.v4.new_code_cell(body),
        ])
        nb.cells[1].metadata["tags"] = ["parameters"]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / "chapters" / f"{name}.ipynb")
    for p, size in (("smoke", 21), ("cpu", 50), ("paper", 99)):
        (tmp_path / "chapters" / "params" / f"{p}.yaml").write_text(yaml.safe_dump({"ok": {"size": size}}))
    monkeypatch.setenv("BKFAC_ROOT", str(tmp_path))
    bad_before = (tmp_path / "chapters" / "bad.ipynb").read_text()

    assert book.run_reproduce(argparse.Namespace(profile="smoke", chapters=["ok"], list=False)) == 0
    out = _nb(tmp_path / ".nbrun" / "smoke" / "ok.ipynb")
    assert "42" in "".join(out["cells"][-1]["outputs"][0]["text"])
    assert "[1/1] ok ... ok (" in capsys.readouterr().out
    assert _nb(tmp_path / "chapters" / "ok.ipynb")["cells"][-1]["outputs"] == []  # smoke: not in place

    assert book.run_reproduce(argparse.Namespace(profile="cpu", chapters=None, list=False)) == 1
    text = capsys.readouterr().out
    assert "[2/2] bad ... FAILED" in text and "FAILED: bad" in text
    assert "100" in "".join(_nb(tmp_path / "chapters" / "ok.ipynb")["cells"][-1]["outputs"][0]["text"])
    assert (tmp_path / "chapters" / "bad.ipynb").read_text() == bad_before  # never half-replaced
    assert (tmp_path / ".nbrun" / "failed" / "cpu" / "bad.ipynb").is_file()
    # papermill's recorded paths are the repository's, not the scratch file's or the machine's
    for executed, out_rel in ((tmp_path / ".nbrun" / "smoke" / "ok.ipynb", ".nbrun/smoke/ok.ipynb"),
                              (tmp_path / "chapters" / "ok.ipynb", "chapters/ok.ipynb")):
        meta = _nb(executed)["metadata"]["papermill"]
        assert (meta["input_path"], meta["output_path"]) == ("chapters/ok.ipynb", out_rel)
        assert str(tmp_path) not in executed.read_text(encoding="utf-8")


def test_executed_notebook_records_repository_relative_paths(tmp_path):
    root = tmp_path / "repo"
    (root / "chapters").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    scratch = root / ".nbrun" / "tmp" / "c.abc123.ipynb"  # what papermill records: absolute paths
    nb.metadata["papermill"] = {"input_path": str(root / "chapters" / "c.ipynb"), "output_path": str(scratch),
                                "parameters": {"profile": "cpu"}}
    nb_file = tmp_path / "executed.ipynb"
    nbformat.write(nb, nb_file)
    book._record_repo_paths(nb_file, root / "chapters" / "c.ipynb", root / "chapters" / "c.ipynb", root)
    meta = _nb(nb_file)["metadata"]["papermill"]
    assert (meta["input_path"], meta["output_path"]) == ("chapters/c.ipynb", "chapters/c.ipynb")
    assert meta["parameters"] == {"profile": "cpu"} and str(tmp_path) not in nb_file.read_text(encoding="utf-8")
    outside = tmp_path / "elsewhere" / "c.ipynb"  # a notebook written outside the repository keeps its place
    book._record_repo_paths(nb_file, root / "chapters" / "c.ipynb", outside, root)
    assert _nb(nb_file)["metadata"]["papermill"]["output_path"] == str(outside.resolve())


def test_display_path_is_relative_to_the_working_directory_or_the_repository(tmp_path, monkeypatch):
    root, other = tmp_path / "repo", tmp_path / "other"
    (root / "data" / "results").mkdir(parents=True)
    other.mkdir()
    monkeypatch.chdir(root / "data")
    assert book.display_path(root / "data" / "results" / "x.csv", root) == "results/x.csv"
    assert book.display_path(root / "data", root) == "."
    monkeypatch.chdir(other)
    assert book.display_path(root / "data" / "results" / "x.csv", root) == "data/results/x.csv"
    assert book.display_path(tmp_path / "elsewhere.csv", root) == str(tmp_path / "elsewhere.csv")
