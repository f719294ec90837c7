"""The layout experiment's MLLM: a tiny Qwen2.5-VL taught the toy language by text-only grounding, saved in the
real format and loaded by the same Planner users run."""

from __future__ import annotations

import json

import torch

from experiments import layout
from experiments.toy_mllm import answer_of, grounding_accuracy, write_language_mllm


def test_answer_lists_the_scene_in_reading_order():
    scene = [("square", "blue", 4), ("circle", "red", 0), ("triangle", "green", 8)]
    assert answer_of(scene, layout.CELLS) == "top left: red circle; center: blue square; bottom right: green triangle"


def test_language_mllm_learns_grounding_and_loads_in_the_planner(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from metacanvas_core.canvas import CanvasEmbedding, CanvasGrid
    from metacanvas_core.planner import Planner

    data = layout.make_data(0, n_train=16)
    scenes = layout.language_scenes(data, n=600)
    test = data.test[:16]
    before = tmp_path / "before"
    write_language_mllm(before, scenes, test, layout.CELLS, layout.prompt_of, steps=0)
    report = write_language_mllm(
        tmp_path / "lm", scenes, test, layout.CELLS, layout.prompt_of, steps=200, batch_size=32
    )
    assert json.loads((tmp_path / "lm" / "grounding.json").read_text()) == report

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert len(tokenizer(" red circle at the top left").input_ids) == 6  # one token per word, as in Qwen's vocabulary
    untrained = Qwen2_5_VLForConditionalGeneration.from_pretrained(before).eval()
    pairs = [(layout.prompt_of(s), answer_of(s, layout.CELLS)) for s in test]
    chance = grounding_accuracy(untrained, tokenizer, pairs)["token"]
    assert report["test"]["token"] > chance + 0.4, (report, chance)

    planner = Planner.from_folder(tmp_path / "lm")
    grid = CanvasGrid(1, 3, 3)
    canvas = CanvasEmbedding(planner.hidden_size, grid)
    with torch.no_grad():
        _, states = planner.write(layout.prompt_of(test[0]), canvas(grid), grid)
    assert states.shape == (1, grid.numel, planner.hidden_size) and torch.isfinite(states).all()
