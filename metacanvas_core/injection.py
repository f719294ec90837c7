"""The canvas mechanism, written once: how a plan's aligned canvas reaches a DiT's patch tokens.

The diffusers adapters (`backbones/`) and the patch on ComfyUI's native models (`nodes/model_patch.py`) call the
same functions on the same tokens: the fuse block's residual added to the noisy target tokens only, scaled by a
strength and confined by a mask (`CanvasInjection`); FLUX's target rows before Kontext's reference rows
(`add_to_image_tokens`); Wan's patch embeddings with reference frames before the video, clean frames untouched and
the condition embedding's layout (`add_to_patch_embedding`, `prepend_references`, `wan_condition`), and the frames
Wan's VAE reads for them resized the one way training does (`vae_pixels`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.video_processor import VideoProcessor
from einops import rearrange
from PIL import Image

from .canvas import interpolate_canvas
from .connectors import CanvasConnector
from .errors import MetaCanvasInputError


def canvas_acts(strength: float, mask: torch.Tensor | None) -> bool:
    """Whether a canvas changes anything: strength 0 or an all-zero mask is exactly no canvas."""
    return strength != 0 and (mask is None or bool(mask.any()))


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


def add_to_image_tokens(
    tokens: torch.Tensor, canvas: CanvasInjection, clock: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """FLUX's embedded image tokens (B, target + reference rows, D) + the canvas on the target rows only.

    The target (the noisy latent, packed 2×2, row-major on its `grid` of tokens) comes first; Kontext reference
    tokens after it are never touched.
    """
    n_target = grid[0] * grid[1]
    target = canvas.add_to(tokens[:, :n_target].unflatten(1, (1, *grid)), clock).flatten(1, 3)
    return torch.cat([target, tokens[:, n_target:]], 1)


def vae_pixels(frames: list[Image.Image], height: int, width: int, vae_stride: int) -> torch.Tensor:
    """Frames as the Wan VAE reads them for the DiT (reference images, a source video), resized (stretched) to
    height × width the one way training does: diffusers' VideoProcessor (Lanczos), in [-1, 1]: (1, 3, n, H, W)."""
    return VideoProcessor(vae_scale_factor=vae_stride).preprocess_video(frames, height=height, width=width)


def prepend_references(
    latents: torch.Tensor, timesteps: torch.Tensor, reference: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's latents (B, z, F, h, w) and per-frame timesteps (B, F) with the reference images' clean latent frames
    (1, z, R, h, w) put before the video at timestep 0 (Wan-Animate's layout, the paper's in-context video)."""
    if reference is None:
        return latents, timesteps
    b, n_ref = latents.shape[0], reference.shape[2]
    latents = torch.cat([reference.to(latents.device, latents.dtype).expand(b, -1, -1, -1, -1), latents], 2)
    return latents, torch.cat([timesteps.new_zeros(b, n_ref), timesteps], 1)


def wan_condition(
    n_ref: int, frames: int, latent_shape: tuple[int, int, int], source: torch.Tensor | None, device
) -> torch.Tensor:
    """The condition embedding's input (1, z+2, R+F, h, w): [source latent (z) | is-reference | has-source] per
    latent frame, the R reference frames first; `source` (1, z, F, h, w): a source video's normalised latents on the
    call's F frames (video editing), or None. `latent_shape`: (z, h, w)."""
    z, h, w = latent_shape
    c = torch.zeros(1, z + 2, n_ref + frames, h, w, device=device)
    c[:, z, :n_ref] = 1
    if source is not None:
        c[:, :z, n_ref:] = source.to(device)
        c[:, z + 1, n_ref:] = 1
    return c


def add_to_patch_embedding(
    out: torch.Tensor,
    canvas: CanvasInjection | None,
    clock: torch.Tensor,
    n_ref: int,
    noisy: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wan's patch embeddings (B, D, R+F, H', W') [+ the condition embedding's output] + the canvas.

    The canvas (on the video's F latent frames: canvas frame i belongs to video frame i) lands on the noisy video
    frames only: never on the R reference frames before the video, nor where `noisy` (B, F) is 0 (frames given
    clean, at timestep 0: image-to-video's first frame), whose tokens keep their values exactly. `noisy` is a tensor
    so that no host sync decides where the canvas goes (one compiled graph under torch.compile).
    """
    if condition is not None:
        out = out + condition.to(out.dtype)
    if canvas is None:
        return out
    tokens = out.permute(0, 2, 3, 4, 1)  # (B, T, H', W', D)
    if noisy is not None:
        keep = noisy[canvas.rows].float()[..., None, None]  # (b, F, 1, 1)
        canvas = replace(canvas, mask=keep if canvas.mask is None else canvas.mask * keep)
    video = canvas.add_to(tokens[:, n_ref:], clock)
    return torch.cat([tokens[:, :n_ref], video], 1).permute(0, 4, 1, 2, 3)
