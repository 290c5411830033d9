"""The Markdown that Quarto hands to pandoc for an executed chapter notebook.

Quarto renders a ``.ipynb`` without executing it (``execute: enabled: false`` in
``_quarto.yml``) by turning the notebook into Markdown and handing that to pandoc. This module
rebuilds that Markdown from a notebook, following Quarto's ``jupyterToMarkdown`` for an HTML
book (``src/core/jupyter/jupyter.ts`` of quarto-cli 1.4-1.10), so the book can be checked with
the engine Quarto runs (pandoc, e.g. from the ``pypandoc-binary`` wheel) where the Quarto CLI is
not installed:

* the front-matter raw cell and the Markdown cells are passed through as written;
* a code cell's options come from its tags (``remove-cell``/``hide-cell`` -> ``include:
  false``, ``hide-code`` -> ``echo: false``, ``hide-output`` -> ``output: false``,
  ``hide-warnings``, ``show-*``), overridden by its ``#| key: value`` lines (YAML);
  ``include: false`` drops the cell, ``echo: false`` its code, ``output: false`` its outputs,
  ``warning: false`` its stderr. Quarto does not know the tags ``remove-input`` or
  ``remove-output``: they change nothing here either;
* a kept code cell becomes a ``::: {.cell}`` div (``#label`` on it when the label does not go
  to a single figure, unknown options and cell metadata forwarded as attributes, e.g.
  ``tbl-cap``) holding a ```` ```{.python .cell-code}```` block without the ``#|`` lines and
  one ``::: {.cell-output ...}`` div per output: streams (consecutive ones of a kind merged)
  and ``text/plain`` as code blocks, ``text/markdown`` inlined as Markdown, images as
  ``![caption](<figures_dir>/<label>-output-<i>.png){#fig-label}``, ``text/html`` as a raw
  HTML block (the HTML priority: HTML, Markdown, SVG, PNG, JPEG, plain text).

:func:`notebook_markdown` returns the document; :func:`code_cell_options` the options of one
cell. Images are referenced where Quarto would write them (``<stem>_files/figure-html/``
next to the notebook); ``write_figures`` writes them there too. Not supported: ``output:
asis`` (``ValueError``), slides, widgets' JavaScript dependencies, attachments of Markdown cells.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["code_cell_options", "notebook_markdown", "QUARTO_TAG_OPTIONS"]

#: Quarto's mapping of cell tags to cell options (``tagMapping`` in jupyter.ts).
QUARTO_TAG_OPTIONS: dict[str, dict[str, bool]] = {
    "hide-cell": {"include": False},
    "remove-cell": {"include": False},
    "hide-code": {"echo": False},
    "hide-output": {"output": False},
    "hide-warnings": {"warning": False},
    "show-code": {"echo": True},
    "show-output": {"output": True},
    "show-warnings": {"warning": True},
}

# options Quarto handles itself and does not forward as attributes of the cell div
_INTERNAL_OPTIONS = {
    "eval", "echo", "warning", "error", "output", "include", "label", "classes", "panel", "column",
    "fig-cap", "fig-subcap", "fig-scap", "fig-cap-location", "tbl-cap-location", "cap-location",
    "fig-column", "tbl-column", "fig-link", "fig-align", "fig-alt", "fig-env", "fig-pos", "lst-label",
    "lst-cap", "out-width", "out-height", "md-indent", "code-fold", "code-line-numbers", "code-summary",
    "code-overflow", "html-table-processing",
}
_OPTION_KEYS = _INTERNAL_OPTIONS | {"layout-align", "layout-valign", "layout-ncol", "layout-nrow", "layout",
                                    "tbl-cap", "tbl-colwidths"}
# cell metadata that is not forwarded either (Jupyter's standard keys, colab, jupytext, nbdev)
_METADATA_NOT_FORWARDED = {"collapsed", "autoscroll", "deletable", "format", "name", "id", "colab",
                           "colab_type", "outputid", "lines_to_next_cell", "language"}
_HTML_PRIORITY = ("application/vnd.jupyter.widget-state+json", "application/vnd.jupyter.widget-view+json",
                  "application/javascript", "text/html", "text/markdown", "image/svg+xml", "image/png",
                  "image/jpeg", "text/plain")
_IMAGE_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}
_OPTION_LINE = re.compile(r"^#\|\s?(.*)$")
_EXECUTE_DEFAULTS = {"echo": True, "output": True, "warning": True, "include": True}


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _ticks(text: str) -> str:
    """A code fence longer than any run of backticks that starts a line of ``text``."""
    longest = max((len(m.group(1)) for m in re.finditer(r"^\s*(`+)", text, re.M)), default=0)
    return "`" * max(3, longest + 1)


def _partition(source: str) -> tuple[dict, list[str]]:
    """The ``#|`` option lines at the top of a code cell (parsed as YAML) and the remaining lines."""
    lines = source.splitlines()
    opt_lines = []
    while lines and _OPTION_LINE.match(lines[0]):
        opt_lines.append(_OPTION_LINE.match(lines.pop(0)).group(1))
    options = yaml.safe_load("\n".join(opt_lines)) if opt_lines else {}
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"the '#|' lines of a cell must form a YAML mapping, got {opt_lines!r}")
    return options, lines


def code_cell_options(cell: dict) -> dict:
    """The Quarto options of a code cell: its tags mapped by :data:`QUARTO_TAG_OPTIONS`, then
    option keys in its metadata, then its ``#|`` lines (YAML), each overriding the one before."""
    if not isinstance(cell, dict) or cell.get("cell_type") != "code":
        raise ValueError(f"cell must be a notebook code cell (a dict with cell_type 'code'), got {cell!r:.80}")
    options: dict = {}
    for tag in cell.get("metadata", {}).get("tags", []) or []:
        options.update(QUARTO_TAG_OPTIONS.get(tag, {}))
    options.update({k: v for k, v in cell.get("metadata", {}).items() if k in _OPTION_KEYS})
    options.update(_partition(_text(cell.get("source")))[0])
    return options


def _merge_streams(outputs: list[dict]) -> list[dict]:
    """Quarto's ``fixupStreams``: all stream outputs of one name joined at the first one's place."""
    out, seen = [], set()
    for o in outputs:
        if o.get("output_type") != "stream":
            out.append(o)
        elif o.get("name") not in seen:
            seen.add(o.get("name"))
            text = "".join(_text(s.get("text")) for s in outputs
                           if s.get("output_type") == "stream" and s.get("name") == o.get("name"))
            out.append({"output_type": "stream", "name": o.get("name"), "text": text})
    return out


def _mime(output: dict) -> str | None:
    data = output.get("data", {})
    return next((m for m in _HTML_PRIORITY if m in data), None)


def _is_display(output: dict) -> bool:
    return output.get("output_type") in ("display_data", "execute_result")


def _code_block(text: str, cls: str = "") -> str:
    ticks = _ticks(text)
    return f"{ticks}{cls}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{ticks}\n"


def _auto_identifier(text: str) -> str:
    """pandoc's auto identifier, as Quarto uses it for output file names."""
    text = re.sub(r"[^\w\s_.-]", "", text.lower())
    text = re.sub(r"\s+", "-", text.strip())
    return re.sub(r"^[^a-z]+", "", text) or "section"


def _attr_value(value: Any) -> str:
    if not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value.replace("'", "\\'")


class _Figures:
    def __init__(self, figures_dir: str, write_to: Path | None):
        self.dir = figures_dir.rstrip("/")
        self.write_to = write_to

    def link(self, name: str, mime: str, data: Any) -> str:
        path = f"{self.dir}/{name}.{_IMAGE_EXT[mime]}"
        if self.write_to is not None:
            target = self.write_to / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if mime == "image/svg+xml":
                target.write_text(_text(data), encoding="utf-8")
            else:
                target.write_bytes(base64.b64decode(_text(data)))
        return path


def _code_cell_markdown(cell: dict, index: int, language: str, figures: _Figures) -> str:
    options = {**_EXECUTE_DEFAULTS, **code_cell_options(cell)}
    if not options["include"]:
        return ""
    _, code_lines = _partition(_text(cell.get("source")))
    while code_lines and not code_lines[0].strip():  # Quarto trims the lines left by the options
        code_lines.pop(0)
    outputs = _merge_streams(list(cell.get("outputs") or []))
    have_image = any(_mime(o) in _IMAGE_EXT for o in outputs if _is_display(o))
    kept = []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") == "stderr" and not options["warning"]:
            continue
        if o.get("output_type") == "execute_result" and list(o.get("data", {})) == ["text/plain"]:
            plain = _text(o["data"]["text/plain"])
            if (have_image and "\n" not in plain.strip() and re.match(r"^[<(\[].*[>)\]]$", plain.strip())) or \
                    plain.startswith(("[<matplotlib", "<matplotlib", "<seaborn.", "<ggplot:")):
                continue  # matplotlib's return values next to a figure
        kept.append(o)
    if options.get("output") == "asis":
        raise ValueError("cell option 'output: asis' is not supported by bkfac.quarto_md")
    if not (options["echo"] and code_lines) and not (options["output"] and kept):
        return "\n"  # nothing to show: Quarto writes no div either

    label = str(options.get("label", "") or "")
    label = "#" + label if label and not label.startswith("#") else label
    displays = [o for o in kept if _is_display(o)]
    fig_cap = options.get("fig-cap")
    label_on_cell = (not options["output"] or not displays or (len(displays) > 1 and not isinstance(fig_cap, list))
                     or label.startswith("#tbl-"))
    captions = list(fig_cap) if isinstance(fig_cap, list) else ([fig_cap] if fig_cap else [])

    head = ["::: {"]
    if label and label_on_cell:
        head.append(label + " ")
    head.append(".cell ")
    classes = options.get("classes") or []
    classes = list(classes) if isinstance(classes, list) else [classes]
    for key, prefix in (("panel", "panel-"), ("column", "column-"), ("fig-column", "fig-column-"),
                        ("tbl-column", "tbl-column-")):
        if isinstance(options.get(key), str):
            classes.append(prefix + options[key])
    if classes:
        head.append(" ".join(c if str(c).startswith(".") else "." + str(c) for c in classes) + " ")
    metadata = cell.get("metadata", {})
    for key, value in {**metadata, **options}.items():
        if key.lower() in _INTERNAL_OPTIONS or key.lower() in _METADATA_NOT_FORWARDED or value is None:
            continue
        head.append(f"{key}='{_attr_value(value)}' ")
    if isinstance(cell.get("execution_count"), int):
        head.append(f"execution_count={cell['execution_count']} ")
    md = ["".join(head).rstrip() + "}\n"]

    if options["echo"]:
        code = "\n".join(code_lines)
        ticks = "`" * max(len(_ticks(code)), 3)
        md.append(f"{ticks} {{.{language} .cell-code}}\n{code}\n{ticks}\n")

    if options["output"]:
        label_name = label.lstrip("#").replace(":", "-") if label else f"cell-{index + 1}"
        out_name = f"{_auto_identifier(label_name)}-output"
        suffix = 1
        for i, o in enumerate(kept):
            out_label = label
            if label and label_on_cell and _is_display(o):
                out_label, suffix = f"{label}-{suffix}", suffix + 1
            mime = _mime(o) if _is_display(o) else None
            div = ["\n::: {"]
            if out_label and _is_display(o) and not label.startswith("#tbl-") and mime not in _IMAGE_EXT:
                div.append(out_label + " ")
            div.append(".cell-output ")
            kind = o.get("output_type")
            div.append(f".cell-output-{o.get('name')}" if kind == "stream" else
                       ".cell-output-display" if _is_display(o) else f".cell-output-{kind}")
            if mime == "text/markdown":
                div.append(" .cell-output-markdown")
            if _is_display(o) and isinstance(o.get("execution_count"), int):
                div.append(f" execution_count={o['execution_count']}")
            md.append("".join(div) + "}\n")
            if kind == "stream":
                text = _text(o.get("text"))
                if o.get("name") == "stderr":
                    text = re.sub(r"^<ipython-input.*?>:\d+:\s+", "", text)
                md.append(_code_block(text))
            elif kind == "error":
                md.append(_code_block(f"{o.get('ename')}: {o.get('evalue')}"))
            elif mime is not None:
                data = o["data"][mime]
                caption = captions.pop(0) if captions else None
                if mime in _IMAGE_EXT:
                    image = f"![{caption or ''}]({figures.link(f'{out_name}-{i + 1}', mime, data)})"
                    attrs = [out_label] if out_label else []
                    for key in ("fig-align", "fig-env", "fig-alt", "fig-pos", "fig-scap"):
                        if options.get(key):
                            attrs.append(f"{key}='{_attr_value(options[key])}'")
                    md.append(image + ("{" + " ".join(attrs) + "}" if attrs else "") + "\n")
                elif mime == "text/markdown":
                    md.append(_text(data) + "\n")
                elif mime == "text/plain":
                    md.append(_code_block(_text(data)))
                elif mime == "text/html":
                    md.append(_code_block(_text(data), "{=html}"))
                else:  # widgets and scripts: raw HTML carrying the payload
                    payload = data if isinstance(data, (str, list)) else json.dumps(data)
                    md.append(_code_block(f'<script type="{mime}">\n{_text(payload)}\n</script>', "{=html}"))
                if caption and mime not in _IMAGE_EXT:
                    md.append(f"\n{caption}\n")
            md.append(":::\n")
    md.append(":::\n")
    return "".join(md) + "\n" * int(metadata.get("lines_to_next_cell") or 1)


def notebook_markdown(notebook: dict | str | os.PathLike, *, figures_dir: str | None = None,
                      write_figures: str | os.PathLike | None = None) -> str:
    """The Markdown Quarto would hand to pandoc when rendering ``notebook`` (not executing it).

    Args:
        notebook: the notebook as a dict (nbformat 4 JSON) or the path of a ``.ipynb`` file.
        figures_dir: the folder image outputs are linked from; default Quarto's
            ``<stem>_files/figure-html`` (``figure-html`` for a dict).
        write_figures: when given, the images are also decoded and written to
            ``<write_figures>/<figures_dir>/``.

    Raises ``ValueError`` when ``notebook`` is not a notebook (no ``cells`` list), a cell has
    an unknown type or its ``#|`` lines are not a YAML mapping; ``FileNotFoundError`` for a
    missing file.
    """
    stem = None
    if isinstance(notebook, (str, os.PathLike)):
        path = Path(notebook)
        with open(path, encoding="utf-8") as fh:
            nb = json.load(fh)
        stem = path.stem
    elif isinstance(notebook, dict):
        nb = notebook
    else:
        raise TypeError(f"notebook must be a dict or a path, got {type(notebook).__name__}")
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise ValueError("notebook has no 'cells' list: not an nbformat 4 notebook")
    meta = nb.get("metadata", {})
    language = (meta.get("kernelspec", {}).get("language") or meta.get("language_info", {}).get("name")
                or "python").lower()
    figures = _Figures(figures_dir or (f"{stem}_files/figure-html" if stem else "figure-html"),
                       Path(write_figures) if write_figures is not None else None)
    parts = []
    code_index = 0
    for cell in cells:
        kind = cell.get("cell_type")
        if kind in ("markdown", "raw"):
            src = _text(cell.get("source"))
            fmt = cell.get("metadata", {}).get("raw_mimetype") if kind == "raw" else None
            if fmt == "text/html":
                parts.append(_code_block(src, "{=html}"))
            elif fmt in ("text/latex", "text/tex"):
                parts.append(_code_block(src, "{=tex}"))
            else:
                parts.append(src if src.endswith("\n") or not src else src + "\n")
        elif kind == "code":
            code_index += 1  # Quarto counts code cells from 1 and names unlabelled outputs cell-<index + 1>
            parts.append(_code_cell_markdown(cell, code_index, language, figures))
        else:
            raise ValueError(f"unexpected cell type {kind!r}")
        parts.append("\n")
    return "".join(parts)
