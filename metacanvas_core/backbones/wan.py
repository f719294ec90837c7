"""Wan2.2-TI2V-5B video (the paper's video backbone): WanTransformer3DModel + AutoencoderKLWan (48 ch).

Time: Wan2.2 TI2V's per-token timesteps (diffusers `expand_timesteps`): clean latent frames (the
image-to-video first frame, reference frames) get timestep 0, noisy ones t; the first frame is
replaced by the clean image latent before every model call and at the end, as
`WanImageToVideoPipeline` does, so with the canvas off the arithmetic is the pipeline's.

Context: the paper's (video setup) is the MLLM's prompt states through the context connector (MLLM -> 4× -> a `text_dim`
of 4096, dropout 0.1), replacing umT5. The native umT5 from the folder (loaded on request) gives the plain Wan2.2 output
before any connector is trained; prompts are then encoded by diffusers' own `WanPipeline.encode_prompt`.

Canvas: sparse keyframes (the paper's 3 × 11×20 at 704×1280; Table 6 for 3) interpolated linearly to every noisy latent
frame; the fuse block runs frame by frame. It reaches the noisy target tokens only, never reference frames or the clean
first frame.

Condition inputs (Wan-Animate style as in the paper's Fig. 3 and App. D.2; the details below are this project's
decisions): a zero-initialised `Conv3d(z + 2 -> width)` patch embedding, kept in the MetaCanvas checkpoint, embeds per
latent frame [source-video latent (z) | is-reference (1) | has-source (1)] and is added to the backbone's own patch
embedding. That is exactly the backbone's patch embedding with its input channels widened by zero-initialised channels
(a conv is linear in its input channels), but the pretrained folder loads unchanged and an untrained checkpoint adds
exact zeros. Reference images are encoded as clean latent frames placed before the video along time (Wan-Animate),
marked by the is-reference channel; a source video (editing) fills the source channels of the target frames.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from ..connectors import ConditionEmbedding
from ..errors import MetaCanvasInputError
from ..injection import add_to_patch_embedding, prepend_references, vae_pixels, wan_condition
from ..inputs import ImageRole, VisualInputs
from ..sizes import check_size
from ..specs import WAN, WAN_DEFAULT_SIZE, WAN_MAX_REFERENCES, BackboneSpec, wan_spec
from ..text import TextContext
from .base import Backbone, Branch, patch_embedding_hook, read_json

MAX_SEQUENCE_LENGTH: int = inspect.signature(WanPipeline.__call__).parameters["max_sequence_length"].default


@dataclass(frozen=True)
class WanReferences:
    """Wan's own inputs from a request's images and video, as normalised latents (1, z, frames, h, w)."""

    first_frame: torch.Tensor | None = None  # image-to-video: the clean first frame
    reference: torch.Tensor | None = None  # reference images: clean frames before the video
    source_frames: tuple = ()  # a source video's frames (PIL), encoded by `fit_references` into `source`
    size: tuple[int, int] | None = None  # (height, width) the source frames are encoded at
    source: torch.Tensor | None = None  # the source video's latents (video editing)
    condition: ConditionEmbedding | None = None  # the checkpoint's condition embedding (references, source)


class WanBackbone(Backbone):
    kind = WAN
    pipeline_class_names = ("WanPipeline", "WanImageToVideoPipeline")
    context_source = "mllm"
    batch_guidance = False  # WanPipeline calls the model once per CFG branch

    def __init__(self, folder: str, transformer, vae, scheduler_config: dict, text_encoder=None, tokenizer=None):
        super().__init__(folder, transformer, vae, scheduler_config)
        self.text_encoder = text_encoder
        # Used only for its prompt encoding: the denoising loop is ours (sampling.py).
        self.pipeline = WanPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None
        )

    @classmethod
    def from_folder(
        cls, folder: Path, dtype: torch.dtype, device: str | torch.device, text_encoder: bool = True
    ) -> WanBackbone:
        index = read_json(folder / "model_index.json")
        if index.get("transformer_2") and index["transformer_2"][0] or not index.get("expand_timesteps", False):
            raise MetaCanvasInputError(
                f"'{folder}' is a Wan folder but not Wan2.2-TI2V-5B (it has a second transformer or no per-token "
                "timesteps): MetaCanvas video uses the Wan2.2-TI2V-5B-Diffusers folder."
            )
        kw = dict(local_files_only=True, use_safetensors=True)
        transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **kw)
        # The Wan VAE is kept in fp32 as diffusers' Wan examples do: its causal 3D convs drift in half precision.
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **kw)
        encoder = tokenizer = None
        if text_encoder and (folder / "text_encoder" / "config.json").is_file():
            encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype, **kw)
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        for module in (transformer, vae, encoder):
            if module is not None:
                module.to(device).eval().requires_grad_(False)
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        return cls(str(folder), transformer, vae, scheduler_config, encoder, tokenizer)

    # --- geometry ---------------------------------------------------------------------------
    @property
    def vae_stride(self) -> int:
        return self.vae.config.scale_factor_spatial

    @property
    def temporal_stride(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def pixel_stride(self) -> int:
        return self.vae_stride * self.transformer.config.patch_size[1]

    @property
    def default_size(self) -> tuple[int, int]:
        return WAN_DEFAULT_SIZE

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_stride + 1

    def pixel_frames(self, latents: torch.Tensor) -> int:
        return (latents.shape[2] - 1) * self.temporal_stride + 1

    def check_size(self, height: int, width: int, frames: int = 1) -> None:
        super().check_size(height, width)
        check_size("length", frames, self.temporal_stride, "frames the Wan2.2 VAE takes", offset=1)

    @property
    def text_dim(self) -> int:
        return self.transformer.config.text_dim

    @property
    def spec(self) -> BackboneSpec:
        c = self.transformer.config
        return wan_spec(self.width, self.text_dim, c.in_channels, tuple(c.patch_size), self.vae_stride)

    def parts(self):
        return {**super().parts(), **({"text_encoder": self.text_encoder} if self.text_encoder is not None else {})}

    @property
    def has_text_encoder(self) -> bool:
        return self.text_encoder is not None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> TextContext:
        """umT5 states as WanPipeline makes them (zero-padded to its max length; Wan has no text mask)."""
        self.require_text_encoder()
        embeds, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.device,
            dtype=self.dtype,
        )
        return TextContext(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))

    def latent_shape(self, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        s = self.vae_stride
        return batch, self.vae.config.z_dim, self.latent_frames(frames), height // s, width // s

    # --- VAE --------------------------------------------------------------------------------
    def _normalize(self, latents: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return latents / inv_std + mean if inverse else (latents - mean) * inv_std

    @torch.no_grad()
    def encode_video(self, frames: list[Image.Image], height: int, width: int) -> torch.Tensor:
        """Frames -> normalised latents (1, z, (n-1)/4+1, h, w), resized to height × width (stretched)."""
        pixels = vae_pixels(frames, height, width, self.vae_stride)  # (1, 3, n, H, W)
        pixels = pixels.to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self._normalize(latents.to(self.device, torch.float32))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (1, z, F, h, w) -> frames (4(F-1)+1, H, W, 3) on the CPU, one latent frame at a time.

        The same causal-cache loop as `AutoencoderKLWan._decode`, but each decoded chunk leaves the
        GPU at once, so a 121-frame 704×1280 video never sits decoded in GPU memory.
        """
        vae = self.vae
        z = self._normalize(latents.to(self.device, vae.dtype), inverse=True)
        x = vae.post_quant_conv(z)
        vae.clear_cache()
        chunks = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            chunks.append((out.float().clamp(-1, 1) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).cpu())
        vae.clear_cache()
        return torch.cat(chunks)

    # --- conditions -------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_references(
        self, inputs: VisualInputs, height: int, width: int, condition: ConditionEmbedding | None = None
    ) -> WanReferences | None:
        """Latents of the first frame (image-to-video), reference images or the source video (editing)."""
        images, video = inputs.images, inputs.video
        refs = WanReferences()
        if images and inputs.role == ImageRole.FIRST_FRAME:
            if len(images) != 1:
                raise MetaCanvasInputError(
                    f"images: image-to-video starts from one image, the plan has {len(images)}; pass one image or set "
                    f"image_role to '{ImageRole.REFERENCES}'."
                )
            refs = replace(refs, first_frame=self.encode_video(list(images), height, width))
        elif images:
            if len(images) > WAN_MAX_REFERENCES:
                raise MetaCanvasInputError(
                    f"images: {len(images)} reference images; MetaCanvas video takes 1 to {WAN_MAX_REFERENCES}."
                )
            refs = replace(refs, reference=torch.cat([self.encode_video([im], height, width) for im in images], 2))
        if video:  # encoded by `fit_references`, once the sampler's length says how many frames are needed
            refs = replace(refs, source_frames=tuple(video), size=(height, width))
        if refs.reference is not None or refs.source_frames:
            if condition is None:
                raise MetaCanvasInputError(
                    "this MetaCanvas checkpoint has no condition embedding, which Wan reference images and source "
                    "videos need: use a checkpoint made for the Wan backbone."
                )
            refs = replace(refs, condition=condition)
        return refs if refs != WanReferences() else None

    @torch.no_grad()
    def fit_references(self, references: WanReferences | None, frames: int) -> WanReferences | None:
        """Encode only the source-video frames a `frames`-long sample needs (a long clip never meets the VAE)."""
        if references is None or not references.source_frames:
            return references
        video, k = references.source_frames, self.temporal_stride
        needed = (self.latent_frames(frames) - 1) * k + 1
        if len(video) < needed:
            usable = (len(video) - 1) // k * k + 1
            raise MetaCanvasInputError(
                f"video: the source video gives {usable} usable frames, fewer than the {needed} asked: lower the "
                "sampler's length or load more frames."
            )
        source = self.encode_video(list(video[:needed]), *references.size)
        return replace(references, source_frames=(), size=None, source=source)

    # --- denoising --------------------------------------------------------------------------
    def _first_frame_mask(self, latents: torch.Tensor, refs: WanReferences | None) -> torch.Tensor:
        """1 where a latent frame is noisy, 0 on the clean image-to-video first frame: (1, 1, F, h, w)."""
        mask = torch.ones(1, 1, *latents.shape[2:], dtype=latents.dtype, device=latents.device)
        if refs is not None and refs.first_frame is not None:
            mask[:, :, 0] = 0
        return mask

    def finalize(self, latents: torch.Tensor, references: WanReferences | None) -> torch.Tensor:
        if references is not None and references.first_frame is not None:
            mask = self._first_frame_mask(latents, references)
            latents = (1 - mask) * references.first_frame + mask * latents
        return latents

    def loss_frames(self, references: WanReferences | None) -> slice:
        """Image-to-video's first frame is given, not learned."""
        return slice(1 if references is not None and references.first_frame is not None else 0, None)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, branch: Branch, clock: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token timesteps take one scalar `t` for the whole call (as diffusers' Wan pipelines)."""
        model = self.transformer
        refs: WanReferences | None = branch.references
        b, _, frames = latents.shape[:3]
        mask = self._first_frame_mask(latents, refs)
        noisy = mask[:, 0, :, 0, 0].expand(b, -1)  # (b, F): 0 on the clean first frame
        x = latents
        if refs is not None and refs.first_frame is not None:
            x = (1 - mask) * refs.first_frame + mask * latents
        x, per_frame = prepend_references(x, noisy * t, None if refs is None else refs.reference)
        n_ref = x.shape[2] - frames
        _, p_h, p_w = model.config.patch_size
        timestep = per_frame.repeat_interleave((x.shape[-2] // p_h) * (x.shape[-1] // p_w), dim=1)  # per token
        condition = None
        if refs is not None and refs.condition is not None:
            source = wan_condition(n_ref, frames, (latents.shape[1], *latents.shape[-2:]), refs.source, self.device)
            condition = refs.condition(source)
        canvas = branch.canvas
        clock = (t if clock is None else clock).expand(b).float()  # the connector's sigma·1000

        def add(out: torch.Tensor) -> torch.Tensor:  # (B, D, T, H', W') before Wan flattens it
            return add_to_patch_embedding(out, canvas, clock, n_ref, noisy, condition)

        dtype = model.dtype
        call = dict(timestep=timestep, encoder_hidden_states=branch.text.embeds.to(dtype), return_dict=False)
        if condition is None and canvas is None:
            v = model(x.to(dtype), **call)[0]
        else:
            with patch_embedding_hook(model.patch_embedding, add):
                v = model(x.to(dtype), **call)[0]
        return v[:, :, n_ref:]
