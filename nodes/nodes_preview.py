"""Seeing the plan: the canvas the MLLM wrote, as an image (PCA of the aligned canvas features, the paper's Fig. 5)."""

from __future__ import annotations

import torch

from metacanvas_core.preview import plan_preview

from .runtime import Loaded, intermediate_device, load
from .widgets import CATEGORY, check_numbers


class MetaCanvasPlanPreview:
    DESCRIPTION = (
        "Shows the plan: the canvas the MLLM wrote, aligned by the checkpoint's canvas connector (what is added to "
        "the DiT), reduced to its three principal components as RGB (as in the paper's Fig. 5): regions the plan "
        "treats alike share a colour. One image per keyframe for video, at the plan's width × height, optionally "
        "blended over the generated image. All grey: the canvas is empty (an untrained checkpoint adds nothing)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("The plan as images (B = keyframes), float 0..1: connect a core Preview Image or Save Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "plan": ("METACANVAS_PLAN", {"tooltip": "The MLLM's plan (MetaCanvas Plan)."}),
                "metacanvas": ("METACANVAS", {"tooltip": "The checkpoint the plan was made with."}),
            },
            "optional": {
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "Optional: the generated image (or video frames, spread over the keyframes) to show under the plan; resized to the plan's size."
                    },
                ),
                "blend": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "round": 0.01,
                        "tooltip": "How much of the plan shows over the image: 1 = the plan only, 0 = the image only. Without an image: the plan.",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, blend=None):
        return check_numbers(cls, blend=blend)

    def preview(self, plan, metacanvas: Loaded, image: torch.Tensor | None = None, blend: float = 0.5):
        with torch.no_grad():
            aligned = metacanvas.model.align(plan, load(*metacanvas.parts()))
        return (plan_preview(aligned, plan.size, image, blend).to(intermediate_device()),)


NODE_CLASS_MAPPINGS = {"MetaCanvasPlanPreview": MetaCanvasPlanPreview}
NODE_DISPLAY_NAME_MAPPINGS = {"MetaCanvasPlanPreview": "MetaCanvas Plan Preview"}
