"""``make preview`` (:mod:`bkfac.preview`) and ``make book``'s fallback to it.

* A small book made here, with one of each thing Quarto adds to pandoc -- chapters and an
  appendix, sections, a figure, a table with ``tbl-cap``, a proposition, cross-references within
  and across chapters, citations and a references page -- built and read back: the numbers,
  captions, links and the reference list are the ones Quarto would print.
* The committed book built: every page of ``_quarto.yml`` in order with prev/next links, every
  cross-reference resolved, every local link and anchor present, every cited work listed.
* The preview in headless Chromium (skipped only where no Chromium is installed; ``.ci/run``
  installs it): the front page, a chapter with figures, the references page load without console
  errors, failed loads or exceptions, and every image is decoded.
* ``make book`` where ``quarto`` is missing and its installation fails or times out (a fake
  installer): exit status 0, one line saying the book was not rendered and why, the preview
  written.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bkfac import book
from bkfac.preview import build_preview

ROOT = book.repo_root()

# a 2x2 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg==")


# ------------------------------------------------------------------------------------------
# reading the HTML
# ------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Ids, links, images and the text of every element (by tag and by class) of one HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, dict]] = []  # (href, text, attrs)
        self.images: list[str] = []
        self.text_of: dict[str, list[str]] = {}  # tag or class -> texts
        self._open: list[tuple[str, dict, list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("br", "img", "meta", "link", "hr", "input", "col"):
            return
        self._open.append((tag, a, []))

    def handle_endtag(self, tag):
        while self._open:
            t, a, parts = self._open.pop()
            text = " ".join("".join(parts).split())
            for key in [t] + (a.get("class") or "").split():
                self.text_of.setdefault(key, []).append(text)
            if t == "a" and "href" in a:
                self.links.append((a["href"], text, a))
            if self._open:
                self._open[-1][2].append("".join(parts))
            if t == tag:
                break

    def handle_data(self, data):
        if self._open and self._open[-1][0] != "annotation":  # MathML's TeX source is not shown
            self._open[-1][2].append(data)


def _read(path: Path) -> _Page:
    return _Page(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------
# a small book with one of everything
# ------------------------------------------------------------------------------------------


def _nb(title: str, *cells: dict) -> dict:
    raw = {"cell_type": "raw", "metadata": {}, "source": f'---\ntitle: "{title}"\n---'}
    return {"cells": [raw, *cells], "metadata": {"kernelspec": {"language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def _md(src: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": src}


def _code(src: str, *outputs: dict, tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": src, "execution_count": 1,
            "outputs": list(outputs)}


def _png_out() -> dict:
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(PNG).decode(), "text/plain": "<Figure>"}}


def _table_out(markdown: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": markdown, "text/plain": "<md>"}}


BIB = """@article{alpha2020,
  author = {Alpha, Ann and Beta, Bob}, title = {On Things}, journal = {J. Things}, year = {2020}, volume = {1}, pages = {1--2}}
@article{gamma2021,
  author = {Gamma, Gil}, title = {More Things}, journal = {J. Things}, year = {2021}, volume = {2}, pages = {3--4}}
@article{unused1999,
  author = {Nobody, N.}, title = {Never Cited}, journal = {J. Nothing}, year = {1999}}
"""


@pytest.fixture(scope="module")
def small_book(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("book")
    (root / "chapters").mkdir()
    (root / "_quarto.yml").write_text(
        "project: {type: book}\n"
        "book:\n  title: Tiny Book\n  chapters: [index.qmd, chapters/one.ipynb, chapters/two.ipynb, references.qmd]\n"
        "  appendices: [chapters/app.ipynb]\n"
        "bibliography: refs.bib\ncrossref: {prp-title: Proposition}\n")
    (root / "refs.bib").write_text(BIB)
    (root / "index.qmd").write_text("# Preface {.unnumbered}\n\nA book citing [@alpha2020]. See @fig-curve.\n")
    (root / "references.qmd").write_text("# References {.unnumbered}\n\n::: {#refs}\n:::\n")
    one = _nb("First",
              _md("Intro text, as @gamma2021 shows.\n\n## Setting {#sec-setting}\n\nSome $x^2$ math.\n\n"
                  "::: {#prp-main}\n## Main claim\nFor every $k$, it holds.\n:::\n\n### Details\n\ntext"),
              _code("#| label: fig-curve\n#| fig-cap: 'A curve of $y$.'\nplot()", _png_out()),
              _md("## Results\n\nAs @fig-curve and @tbl-numbers show, and @prp-main; see @sec-setting. "
                  "Missing: @fig-nowhere."),
              _code("#| label: tbl-numbers\n#| tbl-cap: 'Numbers, with $n$.'\nshow()",
                    _table_out("| a | b |\n|---|---:|\n| x | 1 |")))
    two = _nb("Second", _md("## Back\n\nWe saw @fig-curve and [@prp-main; @alpha2020]."),
              _code("#| label: fig-second\n#| fig-cap: 'Another.'\nplot()", _png_out()),
              _md("Then @fig-second."))
    app = _nb("Proofs", _md("## Proof of the claim\n\nOf @prp-main."),
              _code("#| label: tbl-proof\n#| tbl-cap: 'Proof checks.'\nshow()", _table_out("| c |\n|---|\n| 1 |")))
    for name, nb in (("one", one), ("two", two), ("app", app)):
        (root / "chapters" / f"{name}.ipynb").write_text(json.dumps(nb))
    return root


@pytest.fixture(scope="module")
def small_preview(small_book, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-preview")
    written = build_preview(small_book, out)
    assert written == [out / "one.html", out / "two.html", out / "app.html", out / "index.html"]
    return out


def test_numbers_captions_and_theorems_as_quarto_prints_them(small_preview):
    one = _read(small_preview / "one.html")
    assert one.text_of["h1"] == ["1 First"]
    assert "1.1 Setting" in one.text_of["h2"] and "1.2 Results" in one.text_of["h2"]
    assert "1.1.1 Details" in one.text_of["h3"]
    assert "Main claim" not in " ".join(one.text_of["h2"] + one.text_of["h3"])  # the theorem's name, no section
    assert one.text_of["theorem-title"] == ["Proposition 1.1 (Main claim)"]
    assert one.text_of["figcaption"] == ["Figure 1.1: A curve of y."]
    assert one.text_of["caption"] == ["Table 1.1: Numbers, with n."]
    assert {"fig-curve", "tbl-numbers", "prp-main", "sec-setting"} <= one.ids
    assert len(one.images) == 1 and one.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(one.images[0].split(",", 1)[1]) == PNG  # the notebook's figure, embedded
    two = _read(small_preview / "two.html")
    assert two.text_of["h1"] == ["2 Second"] and two.text_of["figcaption"] == ["Figure 2.1: Another."]
    app = _read(small_preview / "app.html")
    assert app.text_of["h1"] == ["Appendix A — Proofs"] and "A.1 Proof of the claim" in app.text_of["h2"]
    assert app.text_of["caption"] == ["Table A.1: Proof checks."]
    index = _read(small_preview / "index.html")
    assert index.text_of["h1"] == ["Preface"]  # unnumbered


def test_cross_references_are_numbered_links_and_unresolved_ones_are_marked(small_preview):
    one = _read(small_preview / "one.html")
    xrefs = [(href, text) for href, text, a in one.links if "quarto-xref" in a.get("class", "")]
    assert xrefs == [("#fig-curve", "Figure 1.1"), ("#tbl-numbers", "Table 1.1"), ("#prp-main", "Proposition 1.1"),
                     ("#sec-setting", "Section 1.1")]
    assert "?@fig-nowhere" in one.text_of["strong"]  # as Quarto marks an unresolved reference
    two = _read(small_preview / "two.html")
    xrefs = [(href, text) for href, text, a in two.links if "quarto-xref" in a.get("class", "")]
    assert xrefs == [("one.html#fig-curve", "Figure 1.1"), ("one.html#prp-main", "Proposition 1.1"),
                     ("#fig-second", "Figure 2.1")]
    index = _read(small_preview / "index.html")
    assert ("one.html#fig-curve", "Figure 1.1") in [(h, t) for h, t, _ in index.links]


def test_citations_link_to_one_reference_list_of_the_cited_works(small_preview):
    refs = _read(small_preview / "references.html")
    entries = refs.text_of["csl-entry"]
    assert len(entries) == 2  # the cited works only, once each
    assert entries[0].startswith("Alpha, Ann, and Bob Beta. 2020. “On Things.”") and "Gamma, Gil. 2021" in entries[1]
    assert {"ref-alpha2020", "ref-gamma2021"} <= refs.ids and "ref-unused1999" not in refs.ids
    for page, key, text in (("index.html", "alpha2020", "Alpha and Beta 2020"), ("one.html", "gamma2021", "2021"),
                            ("two.html", "alpha2020", "Alpha and Beta 2020")):
        parsed = _read(small_preview / page)
        assert any(h == f"references.html#ref-{key}" and text in t for h, t, _ in parsed.links), (page, parsed.links)
        assert "refs" not in parsed.ids  # no second reference list on a chapter page


def test_navigation_in_book_order(small_preview):
    order = ["index.html", "one.html", "two.html", "references.html", "app.html"]
    for i, name in enumerate(order):
        page = _read(small_preview / name)
        rel = {a.get("rel"): h for h, _, a in page.links if a.get("rel")}
        assert rel.get("prev") == (order[i - 1] if i else None) and rel.get("next") == (
            order[i + 1] if i + 1 < len(order) else None), name
        sidebar = [h for h, _, a in page.links if h in order and not a.get("rel")]
        assert sidebar[:1] == ["index.html"] and sidebar[1:] == order  # the title, then every page


def test_a_book_without_front_page_or_bibliography(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "chapters" / "t.ipynb").write_text(json.dumps(_nb("Only", _md("Text and @fig-none."))))
    (tmp_path / "_quarto.yml").write_text("project: {type: book}\nbook:\n  title: T\n  chapters: [chapters/t.ipynb]\n")
    written = build_preview(tmp_path, tmp_path / "out")
    assert written == [tmp_path / "out" / "t.html", tmp_path / "out" / "index.html"]
    index = _read(tmp_path / "out" / "index.html")
    assert ("t.html", "Only") in [(h, t) for h, t, _ in index.links]
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        (tmp_path / "_quarto.yml").write_text("book:\n  chapters: [chapters/missing.ipynb]\n")
        build_preview(tmp_path, tmp_path / "out2")


# ------------------------------------------------------------------------------------------
# the committed book
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book_preview(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preview")
    written = book.preview(out, None, ROOT)
    assert written[-1] == out / "index.html"
    assert [p.name for p in written[:-1]] == [f"{p.stem}.html" for p in book.chapters(ROOT)]
    return out


def test_the_book_preview_resolves_everything(book_preview):
    pages = ["index.html"] + [f"{Path(f).stem}.html" for f in book.book_files(ROOT) if f != "index.qmd"]
    assert sorted(p.name for p in book_preview.glob("*.html")) == sorted(pages)
    parsed = {name: _read(book_preview / name) for name in pages}
    cited: set[str] = set()
    sources = [(ROOT / f).read_text(encoding="utf-8") for f in book.book_files(ROOT)]
    labels = {m for s in sources for m in re.findall(r"@((?:fig|tbl|prp|sec)-[\w-]+)", s)}
    for name, page in parsed.items():
        text = (book_preview / name).read_text(encoding="utf-8")
        assert "?@" not in text, f"{name}: an unresolved cross-reference"
        for href, label, attrs in page.links:
            if re.match(r"^[a-z]+:", href):
                continue  # external (https:, mailto:)
            target, _, anchor = href.partition("#")
            target = target or name
            assert target in parsed, f"{name}: link to a missing page {href}"
            assert not anchor or anchor in parsed[target].ids, f"{name}: link to a missing anchor {href}"
            if anchor.startswith("ref-"):
                cited.add(anchor)
        for img in page.images:
            assert img.startswith("data:image/"), f"{name}: image not embedded: {img[:80]}"
    for label in labels:  # every cross-reference of the sources is a numbered link somewhere
        assert any(href.endswith(f"#{label}") and re.search(r"\d", text)
                   for p in parsed.values() for href, text, _ in p.links), label
    refs = parsed["references.html"]
    assert cited and cited == {i for i in refs.ids if i.startswith("ref-")}  # listed = cited
    assert any("Brand New K-FACs" in e for e in refs.text_of["csl-entry"])
    chapter3 = parsed["03-brand-kfacs.html"]
    assert chapter3.text_of["figcaption"][0].startswith("Figure 3.1: ")
    assert any(t.startswith("Proposition 3.1 (") for t in chapter3.text_of["theorem-title"])


# ------------------------------------------------------------------------------------------
# headless Chromium
# ------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-terminated JSON on file descriptors 3 and 4), standard library only."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]

    def __init__(self, exe: str, user_data_dir: Path):
        import fcntl

        r, self._cmd_w = os.pipe()
        self._resp_r, w = os.pipe()
        # the browser's ends above 9, so that moving them to 3 and 4 overwrites neither
        cmd_r, resp_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (r, w))
        os.close(r)
        os.close(w)
        self.log = user_data_dir.with_name(user_data_dir.name + ".log")

        def to_3_and_4():  # in the child, before the descriptors not in pass_fds are closed
            os.dup2(cmd_r, 3)
            os.dup2(resp_w, 4)

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, *self.FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(3, 4), preexec_fn=to_3_and_4)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._resp_r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                raise EOFError(f"Chromium closed its pipe; its log ends: {self.log.read_text(errors='replace')[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method and m.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read(max(0.01, end - time.monotonic())))

    def load(self, url: str) -> tuple[dict, list[str]]:
        """Open ``url`` in a new tab; return what the page shows and every error it raised (console
        errors, uncaught exceptions, failed loads, errors in the browser's log)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=s)
        self.call("Page.navigate", {"url": url}, session=s)
        self.wait_event("Page.loadEventFired", s)
        probe = """JSON.stringify({
            title: document.title,
            h1: (document.querySelector('h1.title') || {}).textContent,
            images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
            figcaptions: [...document.querySelectorAll('figcaption')].map(e => e.textContent),
            refs: [...document.querySelectorAll('#refs .csl-entry')].map(e => e.textContent),
            next: (document.querySelector('a[rel=next]') || {}).href || null,
            math: document.querySelectorAll('math').length,
            width: document.documentElement.scrollWidth})"""
        shown = json.loads(self.call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                     session=s)["result"]["value"])
        errors = []
        for m in self.events:
            if m.get("sessionId") != s:
                continue
            p = m.get("params", {})
            if m["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append(f"console.{p['type']}: {[a.get('value') for a in p['args']]}")
            elif m["method"] == "Runtime.exceptionThrown":
                errors.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m["method"] == "Network.loadingFailed":
                errors.append(f"failed load: {p.get('errorText')}")
            elif m["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        self.call("Target.closeTarget", {"targetId": target})
        return shown, errors

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (TimeoutError, EOFError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (.ci/run installs the Debian package)")
def test_the_preview_in_headless_chromium(book_preview, tmp_path):
    browser = Chromium(_chromium(), tmp_path / "profile")  # a fresh profile
    try:
        front, errors = browser.load((book_preview / "index.html").as_uri())
        assert not errors, errors
        assert front["h1"] == "Preface" and front["title"].startswith("Preface")
        assert front["next"] == (book_preview / f"{book.chapters(ROOT)[0].stem}.html").as_uri()
        chapter, errors = browser.load((book_preview / "03-brand-kfacs.html").as_uri())
        assert not errors, errors
        assert chapter["h1"].startswith("3") and len(chapter["images"]) >= 2
        assert all(img["ok"] for img in chapter["images"]), chapter["images"]  # every figure decoded
        assert len(chapter["figcaptions"]) == len(chapter["images"])
        assert chapter["figcaptions"][0].startswith("Figure 3.1:") and chapter["math"] > 10
        refs, errors = browser.load((book_preview / "references.html").as_uri())
        assert not errors, errors
        assert len(refs["refs"]) >= 5 and any("Brand New K-FACs" in r for r in refs["refs"])
    finally:
        browser.close()


# ------------------------------------------------------------------------------------------
# make book: the fallback where Quarto cannot be installed
# ------------------------------------------------------------------------------------------


def test_quarto_requirement_is_the_quarto_extra():
    extra = re.search(r'^quarto = \["([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    make = re.search(r"^QUARTO_CLI\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert extra and make and extra.group(1) == make.group(1)


def _make_book(tmp_path: Path, install: str, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """``make book`` in this checkout with ``quarto`` missing and ``install`` as its installer; this
    interpreter stands in for the venv (nothing is installed), the preview goes to tmp_path."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    path = os.pathsep.join(d for d in ("/usr/bin", "/bin") if os.path.isdir(d))
    if shutil.which("quarto", path=path):
        pytest.skip("quarto is installed system-wide: it cannot be made missing")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    env["PATH"] = path
    return subprocess.run(
        ["make", "--no-print-directory", "book", f"VENV={venv}", f"PY={sys.executable}", "-o", f"{venv}/.bkfac-installed",
         f"PREVIEW_DIR={tmp_path / 'preview'}", f"QUARTO_INSTALL={install}", f"QUARTO_INSTALL_TIMEOUT={timeout_s}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _not_rendered(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stdout.splitlines() if "not rendered" in ln]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_book_falls_back_to_the_preview_when_quarto_cannot_be_installed(tmp_path):
    # as on a machine without access to Quarto's downloads: quarto-cli's build fails
    fail = "sh -c 'echo \"Error downloading Quarto: <urlopen error [Errno -2] Name or service not known>\"; exit 1'"
    proc = _make_book(tmp_path, fail)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = _not_rendered(proc)
    assert line.startswith("The book was not rendered: Quarto is not installed: installing quarto-cli") and \
        "Error downloading Quarto: <urlopen error [Errno -2]" in line and f"({tmp_path}/preview/index.html)" in line
    assert "Traceback" not in proc.stdout + proc.stderr
    index = tmp_path / "preview" / "index.html"
    assert index.is_file() and "Preface" in index.read_text(encoding="utf-8")
    assert (tmp_path / "preview" / "references.html").is_file()


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("timeout") is None, reason="needs make, timeout")
def test_make_book_gives_up_on_a_hanging_install(tmp_path):
    t0 = time.monotonic()
    proc = _make_book(tmp_path, "sleep 60", timeout_s=2)
    assert time.monotonic() - t0 < 50 and proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = _not_rendered(proc)
    assert "timed out after 2 s" in line and (tmp_path / "preview" / "index.html").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_book_renders_with_the_installed_quarto(tmp_path):
    """Where the install works, its ``quarto`` (in the venv's bin/) renders; where the render fails,
    the preview stands in and the status says so."""
    log = tmp_path / "quarto-calls"
    for code, failed in ((0, False), (3, True)):
        fake = tmp_path / "venv" / "bin" / "quarto"
        install = (f"sh -c 'mkdir -p {fake.parent} && printf \"#!/bin/sh\\necho \\$$* >> {log}\\nexit {code}\\n\" "
                   f"> {fake} && chmod +x {fake}'")
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)
        proc = _make_book(tmp_path, install)
        assert (proc.returncode != 0) == failed, proc.stdout + proc.stderr
        assert log.read_text().splitlines()[-1] == "render"
        if not failed:
            assert not _not_rendered(proc) and not (tmp_path / "preview").exists()
        else:
            (line,) = _not_rendered(proc)
            assert "quarto render failed" in line and (tmp_path / "preview" / "index.html").is_file()
