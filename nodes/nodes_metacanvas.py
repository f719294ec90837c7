"""MetaCanvas graph nodes (classic V1 API): load, plan, project, sample, decode.

Thin adapters over `metacanvas_core`: each node turns widget values into core calls, asks ComfyUI's
memory manager for the models it needs, and hands tensors and models to the next node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from metacanvas_core.backbones import SCHEDULERS, load_backbone
from metacanvas_core.backbones.flux import REFERENCE_RULE
from metacanvas_core.backbones.wan import MAX_REFERENCES
from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.conditioning import project
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.inputs import ContextSource, ImageRole, VisualInputs
from metacanvas_core.metacanvas import UNTRAINED, default_context_source, new_metacanvas
from metacanvas_core.planner import Planner
from metacanvas_core.sampling import sample

from .runtime import (
    Managed,
    find_model,
    intermediate_device,
    list_models,
    make_video,
    offload_device,
    resolve_dtype,
    step_callback,
)

CATEGORY = "MetaCanvas"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
MLLM_KINDS = ("LLM", "text_encoders")
MAX_SIZE = 8192
SIZE_MULTIPLE = 16  # every backbone's pixel stride is a multiple of this; the exact one is checked when sampling


@dataclass
class Loaded:
    """A core model plus its registration with the memory manager."""

    model: Any
    managed: Managed

    def ready(self):
        """The model, with its weights on the compute device."""
        self.managed.load()
        return self.model


def _check_size(width: int, height: int) -> bool | str:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            return (
                f"{name} {value} must be a positive multiple of {SIZE_MULTIPLE} (32 for SANA, 16 for FLUX-Kontext): "
                f"try {max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)}."
            )
    return True


def _images_to_pil(images: torch.Tensor | None, name: str = "images") -> list[Image.Image]:
    if images is None:
        return []
    if images.shape[0] == 0:
        raise MetaCanvasInputError(f"{name}: the image batch is empty; connect at least one image or disconnect it.")
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a[..., :3])) for a in arrays]


def _size_inputs(tip: str) -> dict:
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


class MetaCanvasMLLMLoader:
    DESCRIPTION = (
        "Loads the planner MLLM (Qwen2.5-VL, Hugging Face folder) that writes the layout plan into canvas tokens."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("METACANVAS_MLLM",)
    RETURN_NAMES = ("mllm",)
    OUTPUT_TOOLTIPS = ("The loaded Qwen2.5-VL planner.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = sorted(set(list_models("LLM")) | set(list_models("text_encoders")))
        return {
            "required": {
                "mllm_folder": (
                    names,
                    {
                        "tooltip": "A Qwen2.5-VL folder (config.json, *.safetensors, tokenizer) in models/LLM or models/text_encoders, e.g. Qwen2.5-VL-7B-Instruct."
                    },
                ),
                "dtype": (
                    DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto = bf16 where the GPU supports it, else fp32.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mllm_folder):
        try:
            find_model(MLLM_KINDS, mllm_folder, "MLLM folder")
        except MetaCanvasInputError as e:
            return str(e)
        return True

    def load(self, mllm_folder: str, dtype: str):
        folder = find_model(MLLM_KINDS, mllm_folder, "MLLM folder")
        planner = Planner.from_folder(folder, resolve_dtype(dtype), offload_device())
        return (Loaded(planner, Managed({"mllm": planner.model})),)


class MetaCanvasBackboneLoader:
    DESCRIPTION = (
        "Loads a diffusion backbone from a diffusers folder; its kind (SANA text-to-image, FLUX.1-Kontext image "
        "editing, Wan2.2-TI2V-5B video) is read from model_index.json."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("METACANVAS_BACKBONE",)
    RETURN_NAMES = ("backbone",)
    OUTPUT_TOOLTIPS = (
        "The backbone: transformer, VAE and, when load_text_encoder is on, its own text encoder (SANA: Gemma-2, "
        "Wan2.2: umT5, FLUX-Kontext: T5 + CLIP).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone_folder": (
                    list_models("diffusers"),
                    {
                        "tooltip": "A diffusers pipeline folder in models/diffusers, e.g. Sana_1600M_512px_diffusers (text-to-image), FLUX.1-Kontext-dev (image editing) or Wan2.2-TI2V-5B-Diffusers (video)."
                    },
                ),
                "dtype": (
                    DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto = bf16 where the GPU supports it, else fp32.",
                    },
                ),
                "load_text_encoder": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Also load the backbone's own text encoder from the folder (native context: the plain backbone's output with an untrained MetaCanvas). Off saves memory when the checkpoint takes its context from the MLLM.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, backbone_folder):
        try:
            find_model(("diffusers",), backbone_folder, "Backbone folder")
        except MetaCanvasInputError as e:
            return str(e)
        return True

    def load(self, backbone_folder: str, dtype: str, load_text_encoder: bool = True):
        folder = find_model(("diffusers",), backbone_folder, "Backbone folder")
        backbone = load_backbone(folder, resolve_dtype(dtype), offload_device(), load_text_encoder)
        return (Loaded(backbone, Managed({m.__class__.__name__: m for m in backbone.modules()})),)


class MetaCanvasConnectorLoader:
    DESCRIPTION = (
        "Loads a MetaCanvas checkpoint (canvas tokens + connectors) for this MLLM and backbone, checking that it fits "
        "both. 'new (untrained)' makes a zero-initialised one: the output is then exactly the plain backbone's."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("METACANVAS",)
    RETURN_NAMES = ("metacanvas",)
    OUTPUT_TOOLTIPS = ("Canvas embeddings, canvas connector and context connector.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": ("METACANVAS_MLLM", {"tooltip": "The planner MLLM the checkpoint was trained with."}),
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The backbone the checkpoint was trained for."}),
                "checkpoint": (
                    [UNTRAINED] + list_models("metacanvas"),
                    {
                        "tooltip": "A .safetensors file in models/metacanvas, or 'new (untrained)': a zero-initialised connector that leaves the backbone's output unchanged."
                    },
                ),
                "context": (
                    ["auto", *ContextSource.values()],
                    {
                        "default": "auto",
                        "tooltip": "Where the prompt reaches the backbone's text slot from. native = the backbone's own text encoder (with 'new (untrained)': exactly the plain backbone); mllm = the MLLM through the context connector (the paper's path for Wan2.2 and FLUX-Kontext; noise until trained). auto = the checkpoint's own; for 'new (untrained)', native when the backbone's text encoder is loaded.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint):
        if checkpoint == UNTRAINED:
            return True
        try:
            find_model(("metacanvas",), checkpoint, "MetaCanvas checkpoint")
        except MetaCanvasInputError as e:
            return str(e)
        return True

    def load(self, mllm: Loaded, backbone: Loaded, checkpoint: str, context: str = "auto"):
        planner, bb = mllm.model, backbone.model
        wanted = None if context == "auto" else context
        if checkpoint == UNTRAINED:
            source = wanted or default_context_source(bb.has_text_encoder)
            mc = new_metacanvas(planner.hidden_size, bb.spec, source).to(offload_device())
        else:
            mc = load_metacanvas(find_model(("metacanvas",), checkpoint, "MetaCanvas checkpoint"), offload_device())
            if wanted is not None:
                mc.check_context_source(wanted)
        mc.check_compatible(planner.hidden_size, planner.folder, bb.spec, bb.folder, bb.has_text_encoder)
        return (Loaded(mc, Managed({"metacanvas": mc})),)


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
                **_size_inputs(
                    "Sets the canvas grid (and, for FLUX-Kontext, the input image's pixel area); use the same size in the sampler."
                ),
            },
            "optional": {
                "images": (
                    "IMAGE",
                    {
                        "tooltip": "Input images the MLLM looks at with the prompt. Required for FLUX-Kontext editing (one image: the image to edit, which the DiT also sees as reference tokens). "
                        + REFERENCE_RULE
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
                        "tooltip": f"Video backbones (Wan2.2): 'first frame' = image-to-video (one image, kept exactly as the first frame); 'references' = reference-images-to-video (1 to {MAX_REFERENCES} images). Images are resized (stretched) to width × height for the DiT. Ignored by image backbones.",
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
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        return _check_size(width, height)

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
    ):
        inputs = VisualInputs(_images_to_pil(images), _images_to_pil(video, "video"), image_role)
        mc = metacanvas.ready()
        planner = mllm.ready()
        with torch.no_grad():
            return (mc.plan(planner, prompt, height, width, inputs, negative_prompt, keyframes or None),)


class MetaCanvasProject:
    DESCRIPTION = "Projects the plan for the backbone: the canvas connector aligns the canvas to the DiT width; the prompt goes into the backbone's text slot."
    CATEGORY = CATEGORY
    FUNCTION = "project"
    RETURN_TYPES = ("METACANVAS_COND",)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("Context for the text slot (positive and negative) and the aligned canvas.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "plan": ("METACANVAS_PLAN", {"tooltip": "The MLLM's plan."}),
                "metacanvas": ("METACANVAS", {"tooltip": "The same MetaCanvas checkpoint the plan was made with."}),
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The backbone that will sample."}),
            }
        }

    def project(self, plan, metacanvas: Loaded, backbone: Loaded):
        bb = backbone.ready()
        mc = metacanvas.ready()
        return (project(plan.to(bb.device), mc, bb),)


class MetaCanvasSampler:
    DESCRIPTION = (
        "Denoises with the backbone: flow matching with classifier-free guidance; the canvas residual is added to "
        "the patch embeddings of the conditional branch only."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent, in the backbone's own latent space (decode with MetaCanvas Decode).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The backbone to sample with."}),
                "cond": ("METACANVAS_COND", {"tooltip": "From MetaCanvas Project."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Noise seed. Noise is drawn on the CPU, so a seed gives the same image on any GPU.",
                    },
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 4.5,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free (text) guidance scale; its unconditional branch has the negative prompt and no canvas. 1 or less turns it off (one model call per step fewer).",
                    },
                ),
                **_size_inputs("A multiple of the backbone's pixel stride (32 for SANA, 16 for FLUX-Kontext)."),
                "scheduler": (
                    list(SCHEDULERS),
                    {
                        "default": "dpm_solver_flow",
                        "tooltip": "dpm_solver_flow: DPM-Solver++ for flow models (SANA's default). flow_euler: flow-matching Euler.",
                    },
                ),
                "use_canvas": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Off = the plain backbone with the same prompt, for A/B comparison against global conditioning.",
                    },
                ),
            },
            "optional": {
                "negative": (
                    "METACANVAS_COND",
                    {
                        "tooltip": "Optional: another projected plan whose prompt becomes the negative, instead of the plan's negative prompt."
                    },
                ),
                "length": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 1025,
                        "step": 4,
                        "tooltip": "Frames to make: 1 for images; for Wan2.2 video 4k+1 (121 = 5 s at 24 fps).",
                    },
                ),
                "frame_rate": (
                    "FLOAT",
                    {
                        "default": 24.0,
                        "min": 1.0,
                        "max": 120.0,
                        "step": 1.0,
                        "tooltip": "Frames per second of the VIDEO that Decode makes (Wan2.2 is trained at 24).",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, length=1):
        if length < 1 or (length - 1) % 4:
            return f"length {length} must be 1 (an image) or 4k+1 frames for video: try {max(1, (length - 1) // 4 * 4 + 1)} or {(max(0, length - 1) // 4 + 1) * 4 + 1}."
        return _check_size(width, height)

    def sample(
        self,
        backbone: Loaded,
        cond,
        seed: int,
        steps: int,
        cfg: float,
        width: int,
        height: int,
        scheduler: str,
        use_canvas: bool,
        negative=None,
        length: int = 1,
        frame_rate: float = 24.0,
    ):
        bb = backbone.ready()
        if negative is not None:
            cond = cond.with_negative(negative)
        latents = sample(
            bb,
            cond,
            seed=seed,
            steps=steps,
            cfg=cfg,
            height=height,
            width=width,
            scheduler=scheduler,
            use_canvas=use_canvas,
            on_step=step_callback(steps),
            frames=length,
        )
        return ({"samples": latents.to(intermediate_device()), "frame_rate": frame_rate},)


class MetaCanvasEditGuidance:
    DESCRIPTION = (
        "Sets the editing guidance a conditioning is sampled with (like the core FluxGuidance node): FLUX-Kontext's "
        "embedded guidance and the image guidance against a branch without the input image. Without this node: "
        "guidance 3.5 (diffusers' FluxKontextPipeline default) and image guidance off."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("METACANVAS_COND",)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("The same conditioning with these guidance values; connect it to MetaCanvas Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cond": ("METACANVAS_COND", {"tooltip": "From MetaCanvas Project."}),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 2.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "FLUX-Kontext's embedded (distilled) guidance; 2.5 in its model card. Backbones without a guidance embedding (SANA) ignore it.",
                    },
                ),
                "image_cfg": (
                    "FLOAT",
                    {
                        "default": 1.5,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Image guidance (InstructPix2Pix-style): how strongly the output follows the input image, against a branch with the negative prompt, no canvas and no input image; 1.5 is MetaQuery's setting. 1 = off (one model call per step fewer). Only for backbones that take the input image themselves (FLUX-Kontext).",
                    },
                ),
            }
        }

    def apply(self, cond, guidance: float, image_cfg: float):
        return (replace(cond, guidance=guidance, image_cfg=image_cfg),)


class MetaCanvasDecode:
    DESCRIPTION = (
        "Decodes a MetaCanvas latent with the backbone's VAE: IMAGE (video frames stacked on the batch) for the "
        "core Preview/Save Image nodes, and VIDEO (with the sampler's frame rate) for core Save Video."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "VIDEO")
    RETURN_NAMES = ("image", "video")
    OUTPUT_TOOLTIPS = (
        "Decoded images or video frames, float 0..1, [B, H, W, C].",
        "The frames as a video at the sampler's frame rate (a one-frame video for images).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The backbone whose VAE made the latent space."}),
                "latent": ("LATENT", {"tooltip": "From MetaCanvas Sampler."}),
            }
        }

    def decode(self, backbone: Loaded, latent: dict):
        bb = backbone.ready()
        images = bb.decode(latent["samples"].to(bb.device)).to(intermediate_device())
        return (images, make_video(images, latent.get("frame_rate", 24.0)))


NODE_CLASS_MAPPINGS = {
    "MetaCanvasMLLMLoader": MetaCanvasMLLMLoader,
    "MetaCanvasBackboneLoader": MetaCanvasBackboneLoader,
    "MetaCanvasConnectorLoader": MetaCanvasConnectorLoader,
    "MetaCanvasPlan": MetaCanvasPlan,
    "MetaCanvasProject": MetaCanvasProject,
    "MetaCanvasSampler": MetaCanvasSampler,
    "MetaCanvasDecode": MetaCanvasDecode,
    "MetaCanvasEditGuidance": MetaCanvasEditGuidance,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MetaCanvasMLLMLoader": "MetaCanvas MLLM Loader",
    "MetaCanvasBackboneLoader": "MetaCanvas Backbone Loader",
    "MetaCanvasConnectorLoader": "MetaCanvas Connector Loader",
    "MetaCanvasPlan": "MetaCanvas Plan",
    "MetaCanvasProject": "MetaCanvas Project",
    "MetaCanvasSampler": "MetaCanvas Sampler",
    "MetaCanvasDecode": "MetaCanvas Decode",
    "MetaCanvasEditGuidance": "MetaCanvas Edit Guidance",
}
