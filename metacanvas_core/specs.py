"""What MetaCanvas knows of each backbone without loading one: the dimensions a checkpoint is built and checked
against (`BackboneSpec`) and each backbone's rules, from the paper or this project's decisions.

The diffusers adapters (`backbones/`) and the patch on ComfyUI's native models (`nodes/model_patch.py`) both make
their spec here (`wan_spec`, `flux_kontext_spec`; SANA's from its adapter), so both agree on every rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .canvas import FACTOR_RULE, FIXED_RULE, CanvasGrid, canvas_grid_for

SANA, WAN, FLUX_KONTEXT = "sana", "wan", "flux_kontext"  # backbone kinds, as checkpoints record them
VIDEO_KINDS = frozenset({WAN})
EDITING_KINDS = frozenset({FLUX_KONTEXT})  # a plan for them must carry the image to edit

# Wan2.2-TI2V-5B
WAN_DEFAULT_SIZE = (704, 1280)  # its 720p (also 1280×704): where a new checkpoint's canvas grid is stored
WAN_CANVAS_FACTOR = 2  # the paper's 11×20 canvas on the 22×40 token grid of 704×1280 (the integer factor: ours)
WAN_KEYFRAMES = 3  # the paper's Table 6: 3 keyframes beat 1, 6, 11, 31
WAN_CONTEXT_DROPOUT = 0.1  # the paper's context MLP dropout (video setup)
WAN_VAE_STRIDE = 16  # pixels per latent position of the Wan2.2 VAE (height and width)
WAN_MAX_REFERENCES = 3  # the paper's in-context video (OmniContext-Video style) takes 1–3 reference images
FUSE_HEAD_DIM = 32  # Algorithm 1's fuse block: heads of 32 (96 at width 3072)

# FLUX.1-Kontext
KONTEXT_SIDE = 1024  # its square resolution: the default output size
CANVAS_SIDE = 32  # the paper's editing canvas, 32×32 = 1024 tokens, fixed over the image at every size
FLUX_VAE_STRIDE = 8
FLUX_CANVAS_FACTOR = 1  # recorded with the fixed canvas (sizes in multiples of the pixel stride); used by older files


@dataclass(frozen=True)
class BackboneSpec:
    """The dimensions a MetaCanvas checkpoint is built and checked against, for one backbone."""

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


def wan_spec(
    width: int, text_dim: int, latent_channels: int, patch_size: tuple[int, int, int], vae_stride: int
) -> BackboneSpec:
    """A Wan2.2-TI2V DiT of these dimensions (diffusers' or ComfyUI's). Fuse block: Algorithm 1's heads of 32.
    Condition inputs: [source latent (z) | is-reference | has-source] per latent frame -> the DiT width."""
    return BackboneSpec(
        kind=WAN,
        width=width,
        pixel_stride=vae_stride * patch_size[1],
        text_dim=text_dim,
        attention_heads=(width // FUSE_HEAD_DIM, FUSE_HEAD_DIM),
        default_size=WAN_DEFAULT_SIZE,
        canvas_factor=WAN_CANVAS_FACTOR,
        keyframes=WAN_KEYFRAMES,
        context_dropout=WAN_CONTEXT_DROPOUT,
        context_hidden_dim=None,
        condition={"in_channels": latent_channels + 2, "width": width, "patch_size": tuple(patch_size)},
    )


def flux_kontext_spec(
    width: int, attention_heads: tuple[int, int], text_dim: int, pooled_dim: int, vae_stride: int
) -> BackboneSpec:
    """A FLUX.1-Kontext DiT of these dimensions (diffusers' or ComfyUI's): 2×2 packed tokens, the fixed 32×32
    canvas; context connector UniWorld-V1's, MLLM -> 3·4096 -> 4096 (the paper's editing setup starts from it)."""
    return BackboneSpec(
        kind=FLUX_KONTEXT,
        width=width,
        pixel_stride=vae_stride * 2,
        text_dim=text_dim,
        attention_heads=attention_heads,
        default_size=(KONTEXT_SIDE, KONTEXT_SIDE),
        canvas_factor=FLUX_CANVAS_FACTOR,
        keyframes=1,
        context_dropout=0.0,
        context_hidden_dim=3 * text_dim,
        pooled_dim=pooled_dim,
        fixed_canvas=(CANVAS_SIDE, CANVAS_SIDE),
    )
