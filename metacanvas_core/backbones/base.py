"""What every diffusion backbone adapter gives MetaCanvas: a diffusers transformer + VAE (+ its own text encoder)
loaded from a diffusers-format folder, for training, the command line and the equivalence checks.

The canvas residual is added to the transformer's patch embeddings by a forward hook on its patch-embed module: after
patchify, before the first block (the paper's §3.4, Fig. 2; Table 3: adding it before patchify is worse), by the
canvas mechanism ComfyUI's native models also get (`injection.py`). Per-backbone files only say how their patch
tokens are laid out and how they call their model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

from ..connectors import ConditionEmbedding
from ..errors import MetaCanvasInputError
from ..injection import CanvasInjection
from ..inputs import VisualInputs
from ..schedulers import SCHEDULERS
from ..sizes import check_size
from ..specs import VIDEO_KINDS, BackboneSpec
from ..text import TextContext


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
    batch_guidance: ClassVar[bool] = True  # CFG branches in one 2B call (SANA) or one call each (FLUX)

    @property
    def is_video(self) -> bool:
        return self.kind in VIDEO_KINDS

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
        why = f"the pixel stride of the {self.kind} backbone '{self.folder}'"
        for name, value in (("width", width), ("height", height)):
            check_size(name, value, self.pixel_stride, why)

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
    @abstractmethod
    def spec(self) -> BackboneSpec:
        """This backbone's dimensions and rules (`specs.py`)."""

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
