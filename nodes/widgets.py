"""What the MetaCanvas nodes share: the category, widget declarations, their validation and input conversions."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.sizes import size_problem

CATEGORY = "MetaCanvas"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
MAX_SIZE = 8192
SIZE_MULTIPLE = 16  # every backbone's pixel stride is a multiple of this; the exact one is checked when sampling


# The canvas as a dial, on every node that applies it (the pack's Sampler, Attach Canvas on native graphs).
CANVAS_DIAL = {
    "canvas_strength": (
        "FLOAT",
        {
            "default": 1.0,
            "min": 0.0,
            "max": 2.0,
            "step": 0.05,
            "round": 0.01,
            "tooltip": "How strongly the plan steers: the canvas residual is scaled by this. 1 = as trained, 0 = no canvas (exactly the plain backbone's prediction), up to 2 to push the layout.",
        },
    ),
    "canvas_mask": (
        "MASK",
        {
            "tooltip": "Optional: where the canvas acts (1) and where not (0), e.g. from a core Load Image Mask or a mask editor. Resized to the token grid (each token the mean of its pixels); for video one mask for all frames, or one per frame (spread over the latent frames).",
        },
    ),
}


def size_inputs(tip: str) -> dict:
    return {
        "width": (
            "INT",
            {"default": 512, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": f"Image width in pixels. {tip}"},
        ),
        "height": (
            "INT",
            {"default": 512, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": f"Image height in pixels. {tip}"},
        ),
    }


def check_numbers(node: type, **values: object) -> bool | str:
    """VALIDATE_INPUTS for number widgets, against the node's own INPUT_TYPES. ComfyUI skips its min/max check for
    every input VALIDATE_INPUTS declares, and a NaN passes any min/max (every comparison with it is false) and would
    run through the whole latent, so finiteness and range are checked here. None: a linked input (its value comes
    when the graph runs) or a missing one (ComfyUI reports that itself)."""
    inputs = node.INPUT_TYPES()
    specs = {**inputs.get("required", {}), **inputs.get("optional", {})}
    for name, value in values.items():
        if value is None:
            continue
        options = specs[name][1]
        fix = f"give a number from {options['min']} to {options['max']} (default {options['default']})"
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} is {value!r}, not a finite number: {fix}."
        if not options["min"] <= value <= options["max"]:
            return f"{name} {value} is out of range: {fix}."
    return True


def check_size(width: int | None, height: int | None) -> bool | str:
    """VALIDATE_INPUTS for width/height: what every backbone needs (each one's own stride is checked when it runs).
    None: linked (known only when the graph runs)."""
    why = "every backbone's pixel stride: Wan2.2 and SANA take multiples of 32, FLUX-Kontext of 16"
    for name, value in (("width", width), ("height", height)):
        problem = None if value is None else size_problem(name, value, SIZE_MULTIPLE, why)
        if problem:
            return problem
    return True


def images_to_pil(images: torch.Tensor | None, name: str = "images") -> list[Image.Image]:
    """A ComfyUI IMAGE batch (B, H, W, C) in 0..1 as PIL images (RGB)."""
    if images is None:
        return []
    if images.shape[0] == 0:
        raise MetaCanvasInputError(f"{name}: the image batch is empty; connect at least one image or disconnect it.")
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a[..., :3])) for a in arrays]
