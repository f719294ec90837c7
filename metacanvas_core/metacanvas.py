"""The MetaCanvas model: everything MetaCanvas adds to an MLLM + backbone pair, and the one plan call.

`MetaCanvas` holds the canvas tokens, the canvas connector, the context connector (MLLM-context
backbones), the Wan condition embedding and an optional canvas-only LoRA for the MLLM. Its config
(`MetaCanvasConfig`) is what a checkpoint file records in its header (`checkpoint.py` saves and loads).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import nn

from .canvas import CANVAS_POSITIONS, FACTOR_RULE, FIXED_RULE, CanvasEmbedding, CanvasGrid, canvas_grid_for
from .connectors import CanvasConnector, ConditionEmbedding, ContextConnector
from .errors import MetaCanvasInputError
from .inputs import NO_INPUTS, ContextSource, VisualInputs
from .planner import VIDEO_FRAME_TOKENS, CanvasLora, Plan, Planner
from .sizes import check_size
from .specs import EDITING_KINDS, VIDEO_KINDS, BackboneSpec

UNTRAINED = "new (untrained)"


@dataclass(frozen=True)
class MetaCanvasConfig:
    """What a MetaCanvas was made for, and the configs of its modules; compared against loaded models."""

    backbone: str
    mllm_hidden_size: int
    dit_width: int
    pixel_stride: int  # pixels per DiT token of the backbone (sizes the canvas for an output size)
    text_dim: int
    canvas_grid: tuple[int, int, int]  # the canvas the checkpoint stores (at the default size for the factor rule)
    canvas_factor: int  # the factor rule's divisor of the token grid (the size multiple: pixel stride × factor)
    context_source: str  # ContextSource value
    canvas_connector: dict  # CanvasConnector config
    context_connector: dict | None  # ContextConnector config
    lora: dict | None  # LoraConfig kwargs of the canvas LoRA
    condition_embedding: dict | None = None  # ConditionEmbedding config (Wan: source video + masks)
    pooled_dim: int | None = None  # MLLM context on FLUX: the pooled vector stored with the checkpoint
    canvas_positions: str = CANVAS_POSITIONS  # the planner's mRoPE position scheme (`canvas.CANVAS_POSITIONS`)
    # MLLM tokens per picture the planner reads (`default_visual_tokens`); None: the image processor's own limit
    # (checkpoints from before the budget, trained that way)
    visual_tokens: int | None = None
    # How the canvas grid follows the output size (`canvas.CANVAS_RULES`): "factor" (token grid / canvas_factor; what
    # every checkpoint from before the field used) or "fixed" (`canvas_grid` at every size: FLUX-Kontext since issue 25)
    canvas_rule: str = FACTOR_RULE


def default_visual_tokens(spec: BackboneSpec) -> int:
    """The visual-token budget of a new checkpoint: MLLM tokens per input image or video frame.

    Video backbones (Wan2.2): 144, the paper's for its video setup. Image backbones, this project's decision: as many
    tokens as one canvas frame of a new checkpoint (SANA 16×16 = 256, FLUX-Kontext 32×32 = 1024): the MLLM reads an
    input image (FLUX-Kontext's edit source) at the resolution it writes its plan at. The paper states no budget there;
    Qwen's own default (12.8 MP, up to ~16k tokens an image) would cost 16× the canvas in the MLLM (quadratic in
    its attention, and in training every token carries gradients to the canvas LoRA) for detail the 32×32 plan
    cannot hold, while the DiT still sees the image at full resolution through its own reference tokens.
    """
    if spec.kind in VIDEO_KINDS:
        return VIDEO_FRAME_TOKENS
    grid = spec.canvas_grid()
    return grid.height * grid.width


def default_context_source(has_text_encoder: bool) -> ContextSource:
    """An untrained MetaCanvas's context: the backbone's own text encoder when it is loaded (then the output is
    exactly the plain backbone's), else the MLLM through a new context connector."""
    return ContextSource.TEXT_ENCODER if has_text_encoder else ContextSource.MLLM


class MetaCanvas(nn.Module):
    """Canvas embeddings + connectors (+ canvas LoRA) for one MLLM + backbone pair."""

    def __init__(self, config: MetaCanvasConfig, name: str = UNTRAINED, identity: str | None = None) -> None:
        """`name`: what messages call it (its file name); `identity`: what it is (a checkpoint's content hash,
        recorded when it was written; a fresh one for a new, untrained MetaCanvas, whose weights are its own)."""
        super().__init__()
        self.config = config
        self.name = name
        self.identity = identity or f"untrained-{uuid.uuid4().hex}"
        self.canvas = CanvasEmbedding(config.mllm_hidden_size, CanvasGrid(*config.canvas_grid))
        self.canvas_connector = CanvasConnector(**config.canvas_connector)
        self.context_connector = ContextConnector(**config.context_connector) if config.context_connector else None
        self.condition_embedding = (
            ConditionEmbedding(**config.condition_embedding) if config.condition_embedding else None
        )
        # FLUX's pooled text slot (which modulates every block) when the text comes from the MLLM: the pooled vector
        # the checkpoint was trained with (CLIP-L of the empty prompt, UniWorld-V1's practice), so a native model
        # needs no CLIP for it.
        self.register_buffer("pooled", torch.zeros(1, config.pooled_dim) if config.pooled_dim else None)
        self.lora: CanvasLora | None = None
        self.eval()  # inference mode (the context connector's dropout off); a trainer switches on what it trains

    def canvas_grid(self, height: int, width: int, keyframes: int | None = None) -> CanvasGrid:
        """The canvas for an output of height × width, with `keyframes` (default: the checkpoint's) for video.

        The factor rule: the token grid divided by the canvas factor (sizes in multiples of pixel stride × factor, a
        whole canvas cell per f × f DiT tokens). The fixed rule: the stored grid at every size, interpolated to the
        token grid by the projection (sizes in multiples of the pixel stride).
        """
        c = self.config
        s = c.pixel_stride
        fixed = c.canvas_rule == FIXED_RULE
        step = s if fixed else s * c.canvas_factor
        why = f"the {c.backbone} backbone's pixel stride {s}"
        why += "" if fixed else f" × this checkpoint's canvas factor {c.canvas_factor}"
        for name, value in (("width", width), ("height", height)):
            check_size(name, value, step, why)
        frames = keyframes or c.canvas_grid[0]
        if fixed:
            return CanvasGrid(frames, *c.canvas_grid[1:])
        return canvas_grid_for((1, height // s, width // s), c.canvas_factor, frames)

    def plan(
        self,
        planner: Planner,
        prompt: str,
        height: int,
        width: int,
        inputs: VisualInputs = NO_INPUTS,
        negative_prompt: str = "",
        keyframes: int | None = None,
        negative: bool | None = None,
        visual_tokens: int | None = None,
    ) -> Plan:
        """Make a plan with this checkpoint: its canvas (sized for height × width) and canvas LoRA in the MLLM.

        `negative`: also plan the negative prompt's states (default: when the checkpoint takes its context from
        the MLLM). `visual_tokens`: MLLM tokens per input picture (default: the checkpoint's budget, which it was
        trained with). Differentiable in the canvas and LoRA under the caller's grad mode (training); inference
        callers run it under `torch.no_grad()`.
        """
        kind = self.config.backbone
        if kind in EDITING_KINDS and not inputs.images:
            raise MetaCanvasInputError(
                f"images: this MetaCanvas checkpoint is for {kind} image editing, which needs the image to edit. "
                "Connect it (e.g. a core Load Image) to the 'images' input of MetaCanvas Plan."
            )
        grid = self.canvas_grid(height, width, keyframes)
        if negative is None:
            negative = self.config.context_source == ContextSource.MLLM
        budget = visual_tokens or self.config.visual_tokens
        context, canvas = planner.write(prompt, self.canvas(grid), grid, inputs, self.lora, budget)
        negative_context = planner.prompt_states(negative_prompt, inputs, budget) if negative else None
        return Plan(
            prompt, negative_prompt, context, canvas, grid, inputs, (height, width), self.name, self.identity,
            negative_context,
        )  # fmt: skip

    def align(self, plan: Plan, device: torch.device | str | None = None) -> torch.Tensor:
        """A plan's canvas aligned to the DiT width by this checkpoint's canvas connector (B, K, Hc, Wc, dit_width),
        on `device` (default: the plan's); a plan made with another checkpoint is refused first (`check_plan`)."""
        self.check_plan(plan)
        return align_canvas(self.canvas_connector, plan.canvas.to(device or plan.canvas.device), plan.grid)

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan made with another checkpoint (its canvas states would not fit this connector)."""
        if plan.identity != self.identity or plan.canvas.shape[-1] != self.config.mllm_hidden_size:
            raise MetaCanvasInputError(
                f"plan: it was made with MetaCanvas checkpoint {self.describe(plan.checkpoint, plan.identity)}, this "
                f"node has {self.describe()}: give the Plan node and this node the same Connector Loader output."
            )

    def describe(self, name: str | None = None, identity: str | None = None) -> str:
        """A checkpoint as messages name it: its file name and the start of its content hash (two files of one name,
        or a file replaced under its name, differ there)."""
        name, identity = name or self.name, identity or self.identity
        return f"'{name}' ({identity[:19]})"

    def check_compatible(
        self, mllm_hidden_size: int, mllm: str, spec: BackboneSpec, backbone: str, has_text_encoder: bool = True
    ) -> None:
        """Refuse an MLLM or backbone this checkpoint was not made for, naming both sides. `has_text_encoder`:
        whether the backbone's own text encoder is loaded (a native-context checkpoint needs it)."""
        self.check_backbone(spec, backbone, has_text_encoder)
        if self.config.mllm_hidden_size != mllm_hidden_size:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made for an MLLM of hidden size "
                f"{self.config.mllm_hidden_size}, but the loaded MLLM '{mllm}' has hidden size {mllm_hidden_size}. "
                "Load the MLLM it was trained with (3584 = Qwen2.5-VL-7B, 2048 = Qwen2.5-VL-3B), or choose "
                "'new (untrained)'."
            )

    def check_backbone(self, spec: BackboneSpec, backbone: str, has_text_encoder: bool = True) -> None:
        """Refuse a backbone this checkpoint was not made for, naming both sides."""
        c = self.config
        if (c.backbone, c.dit_width, c.pixel_stride) != (spec.kind, spec.width, spec.pixel_stride):
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made for a {c.backbone} backbone of width {c.dit_width} "
                f"(pixel stride {c.pixel_stride}), but the loaded backbone '{backbone}' is {spec.kind} "
                f"of width {spec.width} (pixel stride {spec.pixel_stride}). "
                "Load the checkpoint trained for this backbone, or choose 'new (untrained)'."
            )
        if c.text_dim != spec.text_dim:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' expects a text slot of width {c.text_dim}, but backbone "
                f"'{backbone}' has {spec.text_dim}."
            )
        if c.context_source == ContextSource.TEXT_ENCODER and not has_text_encoder:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made with the backbone's native text encoder as context, "
                f"but backbone '{backbone}' was loaded without it: turn load_text_encoder on in the Backbone "
                "Loader (the folder must hold it)."
            )

    def check_context_source(self, wanted: str) -> None:
        """Refuse a checkpoint whose context source is not the one asked for, naming both."""
        if wanted != self.config.context_source:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was trained with '{self.config.context_source}' context, not "
                f"'{wanted}': set context to 'auto' or '{self.config.context_source}', or load a checkpoint trained "
                f"with '{wanted}' context."
            )

    def with_lora(self, lora: CanvasLora | None) -> MetaCanvas:
        """This MetaCanvas (the same modules) with another canvas LoRA, its config recording it."""
        self.lora = lora
        self.config = replace(self.config, lora=dict(lora.config) if lora is not None else None)
        return self


def align_canvas(connector: CanvasConnector, states: torch.Tensor, grid: CanvasGrid) -> torch.Tensor:
    """Canvas states (B, K·Hc·Wc, mllm_dim) -> the aligned canvas (B, K, Hc, Wc, dit_width)."""
    dtype = next(connector.parameters()).dtype
    aligned = connector.align(states.to(dtype))
    return rearrange(aligned, "b (k h w) d -> b k h w d", k=grid.frames, h=grid.height, w=grid.width)


def new_metacanvas(
    mllm_hidden_size: int,
    spec: BackboneSpec,
    context_source: ContextSource | str,
    connector_options: dict | None = None,
    seed: int = 0,
    pooled: torch.Tensor | None = None,
) -> MetaCanvas:
    """A fresh MetaCanvas, seeded: zero-initialised canvas projections, so until trained the canvas changes nothing.

    `context_source`: "native" (the backbone's own text encoder: with the canvas untrained, exactly the plain
    backbone) or "mllm" (a context connector, which needs training first). `connector_options`: the canvas
    connector's Table 3 ablations (`CanvasConnector`); the canvas tokens and the context connector do not depend
    on them (they are the paper's connector's), so ablation arms of one seed start from the same ones.
    `pooled`: the backbone's pooled vector of the empty prompt (FLUX with MLLM context; zeros when not given).
    """
    try:
        context_source = ContextSource(context_source)
    except ValueError:
        raise MetaCanvasInputError(
            f"context source '{context_source}' is not one of {ContextSource.values()}."
        ) from None
    heads, head_dim = spec.attention_heads
    grid = spec.canvas_grid()
    context = None
    if context_source == ContextSource.MLLM:
        context = {
            "mllm_dim": mllm_hidden_size,
            "hidden_dim": spec.context_hidden_dim or 4 * mllm_hidden_size,
            "text_dim": spec.text_dim,
            "dropout": spec.context_dropout,
        }
    config = MetaCanvasConfig(
        backbone=spec.kind,
        mllm_hidden_size=mllm_hidden_size,
        dit_width=spec.width,
        pixel_stride=spec.pixel_stride,
        text_dim=spec.text_dim,
        canvas_grid=(grid.frames, grid.height, grid.width),
        canvas_factor=spec.canvas_factor,
        canvas_rule=spec.canvas_rule,
        context_source=context_source.value,
        canvas_connector={
            "mllm_dim": mllm_hidden_size,
            "dit_dim": spec.width,
            "num_heads": heads,
            "head_dim": head_dim,
            "attention_bias": False,  # Algorithm 1's; recorded, since files without the key predate it (biased)
        },
        context_connector=context,
        lora=None,
        condition_embedding=dict(spec.condition) if spec.condition else None,
        pooled_dim=spec.pooled_dim if context_source == ContextSource.MLLM else None,
        visual_tokens=default_visual_tokens(spec),
    )
    # Seeded, without touching the caller's RNG: 'new (untrained)' is the same checkpoint on every load, so a
    # graph gives the same image each run (the random parts are the canvas tokens and the context connector).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mc = MetaCanvas(config)
        if connector_options:  # the ablation's connector, drawn as the paper's would be; the rest stays
            torch.manual_seed(seed)
            config = replace(config, canvas_connector={**config.canvas_connector, **connector_options})
            mc.canvas_connector = MetaCanvas(config).canvas_connector
            mc.config = config
    if pooled is not None and mc.pooled is not None:
        mc.pooled.copy_(pooled.reshape(mc.pooled.shape))
    return mc
