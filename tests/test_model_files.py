"""The planner from ComfyUI's single file, castable weights, model names kept inside the model folders, and wrong or
damaged files refused with their names (CPU, tiny models; the real-ComfyUI side is test_comfyui_native.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support.graph import run

from metacanvas_core.casting import ScaledFP8Linear, make_castable, set_cast
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.files import SafetensorsFile
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.planner import Planner
from metacanvas_core.specs import BackboneSpec
from metacanvas_core.tiny import write_qwen_single_file

PROMPT = "a red cube left of a blue ball"
SPEC = BackboneSpec("sana", 16, 4, 32, (2, 8), (64, 64), 1, 1, 0.0, None)


def plans(planner: Planner, images=()):
    """Canvas and prompt states of one plan (a fixed untrained checkpoint, the same for every planner)."""
    mc = new_metacanvas(planner.hidden_size, SPEC, "native")
    with torch.no_grad():
        plan = mc.plan(planner, PROMPT, 64, 64, VisualInputs(images))
    return plan.canvas, plan.context


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (56, 56), (200, 10, 10))


def test_single_file_gives_the_folders_plan_exactly(tiny, planner, image):
    folder_plan = plans(planner, [image])
    file_planner = Planner.load(tiny["mllm_file"])
    assert file_planner.folder.endswith("tiny-qwen2_5-vl.safetensors")
    for a, b in zip(folder_plan, plans(file_planner, [image]), strict=True):
        assert torch.equal(a, b)


def test_bf16_single_file_equals_the_bf16_folder(tiny, tmp_path, image):
    path = write_qwen_single_file(tiny["mllm"], tmp_path / "qwen_bf16.safetensors", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.bfloat16}
    folder = plans(Planner.from_folder(tiny["mllm"], dtype=torch.bfloat16), [image])
    single = plans(Planner.load(path, dtype=torch.bfloat16), [image])
    for a, b in zip(folder, single, strict=True):
        assert torch.equal(a, b)


def test_fp8_scaled_file_stays_fp8_and_is_close(tiny, planner, image):
    """Scaled fp8 (3 mantissa bits: a weight is off by up to 2^-4 of itself) gives the plan within 5% (relative L2);
    dropping the scales would be far off."""
    fp8 = Planner.load(tiny["mllm_fp8"])
    q = fp8.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q, ScaledFP8Linear) and q.weight.dtype == torch.float8_e4m3fn and q.scale_weight < 1
    (canvas, context), (canvas8, context8) = plans(planner, [image]), plans(fp8, [image])
    for a, b in ((canvas, canvas8), (context, context8)):
        error = float((a - b).norm() / a.norm())
        assert 0 < error < 0.05, error
    for layer in fp8.model.modules():  # unscaled: the weights alone are ~1/scale too large
        if isinstance(layer, ScaledFP8Linear):
            layer.scale_weight.fill_(1.0)
    assert float((plans(fp8, [image])[0] - canvas).norm() / canvas.norm()) > 0.5


def test_weight_dtype_fp8_keeps_a_full_file_in_fp8(tiny, planner):
    fp8 = Planner.load(tiny["mllm_file"], weight_dtype="fp8_e4m3fn")
    layers = [m for m in fp8.model.modules() if isinstance(m, ScaledFP8Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and float(m.scale_weight) == 1 for m in layers)
    error = float((plans(fp8)[0] - plans(planner)[0]).norm() / plans(planner)[0].norm())
    assert 0 < error < 0.1, error


def test_weight_dtype_fp8_keeps_a_folder_in_fp8_as_it_does_the_same_weights_single_file(tiny, image):
    """A Hugging Face folder honours weight_dtype too (it was ignored): the same fp8 weights and plan as the single
    file holding the same weights, bit for bit; the never-used lm_head is left as it is."""
    folder = Planner.load(tiny["mllm"], weight_dtype="fp8_e5m2")
    single = Planner.load(tiny["mllm_file"], weight_dtype="fp8_e5m2")
    layers = {n: m for n, m in folder.model.named_modules() if isinstance(m, ScaledFP8Linear)}
    assert layers.keys() == {n for n, m in single.model.named_modules() if isinstance(m, ScaledFP8Linear)}
    assert "lm_head" not in layers and all(m.weight.dtype == torch.float8_e5m2 for m in layers.values())
    assert any(n.startswith("model.visual.") for n in layers)  # the vision tower's layers too
    for a, b in zip(plans(folder, [image]), plans(single, [image]), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MetaCanvasInputError, match=r"weight_dtype 'fp4' is not one of \['default', 'fp8_e4m3fn'"):
        Planner.load(tiny["mllm"], weight_dtype="fp4")


def test_wrong_and_damaged_mllm_files_are_named(tiny, tmp_path):
    qwen_image = tmp_path / "qwen_image_fp8.safetensors"
    save_file(
        {"transformer_blocks.0.img_mod.1.weight": torch.zeros(2, 2), "txt_norm.weight": torch.zeros(2)}, str(qwen_image)
    )
    qwen3 = tmp_path / "qwen_3_4b.safetensors"
    save_file(
        {"model.layers.0.self_attn.q_norm.weight": torch.zeros(2), "model.embed_tokens.weight": torch.zeros(4, 2)},
        str(qwen3),
    )
    for path, words in ((qwen_image, "a Qwen-Image DiT"), (qwen3, "a Qwen3 text encoder")):
        with pytest.raises(
            MetaCanvasInputError, match=f"'{path.name}' holds {words}; the MLLM Loader needs Qwen2.5-VL"
        ):
            Planner.load(path)
    truncated = tmp_path / "qwen_2.5_vl_7b.safetensors"
    truncated.write_bytes(tiny["mllm_file"].read_bytes()[:-1000])
    with pytest.raises(MetaCanvasInputError, match="qwen_2.5_vl_7b.safetensors' is not a readable .safetensors file"):
        Planner.load(truncated)
    no_tokenizer = tmp_path / "bare.safetensors"  # as a real single file: no tokenizer in its metadata
    metadata = {k: v for k, v in SafetensorsFile.open(tiny["mllm_file"], "MLLM").metadata.items() if k != "tokenizer"}
    save_file(load_file(str(tiny["mllm_file"])), str(no_tokenizer), metadata=metadata)
    with pytest.raises(MetaCanvasInputError, match="no tokenizer folder was given.*qwen25_tokenizer"):
        Planner.load(no_tokenizer)
    assert Planner.load(no_tokenizer, tokenizer=tiny["mllm"]).hidden_size == 64


def test_castable_modules_compute_the_same_with_cast_on(tiny, image):
    """ComfyUI's lowvram protocol: with `comfy_cast_weights` on, each layer casts its weights to the input's device at
    every call; the result is unchanged (CPU here: the cast is the identity; streaming is checked in a real ComfyUI).
    Only layers that have the `weight` and `bias` ComfyUI's manager reads of every flagged module carry the flag."""
    planner = Planner.load(tiny["mllm_fp8"])
    before = plans(planner, [image])
    make_castable(planner.model)
    weighted = [m for m in planner.model.modules() if next(m.parameters(recurse=False), None) is not None]
    flagged = [m for m in weighted if hasattr(m, "comfy_cast_weights")]
    assert flagged and all(hasattr(m, "weight") and hasattr(m, "bias") for m in flagged)
    assert any(
        type(m).__name__ == "CastableQwen2_5_VLRMSNorm" and m.bias is None for m in flagged
    )  # no bias of its own
    set_cast(planner.model, True)
    for a, b in zip(before, plans(planner, [image]), strict=True):
        assert torch.equal(a, b)
    set_cast(planner.model, False)


def test_modules_without_a_layer_weight_carry_no_cast_flag():
    """A canvas's tokens, attention's in_proj_weight, a block's modulation table: no `weight` for the manager to read,
    so no flag (ComfyUI 0.3.76+ reads `<module>.weight` of every flagged module); they cast themselves at each call."""
    mc = make_castable(new_metacanvas(64, SPEC, "mllm"))
    assert not hasattr(mc.canvas, "comfy_cast_weights")
    unflagged = [m for m in mc.modules() if next(m.parameters(recurse=False), None) is not None]
    unflagged = [m for m in unflagged if not hasattr(m, "comfy_cast_weights")]
    assert {"CastableCanvasEmbedding", "CastableMultiheadAttention"} <= {type(m).__name__ for m in unflagged}
    grid = mc.canvas.grid
    assert torch.equal(mc.canvas(grid), torch.cat([mc.canvas.start[None], mc.canvas.tokens.reshape(grid.numel, -1)]))


# --- model names stay inside the model folders (the loaders' validation) ----------------------------------------


def test_names_outside_the_model_folders_are_refused(pack, models_dir, tmp_path):
    loaders = pack.NODE_CLASS_MAPPINGS
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    escape = "../" * 12 + str(outside).lstrip("/")
    for name in (str(outside), escape, "../LLM/tiny-qwen2_5-vl"):
        message = loaders["MetaCanvasMLLMLoader"].VALIDATE_INPUTS(mllm_folder=name)
        assert isinstance(message, str) and "not a name inside a model folder" in message, (name, message)
        with pytest.raises(MetaCanvasInputError, match="not a name inside a model folder"):
            run(loaders["MetaCanvasMLLMLoader"], mllm_folder=name, dtype="fp32")
    assert "not a name inside" in loaders["MetaCanvasConnectorLoader"].VALIDATE_INPUTS(
        checkpoint="/etc/passwd.safetensors"
    )
    assert "not a name inside" in loaders["MetaCanvasBackboneLoader"].VALIDATE_INPUTS(backbone_folder="../diffusers/x")


def test_a_symlinked_folder_inside_the_model_folder_is_allowed(pack, models_dir, tiny, tmp_path):
    shared = tmp_path / "shared_models"
    shared.mkdir()
    (shared / "qwen").symlink_to(tiny["mllm"], target_is_directory=True)
    link = models_dir / "LLM" / "linked"
    link.symlink_to(shared, target_is_directory=True)
    try:
        loader = pack.NODE_CLASS_MAPPINGS["MetaCanvasMLLMLoader"]
        assert "linked/qwen" in loader.INPUT_TYPES()["required"]["mllm_folder"][0]
        assert loader.VALIDATE_INPUTS(mllm_folder="linked/qwen") is True
        (mllm,) = run(loader, mllm_folder="linked/qwen", dtype="fp32")
        assert mllm.model.hidden_size == 64
    finally:
        link.unlink()


def test_the_mllm_loader_lists_and_checks_single_files(pack, models_dir, tmp_path):
    loader = pack.NODE_CLASS_MAPPINGS["MetaCanvasMLLMLoader"]
    names = loader.INPUT_TYPES()["required"]["mllm_folder"][0]
    assert {"tiny-qwen2_5-vl.safetensors", "tiny-qwen2_5-vl_fp8_scaled.safetensors", "tiny-qwen2_5-vl"} <= set(names)
    assert loader.VALIDATE_INPUTS(mllm_folder="tiny-qwen2_5-vl_fp8_scaled.safetensors") is True
    t5 = models_dir / "text_encoders" / "t5_base.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(2, 2)}, str(t5))
    try:
        message = loader.VALIDATE_INPUTS(mllm_folder="t5_base.safetensors")
        assert "holds a T5 text encoder; the planner is Qwen2.5-VL" in message, message
    finally:
        t5.unlink()
    (mllm,) = run(loader, mllm_folder="tiny-qwen2_5-vl_fp8_scaled.safetensors", dtype="fp32", weight_dtype="default")
    assert mllm.model.folder.endswith("_fp8_scaled.safetensors")
