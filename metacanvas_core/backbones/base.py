"""What every diffusion backbone gives MetaCanvas, and the one shared canvas mechanism.

A backbone adapter wraps a diffusers transformer + VAE (+ native text encoder) loaded from a
diffusers-format folder. The canvas residual is added to the transformer's patch embeddings by a
forward hook on its patch-embed module: after patchify, before the first block (paper §2.3).
Per-backbone files only say how their patch tokens are laid out and how they call their model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

from ..connectors import CanvasConnector
from ..errors import MetaCanvasInputError

if TYPE_CHECKING:
    from ..checkpoint import MetaCanvas
    from ..planner import Plan

SCHEDULERS = ("dpm_solver_flow", "flow_euler", "unipc_flow")


@dataclass
class CanvasInjection:
    """The aligned canvas on the DiT token grid, for the batch rows of the conditional branch."""

    connector: CanvasConnector
    canvas: torch.Tensor  # (b, T, H, W, D) for the rows in `rows`
    rows: slice

    @property
    def in_latents(self) -> bool:
        """Whether the canvas is added to the noisy latent before patchify (the Table 3 ablation)."""
        return self.connector.config.get("inject", "patch_embed") == "latent"

    def add_to_latents(self, latents: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Latents (B, C, h, w) plus the canvas (b, 1, h/p, w/p, C·p²) unpatchified, on `rows`."""
        b, _, hh, ww, _ = self.canvas.shape
        c, p = latents.shape[1], patch_size
        x = self.canvas[:, 0].reshape(b, hh, ww, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh * p, ww * p)
        residual = torch.zeros_like(latents)
        residual[self.rows] = x.to(latents.dtype)
        return latents + residual

    def add_to(self, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, T, H, W, D) plus the fuse block's residual on `rows`; other rows untouched.

        The fuse block runs frame by frame, `(b t) (h w) d`, which bounds its memory on video.
        """
        if self.in_latents:
            raise MetaCanvasInputError(
                "this MetaCanvas checkpoint adds its canvas before patchify (a connector ablation): only the SANA "
                "backbone takes it."
            )
        dtype = next(self.connector.parameters()).dtype  # the connector keeps its own precision
        x = tokens[self.rows].to(dtype)
        b, t, h, w, d = x.shape
        r = self.connector.fuse(
            x.reshape(b * t, h * w, d),
            self.canvas.to(dtype).reshape(b * t, h * w, d),
            timestep[self.rows].repeat_interleave(t).to(dtype),
            h,
            w,
        )
        residual = torch.zeros_like(tokens)
        residual[self.rows] = r.reshape(b, t, h, w, d).to(tokens.dtype)
        return tokens + residual


@contextmanager
def patch_embedding_hook(module: nn.Module, transform) -> Iterator[None]:
    """Replace `module`'s output with `transform(output)` for the duration of the block."""
    handle = module.register_forward_hook(lambda _m, _args, out: transform(out))
    try:
        yield
    finally:
        handle.remove()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class Backbone(ABC):
    """A diffusion backbone as MetaCanvas sees it."""

    kind: ClassVar[str]  # "sana", ...: stored in checkpoints
    pipeline_class_names: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this adapter loads
    # The paper's context source for this backbone: "native" (its own text encoder) or "mllm" (context
    # connector). Checkpoints record theirs; an untrained one uses the native encoder when it is loaded.
    context_source: ClassVar[str]
    canvas_factor: ClassVar[int]  # canvas grid = token grid / factor [D, §2.2]
    needs_input_image: ClassVar[bool] = False  # editing backbones: the plan must carry an input image
    batch_guidance: ClassVar[bool] = True  # CFG branches in one 2B call (SANA) or one call each (FLUX)
    is_video: ClassVar[bool] = False
    keyframes: ClassVar[int] = 1  # canvas keyframes K of a new checkpoint (video: sparse 3D canvas)
    context_dropout: ClassVar[float] = 0.0  # dropout inside a new context connector
    condition_channels: ClassVar[int] = 0  # input channels of a condition embedding (Wan: source video + masks)

    def __init__(self, folder: str, transformer: nn.Module, vae: nn.Module, scheduler_config: dict) -> None:
        self.folder = folder
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = scheduler_config

    # --- geometry -------------------------------------------------------------------------
    @property
    @abstractmethod
    def pixel_stride(self) -> int:
        """Pixels per DiT token along height and width (VAE stride × patch size)."""

    @property
    @abstractmethod
    def default_size(self) -> tuple[int, int]:
        """(height, width) the backbone was trained at; the checkpoint's canvas grid is stored there."""

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a length in frames (images: 1)."""
        return frames

    def token_grid(self, height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
        return self.latent_frames(frames), height // self.pixel_stride, width // self.pixel_stride

    def check_size(self, height: int, width: int, frames: int = 1) -> None:
        if frames != 1 and not self.is_video:
            raise MetaCanvasInputError(
                f"length {frames}: the {self.kind} backbone '{self.folder}' makes images; set length to 1."
            )
        s = self.pixel_stride
        for name, value in (("width", width), ("height", height)):
            if value % s or value <= 0:
                raise MetaCanvasInputError(
                    f"{name} {value} is not a positive multiple of {s}, the pixel stride of the {self.kind} "
                    f"backbone '{self.folder}': use {max(s, value // s * s)} or {(value // s + 1) * s}."
                )

    # --- sizes of the transformer ---------------------------------------------------------
    @property
    def width(self) -> int:
        """Hidden width of the DiT (the canvas connector's output width)."""
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    @property
    def attention_heads(self) -> tuple[int, int]:
        """(heads, head_dim) of the connector's blocks: by default the DiT's own."""
        c = self.transformer.config
        return c.num_attention_heads, c.attention_head_dim

    @property
    @abstractmethod
    def text_dim(self) -> int:
        """Width of the DiT's text slot (what a context connector must produce)."""

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def context_hidden_dim(self, mllm_dim: int) -> int:
        """Hidden width of a new context connector (MLLM → hidden → text slot)."""
        return 4 * mllm_dim

    def modules(self) -> list[nn.Module]:
        """Every module holding weights, for device moves and memory accounting."""
        return [self.transformer, self.vae]

    # --- the model ------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Native text encoder: (embeds (B, L, text_dim), mask (B, L))."""

    def encode_negative(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Native encoding of the unconditional branch (some pipelines encode it differently)."""
        return self.encode_prompt(prompts)

    @property
    def has_text_encoder(self) -> bool:
        """Whether the native text encoder was loaded (so `encode_prompt` works)."""
        return False

    def require_text_encoder(self) -> None:
        if not self.has_text_encoder:
            raise MetaCanvasInputError(
                f"the {self.kind} backbone '{self.folder}' was loaded without its own text encoder (the Backbone "
                "Loader's load_text_encoder is off, or the folder has none), so it cannot encode the prompt natively: "
                "turn load_text_encoder on, or use a MetaCanvas checkpoint with MLLM context."
            )

    def encode_pooled(self, prompts: list[str]) -> torch.Tensor | None:
        """Native global text vector for backbones that have a slot for one (FLUX: CLIP pooled)."""
        return None

    def prepare_references(self, plan: Plan, metacanvas: MetaCanvas, height: int, width: int) -> dict[str, Any] | None:
        """Backbone inputs made from the plan's input images/video for an output of height × width.

        Passed unchanged to every `predict` call as `references`. None: the backbone takes no image
        input of its own (the images reach only the MLLM), which is the default.
        """
        return None

    def fit_references(self, references: dict[str, Any] | None, frames: int) -> dict[str, Any] | None:
        """The references for a sample of `frames` frames, made once before the loop (Wan: the source-video
        latents, encoded for just the frames needed). Returns a new dict; the conditioning is not changed."""
        return references

    def finalize(self, latents: torch.Tensor, references: dict[str, Any] | None) -> torch.Tensor:
        """The sampled latents as the decoder should see them (Wan I2V: the clean first frame put back)."""
        return latents

    @abstractmethod
    def latent_shape(self, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of the noisy latent for `batch` samples of height × width pixels (× frames for video)."""

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        canvas: CanvasInjection | None,
        references: dict[str, Any] | None = None,
        guidance: float | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for `latents` at scheduler timestep `t`, with the canvas added when given.

        `references`: from `prepare_references` (None = without the input images, e.g. the null
        branch of image guidance). `guidance`: an embedded-guidance value for guidance-distilled
        models (FLUX); backbones without a guidance embedding ignore it. `pooled`: the branch's global
        text vector from `encode_pooled` (None: the backbone's default; backbones without the slot ignore it).
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images (B, H, W, 3) float in 0..1."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) float in 0..1 → the latents `decode` inverts (training targets).

        Default for diffusers image VAEs: AutoencoderDC's `latent`, AutoencoderKL's distribution mode,
        then (x − shift_factor) · scaling_factor. Backbones with other latent normalisations override it.
        """
        x = (images.permute(0, 3, 1, 2) * 2 - 1).to(self.vae.device, self.vae.dtype)
        out = self.vae.encode(x)
        latents = out.latent if hasattr(out, "latent") else out.latent_dist.mode()
        c = self.vae.config
        return (latents.float() - (c.get("shift_factor") or 0.0)) * c.scaling_factor

    # --- shared machinery -----------------------------------------------------------------
    def initial_noise(self, seed: int, batch: int, height: int, width: int, frames: int = 1) -> torch.Tensor:
        """Float32 noise from a CPU generator, so a seed gives the same image on any device."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = self.latent_shape(batch, height, width, frames)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def set_timesteps(self, scheduler, steps: int, height: int, width: int) -> None:
        """The scheduler's timesteps for an output of height × width (default: its own spacing)."""
        scheduler.set_timesteps(steps, device=self.device)

    def make_scheduler(self, name: str):
        """A fresh flow-matching scheduler; the folder's own config when it is of the asked kind."""
        config = dict(self.scheduler_config)
        own = config.get("_class_name")
        shift = config.get("flow_shift") or config.get("shift") or 1.0
        if name == "dpm_solver_flow":
            if own == "DPMSolverMultistepScheduler":
                return DPMSolverMultistepScheduler.from_config(config)
            return DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
            )
        if name == "flow_euler":
            if own == "FlowMatchEulerDiscreteScheduler":
                return FlowMatchEulerDiscreteScheduler.from_config(config)
            return FlowMatchEulerDiscreteScheduler(shift=shift)
        if name == "unipc_flow":
            if own == "UniPCMultistepScheduler":
                return UniPCMultistepScheduler.from_config(config)
            return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        raise MetaCanvasInputError(f"scheduler '{name}' is not one of {', '.join(SCHEDULERS)}.")
