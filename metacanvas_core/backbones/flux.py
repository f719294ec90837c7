"""FLUX.1-Kontext-dev image editing (the paper's editing backbone): FluxTransformer2DModel + AutoencoderKL.

Sequence, as diffusers' `FluxKontextPipeline` builds it: the noisy target's packed 2×2 latent tokens,
then the input image's packed tokens (the "reference"), whose position ids have 1 in the first
channel; the transformer's output is sliced back to the target rows. The packing, unpacking, ids, VAE
encoding, image resizing and timestep spacing are the pipeline's own helpers, so with the canvas off
one branch computes what `FluxKontextPipeline` computes for the same prompt embeddings.

Text: in the paper T5 is dropped; the MLLM's prompt states go through the context connector `Linear(MLLM -> 3·4096) ->
SiLU -> Linear(-> 4096)` into the joint text stream (the paper's editing setup: the MLP initialised from UniWorld-V1's).
The native T5-XXL + CLIP-L from the folder (loaded on request) give the plain FLUX.1-Kontext output before any connector
is trained; prompts are then encoded by diffusers' own `FluxKontextPipeline.encode_prompt`.

Pooled projection (FLUX's 768-d CLIP pooled slot, which modulates every block with the timestep), this project's
decision (the paper does not say): a constant, the CLIP-L pooled embedding of the empty prompt, computed once when the
folder is loaded (CLIP is then released). Reason: UniWorld-V1, whose connector MetaCanvas starts from, feeds exactly
that when it drops T5 (`encode_prompt(..., '' ...)` -> pooled), so the connector's states meet the pooled input it was
trained with, and every piece of prompt information then comes from the MLLM (no second text encoder reading the
prompt). A folder without `text_encoder/` (the tiny test models may omit it) gets zeros.

Canvas: a fixed 32×32 grid over the target at every size (the fixed canvas rule, `canvas.CANVAS_RULES`): the paper
states 32×32 = 1024 canvas tokens for editing. It is interpolated to the target's token grid (64×64 at Kontext's 1024²)
and added after `x_embedder` to the target rows only; reference and text rows are never touched (the paper's §3.4 and
Fig. 2: the canvas goes to the noisy latent's tokens only). Checkpoints written before issue 25 keep the factor rule
they were trained with (canvas factor 1: one canvas token per DiT token).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS, calculate_shift
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from ..connectors import ConditionEmbedding
from ..errors import MetaCanvasInputError
from ..injection import add_to_image_tokens
from ..inputs import VisualInputs
from ..specs import FLUX_KONTEXT, KONTEXT_SIDE, BackboneSpec, flux_kontext_spec
from ..text import TextContext
from .base import Backbone, Branch, patch_embedding_hook, read_json

_CALL_DEFAULTS = inspect.signature(FluxKontextPipeline.__call__).parameters
DEFAULT_GUIDANCE: float = _CALL_DEFAULTS["guidance_scale"].default
MAX_SEQUENCE_LENGTH: int = _CALL_DEFAULTS["max_sequence_length"].default
KONTEXT_AREA = KONTEXT_SIDE**2  # the area of PREFERRED_KONTEXT_RESOLUTIONS (FLUX.1-Kontext's training buckets)

REFERENCE_RULE = (
    "The input image is resized, never cropped: to the FLUX.1-Kontext preferred resolution nearest its own "
    "aspect ratio (1024×1024, 1248×832, 1568×672, ...), scaled by sqrt(output width·height / 1024²), each side "
    "floored to a multiple of 16. So it keeps its aspect ratio whatever the output's, and holds about as "
    "many tokens as the output."
)


def reference_size(image_width: int, image_height: int, height: int, width: int, multiple: int) -> tuple[int, int]:
    """(height, width) of the reference for an input image and an output of height × width (REFERENCE_RULE)."""
    aspect = image_width / image_height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    scale = math.sqrt(height * width / KONTEXT_AREA)
    return (max(multiple, int(h * scale) // multiple * multiple), max(multiple, int(w * scale) // multiple * multiple))


@dataclass(frozen=True)
class FluxReferences:
    """The input image as Kontext reference tokens: packed latents, their position ids and the pixel size."""

    tokens: torch.Tensor  # (1, n, 4C)
    ids: torch.Tensor  # (n, 3), first channel 1
    size: tuple[int, int]  # (height, width) the image was resized to


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) VAE latents -> (B, h/2·w/2, 4C) FLUX tokens, with the pipeline's own helper."""
    b, c, h, w = latents.shape
    return FluxKontextPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, latent_height: int, latent_width: int, vae_stride: int) -> torch.Tensor:
    """Inverse of `pack` for a latent of latent_height × latent_width."""
    return FluxKontextPipeline._unpack_latents(
        tokens, latent_height * vae_stride, latent_width * vae_stride, vae_stride
    )


class FluxKontextBackbone(Backbone):
    kind = FLUX_KONTEXT
    pipeline_class_names = ("FluxKontextPipeline",)
    context_source = "mllm"
    batch_guidance = False  # one call per branch, as FluxKontextPipeline does for true CFG (no text mask)

    def __init__(self, folder: str, transformer, vae, scheduler_config: dict, encoders: dict | None = None) -> None:
        super().__init__(folder, transformer, vae, scheduler_config)
        encoders = encoders or {}
        # Used for its helpers (image processor, VAE encoding, prompt encoding): the denoising loop is ours.
        self.pipeline = FluxKontextPipeline(
            scheduler=None,
            vae=vae,
            text_encoder=encoders.get("text_encoder"),
            tokenizer=encoders.get("tokenizer"),
            text_encoder_2=encoders.get("text_encoder_2"),
            tokenizer_2=encoders.get("tokenizer_2"),
            transformer=transformer,
        )
        dim = transformer.config.pooled_projection_dim
        self.pooled = self.encode_pooled([""]) if self.pipeline.text_encoder is not None else torch.zeros(1, dim)
        if self.pipeline.text_encoder_2 is None:  # MLLM context: CLIP was needed for the constant pooled only
            self.pipeline.text_encoder = self.pipeline.tokenizer = None

    @classmethod
    def from_folder(
        cls, folder: Path, dtype: torch.dtype, device: str | torch.device, text_encoder: bool = True
    ) -> FluxKontextBackbone:
        """`text_encoder`: also load T5-XXL (context 'native'); CLIP-L is read in any case for the pooled slot."""
        kw = dict(local_files_only=True, use_safetensors=True)
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        encoders = {}
        if (folder / "text_encoder" / "config.json").is_file():
            encoders["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, **kw)
            encoders["tokenizer"] = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        if text_encoder and encoders and (folder / "text_encoder_2" / "config.json").is_file():
            encoders["text_encoder_2"] = T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype, **kw)
            encoders["tokenizer_2"] = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        for module in (transformer, vae, *(m for m in encoders.values() if isinstance(m, torch.nn.Module))):
            module.to(device).eval().requires_grad_(False)
        return cls(str(folder), transformer, vae, scheduler_config, encoders)

    # --- geometry ----------------------------------------------------------------------------
    @property
    def vae_stride(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_stride(self) -> int:
        return self.vae_stride * 2  # 2×2 packing

    @property
    def default_size(self) -> tuple[int, int]:
        return KONTEXT_SIDE, KONTEXT_SIDE

    @property
    def text_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def spec(self) -> BackboneSpec:
        c = self.transformer.config
        return flux_kontext_spec(
            self.width, self.attention_heads, self.text_dim, c.pooled_projection_dim, self.vae_stride
        )

    # --- the model ---------------------------------------------------------------------------
    def parts(self):
        encoders = {"text_encoder": self.pipeline.text_encoder, "text_encoder_2": self.pipeline.text_encoder_2}
        return {**super().parts(), **{k: m for k, m in encoders.items() if m is not None}}

    @property
    def has_text_encoder(self) -> bool:
        return self.pipeline.text_encoder_2 is not None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> TextContext:
        """T5-XXL states and the CLIP-L pooled vector as FluxKontextPipeline makes them (no text mask: all ones)."""
        self.require_text_encoder()
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return TextContext(embeds, mask, pooled.to(self.dtype))

    def default_pooled(self) -> torch.Tensor:
        return self.pooled

    @torch.no_grad()
    def encode_pooled(self, prompts: list[str]) -> torch.Tensor:
        """CLIP-L pooled embedding, as FluxKontextPipeline computes it."""
        return self.pipeline._get_clip_prompt_embeds(prompts, device=self.device).to(self.dtype)

    def latent_shape(self, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        s = self.vae_stride
        return batch, self.transformer.config.in_channels // 4, height // s, width // s

    @torch.no_grad()
    def prepare_references(
        self, inputs: VisualInputs, height: int, width: int, condition: ConditionEmbedding | None = None
    ) -> FluxReferences:
        """The input image as Kontext reference tokens: resized by REFERENCE_RULE, VAE-encoded, packed."""
        images = inputs.images
        if not images:
            raise MetaCanvasInputError(
                "images: the FLUX.1-Kontext backbone edits an input image and this plan has none. Connect the "
                "image to edit (e.g. a core Load Image) to the 'images' input of MetaCanvas Plan."
            )
        if len(images) > 1:
            raise MetaCanvasInputError(
                f"images: FLUX.1-Kontext edits one input image, the plan has {len(images)}. Pass a single image "
                "(e.g. pick one with the core 'Image From Batch' node)."
            )
        image = images[0]
        rh, rw = reference_size(image.width, image.height, height, width, self.pixel_stride)
        proc = self.pipeline.image_processor
        pixels = proc.preprocess(proc.resize(image, rh, rw), rh, rw).to(self.device, self.vae.dtype)
        latents = self.pipeline._encode_vae_image(pixels, generator=None)
        lh, lw = latents.shape[-2:]
        ids = FluxKontextPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, self.device, self.dtype)
        ids[..., 0] = 1  # Kontext: reference ids are the target's with the first channel set to 1
        return FluxReferences(pack(latents), ids, (rh, rw))

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> None:
        """FluxKontextPipeline's spacing: sigmas 1 -> 1/steps, shifted by the target's token count."""
        c = scheduler.config
        mu = None
        if c.get("use_dynamic_shifting"):
            tokens = (height // self.pixel_stride) * (width // self.pixel_stride)
            mu = calculate_shift(
                tokens,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, branch: Branch, clock: torch.Tensor | None = None
    ) -> torch.Tensor:
        model = self.transformer
        dtype, device = model.dtype, latents.device
        b, _, lh, lw = latents.shape
        x = pack(latents.to(dtype))
        n_target = x.shape[1]
        ids = FluxKontextPipeline._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype)
        refs: FluxReferences | None = branch.references
        if refs is not None:
            x = torch.cat([x, refs.tokens.to(device, dtype).expand(b, -1, -1)], 1)
            ids = torch.cat([ids, refs.ids.to(device, dtype)], 0)
        context, mask = branch.text.embeds, branch.text.mask
        if b == 1 and not bool(mask.all()):  # FLUX has no text mask: drop padding instead
            context = context[:, mask[0].bool()]
        t_model = t.expand(b).to(dtype)  # as FluxKontextPipeline: the model divides by 1000, then scales back
        canvas = branch.canvas
        clock = (t if clock is None else clock).expand(b).float()  # the connector's sigma·1000

        def add_canvas(tokens: torch.Tensor) -> torch.Tensor:  # (B, target + reference rows, D)
            return add_to_image_tokens(tokens, canvas, clock, (lh // 2, lw // 2))

        g = None
        if model.config.guidance_embeds:
            value = DEFAULT_GUIDANCE if branch.guidance is None else branch.guidance
            g = torch.full([1], value, device=device, dtype=torch.float32).expand(b)
        pooled = self.pooled if branch.text.pooled is None else branch.text.pooled
        call = dict(
            timestep=t_model / 1000,
            guidance=g,
            pooled_projections=pooled.to(device, dtype).expand(b, -1),
            encoder_hidden_states=context.to(dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            img_ids=ids,
            return_dict=False,
        )
        if canvas is None:
            v = model(hidden_states=x, **call)[0]
        else:
            with patch_embedding_hook(model.x_embedder, add_canvas):
                v = model(hidden_states=x, **call)[0]
        return unpack(v[:, :n_target], lh, lw, self.vae_stride)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        x = latents.to(self.device, self.vae.dtype) / c.scaling_factor + c.shift_factor
        images = self.vae.decode(x, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
