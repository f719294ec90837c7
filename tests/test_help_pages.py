"""The editor's help pages: ComfyUI's frontend asks /extensions/<pack folder>/docs/<node class>.md for a custom
node (after <node class>/<locale>.md), served from the pack's WEB_DIRECTORY. Every node has a page that names each
of its inputs and outputs, in text Windows' cp1252 console and editors can show."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"


def sections(text: str) -> dict[str, str]:
    """A page's text by its `## ` headings."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def listed(body: str) -> set[str]:
    """The names a section lists: its `- **name**` bullets."""
    return set(re.findall(r"^- \*\*(\w+)\*\*", body, flags=re.MULTILINE))


def test_the_pack_serves_its_web_folder(pack):
    assert "WEB_DIRECTORY" in pack.__all__
    assert (ROOT / pack.WEB_DIRECTORY).resolve() == DOCS.parent


def test_every_node_has_a_page_and_every_page_a_node(pack):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(pack.NODE_CLASS_MAPPINGS), (
        set(pack.NODE_CLASS_MAPPINGS) - pages,
        pages - set(pack.NODE_CLASS_MAPPINGS),
    )


@pytest.fixture(params=sorted((ROOT / "web" / "docs").glob("*.md")), ids=lambda p: p.stem)
def page(request) -> Path:
    return request.param


def test_a_page_names_every_input_and_output(pack, page):
    node = pack.NODE_CLASS_MAPPINGS[page.stem]
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[page.stem]}\n\n"), text[:80]
    parts = sections(text)
    inputs = {name for section in node.INPUT_TYPES().values() for name in section}
    assert listed(parts["Inputs"]) == inputs
    assert listed(parts["Outputs"]) == set(node.RETURN_NAMES)


def test_a_page_is_cp1252_text(page):
    text = page.read_text(encoding="utf-8")
    text.encode("cp1252")  # raises UnicodeEncodeError on a character outside cp1252
    assert not set(text) & set("\u00d7\u221a\u2248\u2192"), "write x, sqrt, about, -> (the pack's style)"
    assert "\r" not in text and text.endswith("\n")
