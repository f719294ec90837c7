"""MetaCanvas checkpoint: round trip, refusal of a mismatch, and the canvas-only LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from metacanvas_core.checkpoint import MetaCanvas, load_metacanvas, new_metacanvas, save_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.planner import CanvasLora


def test_round_trip(planner, sana, tmp_path):
    mc = new_metacanvas(planner, sana)
    torch.nn.init.normal_(mc.canvas_connector.out_proj.weight)
    path = tmp_path / "mc.safetensors"
    save_metacanvas(mc, path)
    back = load_metacanvas(path)
    assert back.info == mc.info and back.name == "mc.safetensors"
    for (k, a), (k2, b) in zip(mc.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    back.check_compatible(planner, sana)
    assert mc.info.backbone == "sana" and mc.info.canvas_grid == (1, 16, 16) and mc.info.context_source == "native"


def test_mismatch_is_refused_naming_both(planner, sana, tmp_path):
    mc = new_metacanvas(planner, sana)
    wide = MetaCanvas(
        dataclasses.replace(
            mc.info, mllm_hidden_size=3584, canvas_connector={**mc.info.canvas_connector, "mllm_dim": 3584}
        )
    )
    wide.name = "qwen7b.safetensors"
    with pytest.raises(MetaCanvasInputError, match=r"hidden size 3584.*'.*tiny-qwen2_5-vl' has hidden size 64"):
        wide.check_compatible(planner, sana)
    other = MetaCanvas(dataclasses.replace(mc.info, backbone="wan", dit_width=3072, pixel_stride=16))
    other.name = "wan.safetensors"
    with pytest.raises(MetaCanvasInputError, match=r"made for a wan backbone of width 3072.*is sana of width 16"):
        other.check_compatible(planner, sana)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(MetaCanvasInputError, match="not a MetaCanvas checkpoint"):
        load_metacanvas(path)
    with pytest.raises(MetaCanvasInputError, match="only .safetensors"):
        load_metacanvas(tmp_path / "weights.ckpt")
    with pytest.raises(MetaCanvasInputError, match="does not exist"):
        load_metacanvas(tmp_path / "missing.safetensors")


def _random_lora(planner) -> CanvasLora:
    """A canvas LoRA with nonzero B (as after training), made with peft on a throwaway copy of the MLLM."""
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": r"model\.language_model.*\.(q_proj|v_proj)",
    }
    model = get_peft_model(
        copy.deepcopy(planner.model),
        LoraConfig(**config, alora_invocation_tokens=[planner.canvas_start_id], task_type="CAUSAL_LM"),
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return CanvasLora("test", config, get_peft_model_state_dict(model))


def test_canvas_lora_changes_only_canvas_states(planner, sana, tmp_path):
    mc = new_metacanvas(planner, sana)
    grid = mc.canvas_grid(64, 64)
    base = planner.plan("a cat left of a dog", mc.canvas(grid), grid)
    lora = _random_lora(planner)
    with_lora = planner.plan("a cat left of a dog", mc.canvas(grid), grid, lora=lora)
    assert torch.equal(with_lora.context, base.context)
    assert not torch.allclose(with_lora.canvas, base.canvas)
    again = planner.plan("a cat left of a dog", mc.canvas(grid), grid)  # adapter off again
    assert torch.equal(again.canvas, base.canvas)

    mc.lora = lora
    mc.info = dataclasses.replace(mc.info, lora=lora.config)
    save_metacanvas(mc, tmp_path / "with_lora.safetensors")
    loaded = load_metacanvas(tmp_path / "with_lora.safetensors")
    assert loaded.lora is not None and loaded.lora.state_dict.keys() == lora.state_dict.keys()
    from_file = planner.plan("a cat left of a dog", loaded.canvas(grid), grid, lora=loaded.lora)
    assert torch.equal(from_file.canvas, with_lora.canvas)
