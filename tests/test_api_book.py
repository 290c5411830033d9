"""The book's API appendix (chapters/B-api.ipynb) is generated from the code: its stored output
is what ``api_reference`` gives now, part by part, and it covers every public name."""

import json
import re

import pytest

import bkfac
from bkfac import book
from bkfac.optim.factory import API_PARTS, OPTIMIZERS, api_reference, hyper_names

CHAPTER = book.repo_root() / "chapters" / "B-api.ipynb"
RERUN = "the API appendix is stale: run `bkfac reproduce --profile cpu --chapters B-api` and commit the chapter"


def stored_parts() -> dict[str, str]:
    nb = json.loads(CHAPTER.read_text(encoding="utf-8"))
    out = {}
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        m = re.fullmatch(r'display\(Markdown\(api_reference\("([\w-]+)"\)\)\)\s*', src)
        if cell["cell_type"] == "code" and m:
            (output,) = cell["outputs"]
            text = output["data"]["text/markdown"]
            out[m.group(1)] = "".join(text) if isinstance(text, list) else text
    return out


def test_the_appendix_is_in_the_book():
    assert "chapters/B-api.ipynb" in book.book_files()


@pytest.mark.parametrize("part", API_PARTS)
def test_the_stored_appendix_is_what_the_code_gives_now(part):
    stored = stored_parts()
    assert part in stored, f"no cell prints api_reference({part!r})"
    assert stored[part] == api_reference(part), RERUN


def test_the_reference_covers_the_public_api():
    text = api_reference()
    for name in bkfac.__all__:
        if name in ("linalg", "__version__", "OPTIMIZERS", "PAPER_DEFAULTS"):
            continue
        assert f"`bkfac.{name}`" in text or f"`bkfac.optim.factory.{name}`" in text, name
    for name in bkfac.linalg.__all__:
        assert f"`bkfac.linalg.{name}`" in text, name
    for opt in OPTIMIZERS:  # every hyper-parameter of every optimizer is in a table row
        for key in hyper_names(opt):
            assert f"| `{key}` |" in text, (opt, key)
    assert "| `t_brand` | 1 | b-kfac: 125; b-r-kfac: 25; b-kfac-c: 125 | b-kfac, b-r-kfac, b-kfac-c |" in text
    with pytest.raises(ValueError, match="part must be one of"):
        api_reference("everything")
