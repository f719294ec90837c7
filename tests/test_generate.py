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
