"""The planner's mRoPE positions are the pack's own (one scheme, recorded in checkpoints), not the installed
transformers release's; the planner reads only the last hidden state."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from metacanvas_core.canvas import CANVAS_POSITIONS, CanvasGrid, canvas_rope_positions, sequence_positions
from metacanvas_core.checkpoint import load_metacanvas, save_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.metacanvas import MetaCanvas, new_metacanvas

KEYFRAMES = CanvasGrid(3, 2, 5)


def test_position_rule_on_a_mixed_sequence():
    """The pack's rule (this project's choice: Qwen's get_rope_index of transformers 4.x, images with
    second_per_grid_t = 0): text ramps; a visual grid starts at the next id, one temporal id for all its frames; text
    after it continues from the grid's largest id + 1."""
    visual = torch.tensor([0, 0] + [1] * 6 + [0] + [1] * 12 + [0, 0])
    pos = sequence_positions(visual, [(1, 2, 3), (3, 2, 2)])
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert pos[:, 8].tolist() == [5, 5, 5]  # after a 2×3 grid at 2: max id 4, so 5
    t, h, w = pos[:, 9:21]
    assert t.tolist() == [6] * 12 and h.tolist() == [6, 6, 7, 7] * 3 and w.tolist() == [6, 7, 6, 7] * 3
    assert pos[:, 21:].tolist() == [[8, 9]] * 3
    with pytest.raises(ValueError, match="does not fit its grid"):
        sequence_positions(visual, [(1, 2, 2), (3, 2, 2)])


def test_keyframe_canvas_has_one_temporal_id(planner):
    seq = planner.sequence("a dog runs", [], KEYFRAMES)
    n = seq["n_prompt"]
    pos = seq["position_ids"][:, 0]
    assert torch.equal(pos[:, :n], torch.arange(n).expand(3, -1))  # a text-only prompt: plain 1-D ids
    s = n  # the start marker follows the prompt's last id (n - 1)
    assert pos[:, n].tolist() == [s, s, s]
    t, h, w = pos[:, n + 1 :].reshape(3, *KEYFRAMES.as_thw())
    assert (t == s + 1).all()
    assert torch.equal(h, (torch.arange(2) + s + 1).view(1, 2, 1).expand(3, 2, 5))
    assert torch.equal(w, (torch.arange(5) + s + 1).view(1, 1, 5).expand(3, 2, 5))
    assert torch.equal(pos[:, n:], canvas_rope_positions(n - 1, KEYFRAMES))


def test_one_frame_positions_agree_with_the_installed_transformers(planner):
    """Where every rule agrees (one-frame grids: input images and image canvases), the pack's ids are the model's."""
    grid = CanvasGrid(1, 4, 4)
    images = [Image.new("RGB", (56, 56), (200, 10, 10)), Image.new("RGB", (56, 56), (10, 10, 200))]
    seq = planner.sequence("a cat on the left", images, grid)
    ids = seq["ids"]
    mm = (ids == planner.model.config.image_token_id).long()
    mm[:, seq["n_prompt"] + 1 :] = 1
    merge = planner.model.config.vision_config.spatial_merge_size
    grids = torch.cat([seq["vision"]["image_grid_thw"], torch.tensor([[1, 4 * merge, 4 * merge]])])
    theirs, _ = planner.model.model.get_rope_index(ids, mm, image_grid_thw=grids)
    assert torch.equal(seq["position_ids"], theirs)


def _frame_index_rule(monkeypatch):
    """transformers' multi-frame image grids as the 4.x reference code numbers them (every frame at the grid's start):
    the other rule than the installed release's (frame k at start + k)."""
    original = Qwen2_5_VLModel.get_vision_position_ids

    def reference(self, start_position, grid_thw, temp_merge_size=1, spatial_merge_size=1, time_interval=1.0, **kw):
        return original(self, start_position, grid_thw, temp_merge_size, spatial_merge_size, 0, **kw)

    monkeypatch.setattr(Qwen2_5_VLModel, "get_vision_position_ids", reference)


def test_positions_do_not_depend_on_the_transformers_rule(planner, sana, monkeypatch):
    """A 3-keyframe canvas gets the same ids and the same plan whichever rule the installed get_rope_index follows."""
    mm = torch.tensor([[0] * 4 + [1] * KEYFRAMES.numel])
    ids = torch.zeros_like(mm)
    thw = torch.tensor([[3, 2 * 2, 5 * 2]])  # before the 2×2 merge of the tiny MLLM
    installed, _ = planner.model.model.get_rope_index(ids, mm, image_grid_thw=thw)
    seq = planner.sequence("a dog runs", [], KEYFRAMES)
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    with torch.no_grad():
        plan = mc.plan(planner, "a dog runs", 64, 64, keyframes=3)
    _frame_index_rule(monkeypatch)
    other, _ = planner.model.model.get_rope_index(ids, mm, image_grid_thw=thw)
    assert not torch.equal(installed, other), "the two rules should differ on a multi-frame grid"
    assert torch.equal(planner.sequence("a dog runs", [], KEYFRAMES)["position_ids"], seq["position_ids"])
    with torch.no_grad():
        again = mc.plan(planner, "a dog runs", 64, 64, keyframes=3)
    assert torch.equal(again.canvas, plan.canvas) and torch.equal(again.context, plan.context)


def test_last_hidden_state_is_bit_identical_to_all_hidden_states(planner, sana):
    """The planner reads the text model's last_hidden_state: exactly what output_hidden_states=True's last entry was."""
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    grid = mc.canvas_grid(64, 64)
    images = [Image.new("RGB", (56, 56), (30, 200, 10))]
    with torch.no_grad():
        hidden, n = planner.forward("a frog on a leaf", images, mc.canvas(grid), grid)
        seq = planner.sequence("a frog on a leaf", images, grid)
        embeds = torch.cat([planner.model.get_input_embeddings()(seq["ids"][:, :n]), mc.canvas(grid)[None]], 1)
        planner.model.model.rope_deltas = None
        full = planner.model(
            input_ids=seq["ids"],
            inputs_embeds=embeds,
            position_ids=seq["position_ids"],
            attention_mask=torch.ones_like(seq["ids"]),
            output_hidden_states=True,
            logits_to_keep=1,
            **seq["vision"],
        )
    assert torch.equal(hidden, full.hidden_states[-1])


def test_checkpoints_record_the_scheme(planner, sana, tmp_path):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    path = tmp_path / "mc.safetensors"
    save_metacanvas(mc, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["canvas_positions"]) == CANVAS_POSITIONS == "qwen2.5-vl"
    assert load_metacanvas(path).config.canvas_positions == CANVAS_POSITIONS


def _rewrite(path, **changes):
    """The file with header fields changed (None: removed), as an older or another version would have written it."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = json.dumps(value)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_older_and_other_schemes(planner, sana, tmp_path):
    image = tmp_path / "image.safetensors"
    save_metacanvas(new_metacanvas(planner.hidden_size, sana.spec, "native"), image)
    _rewrite(image, canvas_positions=None)
    assert load_metacanvas(image).config.canvas_positions == CANVAS_POSITIONS  # one keyframe: every rule agrees

    video = tmp_path / "video.safetensors"
    config = new_metacanvas(planner.hidden_size, sana.spec, "native").config
    save_metacanvas(MetaCanvas(dataclasses.replace(config, canvas_grid=(3, *config.canvas_grid[1:]))), video)
    assert load_metacanvas(video).config.canvas_grid[0] == 3
    _rewrite(video, canvas_positions=None)
    with pytest.raises(MetaCanvasInputError, match="3-keyframe canvas trained before .* Retrain it"):
        load_metacanvas(video)
    _rewrite(video, canvas_positions="transformers-5.3")
    with pytest.raises(MetaCanvasInputError, match="'transformers-5.3', this version computes 'qwen2.5-vl'"):
        load_metacanvas(video)
