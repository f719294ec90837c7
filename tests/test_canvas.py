"""Canvas geometry, MRoPE positions of the canvas, and interpolation to the DiT token grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from metacanvas_core.canvas import (
    CanvasEmbedding,
    CanvasGrid,
    canvas_grid_for,
    canvas_rope_positions,
    interpolate_canvas,
)
from metacanvas_core.errors import MetaCanvasInputError


def test_canvas_grid_divides_token_grid():
    assert canvas_grid_for((1, 16, 16), 1) == CanvasGrid(1, 16, 16)  # SANA 512²
    assert canvas_grid_for((31, 44, 80), 4, keyframes=3) == CanvasGrid(3, 11, 20)  # the paper's Wan 704×1280 canvas
    with pytest.raises(MetaCanvasInputError, match="not divisible by the checkpoint's canvas factor 2"):
        canvas_grid_for((1, 15, 16), 2)


def test_embedding_rows_and_resize():
    emb = CanvasEmbedding(8, CanvasGrid(1, 4, 4))
    rows = emb(CanvasGrid(1, 4, 4))
    assert rows.shape == (17, 8)
    assert torch.equal(rows[0], emb.start) and torch.equal(rows[1:], emb.tokens.reshape(16, 8))
    with torch.no_grad():
        emb.tokens.fill_(0.5)
    assert torch.allclose(emb(CanvasGrid(1, 3, 6))[1:], torch.full((18, 8), 0.5))


@pytest.mark.parametrize("with_image", [False, True])
def test_canvas_mrope_positions_are_a_visual_grid(planner, with_image):
    grid = CanvasGrid(1, 4, 4)
    images = [Image.new("RGB", (56, 56), (200, 10, 10))] if with_image else []
    seq = planner.sequence("a cat on the left", images, grid)
    pos = seq["position_ids"][:, 0]
    n = seq["n_prompt"]
    assert torch.equal(pos[:, n:], canvas_rope_positions(pos[:, :n].max(), grid))
    # the prompt's positions do not depend on the canvas that follows it
    assert torch.equal(pos[:, :n], planner.sequence("a cat on the left", images, None)["position_ids"][:, 0])


def test_interpolation_to_token_grid():
    x = torch.randn(2, 1, 4, 4, 8)
    assert interpolate_canvas(x, (1, 4, 4)) is x
    up = interpolate_canvas(x, (1, 8, 12))
    assert up.shape == (2, 1, 8, 12, 8)
    const = torch.full((1, 1, 3, 3, 2), 1.5)
    assert torch.allclose(interpolate_canvas(const, (1, 7, 5)), torch.full((1, 1, 7, 5, 2), 1.5))
    key = torch.stack([torch.zeros(2, 2, 1), torch.ones(2, 2, 1)])[None]  # 2 keyframes: 0 then 1
    video = interpolate_canvas(key, (5, 2, 2))
    assert video.shape == (1, 5, 2, 2, 1)
    frames = video[0, :, 0, 0, 0]
    assert frames[0] == 0 and frames[-1] == 1 and torch.all(frames[1:] >= frames[:-1])  # linear ramp in time


def test_a_size_the_canvas_cannot_take_names_the_input_and_its_neighbours():
    """Wan2.2: pixel stride 32 × canvas factor 2, so 96 passes the stride but not the canvas (issue 17)."""
    from metacanvas_core.metacanvas import new_metacanvas
    from metacanvas_core.specs import wan_spec

    with torch.device("meta"):
        mc = new_metacanvas(64, wan_spec(3072, 4096, 48, (1, 2, 2), 16), "native")
    assert mc.canvas_grid(704, 1280) == CanvasGrid(3, 11, 20)
    with pytest.raises(MetaCanvasInputError, match=r"^height 96 is not a positive multiple of 64 .* 64 or 128\.$"):
        mc.canvas_grid(96, 1280)
    with pytest.raises(MetaCanvasInputError, match=r"^width 80 .* set width to 64 or 128\.$"):
        mc.canvas_grid(704, 80)
