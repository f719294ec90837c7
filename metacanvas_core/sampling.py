"""The denoising loop: flow matching with classifier-free guidance whose unconditional branch has the
negative prompt and no canvas (so the canvas steers only the conditional prediction)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .backbones import Backbone, CanvasInjection
from .canvas import interpolate_canvas
from .conditioning import Conditioning
from .errors import MetaCanvasInputError


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (dim 1) of embeddings (B, L, D) or masks (B, L)."""
    return F.pad(x, [0, 0] * (x.ndim - 2) + [0, length - x.shape[1]])


def batched_context(cond: Conditioning, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[negative, positive] context and mask stacked on the batch (padded to one length), or positive only."""
    if not guided:
        return cond.context, cond.context_mask
    length = max(cond.context.shape[1], cond.negative_context.shape[1])
    context = torch.cat([_pad_to(cond.negative_context, length), _pad_to(cond.context, length)])
    mask = torch.cat([_pad_to(cond.negative_mask, length), _pad_to(cond.context_mask, length)])
    return context, mask


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
) -> torch.Tensor:
    """Latents of one sample. `on_step(i, steps)` is called after each step (progress, interrupt)."""
    if cond.backbone_kind != backbone.kind:
        raise MetaCanvasInputError(f"this conditioning was projected for {cond.backbone_kind}, not {backbone.kind}.")
    backbone.check_size(height, width)
    if steps < 1:
        raise MetaCanvasInputError(f"steps must be at least 1, got {steps}.")
    device = backbone.device
    latents = backbone.initial_noise(seed, 1, height, width)
    sched = backbone.make_scheduler(scheduler)
    sched.set_timesteps(steps, device=device)
    guided = cfg > 1.0
    context, mask = batched_context(cond, guided)
    context, mask = context.to(device), mask.to(device)
    canvas = None
    if use_canvas:
        tokens = interpolate_canvas(cond.canvas, backbone.token_grid(height, width)).to(device)
        canvas = CanvasInjection(cond.connector, tokens, rows=slice(1, 2) if guided else slice(0, 1))
    for i, t in enumerate(sched.timesteps):
        x = torch.cat([latents] * 2) if guided else latents
        v = backbone.predict(x, t, context, mask, canvas).float()
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        latents = sched.step(v, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, len(sched.timesteps))
    return latents
