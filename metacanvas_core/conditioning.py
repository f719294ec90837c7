"""Projection: a plan + a MetaCanvas checkpoint + a backbone → what the sampler consumes.

The canvas is aligned once here (it does not depend on the noise or the timestep); the fuse half of
the canvas connector runs inside every denoising step. Context comes from the backbone's own text
encoder ("native") or from the MLLM through the context connector ("mllm"). Editing backbones
also get their own inputs made from the plan's input images (`Backbone.prepare_references`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .backbones import Backbone
from .canvas import CanvasGrid
from .checkpoint import MetaCanvas
from .connectors import CanvasConnector
from .errors import MetaCanvasInputError
from .planner import Plan


@dataclass
class Conditioning:
    """Positive and negative context in the backbone's text slot, and the aligned canvas."""

    context: torch.Tensor  # (1, L, text_dim)
    context_mask: torch.Tensor  # (1, L)
    negative_context: torch.Tensor
    negative_mask: torch.Tensor
    canvas: torch.Tensor  # (1, K, Hc, Wc, dit_width)
    grid: CanvasGrid
    connector: CanvasConnector
    backbone_kind: str
    references: dict[str, Any] | None = None  # backbone inputs from the input images (FLUX-Kontext: reference tokens)
    guidance: float | None = None  # embedded guidance (FLUX); None = the backbone's default
    image_cfg: float = 1.0  # image guidance scale; 1 = off
    pooled: torch.Tensor | None = None  # native global text vector (FLUX: CLIP pooled); None = backbone default
    negative_pooled: torch.Tensor | None = None

    def with_negative(self, other: Conditioning) -> Conditioning:
        """This conditioning with another one's positive context as the unconditional branch."""
        return replace(
            self, negative_context=other.context, negative_mask=other.context_mask, negative_pooled=other.pooled
        )


@torch.no_grad()
def project(plan: Plan, mc: MetaCanvas, backbone: Backbone) -> Conditioning:
    if mc.info.backbone != backbone.kind:
        raise MetaCanvasInputError(
            f"MetaCanvas checkpoint '{mc.name}' is for {mc.info.backbone}, the backbone is {backbone.kind}."
        )
    device = backbone.device
    pooled = negative_pooled = None
    if mc.info.context_source == "native":
        context, mask = backbone.encode_prompt([plan.prompt])
        negative, negative_mask = backbone.encode_negative([plan.negative_prompt])
        pooled, negative_pooled = backbone.encode_pooled([plan.prompt]), backbone.encode_pooled([plan.negative_prompt])
    else:
        if plan.negative_context is None:
            raise MetaCanvasInputError("this plan has no negative context; re-run the Plan node with this checkpoint.")
        connector = mc.context_connector
        dtype = next(connector.parameters()).dtype
        context = connector(plan.context.to(device, dtype))
        negative = connector(plan.negative_context.to(device, dtype))
        mask, negative_mask = plan.context_mask.to(device), plan.negative_mask.to(device)
    connector = mc.canvas_connector
    states = plan.canvas.to(device, next(connector.parameters()).dtype)
    g = plan.grid
    canvas = connector.align(states).reshape(1, g.frames, g.height, g.width, -1)
    # The output size the plan was made for (its canvas grid × canvas factor × pixel stride).
    scale = mc.info.canvas_factor * mc.info.pixel_stride
    references = backbone.prepare_references(plan, mc, g.height * scale, g.width * scale)
    return Conditioning(
        context,
        mask,
        negative,
        negative_mask,
        canvas,
        g,
        connector,
        backbone.kind,
        references,
        pooled=pooled,
        negative_pooled=negative_pooled,
    )
