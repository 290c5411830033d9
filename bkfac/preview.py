"""``make preview``: a readable stand-in for the rendered book, built with pandoc.

Quarto renders the book by turning every page into Markdown (for a notebook:
:func:`bkfac.quarto_md.notebook_markdown`) and handing it to pandoc, then adding what pandoc
does not know: chapter, section, figure, table and theorem numbers, the cross-references
``@fig-...``/``@tbl-...``/``@prp-...``/``@sec-...`` written as "Figure 3.1", the book's
navigation. This module does the same with pandoc alone (the ``pypandoc-binary`` wheel of the
``book`` extra), where the Quarto CLI is missing:

* the pages in ``_quarto.yml`` order (``book.chapters`` then ``book.appendices``): ``index.qmd``
  is the front page ``index.html`` (a generated list of the chapters where the book has none),
  every other page ``<stem>.html``, with a sidebar listing them all and previous/next links;
* pandoc reads each page (its Markdown, math and table readers are the ones Quarto runs) and
  ``--citeproc`` resolves the citations against the ``bibliography`` of ``_quarto.yml``: the
  citations link to the page holding the ``::: {#refs}`` block (``references.qmd``), which lists
  every work the book cites; where there is none, each page lists its own;
* by hand, only what Quarto adds on top of pandoc -- the numbers (chapters 1, 2, ... and
  appendices A, B, ... as in ``_quarto.yml``; sections, figures, tables and propositions
  numbered within their chapter, "3.2"), the caption prefixes ("Figure 3.1: ..."), the
  proposition blocks (``::: {#prp-...}`` whose first heading names it, titled like
  ``crossref: prp-title``), callout boxes, and the cross-references turned into links (an
  unresolved one is shown as ``?@label``, as Quarto shows it);
* math as MathML and the figures embedded as data URIs, so every page is one self-contained
  file that a browser shows without any network access.

:func:`build_preview` writes the pages; ``python -m bkfac.book preview --out .preview`` (``make
preview``) calls it through :func:`bkfac.book.preview`.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["build_preview", "XREF_KINDS"]

#: Cross-reference prefix -> the word Quarto writes before the number.
XREF_KINDS = {"fig": "Figure", "tbl": "Table", "prp": "Proposition", "sec": "Section", "eq": "Equation",
              "thm": "Theorem", "lem": "Lemma", "cor": "Corollary", "def": "Definition"}
_THEOREMS = ("prp", "thm", "lem", "cor", "def")
_CALLOUTS = ("callout-note", "callout-tip", "callout-warning", "callout-caution", "callout-important")


# --------------------------------------------------------------------------------------------
# pandoc AST helpers
# --------------------------------------------------------------------------------------------


def _pandoc(text: str, to: str, fmt: str, args: Sequence[str] = ()) -> str:
    import pypandoc

    return pypandoc.convert_text(text, to, format=fmt, extra_args=list(args))


def _str(text: str) -> list[dict]:
    """Inlines for plain ``text`` (words and spaces)."""
    out: list[dict] = []
    for i, word in enumerate(text.split(" ")):
        if i:
            out.append({"t": "Space"})
        if word:
            out.append({"t": "Str", "c": word})
    return out


def _span(cls: str, inlines: list[dict]) -> dict:
    return {"t": "Span", "c": [["", [cls], []], inlines]}


def _walk(node: Any, fn) -> Any:
    """Rebuild ``node`` bottom-up, replacing each element ``e`` (a dict with ``t``) by
    ``fn(e)``: an element, or a list of elements spliced into the enclosing list."""
    if isinstance(node, list):
        out = []
        for item in node:
            new = _walk(item, fn)
            if isinstance(item, dict) and "t" in item and isinstance(new, list):
                out.extend(new)
            else:
                out.append(new)
        return out
    if isinstance(node, dict):
        rebuilt = {k: _walk(v, fn) for k, v in node.items()}
        return fn(rebuilt) if "t" in rebuilt else rebuilt
    return node


def _elements(node: Any):
    if isinstance(node, dict):
        if "t" in node:
            yield node
        for v in node.values():
            yield from _elements(v)
    elif isinstance(node, list):
        for v in node:
            yield from _elements(v)


def _plain_text(inlines: Any) -> str:
    parts = []
    for n in _elements(inlines):
        if n["t"] == "Str":
            parts.append(n["c"])
        elif n["t"] in ("Space", "SoftBreak"):
            parts.append(" ")
        elif n["t"] in ("Code", "Math"):
            parts.append(n["c"][1])
    return "".join(parts)


def _inline_markdown(text: str) -> list[dict]:
    """A caption written in Markdown (e.g. ``tbl-cap``), read by pandoc, as inlines."""
    blocks = json.loads(_pandoc(text, "json", "markdown"))["blocks"]
    return blocks[0]["c"] if blocks and blocks[0]["t"] in ("Para", "Plain") else _str(text)


# --------------------------------------------------------------------------------------------
# the book's pages
# --------------------------------------------------------------------------------------------


@dataclass
class _Page:
    source: Path
    out_name: str
    appendix: bool
    ast: dict = field(default_factory=dict)
    number: str = ""  # "3", "A"; empty: unnumbered
    title: list = field(default_factory=list)  # inlines

    @property
    def title_text(self) -> str:
        return _plain_text(self.title) or self.source.stem


def _read_page(page: _Page, figures_root: Path) -> None:
    from .quarto_md import notebook_markdown

    if page.source.suffix == ".ipynb":
        md = notebook_markdown(page.source, figures_dir=f"{page.source.stem}_files/figure-html",
                               write_figures=figures_root)
    else:
        md = page.source.read_text(encoding="utf-8")
    page.ast = json.loads(_pandoc(md, "json", "markdown"))
    meta_title = page.ast["meta"].get("title")
    blocks = page.ast["blocks"]
    if meta_title is not None:
        page.title = meta_title["c"] if meta_title["t"] == "MetaInlines" else _str(_plain_text(meta_title))
        unnumbered = False
    else:  # a .qmd page: its first level-1 heading is the title (as in Quarto)
        first = next((i for i, b in enumerate(blocks) if b["t"] == "Header" and b["c"][0] == 1), None)
        unnumbered = False
        if first is not None:
            header = blocks.pop(first)
            page.title = header["c"][2]
            unnumbered = any(c in ("unnumbered", "-") for c in header["c"][1][1])
    page.ast["meta"].pop("title", None)
    page.number = "" if unnumbered else "?"  # assigned in book order


def _book_pages(root: Path) -> tuple[dict, list[_Page]]:
    from .book import _flatten, _quarto_config

    cfg = _quarto_config(root)
    book = cfg["book"]
    pages = []
    for files, appendix in ((_flatten(book.get("chapters", [])), False),
                            (_flatten(book.get("appendices", [])), True)):
        for f in files:
            src = root / f
            if not src.is_file():
                raise FileNotFoundError(f"_quarto.yml lists {f}, which does not exist under {root}")
            name = "index.html" if f == "index.qmd" else f"{src.stem}.html"
            pages.append(_Page(src, name, appendix))
    return cfg, pages


def _number_pages(pages: list[_Page]) -> None:
    chapter = appendix = 0
    for page in pages:
        if not page.number:
            continue
        if page.appendix:
            appendix += 1
            page.number = chr(ord("A") + appendix - 1)
        else:
            chapter += 1
            page.number = str(chapter)


# --------------------------------------------------------------------------------------------
# what Quarto adds: numbers, captions, theorem blocks, cross-references
# --------------------------------------------------------------------------------------------


def _label_number(page: _Page, k: int) -> str:
    return f"{page.number}.{k}" if page.number else str(k)


def _number_page(page: _Page, registry: dict[str, tuple[str, str, str]], prp_title: str) -> None:
    """Number the sections, figures, tables and theorem blocks of ``page`` in document order,
    prefix the captions and title the theorem blocks; enter every label in ``registry``
    (label -> (kind word, number, page file))."""
    counters: dict[str, int] = {}
    sections = [0, 0, 0, 0, 0, 0]
    words = dict(XREF_KINDS, prp=prp_title)

    def register(label: str, kind: str) -> str:
        counters[kind] = counters.get(kind, 0) + 1
        number = _label_number(page, counters[kind])
        registry[label] = (words[kind], number, page.out_name)
        return number

    def visit(blocks: list) -> list:
        out = []
        for b in blocks:
            t = b["t"]
            if t == "Header":
                level, (ident, classes, kv), inlines = b["c"]
                if "unnumbered" not in classes and "-" not in classes and level >= 2:
                    sections[level - 2] += 1
                    for i in range(level - 1, len(sections)):
                        sections[i] = 0
                    parts = [str(s) for s in sections[: level - 1]]
                    number = ".".join(([page.number] if page.number else []) + parts)
                    inlines = [_span("header-section-number", _str(number)), {"t": "Space"}] + inlines
                    if ident.startswith("sec-"):
                        registry[ident] = ("Section", number, page.out_name)
                b = {"t": "Header", "c": [level, [ident, classes, kv], inlines]}
            elif t == "Figure":
                (ident, classes, kv), (short, cap_blocks), content = b["c"]
                if ident.startswith("fig-"):
                    number = register(ident, "fig")
                    cap_blocks = _prefix_caption(cap_blocks, f"Figure {number}:")
                b = {"t": "Figure", "c": [[ident, classes, kv], [short, cap_blocks], visit(content)]}
            elif t == "Table":
                ident = b["c"][0][0]
                if ident.startswith("tbl-"):
                    b = _caption_table(b, f"Table {register(ident, 'tbl')}:", None)
            elif t == "Div":
                (ident, classes, kv), content = b["c"]
                kv_d = dict(kv)
                if "cell" in classes:
                    kv = [(k, v) for k, v in kv if k not in ("execution", "papermill", "tags", "execution_count")]
                prefix = ident.split("-", 1)[0] if "-" in ident else ""
                if prefix in _THEOREMS:
                    content = _theorem(content, words[prefix], register(ident, prefix), prefix)
                    classes = classes + ["theorem", words[prefix].lower()]
                elif ident.startswith("tbl-"):
                    number = register(ident, "tbl")
                    content = visit(content)
                    cap = kv_d.get("tbl-cap")
                    content = _caption_div_table(content, f"Table {number}:", _inline_markdown(cap) if cap else None)
                    kv = [(k, v) for k, v in kv if k != "tbl-cap"]
                    b = {"t": "Div", "c": [[ident, classes, kv], content]}
                    out.append(b)
                    continue
                elif any(c in _CALLOUTS for c in classes) and "callout" not in classes:
                    content = _callout(content, next(c for c in classes if c in _CALLOUTS))
                    classes = classes + ["callout"]
                b = {"t": "Div", "c": [[ident, classes, kv], visit(content)]}
            elif t in ("BlockQuote",):
                b = {"t": t, "c": visit(b["c"])}
            out.append(b)
        return out

    page.ast["blocks"] = visit(page.ast["blocks"])


def _prefix_caption(cap_blocks: list, prefix: str) -> list:
    head = _span("figure-number", _str(prefix))
    if cap_blocks and cap_blocks[0]["t"] in ("Plain", "Para"):
        first = cap_blocks[0]
        return [{"t": first["t"], "c": [head, {"t": "Space"}] + first["c"]}] + cap_blocks[1:]
    return [{"t": "Plain", "c": [head]}] + cap_blocks


def _caption_table(table: dict, prefix: str, caption: list | None) -> dict:
    c = list(table["c"])
    short, blocks = c[1]
    if caption is not None:
        blocks = [{"t": "Plain", "c": caption}]
    c[1] = [short, _prefix_caption(blocks, prefix)]
    return {"t": "Table", "c": c}


def _caption_div_table(content: list, prefix: str, caption: list | None) -> list:
    """The first table in a ``#tbl-`` cell gets the numbered caption (Quarto's ``tbl-cap``);
    a cell holding no table gets it as a paragraph above its content."""
    done = False

    def fn(e):
        nonlocal done
        if e["t"] == "Table" and not done:
            done = True
            return _caption_table(e, prefix, caption)
        return e

    content = _walk(content, fn)
    if not done:
        cap = [_span("figure-number", _str(prefix))] + ([{"t": "Space"}] + caption if caption else [])
        content = [{"t": "Div", "c": [["", ["table-caption"], []], [{"t": "Para", "c": cap}]]}] + content
    return content


def _theorem(content: list, word: str, number: str, prefix: str) -> list:
    """Quarto's theorem block: its first heading becomes "(name)" after "Proposition 3.1"."""
    name = None
    if content and content[0]["t"] == "Header":
        name = content[0]["c"][2]
        content = content[1:]
    title = [{"t": "Strong", "c": _str(f"{word} {number}")}]
    if name:
        title += [{"t": "Space"}, {"t": "Strong", "c": [{"t": "Str", "c": "("}] + name + [{"t": "Str", "c": ")"}]}]
    head = _span(f"theorem-title {prefix}-title", title)
    if content and content[0]["t"] == "Para":
        return [{"t": "Para", "c": [head, {"t": "Space"}] + content[0]["c"]}] + content[1:]
    return [{"t": "Para", "c": [head]}] + content


def _callout(content: list, kind: str) -> list:
    title = kind.split("-", 1)[1].capitalize()
    if content and content[0]["t"] == "Header":
        title_inl, content = content[0]["c"][2], content[1:]
    else:
        title_inl = _str(title)
    return [{"t": "Div", "c": [["", ["callout-title"], []], [{"t": "Plain", "c": title_inl}]]}] + content


def _resolve_xrefs(page: _Page, registry: dict[str, tuple[str, str, str]]) -> set[str]:
    """Replace the cross-references of ``page`` by links; return the citation keys left for
    citeproc."""
    cited: set[str] = set()

    def fn(e):
        if e["t"] != "Cite":
            return e
        citations, _text = e["c"]
        bib = [c for c in citations if c["citationId"].split("-", 1)[0] not in XREF_KINDS or "-" not in c["citationId"]]
        out: list = []
        for c in citations:
            key = c["citationId"]
            if c in bib:
                continue
            if out:
                out += [{"t": "Str", "c": ","}, {"t": "Space"}]
            out += c["citationPrefix"] + ([{"t": "Space"}] if c["citationPrefix"] else [])
            if key in registry:
                word, number, target = registry[key]
                href = f"#{key}" if target == page.out_name else f"{target}#{key}"
                label = _str(number if c["citationMode"]["t"] == "SuppressAuthor" else f"{word} {number}")
                out.append({"t": "Link", "c": [["", ["quarto-xref"], []], label, [href, ""]]})
            else:  # Quarto's mark of an unresolved reference
                out.append({"t": "Strong", "c": [{"t": "Str", "c": f"?@{key}"}]})
            out += c["citationSuffix"]
        cited.update(c["citationId"] for c in bib)
        if not out:
            return e
        if bib:
            return [{"t": "Cite", "c": [bib, []]}, {"t": "Str", "c": ";"}, {"t": "Space"}] + out
        return out

    page.ast["blocks"] = _walk(page.ast["blocks"], fn)
    return cited


# --------------------------------------------------------------------------------------------
# the HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;line-height:1.55;color:#212529}
.layout{display:flex;min-height:100vh}
nav.sidebar{flex:0 0 17rem;background:#f7f7f9;border-right:1px solid #dee2e6;padding:1rem;font-size:.92rem}
nav.sidebar a{color:#343a40;text-decoration:none}nav.sidebar li.current>a{font-weight:700;color:#2780e3}
nav.sidebar ol{list-style:none;padding-left:0}nav.sidebar li{margin:.3rem 0}
nav.sidebar .book-title{font-weight:700;font-size:1.05rem;display:block;margin-bottom:.8rem}
nav.sidebar .part{margin-top:1rem;font-weight:600;color:#6c757d}
main{flex:1;max-width:52rem;padding:1.5rem 2.5rem 4rem}
h1.title{margin-top:0}.chapter-number,.header-section-number{color:#6c757d;margin-right:.4em}
#TOC{border-left:3px solid #dee2e6;padding-left:1rem;font-size:.9rem;margin-bottom:2rem}
#TOC ul{list-style:none;padding-left:1rem}#TOC>ul{padding-left:0}
pre{background:#f8f9fa;padding:.6rem .8rem;overflow-x:auto;font-size:.85rem;border-radius:4px}
.cell-output pre{background:#fff;border-left:3px solid #e9ecef}
figure{margin:1.5rem 0}figure img{max-width:100%;height:auto}figcaption{font-size:.92rem;color:#495057}
.figure-number{font-weight:600}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border-bottom:1px solid #dee2e6;padding:.25rem .6rem}
caption{caption-side:top;text-align:left;font-size:.92rem;color:#495057;padding-bottom:.4rem}
.theorem{border-left:4px solid #2780e3;background:#f3f8fd;padding:.4rem 1rem;margin:1.2rem 0}
.callout{border-left:4px solid #6c757d;background:#f8f9fa;padding:.4rem 1rem;margin:1.2rem 0}
.callout-title{font-weight:700}
.page-navigation{display:flex;justify-content:space-between;border-top:1px solid #dee2e6;margin-top:3rem;padding-top:1rem}
.page-navigation a{text-decoration:none;color:#2780e3;max-width:48%}
.preview-note{font-size:.8rem;color:#6c757d;margin-top:1.5rem}
div.csl-entry{margin-bottom:.6rem;padding-left:2em;text-indent:-2em}
math[display="block"]{overflow-x:auto;overflow-y:hidden}
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$pagetitle$</title>
<style>
$css$
$if(highlighting-css)$$highlighting-css$$endif$
</style>
</head>
<body>
<div class="layout">
$sidebar$
<main>
<header><h1 class="title">$if(chapter-number)$<span class="chapter-number">$chapter-number$</span> $endif$$title$</h1></header>
$if(toc)$<nav id="TOC" role="doc-toc">$table-of-contents$</nav>$endif$
$body$
$pagenav$
</main>
</div>
</body>
</html>
"""


def _sidebar(book_title: str, pages: list[_Page], current: _Page) -> str:
    items, in_appendix = [], False
    for p in pages:
        if p.appendix and not in_appendix:
            items.append('<li class="part">Appendices</li>')
            in_appendix = True
        number = f'<span class="chapter-number">{p.number}</span> ' if p.number else ""
        cls = ' class="current"' if p is current else ""
        items.append(f'<li{cls}><a href="{p.out_name}">{number}{html.escape(p.title_text)}</a></li>')
    return (f'<nav class="sidebar"><a class="book-title" href="index.html">{html.escape(book_title)}</a>'
            f'<ol>{"".join(items)}</ol><p class="preview-note">Preview built with pandoc '
            "(<code>make preview</code>); <code>quarto render</code> renders the book.</p></nav>")


def _page_nav(pages: list[_Page], i: int) -> str:
    def link(p: _Page, rel: str, arrow: str) -> str:
        label = f"{p.number} {p.title_text}" if p.number else p.title_text
        text = f"{arrow} {html.escape(label)}" if rel == "prev" else f"{html.escape(label)} {arrow}"
        return f'<a rel="{rel}" href="{p.out_name}">{text}</a>'

    prev = link(pages[i - 1], "prev", "&larr;") if i > 0 else "<span></span>"
    nxt = link(pages[i + 1], "next", "&rarr;") if i + 1 < len(pages) else "<span></span>"
    return f'<nav class="page-navigation">{prev}{nxt}</nav>'


def _front_page(cfg: dict, pages: list[_Page]) -> _Page:
    """A generated front page (a book without ``index.qmd``): its title and chapter list."""
    book = cfg["book"]
    lines = [f"# {book.get('title', 'Book')} {{.unnumbered}}", ""]
    if book.get("subtitle"):
        lines += [str(book["subtitle"]), ""]
    lines += [f"{i}. [{p.title_text}]({p.out_name})" for i, p in enumerate(pages, 1)]
    page = _Page(Path("index.qmd"), "index.html", False)
    page.ast = json.loads(_pandoc("\n".join(lines) + "\n", "json", "markdown"))
    page.title = page.ast["blocks"].pop(0)["c"][2]
    return page


def _refs_links(node: Any, refs_page: str) -> Any:
    def fn(e):
        if e["t"] == "Link" and e["c"][2][0].startswith("#ref-"):
            e["c"][2] = [refs_page + e["c"][2][0], e["c"][2][1]]
        return e

    return _walk(node, fn)


def _has_refs_div(ast: dict) -> bool:
    return any(e["t"] == "Div" and e["c"][0][0] == "refs" for e in _elements(ast["blocks"]))


def build_preview(root: Path, out: Path, chapters: Sequence[Path] | None = None) -> list[Path]:
    """Write the preview of the book at ``root`` into ``out`` (see the module's docstring).

    ``chapters``: the notebooks whose pages are written (default: all); the ``.qmd`` pages and
    the front page are always written, and every page is read, so that numbers and
    cross-references are those of the whole book. Returns the notebook pages written, then
    ``index.html``.
    """
    from .book import _atomic_write

    cfg, pages = _book_pages(root)
    book_title = str(cfg["book"].get("title", "Book"))
    prp_title = str((cfg.get("crossref") or {}).get("prp-title", "Proposition"))
    selected = None if chapters is None else {Path(c).resolve() for c in chapters}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bkfac-preview-") as tmp:
        figures = Path(tmp)
        for page in pages:
            _read_page(page, figures)
        if not any(p.out_name == "index.html" for p in pages):
            pages.insert(0, _front_page(cfg, pages))
        _number_pages(pages)
        registry: dict[str, tuple[str, str, str]] = {}
        for page in pages:
            _number_page(page, registry, prp_title)
        cited: set[str] = set()
        for page in pages:
            cited |= _resolve_xrefs(page, registry)
        bib = cfg.get("bibliography")
        bib_path = (root / bib) if isinstance(bib, str) else None
        refs_page = next((p.out_name for p in pages if _has_refs_div(p.ast)), None)
        written, index = [], None
        for i, page in enumerate(pages):
            is_nb = page.source.suffix == ".ipynb"
            if is_nb and selected is not None and page.source.resolve() not in selected:
                continue
            ast = page.ast
            if bib_path is not None:
                meta_args = ["--citeproc", f"--bibliography={bib_path}", "-M", "link-citations=true"]
                if page.out_name == refs_page:
                    ast = dict(ast, meta=dict(ast["meta"], nocite={"t": "MetaInlines", "c": [
                        {"t": "Cite", "c": [[{"citationId": k, "citationPrefix": [], "citationSuffix": [],
                                              "citationMode": {"t": "NormalCitation"}, "citationNoteNum": 0,
                                              "citationHash": 0} for k in sorted(cited)], []]}]}))
                ast = json.loads(_pandoc(json.dumps(ast), "json", "json", meta_args))
                if refs_page is not None and page.out_name != refs_page:  # the list is on the references page
                    blocks = [b for b in ast["blocks"] if not (b["t"] == "Div" and b["c"][0][0] == "refs")]
                    ast = dict(ast, blocks=_refs_links(blocks, refs_page))
            word = "Appendix " if page.appendix and page.number else ""
            ast = dict(ast, meta=dict(ast["meta"], title={"t": "MetaInlines", "c": page.title}))
            heading_title = f"{word}{page.number} — " if word else ""
            args = [
                "--standalone", "--embed-resources", "--mathml", "--toc", "--toc-depth=3",
                f"--resource-path={figures}{os.pathsep}{root}{os.pathsep}{page.source.parent}",
                f"--template={_write_template(figures)}",
                "-V", f"css={_CSS}",
                "-V", f"pagetitle={heading_title or (page.number + ' ' if page.number else '')}"
                      f"{page.title_text} – {book_title}",
                "-V", f"sidebar={_sidebar(book_title, pages, page)}",
                "-V", f"pagenav={_page_nav(pages, i)}",
            ]
            if page.number:
                args += ["-V", f"chapter-number={heading_title or page.number}"]
            body = _pandoc(json.dumps(ast), "html5", "json", args)
            target = out / page.out_name
            _atomic_write(target, lambda t, body=body: Path(t).write_text(body, encoding="utf-8"))
            if page.out_name == "index.html":
                index = target
            elif is_nb:
                written.append(target)
    return written + [index]


def _write_template(folder: Path) -> Path:
    path = folder / "preview.html5"
    if not path.exists():
        path.write_text(_TEMPLATE, encoding="utf-8")
    return path
