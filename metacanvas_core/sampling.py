"""The denoising loop: flow matching with classifier-free guidance whose unconditional branch has the
negative prompt and no canvas (so the canvas steers only the conditional prediction), plus image
guidance for editing backbones."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backbones import Backbone, Branch
from .conditioning import Conditioning
from .errors import MetaCanvasInputError
from .injection import CanvasInjection, canvas_acts
from .text import TextContext


@torch.no_grad()
def sample(
    backbone: Backbone,
    cond: Conditioning,
    *,
    seed: int,
    steps: int,
    cfg: float,
    height: int,
    width: int,
    scheduler: str,
    use_canvas: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    guidance: float | None = None,
    image_cfg: float | None = None,
    frames: int = 1,
    canvas_strength: float = 1.0,
    canvas_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents of one sample. `on_step(i, steps)` is called after each step (progress, interrupt).

    Guidance, with v_c = (prompt, canvas, input images), v_i = (negative, no canvas, input images) and
    v_u = (negative, no canvas, no input images), as InstructPix2Pix combines them:
    v = v_u + image_cfg·(v_i - v_u) + cfg·(v_c - v_i). `cfg` <= 1 drops the text term's null branch
    (cfg counts as 1); `image_cfg` applies only to backbones with input-image references
    (FLUX-Kontext) and is off at 1. `guidance` is the embedded guidance of distilled models (FLUX).
    Both default to the conditioning's own (`Conditioning.guidance`, `.image_cfg`).
    `frames`: the video length in frames (video backbones; 1 for images). `canvas_strength` scales the canvas
    residual (0: none, 1: as trained); `canvas_mask` (1, frames or 1, height, width) in 0..1 confines it.
    """
    if cond.backbone_kind != backbone.kind:
        raise MetaCanvasInputError(f"this conditioning was projected for {cond.backbone_kind}, not {backbone.kind}.")
    backbone.check_size(height, width, frames)
    if steps < 1:
        raise MetaCanvasInputError(f"steps must be at least 1, got {steps}.")
    device = backbone.device
    latents = backbone.initial_noise(seed, 1, height, width, frames)
    sched = backbone.make_scheduler(scheduler)
    backbone.set_timesteps(sched, steps, height, width)
    refs = backbone.fit_references(cond.references, frames)
    guidance = cond.guidance if guidance is None else guidance
    image_cfg = cond.image_cfg if image_cfg is None else image_cfg
    image_guided = image_cfg != 1.0 and refs is not None
    text_guided = cfg > 1.0
    null_text = text_guided or image_guided  # v_i is needed
    batched = text_guided and backbone.batch_guidance
    positive, negative = cond.positive.to(device), cond.negative.to(device)
    canvas = None
    if use_canvas and canvas_acts(canvas_strength, canvas_mask):
        token_grid = backbone.token_grid(height, width, frames)
        rows = slice(1, 2) if batched else slice(0, 1)
        canvas = CanvasInjection.on_tokens(
            cond.connector, cond.canvas.to(device), token_grid, rows, canvas_strength, canvas_mask, backbone.dtype
        )
    if batched:  # [negative, positive] in one call
        both = Branch(TextContext.cat([negative, positive]), canvas, refs, guidance)
    else:
        conditional = Branch(positive, canvas, refs, guidance)
        text_null = Branch(negative, None, refs, guidance)
    image_null = Branch(negative, None, None, guidance)
    for i, t in enumerate(sched.timesteps):
        clock = connector_clock(sched, i, device)
        if batched:
            v_i, v_c = backbone.predict(torch.cat([latents] * 2), t, both, clock).float().chunk(2)
        else:
            v_c = backbone.predict(latents, t, conditional, clock).float()
            if null_text:
                v_i = backbone.predict(latents, t, text_null, clock).float()
        v = v_c
        if null_text:
            v = v_i + (cfg if text_guided else 1.0) * (v_c - v_i)
        if image_guided:
            v_u = backbone.predict(latents, t, image_null, clock).float()
            v = v + (image_cfg - 1.0) * (v_i - v_u)
        latents = sched.step(v, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, len(sched.timesteps))
    return backbone.finalize(latents, refs)


def connector_clock(scheduler, step: int, device: torch.device) -> torch.Tensor:
    """The canvas connector's clock at a scheduler's step: sigma·1000 in float32 from its sigmas, as the trainer
    (`objective.py`) and ComfyUI's native path (`nodes/model_patch.py`) compute it. The UniPC and DPM schedulers' own
    timesteps are int64, rounded down from sigma·1000 (up to one unit off), so the connector never reads them; the DiT
    still gets them, as the diffusers pipelines pass them."""
    return scheduler.sigmas[step].to(device, torch.float32) * 1000
