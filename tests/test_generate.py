"""The README's command-line generation runs (tiny models when no paths are given)."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image


def test_cli_generates_an_image_with_tiny_models(tmp_path):
    out = tmp_path / "image.png"
    result = subprocess.run(
        [sys.executable, "-m", "metacanvas_core.generate", "--steps", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TINY RANDOM models" in result.stdout
    assert Image.open(out).size == (64, 64)


def test_cli_edits_an_image_with_tiny_flux_kontext(tmp_path):
    photo, out = tmp_path / "photo.png", tmp_path / "edited.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(photo)
    cmd = [sys.executable, "-m", "metacanvas_core.generate", "--image", str(photo), "--prompt", "make it blue"]
    cmd += ["--steps", "2", "--width", "64", "--height", "64", "--scheduler", "flow_euler", "--image-cfg", "1.5"]
    result = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TINY RANDOM models" in result.stdout
    assert Image.open(out).size == (64, 64)
