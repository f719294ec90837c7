"""What every diffusion backbone gives MetaCanvas, and the one shared canvas mechanism.

A backbone adapter wraps a diffusers transformer + VAE (+ native text encoder) loaded from a diffusers-format folder.
The canvas residual is added to the transformer's patch embeddings by a forward hook on its patch-embed module: after
patchify, before the first block (the paper's §3.4, Fig. 2; Table 3: adding it before patchify is worse). ComfyUI's
native models get the same residual from the same `CanvasInjection` (`native.py`). Per-backbone files only say how their
patch tokens are laid out and how they call their model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from einops import rearrange
from torch import nn

from ..canvas import FACTOR_RULE, FIXED_RULE, CanvasGrid, canvas_grid_for, interpolate_canvas
from ..connectors import CanvasConnector, ConditionEmbedding
from ..errors import MetaCanvasInputError
from ..inputs import VisualInputs
from ..schedulers import SCHEDULERS


@dataclass(frozen=True)
class BackboneSpec:
    """The dimensions a MetaCanvas checkpoint is built and checked against, for one backbone.

    Made by a pack adapter from its diffusers transformer (`Backbone.spec`) or from a ComfyUI native
    model (`native.py`), with the adapter class's own rules (`Backbone.spec_from`), so both agree.
    """

    kind: str
    width: int  # DiT hidden width (the canvas connector's output)
    pixel_stride: int  # pixels per DiT token along height and width (VAE stride × patch size)
    text_dim: int  # width of the DiT's text slot (a context connector's output)
    attention_heads: tuple[int, int]  # (heads, head_dim) of the connector's blocks
    default_size: tuple[int, int]  # (height, width) the backbone was trained at: where the canvas grid is stored
    canvas_factor: int  # the factor rule: canvas grid = token grid / factor (`canvas.CANVAS_RULES`)
    keyframes: int  # canvas keyframes K of a new checkpoint (video: sparse 3D canvas)
    context_dropout: float  # dropout inside a new context connector
    context_hidden_dim: int | None  # hidden width of a new context connector; None: 4 × the MLLM's width
    condition: dict | None = None  # ConditionEmbedding config (Wan: source video + masks), or None
    pooled_dim: int | None = None  # width of a pooled text vector the DiT also takes (FLUX: CLIP-L's 768), or None
    fixed_canvas: tuple[int, int] | None = None  # the fixed rule's canvas (rows, columns) at every size; None: factor

    @property
    def canvas_rule(self) -> str:
        """The canvas rule of a new checkpoint for this backbone (`canvas.CANVAS_RULES`)."""
        return FACTOR_RULE if self.fixed_canvas is None else FIXED_RULE

    def canvas_grid(self, keyframes: int | None = None) -> CanvasGrid:
        """The canvas grid a new checkpoint stores: the fixed canvas, or the factor rule's at the default size."""
        frames = keyframes or self.keyframes
        if self.fixed_canvas is not None:
            return CanvasGrid(frames, *self.fixed_canvas)
        h, w = self.default_size
        s = self.pixel_stride
        return canvas_grid_for((1, h // s, w // s), self.canvas_factor, frames)


@dataclass
class TextContext:
    """What fills a DiT's text slot for a batch: embeddings, their mask and (FLUX) a pooled vector."""

    embeds: torch.Tensor  # (B, L, text_dim)
    mask: torch.Tensor  # (B, L)
    pooled: torch.Tensor | None = None  # (B, pooled_dim); None: the backbone's default

    @classmethod
    def cat(cls, parts: list[TextContext]) -> TextContext:
        """The parts stacked on the batch, embeddings and masks zero-padded to the longest."""
        length = max(p.embeds.shape[1] for p in parts)
        embeds = torch.cat([F.pad(p.embeds, (0, 0, 0, length - p.embeds.shape[1])) for p in parts])
        mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
        pooled = None if any(p.pooled is None for p in parts) else torch.cat([p.pooled for p in parts])
        return cls(embeds, mask, pooled)

    def sample(self, i: int) -> TextContext:
        """Row i alone, without its padding."""
        keep = self.mask[i].bool()
        pooled = None if self.pooled is None else self.pooled[i : i + 1]
        return TextContext(self.embeds[i : i + 1, keep], self.mask[i : i + 1, keep], pooled)

    def to(self, device: torch.device | str) -> TextContext:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextContext(self.embeds.to(device), self.mask.to(device), pooled)


@dataclass
class CanvasInjection:
    """The aligned canvas on the DiT token grid, for the batch rows that get it.

    `rows` picks those rows of a model call's batch (the conditional branch); every other row, and every
    token a caller leaves out (reference tokens, clean frames), keeps its patch embedding bit for bit.
    `strength` (per row) scales the residual and `mask` (per row, on the token grid, 0..1) confines it: the
    canvas as a dial. Strength 1 without a mask is the residual as trained; strength 0 or an all-zero mask adds
    nothing. `compute_dtype`: what the fuse block computes in when the tokens come in another (ComfyUI's Wan embeds
    its patches in float32 and computes the DiT in bf16/fp16: the residual is then made in the DiT's dtype and added
    to the float32 tokens); None: the tokens' own.
    """

    connector: CanvasConnector
    canvas: torch.Tensor  # (b, T, H, W, D) for the rows in `rows`
    rows: slice | list[int]
    strength: torch.Tensor | None = None  # (b,); None: 1
    mask: torch.Tensor | None = None  # (b, T, H, W) on the token grid; None: everywhere
    compute_dtype: torch.dtype | None = None

    @classmethod
    def on_tokens(
        cls,
        connector: CanvasConnector,
        aligned: torch.Tensor,
        token_grid: tuple[int, int, int],
        rows,
        strength: float | list[float] = 1.0,
        mask: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> CanvasInjection:
        """The aligned canvas (b, K, Hc, Wc, D) interpolated to a token grid (T, H, W).

        `strength`: one for all rows or one per row, Python numbers (decided without a host sync).
        `mask`: (b or 1, frames or 1, height, width) in 0..1 at any resolution, resized to the token grid (area
        average over each token's pixels; frames linearly onto the latent frames, ends aligned). `dtype`: what the
        interpolated canvas is kept in (default: the aligned canvas's); the backbone's compute dtype costs nothing in
        precision, since the fuse block adds it to the patch tokens in that dtype.
        """
        canvas = interpolate_canvas(aligned, token_grid)
        canvas = canvas if dtype is None else canvas.to(dtype)
        b = canvas.shape[0]
        values = [float(strength)] if isinstance(strength, (int, float)) else [float(v) for v in strength]
        dial = None
        if any(v != 1 for v in values):
            dial = torch.tensor(values, dtype=torch.float32, device=canvas.device).expand(b)
        if mask is not None:
            mask = mask_on_tokens(mask.to(canvas.device), token_grid).expand(b, -1, -1, -1)
        return cls(connector, canvas, rows, dial, mask)

    def on_frames(self, frames: list[int]) -> CanvasInjection:
        """This canvas on some of its token grid's frames, in that order (a context window of a long video)."""
        return replace(self, canvas=self.canvas[:, frames], mask=None if self.mask is None else self.mask[:, frames])

    @property
    def in_latents(self) -> bool:
        """Whether the canvas is added to the noisy latent before patchify (the Table 3 ablation)."""
        return self.connector.config.get("inject", "patch_embed") == "latent"

    def add_to_latents(self, latents: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Latents (B, C, h, w) plus the canvas (b, 1, h/p, w/p, C·p²) unpatchified, on `rows`."""
        x = rearrange(self.canvas[:, 0], "b h w (c p q) -> b c (h p) (w q)", p=patch_size, q=patch_size)
        mask = None
        if self.mask is not None:  # each token's mask over its p×p latent positions
            mask = self.mask[:, :1].repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)
        residual = torch.zeros_like(latents)
        residual[self.rows] = self._dial(x.to(latents.dtype), mask)
        return latents + residual

    def residual(self, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The fuse block's residual (b, T, H, W, D) for the patch tokens (B, T, H, W, D) of `rows`, in their dtype
        (or `compute_dtype`).

        `timestep` (B,) is the connector's clock, sigma·1000, in float32 on every backbone (the fuse block keeps it so).
        The fuse block runs frame by frame, `(b t) (h w) d`, a chunk of frames at a time (`CanvasConnector.fuse`).
        """
        if self.in_latents:
            raise MetaCanvasInputError(
                "this MetaCanvas checkpoint adds its canvas before patchify (a connector ablation): only the SANA "
                "backbone takes it."
            )
        x = tokens[self.rows]
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        b, t, h, w, _ = x.shape
        r = self.connector.fuse(
            rearrange(x, "b t h w d -> (b t) (h w) d"),
            rearrange(self.canvas.to(tokens.device), "b t h w d -> (b t) (h w) d"),
            timestep[self.rows].float().repeat_interleave(t),
            h,
            w,
        )
        r = rearrange(r, "(b t) (h w) d -> b t h w d", b=b, t=t, h=h)
        return self._dial(r, None if self.mask is None else self.mask[..., None])

    def _dial(self, r: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The residual scaled by the rows' strength and by `mask` (this residual's shape, broadcastable)."""
        if self.strength is not None:
            r = r * self.strength.to(r.device, r.dtype).view(-1, *[1] * (r.ndim - 1))
        if mask is not None:
            r = r * mask.to(r.device, r.dtype)
        return r

    def add_to(self, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, T, H, W, D) plus the residual on `rows`; other rows untouched (bit for bit)."""
        residual = self.residual(tokens, timestep)  # first: the copy below is not held while the fuse block runs
        out = tokens.clone()
        out[self.rows] += residual.to(out.dtype)
        return out


def mask_on_tokens(mask: torch.Tensor, token_grid: tuple[int, int, int]) -> torch.Tensor:
    """A mask (b, frames, height, width) in 0..1 on a token grid (T, H, W): each token the mean of its pixels;
    frames interpolated linearly with the first and last aligned (4k+1 video frames -> every 4th), one frame: all."""
    t, h, w = token_grid
    b, f = mask.shape[:2]
    m = F.interpolate(mask.float().flatten(0, 1)[:, None], size=(h, w), mode="area")[:, 0].unflatten(0, (b, f))
    if f == t:
        return m
    if f == 1:
        return m.expand(b, t, h, w)
    m = F.interpolate(m.permute(0, 2, 3, 1).flatten(0, 2)[:, None], size=t, mode="linear", align_corners=True)
    return m[:, 0].unflatten(0, (b, h, w)).permute(0, 3, 1, 2)


@dataclass
class Branch:
    """What one model call sees besides the latents and the timestep: one branch of guidance."""

    text: TextContext
    canvas: CanvasInjection | None = None
    references: Any = None  # the backbone's own inputs from images/video (`prepare_references`); None: without
    guidance: float | None = None  # embedded guidance of guidance-distilled models (FLUX); None: the default


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
    canvas_factor: ClassVar[int]  # the factor rule's canvas grid = token grid / factor (`canvas.CANVAS_RULES`)
    needs_input_image: ClassVar[bool] = False  # editing backbones: the plan must carry an input image
    batch_guidance: ClassVar[bool] = True  # CFG branches in one 2B call (SANA) or one call each (FLUX)
    is_video: ClassVar[bool] = False
    keyframes: ClassVar[int] = 1  # canvas keyframes K of a new checkpoint (video: sparse 3D canvas)
    context_dropout: ClassVar[float] = 0.0  # dropout inside a new context connector

    def __init__(self, folder: str, transformer: nn.Module, vae: nn.Module, scheduler_config: dict) -> None:
        self.folder = folder
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = scheduler_config
        # Where inputs go and the computation runs: where the weights are loaded to at first; a memory manager that
        # streams weights (ComfyUI's partial loading) sets it to the compute device.
        self.device: torch.device = next(transformer.parameters()).device

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

    def pixel_frames(self, latents: torch.Tensor) -> int:
        """The length in frames of a latent batch (B, C, [F,] h, w): 1 for images."""
        return 1

    def latent_token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """The token grid of a latent batch (B, C, [F,] h, w)."""
        p = self.pixel_stride // self.vae_stride
        frames = latents.shape[2] if latents.ndim == 5 else 1
        return frames, latents.shape[-2] // p, latents.shape[-1] // p

    @property
    @abstractmethod
    def vae_stride(self) -> int:
        """Pixels per latent position along height and width."""

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
    def spec(self) -> BackboneSpec:
        """This backbone's dimensions (a context connector of 4 × the MLLM's width, no condition inputs)."""
        return BackboneSpec(
            kind=self.kind,
            width=self.width,
            pixel_stride=self.pixel_stride,
            text_dim=self.text_dim,
            attention_heads=self.attention_heads,
            default_size=self.default_size,
            canvas_factor=self.canvas_factor,
            keyframes=self.keyframes,
            context_dropout=self.context_dropout,
            context_hidden_dim=None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def parts(self) -> dict[str, nn.Module]:
        """The loaded models by role ("transformer", "vae", "text_encoder"...): each is memory-managed on its own."""
        return {"transformer": self.transformer, "vae": self.vae}

    def modules(self) -> list[nn.Module]:
        """Every module holding weights (the parts' models)."""
        return list(self.parts().values())

    # --- the model ------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> TextContext:
        """Native text encoder: the text slot for `prompts`."""

    def encode_negative(self, prompts: list[str]) -> TextContext:
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

    def default_pooled(self) -> torch.Tensor | None:
        """The pooled vector of a text slot filled from the MLLM (FLUX: CLIP-L of the empty prompt); None: no slot."""
        return None

    def prepare_references(
        self, inputs: VisualInputs, height: int, width: int, condition: ConditionEmbedding | None = None
    ) -> Any:
        """Backbone inputs made from a request's images/video for an output of height × width.

        Passed unchanged to every `predict` call in `Branch.references`. `condition`: the checkpoint's
        condition embedding, for backbones that take condition latents (Wan). None: the backbone takes no
        image input of its own (the images reach only the MLLM), which is the default.
        """
        return None

    def fit_references(self, references: Any, frames: int) -> Any:
        """The references for a sample of `frames` frames, made once before the loop (Wan: the source-video
        latents, encoded for just the frames needed). Returns new references; the given ones are not changed."""
        return references

    def finalize(self, latents: torch.Tensor, references: Any) -> torch.Tensor:
        """The sampled latents as the decoder should see them (Wan I2V: the clean first frame put back)."""
        return latents

    def loss_frames(self, references: Any) -> slice:
        """The latent frames a training loss counts (Wan I2V: not the given first frame)."""
        return slice(None)

    @abstractmethod
    def latent_shape(self, batch: int, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of the noisy latent for `batch` samples of height × width pixels (× frames for video)."""

    @abstractmethod
    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, branch: Branch, clock: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity for `latents` at timestep `t` (a scalar or one per sample), for one branch.

        `t` goes to the DiT as the backbone's diffusers pipeline passes it (the UniPC and DPM schedulers' timesteps are
        int64, up to one unit below sigma·1000), so an untrained canvas gives the pipeline's output exactly. `clock` is the
        canvas connector's: sigma·1000 in float32 (a scalar or one per sample), as training and ComfyUI's native path give
        it (`sampling.connector_clock`); None: `t` itself, for callers whose `t` is sigma·1000 already (the trainer).
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, H, W, 3) float in 0..1."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) float in 0..1 -> the latents `decode` inverts (training targets).

        Default for diffusers image VAEs: AutoencoderDC's `latent`, AutoencoderKL's distribution mode,
        then (x - shift_factor) · scaling_factor. Backbones with other latent normalisations override it.
        """
        x = (images.permute(0, 3, 1, 2) * 2 - 1).to(self.device, self.vae.dtype)
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
