"""Planning: the MLLM reads the prompt (and images/video) with the checkpoint's canvas tokens and writes its plan."""

from __future__ import annotations

import torch

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.inputs import ImageRole, VisualInputs
from metacanvas_core.specs import WAN_MAX_REFERENCES

from .model_patch import latent_size
from .runtime import Loaded, load
from .widgets import CATEGORY, check_numbers, check_size, images_to_pil, size_inputs


class MetaCanvasPlan:
    DESCRIPTION = (
        "The MLLM reads the prompt (and optional images) together with the canvas tokens and writes its layout plan "
        "into them, in one forward pass. Cached: changing only the seed does not re-run it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "plan"
    RETURN_TYPES = ("METACANVAS_PLAN",)
    RETURN_NAMES = ("plan",)
    OUTPUT_TOOLTIPS = ("Prompt states and canvas states from the MLLM.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": ("METACANVAS_MLLM", {"tooltip": "The planner MLLM."}),
                "metacanvas": (
                    "METACANVAS",
                    {"tooltip": "The MetaCanvas checkpoint: its canvas tokens go into the MLLM."},
                ),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to make. Layout words (left, top, behind, three ...) are what the canvas plans.",
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "The unconditional branch of guidance. It never gets the canvas.",
                    },
                ),
                **size_inputs(
                    "The output size the plan is made for (ignored when a latent is connected): it sizes the canvas grid (SANA, Wan2.2: the token grid / the checkpoint's factor; FLUX-Kontext: a fixed 32x32 grid) and, for FLUX-Kontext, the input image's pixel area; use the same size in the sampler."
                ),
            },
            "optional": {
                "images": (
                    "IMAGE",
                    {
                        "tooltip": "Input images the MLLM looks at with the prompt. Required for FLUX-Kontext editing: one image, the image to edit, which the DiT also sees as reference tokens (give the Plan the same scaled image the core ReferenceLatent's VAE Encode gets, from core FluxKontextImageScale)."
                    },
                ),
                "video": (
                    "IMAGE",
                    {
                        "tooltip": "Video editing (Wan2.2): the source video as frames (e.g. from core Load Video + Get Video Components). The MLLM sees 8 evenly spaced frames; the DiT gets all of them, resized (stretched) to width × height, as condition latents."
                    },
                ),
                "image_role": (
                    ImageRole.values(),
                    {
                        "default": ImageRole.REFERENCES.value,
                        "tooltip": f"Video backbones (Wan2.2): 'first frame' = image-to-video (one image, kept exactly as the first frame); 'references' = reference-images-to-video (1 to {WAN_MAX_REFERENCES} images). Images are resized (stretched) to width × height for the DiT. Ignored by image backbones.",
                    },
                ),
                "keyframes": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 16,
                        "tooltip": "Video canvas keyframes, interpolated linearly to every latent frame. 0 = the checkpoint's (3 for Wan2.2, the paper's best; 1 flickers more). Ignored by image backbones.",
                    },
                ),
                "visual_tokens": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 16384,
                        "step": 1,
                        "tooltip": "The MLLM's budget per input picture (image or video frame), in its tokens (28×28 pixels each): larger pictures are scaled down to fit. 0 = the checkpoint's, what it was trained with (new checkpoints: 144 for Wan2.2 as in the paper, one canvas frame for image backbones: 1024 for FLUX-Kontext, 256 for SANA). Another value plans with inputs the checkpoint never saw at that size.",
                    },
                ),
                **{
                    f"image_{n}": (
                        "IMAGE",
                        {
                            "tooltip": f"Reference-images-to-video: reference image {n}, after those of 'images' (each of any size: no batching node needed)."
                        },
                    )
                    for n in (2, 3)
                },
                "latent": (
                    "LATENT",
                    {
                        "tooltip": "Native graphs: the latent the sampler will fill (Wan22ImageToVideoLatent, or the scaled image's VAE Encode for FLUX-Kontext). The plan is then made for its size and width/height are ignored, so no size is typed twice."
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        numbers = check_numbers(cls, width=width, height=height)
        return numbers if numbers is not True else check_size(width, height)

    def plan(
        self,
        mllm: Loaded,
        metacanvas: Loaded,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        images: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        image_role: str = ImageRole.REFERENCES.value,
        keyframes: int = 0,
        visual_tokens: int = 0,
        image_2: torch.Tensor | None = None,
        image_3: torch.Tensor | None = None,
        latent: dict | None = None,
    ):
        if latent is not None:
            height, width = latent_size(metacanvas.model.config.backbone, latent["samples"])
            try:
                metacanvas.model.canvas_grid(height, width)
            except MetaCanvasInputError as e:
                raise MetaCanvasInputError(
                    f"latent: the plan takes its size from the latent, {width}×{height}: {e} Set it on the node that "
                    "makes the latent (Wan22ImageToVideoLatent, or the image FLUX-Kontext edits)."
                ) from None
        pictures = [
            p
            for name, batch in (("images", images), ("image_2", image_2), ("image_3", image_3))
            for p in images_to_pil(batch, name)
        ]
        inputs = VisualInputs(pictures, images_to_pil(video, "video"), image_role)
        device = load(*mllm.parts(), *metacanvas.parts())
        mc, planner = metacanvas.on(device), mllm.on(device)
        budget = visual_tokens or None  # 0: the checkpoint's
        with torch.no_grad():
            return (mc.plan(planner, prompt, height, width, inputs, negative_prompt, keyframes or None, None, budget),)


NODE_CLASS_MAPPINGS = {"MetaCanvasPlan": MetaCanvasPlan}
NODE_DISPLAY_NAME_MAPPINGS = {"MetaCanvasPlan": "MetaCanvas Plan"}
