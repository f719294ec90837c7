"""Projection: what the MLLM wrote -> what a DiT takes. One code path for inference and training.

The canvas states are aligned to the DiT width once (`MetaCanvas.align`; they do not depend on the noise
or the timestep), then interpolated to the token grid of the latents being denoised
(`CanvasInjection.on_tokens`); the fuse half of the canvas connector runs inside every model call.
The text slot is filled by the backbone's own text encoder ("native") or from the MLLM's prompt
states through the context connector (`mllm_context`). Backbones that take images or video
themselves get their own inputs from the request's (`Backbone.prepare_references`).

`project` makes one sample's `Conditioning` for the sampler; the trainer calls the same functions on
its batches with gradients on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .connectors import CanvasConnector, ContextConnector
from .errors import MetaCanvasInputError
from .inputs import ContextSource
from .metacanvas import MetaCanvas
from .planner import Plan
from .specs import FLUX_KONTEXT
from .text import TextContext

if TYPE_CHECKING:  # only called: ComfyUI's native path imports this module without the diffusers adapters
    from .backbones import Backbone


@dataclass
class Conditioning:
    """Both text slots, the aligned canvas and the backbone's own inputs: what the sampler consumes."""

    positive: TextContext
    negative: TextContext
    canvas: torch.Tensor  # (1, K, Hc, Wc, dit_width), aligned
    connector: CanvasConnector
    backbone_kind: str
    references: Any = None  # the backbone's own inputs from the input images/video (FLUX-Kontext, Wan)
    guidance: float | None = None  # embedded guidance (FLUX); None = the backbone's default
    image_cfg: float = 1.0  # image guidance scale; 1 = off

    def with_negative(self, other: Conditioning) -> Conditioning:
        """This conditioning with another one's positive text as the unconditional branch."""
        return replace(self, negative=other.positive)


def mllm_context(connector: ContextConnector, states: list[torch.Tensor], pooled: torch.Tensor | None) -> TextContext:
    """The MLLM's prompt states (one (1, L, mllm_dim) per sample) through the context connector, padded into a
    batch; `pooled`: the backbone's pooled vector for a text slot filled from the MLLM (FLUX), or None."""
    dtype = next(connector.parameters()).dtype
    parts = []
    for s in states:
        embeds = connector(s.to(dtype))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        parts.append(TextContext(embeds, mask, None if pooled is None else pooled.to(embeds.device)))
    return TextContext.cat(parts)


def mllm_pooled(mc: MetaCanvas) -> torch.Tensor | None:
    """The pooled vector of a text slot filled from the MLLM (FLUX's, which modulates every block): the one the
    checkpoint stores and was trained with; None for backbones without one. One rule on every path (the pack's
    sampler, training, the native Text Conditioning): a FLUX checkpoint from before it stored one is refused."""
    if mc.config.backbone == FLUX_KONTEXT and mc.pooled is None:
        raise MetaCanvasInputError(
            f"MetaCanvas checkpoint '{mc.name}' stores no pooled vector for FLUX's pooled slot (it predates it): "
            "export it again with this version, or use context 'native' (the backbone's own CLIP text encoder)."
        )
    return mc.pooled


@torch.no_grad()
def project(plan: Plan, mc: MetaCanvas, backbone: Backbone) -> Conditioning:
    """One plan as the sampler takes it, for the backbone that will sample."""
    if mc.config.backbone != backbone.kind:
        raise MetaCanvasInputError(
            f"MetaCanvas checkpoint '{mc.name}' is for {mc.config.backbone}, the backbone is {backbone.kind}."
        )
    device = backbone.device
    canvas = mc.align(plan, device)
    if mc.config.context_source == ContextSource.TEXT_ENCODER:
        positive = backbone.encode_prompt([plan.prompt])
        negative = backbone.encode_negative([plan.negative_prompt])
    else:
        if plan.negative_context is None:
            raise MetaCanvasInputError("this plan has no negative context; re-run the Plan node with this checkpoint.")
        pooled = mllm_pooled(mc)
        positive = mllm_context(mc.context_connector, [plan.context.to(device)], pooled)
        negative = mllm_context(mc.context_connector, [plan.negative_context.to(device)], pooled)
    references = backbone.prepare_references(plan.inputs, *plan.size, mc.condition_embedding)
    return Conditioning(positive, negative, canvas, mc.canvas_connector, backbone.kind, references)
