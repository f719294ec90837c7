"""The canvas LoRA at inference without peft: the plain-torch path (`planner.activated_lora`) makes exactly what
peft's Activated LoRA makes at eval, and the nodes plan with a LoRA checkpoint where peft and accelerate (training
dependencies, which pull torch) cannot be imported."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from metacanvas_core.checkpoint import load_metacanvas, save_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.planner import CanvasLora, Planner
from metacanvas_core.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a cat left of a dog"
# As the recipes set it (dropout 0.05: off at eval); alpha / r = 2.
SETTINGS = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.05,
    "target_modules": r"model\.language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
}


def random_lora(planner: Planner, name: str = "random") -> CanvasLora:
    """A canvas LoRA with nonzero B (as after training), made by peft on a throwaway copy of the MLLM."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(**SETTINGS, alora_invocation_tokens=[planner.canvas_start_id], task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(planner.model), config)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return CanvasLora(name, dict(SETTINGS), {k: v.float() for k, v in get_peft_model_state_dict(model).items()})


@pytest.fixture(scope="module")
def image() -> list[Image.Image]:
    """One input picture: its tokens come before the canvas, so the LoRA's start is not the prompt's end alone."""
    return [Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))]


@pytest.mark.parametrize(
    ("source", "dtype"),
    [("mllm", torch.float32), ("mllm", torch.bfloat16), ("mllm_fp8", torch.bfloat16)],
    ids=["fp32", "bf16", "fp8-scaled-file"],
)
def test_plain_canvas_lora_equals_peft_alora(tiny, sana, image, monkeypatch, source, dtype):
    """Bit for bit: the same float32 LoRA arithmetic on the same positions (peft keeps adapter weights in float32
    for bf16/fp16/fp8 models), cast back to the layer's dtype as peft does."""
    from metacanvas_core.metacanvas import new_metacanvas

    plain, peft = Planner.load(tiny[source], dtype), Planner.load(tiny[source], dtype)
    mc = new_metacanvas(plain.hidden_size, sana.spec, "native")
    torch.nn.init.normal_(next(mc.canvas.parameters()))  # a canvas that is not all zeros
    lora = random_lora(plain)
    peft.add_canvas_lora(lora).eval()  # peft's aLoRA at eval (dropout off), as a trainer's wrapper holds it
    for inputs in (VisualInputs(), VisualInputs(image)):
        with torch.no_grad():
            expected = mc.with_lora(lora).plan(peft, PROMPT, 64, 64, inputs)
            base = mc.with_lora(None).plan(plain, PROMPT, 64, 64, inputs)
            with monkeypatch.context() as m:
                m.setitem(sys.modules, "peft", None)  # any `import peft` on this path fails
                got = mc.with_lora(lora).plan(plain, PROMPT, 64, 64, inputs)
        assert torch.equal(got.canvas, expected.canvas)
        assert torch.equal(got.context, expected.context) and torch.equal(got.context, base.context)
        assert (got.canvas.float() - base.canvas.float()).abs().max() > 0.1  # the LoRA does change the canvas


def test_frozen_lora_under_grad_runs_without_dropout(tiny, sana):
    """Under grad mode (training with a checkpoint's frozen LoRA) peft applies it, without dropout: as inference."""
    from metacanvas_core.metacanvas import new_metacanvas

    planner = Planner.load(tiny["mllm"])
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native").with_lora(random_lora(planner))
    with torch.no_grad():
        inference = mc.plan(planner, PROMPT, 64, 64).canvas
    trained = [mc.plan(planner, PROMPT, 64, 64).canvas.detach() for _ in range(2)]
    assert torch.equal(trained[0], inference) and torch.equal(trained[1], inference)


def test_a_lora_that_does_not_fit_is_refused(tiny, planner):
    lora = random_lora(planner)
    wrong_rank = CanvasLora("bad", {**SETTINGS, "r": 8}, lora.state_dict)
    proj = planner.model.model.visual.blocks[0].attn.proj  # a Linear, but in the vision tower: no canvas positions
    key = "base_model.model.model.visual.blocks.0.attn.proj.lora_"
    vision = CanvasLora(
        "bad",
        SETTINGS,
        {f"{key}A.weight": torch.ones(4, proj.in_features), f"{key}B.weight": torch.ones(proj.out_features, 4)},
    )
    embedding = CanvasLora("bad", SETTINGS, {f"{key}embedding_A": torch.ones(4, 4)})
    dora = CanvasLora("bad", {**SETTINGS, "use_dora": True}, lora.state_dict)
    cases = (
        (wrong_rank, "does not fit"),
        (vision, "does not fit"),
        (embedding, "not a LoRA A or B"),
        (dora, "use_dora"),
    )
    for bad, words in cases:
        with pytest.raises(MetaCanvasInputError, match=words):
            bad.weights(planner.model, "tiny")
    assert lora.weights(planner.model, "tiny").keys() == {
        k.split(".lora_")[0][len("base_model.model.") :] for k in lora.state_dict
    }


def test_a_recipe_with_settings_inference_cannot_apply_is_refused(tiny):
    config = TrainConfig(
        name="lora",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["sana"]),
        trainable=["mllm_lora"],
        lr=1e-4,
        max_steps=1,
        batch_size=1,
        buckets=[[64, 64]],
        mllm_lora={**SETTINGS, "use_rslora": True},
        data=[{"synthetic": {"kind": "t2i", "count": 4, "seed": 0}}],
    )
    with pytest.raises(MetaCanvasInputError, match="use_rslora"):
        config.validate()


# The nodes in a fresh process where peft and accelerate cannot be imported (as after `pip install -r
# requirements.txt`): the MLLM from ComfyUI's single file, a checkpoint with a canvas LoRA, the plan's canvas saved.
WITHOUT_PEFT = """
import importlib.util, sys
from pathlib import Path
from safetensors.torch import save_file
sys.modules["peft"] = sys.modules["accelerate"] = None
root, out = Path(sys.argv[1]), sys.argv[2]
spec = importlib.util.spec_from_file_location(
    "metacanvas_pack", root / "__init__.py", submodule_search_locations=[str(root)]
)
pack = importlib.util.module_from_spec(spec)
sys.modules["metacanvas_pack"] = pack
spec.loader.exec_module(pack)
m = pack.NODE_CLASS_MAPPINGS
(mllm,) = m["MetaCanvasMLLMLoader"]().load("tiny-qwen2_5-vl.safetensors", "fp32")
(backbone,) = m["MetaCanvasBackboneLoader"]().load("tiny-sana", "fp32", True)
(mc,) = m["MetaCanvasConnectorLoader"]().load(mllm, "with_lora.safetensors", backbone=backbone)
(plan,) = m["MetaCanvasPlan"]().plan(mllm, mc, sys.argv[3], "", 64, 64)
save_file({"canvas": plan.canvas.contiguous()}, out)
"""


def test_nodes_plan_with_a_lora_checkpoint_without_peft(tiny, models_dir, tmp_path):
    models = tmp_path / "models"
    (models / "metacanvas").mkdir(parents=True)
    for kind in ("text_encoders", "diffusers"):
        (models / kind).symlink_to(models_dir / kind)
    planner = Planner.load(tiny["mllm_file"])
    mc = load_metacanvas(tiny["sana_metacanvas"]).with_lora(random_lora(planner, "with_lora"))
    save_metacanvas(mc, models / "metacanvas" / "with_lora.safetensors")
    out = tmp_path / "canvas.safetensors"
    env = {**os.environ, "METACANVAS_MODELS": str(models)}
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT_PEFT, str(ROOT), str(out), PROMPT], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    planner.add_canvas_lora(mc.lora).eval()  # the same plan through peft
    with torch.no_grad():
        expected = load_metacanvas(models / "metacanvas" / "with_lora.safetensors").plan(planner, PROMPT, 64, 64)
    assert torch.equal(load_file(str(out))["canvas"], expected.canvas)
