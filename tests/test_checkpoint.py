"""MetaCanvas checkpoint: round trip, refusal of a mismatch, and the canvas-only LoRA."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from metacanvas_core.canvas import CanvasGrid
from metacanvas_core.checkpoint import config_to_metadata, load_metacanvas, save_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.metacanvas import MetaCanvas, new_metacanvas
from metacanvas_core.planner import CanvasLora


def check(mc, planner, backbone):
    mc.check_compatible(planner.hidden_size, planner.folder, backbone.spec, backbone.folder, backbone.has_text_encoder)


def test_round_trip(planner, sana, tmp_path):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    torch.nn.init.normal_(mc.canvas_connector.out_proj.weight)
    path = tmp_path / "mc.safetensors"
    save_metacanvas(mc, path)
    back = load_metacanvas(path)
    assert back.config == mc.config and back.name == "mc.safetensors"
    for (k, a), (k2, b) in zip(mc.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    check(back, planner, sana)
    assert (
        mc.config.backbone == "sana" and mc.config.canvas_grid == (1, 16, 16) and mc.config.context_source == "native"
    )


def test_mismatch_is_refused_naming_both(planner, sana, tmp_path):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    wide = MetaCanvas(
        dataclasses.replace(
            mc.config, mllm_hidden_size=3584, canvas_connector={**mc.config.canvas_connector, "mllm_dim": 3584}
        )
    )
    wide.name = "qwen7b.safetensors"
    with pytest.raises(MetaCanvasInputError, match=r"hidden size 3584.*'.*tiny-qwen2_5-vl' has hidden size 64"):
        check(wide, planner, sana)
    other = MetaCanvas(dataclasses.replace(mc.config, backbone="wan", dit_width=3072, pixel_stride=16))
    other.name = "wan.safetensors"
    with pytest.raises(MetaCanvasInputError, match=r"made for a wan backbone of width 3072.*is sana of width 16"):
        check(other, planner, sana)


def test_not_a_checkpoint(tmp_path, tiny):
    path = tmp_path / "random.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(MetaCanvasInputError, match="is not a MetaCanvas checkpoint: it holds 1 tensors of no model"):
        load_metacanvas(path)
    with pytest.raises(MetaCanvasInputError, match="only .safetensors"):
        load_metacanvas(tmp_path / "weights.ckpt")
    with pytest.raises(MetaCanvasInputError, match="does not exist"):
        load_metacanvas(tmp_path / "missing.safetensors")
    dit = tmp_path / "wan_dit.safetensors"  # a DiT where a MetaCanvas checkpoint belongs
    save_file({"head.modulation": torch.zeros(1, 6, 8), "patch_embedding.weight": torch.zeros(8, 4, 1, 2, 2)}, str(dit))
    with pytest.raises(
        MetaCanvasInputError, match="wan_dit.safetensors' is not a MetaCanvas checkpoint: it holds a Wan DiT"
    ):
        load_metacanvas(dit)


def test_damaged_files_are_named(tmp_path, tiny):
    """A truncated checkpoint and a pickle renamed to .safetensors: the message names the file and the fix."""
    good = tiny["sana_metacanvas"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"x": torch.zeros(3)}, pickled)  # a pickle (zip) under a safetensors name
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (truncated, pickled, empty):
        with pytest.raises(MetaCanvasInputError) as e:
            load_metacanvas(path)
        message = str(e.value)
        assert str(path) in message and "not a readable .safetensors file" in message and "again" in message, message


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
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    prompt = "a cat left of a dog"
    base = mc.plan(planner, prompt, 64, 64)
    lora = _random_lora(planner)
    with_lora = mc.with_lora(lora).plan(planner, prompt, 64, 64)
    assert torch.equal(with_lora.context, base.context)
    assert not torch.allclose(with_lora.canvas, base.canvas)
    again = mc.with_lora(None).plan(planner, prompt, 64, 64)  # adapter off again
    assert torch.equal(again.canvas, base.canvas)

    save_metacanvas(mc.with_lora(lora), tmp_path / "with_lora.safetensors")
    assert mc.config.lora == lora.config
    loaded = load_metacanvas(tmp_path / "with_lora.safetensors")
    assert loaded.lora is not None and loaded.lora.state_dict.keys() == lora.state_dict.keys()
    assert torch.equal(loaded.plan(planner, prompt, 64, 64).canvas, with_lora.canvas)


def _written_before_issue_25(mc: MetaCanvas, path) -> None:
    """`mc` saved as versions before issue 25 wrote it: format 1, no canvas rule, no attention_bias in the connector."""
    meta = config_to_metadata(mc.config)
    del meta["canvas_rule"]
    connector = {k: v for k, v in mc.config.canvas_connector.items() if k != "attention_bias"}
    meta.update(format_version="1", canvas_connector=json.dumps(connector))
    save_file({k: v.contiguous() for k, v in mc.state_dict().items()}, str(path), metadata=meta)


def test_flux_canvas_is_fixed_and_older_checkpoints_keep_their_rule(planner, tiny, tmp_path):
    """New FLUX-Kontext checkpoints: a 32×32 canvas at every size and a fuse block without q/k/v biases (Algorithm 1).
    One written before issue 25 (the factor rule, a biased fuse block) loads with both, as it was trained."""
    from metacanvas_core.backbones import load_backbone

    spec = load_backbone(tiny["flux_kontext"], text_encoder=False).spec
    new = new_metacanvas(planner.hidden_size, spec, "mllm")
    save_metacanvas(new, tmp_path / "new.safetensors")
    new = load_metacanvas(tmp_path / "new.safetensors")
    assert new.config.canvas_rule == "fixed" and new.config.canvas_connector["attention_bias"] is False
    assert all(new.canvas_grid(h, w) == CanvasGrid(1, 32, 32) for h, w in [(64, 64), (1024, 512), (832, 1248)])
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in new.state_dict())
    assert "canvas_connector.fuse_block.attn1.to_out.0.bias" in new.state_dict()  # out: a bias still
    with pytest.raises(MetaCanvasInputError, match=r"^width 72 is not a positive multiple of 16 \(the flux_kontext "
                       r"backbone's pixel stride 16\): set width to 64 or 80\.$"):  # fmt: skip
        new.canvas_grid(64, 72)

    old_config = dataclasses.replace(
        new.config,
        canvas_rule="factor",
        canvas_connector={**new.config.canvas_connector, "attention_bias": True},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        old = MetaCanvas(old_config)
    _written_before_issue_25(old, tmp_path / "old.safetensors")
    loaded = load_metacanvas(tmp_path / "old.safetensors")
    assert loaded.config.canvas_rule == "factor" and loaded.config.canvas_connector["attention_bias"] is True
    assert loaded.canvas_grid(1024, 512) == CanvasGrid(1, 64, 32)  # the token grid: canvas factor 1, as trained
    for key, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key  # the q/k/v biases among them
    assert "canvas_connector.fuse_block.attn1.to_q.bias" in loaded.state_dict()

    meta = {**config_to_metadata(old.config), "canvas_rule": json.dumps("spiral")}
    save_file(
        {k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "spiral.safetensors"), metadata=meta
    )
    with pytest.raises(MetaCanvasInputError, match=r"by the rule 'spiral', which this version does not know"):
        load_metacanvas(tmp_path / "spiral.safetensors")
