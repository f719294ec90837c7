"""Tiny random models in the real on-disk formats, so every workflow runs offline in seconds.

    python -m metacanvas_core.tiny --comfyui-models DIR

writes into ComfyUI's models layout:
    LLM/tiny-qwen2_5-vl/                Qwen2.5-VL (config, safetensors, tokenizer, image processor)
    text_encoders/tiny-qwen2_5-vl.safetensors             the same as ComfyUI's single file (and *_fp8_scaled)
    diffusers/tiny-sana/                SANA pipeline folder (transformer, DC-AE, Gemma-2, tokenizer, scheduler)
    diffusers/tiny-flux-kontext/        FLUX.1-Kontext pipeline folder (transformer, 16-ch f8 AutoencoderKL, CLIP, T5)
    metacanvas/tiny-sana-metacanvas.safetensors          a MetaCanvas checkpoint for the Qwen + SANA pair
    metacanvas/tiny-flux-kontext-metacanvas.safetensors  one for the Qwen + FLUX-Kontext pair
    diffusers/tiny-wan2_2-ti2v/         Wan2.2-TI2V pipeline folder (transformer, Wan2.2-style VAE with 8 ch, UniPC, umT5)
    metacanvas/tiny-wan2_2-metacanvas.safetensors        one for the Qwen + Wan2.2 pair
Weights are random (seeded): outputs are noise-like images, but every shape, file and code path is real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import realconfigs
from .comfy_files import wan_original_state

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]

_CORPUS = [
    "a red circle at the top left and a blue square in the center",
    "a photo of a cat sitting on a wooden table next to a green cup",
    "make the sky purple, add a yellow sun, remove the car, a dog runs on the beach",
    "given a user prompt, generate an enhanced prompt with detailed visual descriptions",
] * 20


def _byte_bpe(special: list[str], vocab_size: int, bos: str | None = None, corpus: list[str] = _CORPUS):
    """A byte-level BPE tokenizer trained in memory on `corpus` (no hub files), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    return tk, PreTrainedTokenizerFast


def write_tiny_qwen(folder: Path, seed: int = 0, corpus: list[str] = _CORPUS, vocab_size: int = 320) -> Path:
    """Qwen2.5-VL with hidden size 64, 2 layers, a 2-block vision tower; images of 56×56 -> 4 tokens.

    The tokenizer is a byte-level BPE of `vocab_size` trained on `corpus`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tk, Fast = _byte_bpe(QWEN_SPECIAL, vocab_size, corpus=corpus)
    tokenizer = Fast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL[1:],
    )
    tokenizer.chat_template = realconfigs.chat_template()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer) + 8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2
    ).save_pretrained(folder)
    return folder


def write_qwen_single_file(folder: Path, path: Path, fp8: bool = False, dtype: torch.dtype | None = None) -> Path:
    """A Qwen2.5-VL folder as ComfyUI's single file (`model.*`, `visual.*`, no lm_head), optionally scaled fp8.

    The metadata carries what a single file lacks and a tiny model cannot borrow from the real one: its
    transformers config, image-processor settings and tokenizer files. `fp8`: every Linear weight of the
    decoder and vision blocks in float8_e4m3fn with a per-tensor `scale_weight` (absmax / 448), plus the
    `scaled_fp8` marker, as in ComfyUI's `*_fp8_scaled` files. `dtype`: the other weights' dtype (default: as saved).
    """
    import json

    from safetensors.torch import load_file, save_file

    # transformers saves Qwen2.5-VL under the original names (`model.layers.*`, `visual.*`): ComfyUI's, plus lm_head.
    out = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k != "lm_head.weight"}
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    if fp8:
        for key in [
            k for k in out if k.endswith(".weight") and out[k].ndim == 2 and (".layers." in k or ".blocks." in k)
        ]:
            w = out[key].float()
            scale = w.abs().max().clamp(min=1e-12) / 448.0
            out[key] = (w / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    metadata = {
        "config": (folder / "config.json").read_text(),
        "preprocessor_config": (folder / "preprocessor_config.json").read_text(),
        "tokenizer": json.dumps({name: (folder / name).read_text() for name in tokenizer_files}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
    return path


def write_tiny_sana(folder: Path, seed: int = 0) -> Path:
    """SANA pipeline folder: a 2-layer transformer (width 16), a DC-AE with stride 4, a 2-layer Gemma-2."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tk, Fast = _byte_bpe(GEMMA_SPECIAL, 300, bos="<bos>")
    tokenizer = Fast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    ).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        mlp_ratio=2.5,
        sample_size=16,
        patch_size=1,
        norm_elementwise_affine=False,
    ).eval()
    blocks = ["ResBlock", "ResBlock", "EfficientViTBlock"]
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=[8, 16, 16],
        decoder_block_out_channels=[8, 16, 16],
        encoder_qkv_multiscales=[[], [], [5]],
        decoder_qkv_multiscales=[[], [], [5]],
        encoder_layers_per_block=[1, 1, 1],
        decoder_layers_per_block=[1, 1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_flux_kontext(folder: Path, seed: int = 0) -> Path:
    """FLUX.1-Kontext pipeline folder in the real layout: a 1+1-block transformer (width 32, guidance
    embedding), a 16-channel AutoencoderKL with stride 8 (as FLUX's), a 2-layer CLIP text encoder for
    the pooled slot and a 2-layer T5 (context 'native'; the paper's is the MLLM's)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tk, Fast = _byte_bpe(CLIP_SPECIAL, 300, bos=CLIP_SPECIAL[0])
    tokenizer = Fast(
        tokenizer_object=tk, bos_token=CLIP_SPECIAL[0], eos_token=CLIP_SPECIAL[1], pad_token=CLIP_SPECIAL[1]
    )
    tokenizer.model_max_length = 77
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=[8, 8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    text_encoder_2, tokenizer_2 = _tiny_t5(48, umt5=False, seed=seed)
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_t5(d_model: int, umt5: bool, seed: int):
    """A 2-layer (U)T5 encoder and its tokenizer (pad 0, eos 1, '</s>' appended as T5's tokenizer does)."""
    from tokenizers import processors
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tk, Fast = _byte_bpe(T5_SPECIAL, 300)
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = Fast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.model_max_length = 512
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config).eval(), tokenizer


def write_tiny_wan(folder: Path, seed: int = 0) -> Path:
    """Wan2.2-TI2V pipeline folder in the real layout: a 2-layer transformer (width 32, text_dim 32), a
    Wan2.2-style VAE (residual, patchified, stride 4×16×16, 8 latent channels), UniPC flow scheduler,
    per-token timesteps, and a 2-layer umT5 (the native text encoder; the paper's context is the MLLM's)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=[1, 2, 2],
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,
        out_channels=8,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    vae = tiny_wan_vae(8)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    text_encoder, tokenizer = _tiny_t5(32, umt5=True, seed=seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_wan_vae(z_dim: int):
    """A Wan2.2-style VAE (patchified 2×2, residual, 16× spatial and 4× temporal compression) at width 8."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.1 * i for i in range(z_dim)],
        latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()


def write_tiny_metacanvas(path: Path, mllm_folder: Path, backbone_folder: Path, seed: int = 0) -> Path:
    """A MetaCanvas checkpoint for the tiny pair with small random (not zero) projections, so the
    canvas visibly changes the output: a stand-in for a trained checkpoint in tests and demos."""
    from .backbones import load_backbone
    from .checkpoint import save_metacanvas
    from .metacanvas import new_metacanvas
    from .planner import Planner

    backbone = load_backbone(backbone_folder)  # with the paper's context source (SANA: Gemma-2; others: MLLM)
    hidden = Planner.from_folder(mllm_folder).hidden_size
    mc = new_metacanvas(hidden, backbone.spec, backbone.context_source, pooled=backbone.default_pooled())
    torch.manual_seed(seed)
    for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):
        torch.nn.init.normal_(layer.weight, std=0.2)
    if mc.condition_embedding is not None:
        torch.nn.init.normal_(mc.condition_embedding.proj.weight, std=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_metacanvas(mc, path)
    return path


def write_all(models: Path) -> dict[str, Path]:
    """Every tiny model, laid out as in ComfyUI's models folder."""
    qwen = write_tiny_qwen(models / "LLM" / "tiny-qwen2_5-vl")
    qwen_file = write_qwen_single_file(qwen, models / "text_encoders" / "tiny-qwen2_5-vl.safetensors")
    qwen_fp8 = write_qwen_single_file(
        qwen, models / "text_encoders" / "tiny-qwen2_5-vl_fp8_scaled.safetensors", fp8=True
    )
    sana = write_tiny_sana(models / "diffusers" / "tiny-sana")
    ckpt = write_tiny_metacanvas(models / "metacanvas" / "tiny-sana-metacanvas.safetensors", qwen, sana)
    flux = write_tiny_flux_kontext(models / "diffusers" / "tiny-flux-kontext")
    flux_ckpt = write_tiny_metacanvas(models / "metacanvas" / "tiny-flux-kontext-metacanvas.safetensors", qwen, flux)
    wan = write_tiny_wan(models / "diffusers" / "tiny-wan2_2-ti2v")
    wan_ckpt = write_tiny_metacanvas(models / "metacanvas" / "tiny-wan2_2-metacanvas.safetensors", qwen, wan)
    return {
        "mllm": qwen,
        "mllm_file": qwen_file,
        "mllm_fp8": qwen_fp8,
        "sana": sana,
        "sana_metacanvas": ckpt,
        "flux_kontext": flux,
        "flux_kontext_metacanvas": flux_ckpt,
        "wan": wan,
        "wan_metacanvas": wan_ckpt,
    }


# --- ComfyUI's own single files (native graphs: core loaders + MetaCanvas Apply) ----------------------------------
NATIVE_WAN_DIM = 128  # ComfyUI reads Wan's heads as width // 128: the narrowest Wan it loads


def tiny_native_wan(seed: int = 0):
    """A Wan2.2-TI2V-5B-shaped transformer (48 latent channels, text_dim 4096) at ComfyUI's narrowest width."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=[1, 2, 2],
        num_attention_heads=1,
        attention_head_dim=NATIVE_WAN_DIM,
        in_channels=48,
        out_channels=48,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=256,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()


def _random_layout(name: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random weights for a shipped layout (key -> shape of ComfyUI's own model class): norms 1, biases 0,
    other weights N(0, 1/fan_in), so activations stay finite through a real-size VAE or DiT."""
    import json

    layout = json.loads((realconfigs.CONFIG_DIR / "comfyui_layouts" / f"{name}.json").read_text())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("gamma", "scale") or (leaf == "weight" and len(shape) == 1):
            value = torch.ones(shape)
        elif leaf == "bias" or len(shape) < 2:
            value = torch.zeros(shape)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
            value = torch.randn(shape, generator=g) / fan_in**0.5
        out[key] = value.to(dtype)
    return out


def write_tiny_native(models: Path, seed: int = 0) -> dict[str, Path]:
    """The files of the native graphs, in ComfyUI's folders and key layouts, names containing `tiny`.

    ComfyUI fixes some sizes when it reads a file: a Wan DiT's heads are its width / 128 (so 128 wide here), a FLUX
    DiT is 3072 wide with 24 heads (one double block here, ~400M weights), the Wan2.2 VAE and FLUX's AE have their
    real widths (705M and 84M weights, random). Text comes from the MLLM in these graphs (MetaCanvas Text
    Conditioning): no umT5/T5/CLIP file is needed.
    """
    from safetensors.torch import save_file

    paths = {
        "native_wan": models / "diffusion_models" / "tiny-wan2.2_ti2v_5B.safetensors",
        "native_wan_vae": models / "vae" / "tiny-wan2.2_vae.safetensors",
        "native_flux": models / "diffusion_models" / "tiny-flux1-dev-kontext.safetensors",
        "native_flux_ae": models / "vae" / "tiny-flux-ae.safetensors",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    state = wan_original_state(tiny_native_wan(seed).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["native_wan"]))
    save_file(_random_layout("wan2_2_vae", seed, torch.float16), str(paths["native_wan_vae"]))
    save_file(_random_layout("flux_dit_1_block", seed, torch.bfloat16), str(paths["native_flux"]))
    save_file(_random_layout("flux_ae", seed, torch.float16), str(paths["native_flux_ae"]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-models", type=Path, required=True, help="ComfyUI's models folder")
    parser.add_argument(
        "--native", action="store_true", help="also ComfyUI's own single files for the native graphs (~2.5 GB)"
    )
    args = parser.parse_args()
    written = write_all(args.comfyui_models)
    if args.native:
        written.update(write_tiny_native(args.comfyui_models))
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
