"""The MLLM's visual-token budget: every picture it reads costs at most the checkpoint's budget, the budget is recorded
in the checkpoint (training and inference plan alike) and the Plan node can set another."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.graph import run
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from metacanvas_core import realconfigs
from metacanvas_core.checkpoint import load_metacanvas, save_metacanvas
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import MetaCanvas, default_visual_tokens, new_metacanvas
from metacanvas_core.planner import Planner
from metacanvas_core.specs import flux_kontext_spec, wan_spec

WIDE = Image.new("RGB", (1280, 704), (90, 160, 40))  # Wan2.2's 16:9 output size
SMALL = Image.new("RGB", (56, 56), (200, 10, 10))


@pytest.fixture(scope="module")
def real_processor_planner(planner):
    """The tiny MLLM with Qwen2.5-VL's shipped image-processor settings (up to 12.8 MP, ~16k tokens an image)."""
    settings = {k: v for k, v in realconfigs.load("qwen2_5_vl_preprocessor").items() if not k.endswith("_class")}
    return Planner(planner.model, planner.tokenizer, Qwen2VLImageProcessorPil(**settings), planner.folder)


def image_tokens(planner, prompt, images, budget):
    ids = planner.sequence(prompt, images, None, budget)["ids"]
    return int((ids == planner.model.config.image_token_id).sum())


def test_budget_caps_each_image(real_processor_planner):
    p = real_processor_planner
    assert image_tokens(p, "edit", [WIDE], None) == 25 * 46  # Qwen's own limit: 1150 tokens for 1280×704
    assert image_tokens(p, "edit", [WIDE], 144) == 8 * 16  # <= 144, aspect kept (224×448 px)
    assert image_tokens(p, "edit", [WIDE], 1024) == 23 * 43  # <= 1024 (644×1204 px)
    assert image_tokens(p, "edit", [WIDE, WIDE, SMALL], 144) == 2 * 128 + 4  # each picture on its own; small stays
    # The limits handed to the processor: tokens × 28², never above the processor's own maximum.
    assert p.image_size_limits(144) == {"shortest_edge": 3136, "longest_edge": 144 * 28 * 28}
    assert p.image_size_limits(10**6)["longest_edge"] == 12845056


def test_video_frames_at_the_budget(real_processor_planner):
    p = real_processor_planner
    video = VisualInputs(video=[WIDE] * 9)
    frames = p.seen(video, 144)
    assert len(frames) == 8 and all(f.size == (16 * 28, 9 * 28) for f in frames)  # 9 × 16 = 144 tokens each
    assert image_tokens(p, "make it snow", frames, 144) == 8 * 144
    assert all(f.size == (14 * 28, 7 * 28) for f in p.seen(video, 100))  # 7 × 14 = 98 <= 100


def test_default_budgets():
    """144 per picture on Wan2.2 (the paper's video setup), one canvas frame on image backbones."""
    wan = wan_spec(3072, 4096, 48, (1, 2, 2), 16)
    flux = flux_kontext_spec(3072, (24, 128), 4096, 768, 8)
    sana = dataclasses.replace(flux, kind="sana", pixel_stride=32, default_size=(512, 512), fixed_canvas=None)  # SANA
    assert (default_visual_tokens(wan), default_visual_tokens(flux), default_visual_tokens(sana)) == (144, 1024, 256)


def test_recorded_and_used_by_the_plan(real_processor_planner, sana, tmp_path):
    p = real_processor_planner
    mc = new_metacanvas(p.hidden_size, sana.spec, "native")
    assert mc.config.visual_tokens == default_visual_tokens(sana.spec)
    mc = MetaCanvas(dataclasses.replace(mc.config, visual_tokens=16))
    path = tmp_path / "budget.safetensors"
    save_metacanvas(mc, path)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["visual_tokens"]) == 16
    loaded = load_metacanvas(path)
    inputs = VisualInputs(images=[WIDE])
    text = p.sequence("a boat", [WIDE], None, 16)["n_prompt"] - image_tokens(p, "a boat", [WIDE], 16)
    with torch.no_grad():
        plan = loaded.plan(p, "a boat", 64, 64, inputs)
        wider = loaded.plan(p, "a boat", 64, 64, inputs, visual_tokens=144)  # the Plan node's override
        # the context-only pass (training's dropped samples) reads the same pictures
        alone = p.prompt_states("a boat", inputs, loaded.config.visual_tokens)
    assert plan.context.shape[1] == text + 2 * 5 and wider.context.shape[1] == text + 8 * 16  # <= 16, <= 144
    assert alone.shape == plan.context.shape

    # A checkpoint from before the budget was trained with the processor's own limit, and plans so.
    meta = dict(safe_open(str(path), "pt").metadata())
    del meta["visual_tokens"]
    save_file(load_file(str(path)), str(path), metadata=meta)
    old = load_metacanvas(path)
    assert old.config.visual_tokens is None
    with torch.no_grad():
        assert old.plan(p, "a boat", 64, 64, inputs).context.shape[1] == text + 25 * 46


def test_plan_node_budget_is_the_last_optional_input(pack, models_dir):
    m = pack.NODE_CLASS_MAPPINGS
    spec = m["MetaCanvasPlan"].INPUT_TYPES()
    # appended in order: the visual_tokens widget, then the image_2 / image_3 / latent sockets (saved graphs keep
    # their widget values)
    assert list(spec["optional"])[-4:] == ["visual_tokens", "image_2", "image_3", "latent"]
    assert spec["optional"]["visual_tokens"][1]["default"] == 0
    (mllm,) = run(m["MetaCanvasMLLMLoader"], mllm_folder="tiny-qwen2_5-vl", dtype="fp32")
    (backbone,) = run(m["MetaCanvasBackboneLoader"], backbone_folder="tiny-sana", dtype="fp32")
    (mc,) = run(m["MetaCanvasConnectorLoader"], mllm=mllm, backbone=backbone, checkpoint="new (untrained)")
    images = torch.rand(1, 112, 112, 3)
    kw = dict(mllm=mllm, metacanvas=mc, prompt="a cat", negative_prompt="", width=64, height=64, images=images)
    (default,) = run(m["MetaCanvasPlan"], **kw)  # the checkpoint's budget, capped by the tiny processor's 4 tokens
    (one,) = run(m["MetaCanvasPlan"], **kw, visual_tokens=1)
    assert one.context.shape[1] == default.context.shape[1] - 3
