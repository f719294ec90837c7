"""Exported backbone weights: a DiT LoRA is merged into a plain diffusers transformer that predicts as the
LoRA-wrapped one did; a trained Wan2.2 / FLUX.1-Kontext DiT is also written as the single file ComfyUI's core loader
reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metacanvas_core.backbones import Branch, load_backbone
from metacanvas_core.text import TextContext
from metacanvas_core.training.config import TrainConfig
from metacanvas_core.training.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "metacanvas_core" / "recipes"


def test_dit_lora_is_merged_on_export(tiny, tmp_path):
    config = TrainConfig(
        name="lora",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["sana"]),
        trainable=["canvas_connector", "dit_lora"],
        dit_lora={"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        lr=1e-2,
        max_steps=3,
        batch_size=2,
        buckets=[[64, 64]],
        data=[{"synthetic": {"kind": "t2i", "count": 2, "seed": 0}}],
        eval_samples=0,
    )
    config.validate()
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.train()
    exported = load_backbone(tmp_path / "backbone")
    original = load_backbone(tiny["sana"])
    assert exported.transformer.state_dict().keys() == original.transformer.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    args = (torch.tensor(500.0), Branch(TextContext(context, torch.ones(1, 5, dtype=torch.long))))
    trainer.backbone.transformer.eval()
    with torch.no_grad():
        with_lora = trainer.backbone.predict(x, *args)
        merged = exported.predict(x, *args)
        plain = original.predict(x, *args)
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # the LoRA learned something and it is in the export


# --- the trained DiT as ComfyUI's single file (Wan2.2, FLUX.1-Kontext: ComfyUI's native MODEL) ---------------------
def trained_on(tiny, tmp_path, recipe: str, backbone: str, more: list[str] = ()) -> Trainer:
    from metacanvas_core.training.config import load_config

    overrides = [f"mllm={tiny['mllm']}", f"backbone={tiny[backbone]}", "max_steps=2", "eval_samples=0", *more]
    trainer = Trainer(load_config(RECIPES / f"{recipe}.json", overrides), tmp_path, progress=False)
    trainer.train()
    return trainer


def read_single_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_trained_wan_dit_is_also_a_comfyui_file_under_the_original_names(tiny, tmp_path):
    """tiny_wan_s2 trains the Wan DiT's cross-attention: the export writes it, beside the folder, under the original
    Wan names ComfyUI reads, in bf16 (`single_file_dtype`'s default); diffusers' own reader of those files
    (`convert_wan_transformer_to_diffusers`) gives back every trained weight, rounded to bf16, bit for bit."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from metacanvas_core.comfy_files import wan_original_state

    trainer = trained_on(tiny, tmp_path, "tiny_wan_s2", "wan")
    path = trainer.exported["diffusion_model"]
    assert path == tmp_path / "diffusion_models" / "tiny-wan-s2_wan2.2_ti2v_5B_bf16.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert (tmp_path / "backbone" / "transformer").is_dir()  # the folder stays (resume, the next stage, the CLI)
    trained = trainer.backbone.transformer.state_dict()
    original = load_backbone(tiny["wan"]).transformer.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], original[k])}
    assert changed and all(".attn2." in k or ".norm2." in k for k in changed), sorted(changed)[:4]
    weights, metadata = read_single_file(path)
    assert weights.keys() == wan_original_state(trained).keys()
    assert {"head.modulation", "patch_embedding.weight", "blocks.0.cross_attn.q.weight", "blocks.0.norm3.weight"} <= (
        weights.keys()
    )
    back = convert_wan_transformer_to_diffusers(dict(weights))
    assert back.keys() == trained.keys()
    for key, value in trained.items():
        assert value.dtype == torch.float32 and torch.equal(back[key], value.to(torch.bfloat16)), key
    assert metadata["metacanvas.backbone"] == "wan" and metadata["metacanvas.run"] == "tiny-wan-s2"
    assert metadata["metacanvas.diffusers_class"] == "WanTransformer3DModel"


def test_a_trained_flux_kontext_dit_is_also_a_comfyui_file_in_diffusers_layout(tiny, tmp_path):
    """tiny_flux_kontext_edit trains FLUX's image stream: the single file holds the trained transformer's state dict
    as it is (ComfyUI converts the diffusers layout on load), equal to the exported folder's transformer; here in
    fp32 (`single_file_dtype` set), so exactly."""
    trainer = trained_on(tiny, tmp_path, "tiny_flux_kontext_edit", "flux_kontext", ["single_file_dtype=fp32"])
    path = trainer.exported["diffusion_model"]
    assert path == tmp_path / "diffusion_models" / "tiny-flux-kontext-edit_flux1-dev-kontext_fp32.safetensors"
    trained = trainer.backbone.transformer.state_dict()
    original = load_backbone(tiny["flux_kontext"]).transformer.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in trained if ".attn.to_q." in k)
    assert all(torch.equal(trained[k], original[k]) for k in trained if "context" in k or ".add_" in k)
    weights, metadata = read_single_file(path)
    folder = load_backbone(tmp_path / "backbone").transformer.state_dict()
    assert weights.keys() == trained.keys() == folder.keys()
    for key, value in trained.items():
        assert weights[key].dtype == torch.float32 and torch.equal(weights[key], value), key
        assert torch.equal(folder[key], value), key
    assert metadata["metacanvas.backbone"] == "flux_kontext" and metadata["metacanvas.dit_lora"] == "none"


def test_a_single_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, killed) leaves neither a partial file nor its temporary, and an
    earlier file of that name as it was."""
    import safetensors.torch

    from metacanvas_core.comfy_files import write_single_file

    path = tmp_path / "diffusion_models" / "run_flux1-dev-kontext_fp32.safetensors"
    write_single_file("flux_kontext", {"x_embedder.weight": torch.ones(2, 2)}, path)
    before = path.read_bytes()

    def fails_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fails_half_way)
    with pytest.raises(OSError, match="No space"):
        write_single_file("flux_kontext", {"x_embedder.weight": torch.zeros(2, 2)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == before
