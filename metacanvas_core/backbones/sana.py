"""SANA text-to-image (the paper's T2I study): SanaTransformer2DModel + AutoencoderDC + Gemma-2.

SANA keeps its own Gemma-2 text encoder for the context; the canvas is the only MLLM signal (the paper's T2I study,
whose text names T5: SANA-1.6B's encoder is Gemma-2).
Prompts are encoded by diffusers' own `SanaPipeline.encode_prompt` with the pipeline's defaults, so
with the canvas off our sampler computes exactly what `SanaPipeline` computes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
from transformers import AutoModel, AutoTokenizer

from ..specs import SANA, BackboneSpec
from ..text import TextContext
from .base import Backbone, Branch, patch_embedding_hook, read_json

_CALL_DEFAULTS = inspect.signature(SanaPipeline.__call__).parameters
COMPLEX_HUMAN_INSTRUCTION: list[str] = _CALL_DEFAULTS["complex_human_instruction"].default
MAX_SEQUENCE_LENGTH: int = _CALL_DEFAULTS["max_sequence_length"].default


class SanaBackbone(Backbone):
    kind = SANA
    pipeline_class_names = ("SanaPipeline",)
    context_source = "native"

    def __init__(self, folder: str, transformer, vae, scheduler_config: dict, text_encoder, tokenizer) -> None:
        super().__init__(folder, transformer, vae, scheduler_config)
        self.text_encoder = text_encoder
        # Used only for its prompt encoding: the denoising loop is ours (sampling.py).
        self.pipeline = SanaPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=None
        )

    @classmethod
    def from_folder(
        cls, folder: Path, dtype: torch.dtype, device: str | torch.device, text_encoder: bool = True
    ) -> SanaBackbone:
        kw = dict(local_files_only=True, use_safetensors=True)
        transformer = SanaTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **kw)
        vae = AutoencoderDC.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
        encoder = tokenizer = None
        if text_encoder:
            encoder = AutoModel.from_pretrained(folder / "text_encoder", dtype=dtype, **kw)
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        for module in (transformer, vae, encoder):
            if module is not None:
                module.to(device).eval().requires_grad_(False)
        return cls(str(folder), transformer, vae, scheduler_config, encoder, tokenizer)

    @property
    def vae_stride(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def pixel_stride(self) -> int:
        return self.vae_stride * self.transformer.config.patch_size

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.transformer.config.sample_size * self.vae_stride
        return side, side

    @property
    def text_dim(self) -> int:
        return self.transformer.config.caption_channels

    @property
    def spec(self) -> BackboneSpec:
        """One canvas token per DiT token (factor 1: the paper's 16×16 canvas at 512²), one frame, the DiT's own
        attention heads in the connector, a context connector of 4 × the MLLM's width without dropout."""
        return BackboneSpec(
            kind=self.kind,
            width=self.width,
            pixel_stride=self.pixel_stride,
            text_dim=self.text_dim,
            attention_heads=self.attention_heads,
            default_size=self.default_size,
            canvas_factor=1,
            keyframes=1,
            context_dropout=0.0,
            context_hidden_dim=None,
        )

    def parts(self):
        return {**super().parts(), **({"text_encoder": self.text_encoder} if self.text_encoder is not None else {})}

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], complex_human_instruction: list[str] | None = None) -> TextContext:
        """Gemma-2 states as SanaPipeline makes them (its complex human instruction included by default)."""
        self.require_text_encoder()
        chi = COMPLEX_HUMAN_INSTRUCTION if complex_human_instruction is None else complex_human_instruction
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            complex_human_instruction=chi,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return TextContext(embeds, mask)

    @torch.no_grad()
    def encode_negative(self, prompts: list[str]) -> TextContext:
        """The unconditional branch's states: SanaPipeline encodes negatives without the instruction."""
        return self.encode_prompt(prompts, complex_human_instruction=[])

    def latent_shape(self, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        s = self.vae_stride
        return batch, self.transformer.config.in_channels, height // s, width // s

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, branch: Branch, clock: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SANA has no reference input and no guidance embedding: the branch's text and canvas only."""
        model = self.transformer
        timestep = t.expand(latents.shape[0]) * model.config.timestep_scale
        p = model.config.patch_size
        h, w = latents.shape[-2] // p, latents.shape[-1] // p
        canvas = branch.canvas
        clock = (t if clock is None else clock).expand(latents.shape[0]).float()  # the connector's sigma·1000

        def add_canvas(tokens: torch.Tensor) -> torch.Tensor:  # (B, H·W, D)
            grid = tokens.unflatten(1, (1, h, w))
            return canvas.add_to(grid, clock).flatten(1, 3)

        dtype = model.dtype
        text = branch.text
        call = dict(encoder_hidden_states=text.embeds.to(dtype), encoder_attention_mask=text.mask, timestep=timestep)
        if canvas is not None and canvas.in_latents:  # ablation: the canvas added before patchify
            latents, canvas = canvas.add_to_latents(latents.to(dtype), p), None
        if canvas is None:
            v = model(latents.to(dtype), **call, return_dict=False)[0]
        else:
            with patch_embedding_hook(model.patch_embed, add_canvas):
                v = model(latents.to(dtype), **call, return_dict=False)[0]
        if model.config.out_channels == 2 * model.config.in_channels:  # learned sigma: keep the mean
            v = v.chunk(2, dim=1)[0]
        return v

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(x, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
