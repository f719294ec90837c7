"""The template browser's thumbnails (workflows/*.jpg) and the README's graph pictures (docs/*_graph.png), taken from
the real editor: each shipped workflow loaded in a real ComfyUI (headless Chromium), zoomed to fit, drawn.

    COMFYUI_HARNESS=/path/to/harness; cd tests && python -m support.pictures    (rewrites the pictures)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

from .comfyui import ComfyServer, scripts

ROOT = Path(__file__).resolve().parents[2]
THUMBNAIL_WIDTH = 640
README_GRAPHS = ("text_to_image", "native_text_to_video")

# After browser_check.py has loaded a workflow: hide the editor's menus and panels, fit the view to the nodes, draw.
FIT = """
const app = window.app, c = app.canvas.canvas, nodes = app.graph._nodes, pad = 30;
for (const el of document.querySelectorAll("body > *")) if (!el.contains(c) && !el.querySelector(".dom-widget")) el.style.visibility = "hidden";
for (const el of document.querySelectorAll(".comfyui-menu, .side-tool-bar-container, .p-splitter-gutter, .graph-canvas-menu, .comfyui-body-bottom, .comfyui-body-top, .bottom-panel")) el.style.display = "none";
app.canvas.show_info = false;
for (const [id, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasMenu", false]]) {
  try { await app.extensionManager.setting.set(id, value); } catch (e) {}  // settings of newer editors only
}
const boxes = nodes.map(n => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]).concat((app.graph._groups || []).map(g => g._bounding || g.bounding));
const [x0, y0] = [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1]))];
const [x1, y1] = [Math.max(...boxes.map(b => b[0] + b[2])), Math.max(...boxes.map(b => b[1] + b[3]))];
const rect = c.getBoundingClientRect();
const scale = Math.min(rect.width / (x1 - x0 + 2 * pad), rect.height / (y1 - y0 + 2 * pad));
app.canvas.ds.scale = scale;
app.canvas.ds.offset = [-x0 + (rect.width / scale - (x1 - x0)) / 2, -y0 + (rect.height / scale - (y1 - y0)) / 2];
app.canvas.setDirty(true, true);
app.canvas.draw(true, true);
await new Promise(r => setTimeout(r, 500));
return [x1 - x0, y1 - y0, scale];
"""


def crop_to_content(image: Image.Image, tolerance: int = 6) -> Image.Image:
    """The picture without the empty canvas around the graph (the corner pixel's colour)."""
    rgb = image.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
    mask = ImageChops.difference(rgb, background).convert("L").point(lambda v: 255 if v > tolerance else 0)
    box = mask.getbbox()
    return rgb.crop(box) if box else rgb


def main() -> None:
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory() as work:
        server = ComfyServer.start(Path(work), {})
        try:
            for name in names:
                shot = Path(work) / f"{name}.png"
                cmd = [sys.executable, str(scripts() / "browser_check.py"), "--url", server.url, "--size", "2400,1100"]
                cmd += ["--load", str(ROOT / "workflows" / f"{name}.json"), "--js", FIT, "--out", str(shot)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stdout + done.stderr
                picture = crop_to_content(Image.open(shot))
                if name in README_GRAPHS:
                    picture.save(ROOT / "docs" / f"{name}_graph.png", optimize=True)
                height = round(picture.height * THUMBNAIL_WIDTH / picture.width)
                thumbnail = picture.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS)
                thumbnail.save(ROOT / "workflows" / f"{name}.jpg", quality=85, optimize=True)
                print(f"{name}: {picture.size[0]}×{picture.size[1]} -> workflows/{name}.jpg")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
