"""The help pages served by a real ComfyUI: for each MetaCanvas node, the URLs the editor's help panel asks, as its
frontend builds them (comfyui_frontend_package, NodeHelpService.fetchCustomNodeHelp, releases 1.27 and 1.49): the
pack's folder name taken from the node's `python_module` in /object_info ("custom_nodes.<folder>", cut at "@"),
then `/extensions/<folder>/docs/<node>/<locale>.md`, which must be missing (a 200 there would be shown instead; 1.27
shows any 200), then `/extensions/<folder>/docs/<node>.md`, which must be the page (not HTML: 1.49 rejects HTML).

Needs a prepared harness (see tests/support/comfyui.py); skipped without COMFYUI_HARNESS.

    COMFYUI_HARNESS=/path/to/harness python -m pytest tests/test_comfyui_help_pages.py -q
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.comfyui import HARNESS, SKIP_REASON, ComfyServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"

pytestmark = pytest.mark.skipif(not HARNESS, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ComfyUI (start.sh) on a free port with this pack in custom_nodes; no models needed."""
    work = tmp_path_factory.mktemp("comfyui_help")
    (work / "models").mkdir()
    server = ComfyServer.start(work, {"metacanvas": work / "models"})
    try:
        yield server
    finally:
        server.stop()


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_every_node_has_its_help_page_at_the_editors_url(server):
    status, object_info = server.http("GET", "/object_info")
    assert status == 200
    ours = {name: info for name, info in object_info.items() if name.startswith("MetaCanvas")}
    assert {p.stem for p in DOCS.glob("*.md")} == set(ours), server.log_tail()
    for name, info in sorted(ours.items()):
        module = info["python_module"]
        assert module.startswith("custom_nodes."), (name, module)
        folder = module.split(".")[1].split("@")[0]
        base = f"{server.url}/extensions/{folder}/docs/{name}"
        status, _, _ = get(f"{base}/en.md")
        assert status == 404, f"{name}: the locale page answered {status}; the editor would show it"
        status, kind, body = get(f"{base}.md")
        assert status == 200, f"{name}: {base}.md answered {status}:\n{server.log_tail()}"
        assert "text/html" not in kind, (name, kind)
        assert body == (DOCS / f"{name}.md").read_bytes(), name
