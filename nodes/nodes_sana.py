"""The pack's own path, for SANA (text-to-image; ComfyUI has no SANA): load it from a diffusers folder, project the
plan for it, sample with the pack's sampler, decode with its VAE. Wan2.2 and FLUX-Kontext run in ComfyUI as the native
patch (nodes_native.py): a Wan2.2 or FLUX-Kontext folder is refused here naming the template that replaces it, and the
Edit Guidance node of the former FLUX path stays, deprecated, so old graphs still load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import torch

from metacanvas_core.backbones import SCHEDULERS, load_backbone, pipeline_class_name
from metacanvas_core.backbones.flux import FluxKontextBackbone
from metacanvas_core.backbones.sana import SanaBackbone
from metacanvas_core.backbones.wan import WanBackbone
from metacanvas_core.conditioning import Conditioning, project
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.sampling import sample

from .runtime import (
    Loaded,
    find_model,
    intermediate_device,
    list_folders,
    load,
    make_video,
    offload_device,
    resolve_dtype,
    step_callback,
)
from .widgets import CANVAS_DIAL, CATEGORY, DTYPES, check_numbers, check_size, size_inputs

DIFFUSERS = ("diffusers",)
BACKBONE_FOLDER = "Backbone folder"
# What runs Wan2.2 and FLUX-Kontext in ComfyUI instead of the Backbone Loader: the native patch (core Load Diffusion
# Model + MetaCanvas Apply + core samplers), in these templates.
NATIVE_REPLACEMENTS = {
    WanBackbone: (
        "Wan2.2",
        "core Load Diffusion Model (diffusion_models/wan2.2_ti2v_5B_fp16.safetensors) + MetaCanvas Apply + core "
        "KSampler: open the template native_text_to_video (or native_image_to_video, native_video_editing, "
        "native_in_context_video)",
    ),
    FluxKontextBackbone: (
        "FLUX.1-Kontext",
        "core Load Diffusion Model (diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors) + MetaCanvas Apply + "
        "core FluxGuidance, DualCFGGuider and SamplerCustomAdvanced: open the template native_image_editing",
    ),
}


def _kind_of_name(name: str) -> type | None:
    """Wan2.2 or FLUX-Kontext from a folder name alone (a saved graph naming a folder that is not installed)."""
    last = PurePath(name).name.lower()
    return WanBackbone if "wan2" in last else FluxKontextBackbone if "kontext" in last else None


def _refusal(name: str, kind: type | None) -> str | None:
    """The message for a Wan2.2 or FLUX-Kontext folder given to the Backbone Loader: what replaces it."""
    if kind not in NATIVE_REPLACEMENTS:
        return None
    model, replacement = NATIVE_REPLACEMENTS[kind]
    return (
        f"{BACKBONE_FOLDER} '{name}' is {model}: the MetaCanvas Backbone Loader loads SANA only. {model} runs in "
        f"ComfyUI as the native patch: {replacement} (Workflow -> Browse Templates -> MetaCanvas)."
    )


def check_backbone_folder(name: str) -> Path:
    """The SANA folder `name` names, or MetaCanvasInputError: for a Wan2.2 or FLUX-Kontext folder (installed, or
    named in a saved graph) the message says which native template replaces it."""
    try:
        folder = find_model(DIFFUSERS, name, BACKBONE_FOLDER)
    except MetaCanvasInputError as e:
        plain = not PurePath(name).is_absolute() and ".." not in PurePath(name).parts
        raise MetaCanvasInputError((plain and _refusal(name, _kind_of_name(name))) or str(e)) from None
    pipeline = pipeline_class_name(folder)
    if pipeline in SanaBackbone.pipeline_class_names:
        return folder
    kind = next((cls for cls in NATIVE_REPLACEMENTS if pipeline in cls.pipeline_class_names), None)
    sana = ", ".join(SanaBackbone.pipeline_class_names)
    found = f"is a '{pipeline}' folder" if pipeline else "has no model_index.json naming its pipeline"
    raise MetaCanvasInputError(
        _refusal(name, kind)
        or f"{BACKBONE_FOLDER} '{name}' {found}: the MetaCanvas Backbone Loader loads SANA only (a diffusers folder "
        f"whose model_index.json names {sana}, e.g. Sana_1600M_512px_diffusers)."
    )


def sana_folders() -> list[str]:
    """The diffusers folders holding a SANA pipeline (the Backbone Loader's choices)."""
    names = list_folders(DIFFUSERS, "model_index.json")
    return [
        n
        for n in names
        if pipeline_class_name(find_model(DIFFUSERS, n, BACKBONE_FOLDER)) in SanaBackbone.pipeline_class_names
    ]


class MetaCanvasBackboneLoader:
    DESCRIPTION = (
        "Loads SANA (text-to-image; ComfyUI has no SANA loader) from a diffusers folder for the pack's own Project, "
        "Sampler and Decode. Wan2.2 and FLUX-Kontext run as the native patch instead: core Load Diffusion Model + "
        "MetaCanvas Apply (templates native_text_to_video, native_image_editing, ...); a Wan2.2 or FLUX-Kontext "
        "folder is refused with the template that replaces it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("METACANVAS_BACKBONE",)
    RETURN_NAMES = ("backbone",)
    OUTPUT_TOOLTIPS = ("SANA: transformer, DC-AE and, when load_text_encoder is on, its own Gemma-2 text encoder.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone_folder": (
                    sana_folders(),
                    {
                        "tooltip": "A SANA diffusers pipeline folder in models/diffusers (model_index.json names SanaPipeline), e.g. Sana_1600M_512px_diffusers. Wan2.2 and FLUX-Kontext: the native templates (core Load Diffusion Model + MetaCanvas Apply)."
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
                        "tooltip": "Also load SANA's own Gemma-2 text encoder from the folder (context 'native': the plain SANA output with an untrained MetaCanvas). Off saves memory when the checkpoint takes its context from the MLLM.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, backbone_folder):
        try:
            check_backbone_folder(backbone_folder)
        except MetaCanvasInputError as e:
            return str(e)
        return True

    def load(self, backbone_folder: str, dtype: str, load_text_encoder: bool = True):
        folder = check_backbone_folder(backbone_folder)
        backbone = load_backbone(folder, resolve_dtype(dtype), offload_device(), load_text_encoder)
        return (Loaded(backbone, backbone.parts()),)


@dataclass
class Projected:
    """METACANVAS_COND: a projected plan and the MetaCanvas whose connector the sampler runs (loaded with the DiT)."""

    cond: Conditioning
    metacanvas: Loaded


class MetaCanvasProject:
    DESCRIPTION = (
        "Projects the plan for the SANA backbone: the canvas connector aligns the canvas to the DiT width; the prompt "
        "goes into the backbone's text slot (context 'native': SANA's Gemma-2). Native graphs use Text Conditioning "
        "and Attach Canvas instead."
    )
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
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The SANA backbone that will sample."}),
            }
        }

    def project(self, plan, metacanvas: Loaded, backbone: Loaded):
        # Native context needs the text encoders, input images the VAE; the DiT is not loaded here.
        device = load(*backbone.parts("text_encoder", "text_encoder_2", "vae"), *metacanvas.parts())
        bb, mc = backbone.on(device), metacanvas.on(device)
        return (Projected(project(plan.to(device), mc, bb), metacanvas),)


class MetaCanvasSampler:
    DESCRIPTION = (
        "Denoises with the SANA backbone (images): flow matching with classifier-free guidance; the canvas residual "
        "is added to the patch embeddings of the conditional branch only. Wan2.2 video and FLUX-Kontext editing are "
        "sampled by core samplers on a MetaCanvas Apply model (the native_* templates)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent, in SANA's own latent space (decode with MetaCanvas Decode).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The SANA backbone to sample with."}),
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
                **size_inputs("A multiple of 32 (SANA's pixel stride)."),
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
                        "tooltip": "1: SANA makes images. Kept so saved graphs load; video is sampled by the native Wan2.2 graphs (native_text_to_video etc.: core Load Diffusion Model + MetaCanvas Apply + core KSampler).",
                    },
                ),
                "frame_rate": (
                    "FLOAT",
                    {
                        "default": 24.0,
                        "min": 1.0,
                        "max": 120.0,
                        "step": 1.0,
                        "tooltip": "Frames per second of the one-frame VIDEO that Decode makes (for core Save Video).",
                    },
                ),
                **CANVAS_DIAL,
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, width=None, height=None, length=None, frame_rate=None, canvas_strength=None):
        numbers = check_numbers(
            cls,
            cfg=cfg,
            width=width,
            height=height,
            length=length,
            frame_rate=frame_rate,
            canvas_strength=canvas_strength,
        )
        if numbers is not True:
            return numbers
        if length is not None and length != 1:
            return (
                f"length {length}: MetaCanvas Sampler samples SANA, which makes images (length 1). Video is sampled "
                "by the native Wan2.2 graphs (template native_text_to_video etc.: core Load Diffusion Model + "
                "MetaCanvas Apply + core KSampler)."
            )
        return check_size(width, height)

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
        negative: Projected | None = None,
        length: int = 1,
        frame_rate: float = 24.0,
        canvas_strength: float = 1.0,
        canvas_mask: torch.Tensor | None = None,
    ):
        device = load(*backbone.parts("transformer", "vae"), *cond.metacanvas.parts())
        bb, conditioning = backbone.on(device), cond.cond
        if negative is not None:
            conditioning = conditioning.with_negative(negative.cond)
        latents = sample(
            bb,
            conditioning,
            seed=seed,
            steps=steps,
            cfg=cfg,
            height=height,
            width=width,
            scheduler=scheduler,
            use_canvas=use_canvas,
            on_step=step_callback(steps),
            frames=length,
            canvas_strength=canvas_strength,
            canvas_mask=None if canvas_mask is None else canvas_mask[None],
        )
        return ({"samples": latents.to(intermediate_device()), "frame_rate": frame_rate},)


EDIT_GUIDANCE_REPLACED = (
    "MetaCanvas Edit Guidance is deprecated: it set FLUX-Kontext's guidance on the pack's own sampler, and "
    "FLUX-Kontext now runs in ComfyUI only as the native patch. Use the template native_image_editing: core "
    "FluxGuidance sets the embedded guidance, core DualCFGGuider (cfg_cond2_negative) the image guidance."
)


class MetaCanvasEditGuidance:
    DEPRECATED = True  # ComfyUI hides it from search; old graphs still load it
    DESCRIPTION = (
        "Deprecated (kept so old graphs load; running it stops with a message). It set FLUX-Kontext's embedded "
        "guidance and image guidance on the pack's sampler. FLUX-Kontext runs as the native patch: template "
        "native_image_editing, with core FluxGuidance (embedded guidance) and DualCFGGuider (image guidance)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("METACANVAS_COND",)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("Deprecated node: running it stops the graph (native_image_editing replaces it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "cond": ("METACANVAS_COND", {"tooltip": "Deprecated node. Was: from MetaCanvas Project."}),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 2.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Deprecated node. Was: FLUX-Kontext's embedded guidance; now core FluxGuidance in native_image_editing.",
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
                        "tooltip": "Deprecated node. Was: image guidance against a branch without the input image; now core DualCFGGuider's cfg_cond2_negative in native_image_editing.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, guidance=None, image_cfg=None):
        return check_numbers(cls, guidance=guidance, image_cfg=image_cfg)

    def apply(self, cond: Projected, guidance: float, image_cfg: float):
        raise MetaCanvasInputError(EDIT_GUIDANCE_REPLACED)


class MetaCanvasDecode:
    DESCRIPTION = (
        "Decodes a MetaCanvas Sampler latent with SANA's VAE (DC-AE): IMAGE for the core Preview/Save Image nodes, "
        "and a one-frame VIDEO (with the sampler's frame rate) for core Save Video."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "VIDEO")
    RETURN_NAMES = ("image", "video")
    OUTPUT_TOOLTIPS = (
        "Decoded images, float 0..1, [B, H, W, C].",
        "The image as a one-frame video at the sampler's frame rate.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": ("METACANVAS_BACKBONE", {"tooltip": "The SANA backbone whose VAE made the latent space."}),
                "latent": ("LATENT", {"tooltip": "From MetaCanvas Sampler."}),
            }
        }

    def decode(self, backbone: Loaded, latent: dict):
        bb = backbone.ready("vae")
        images = bb.decode(latent["samples"].to(bb.device)).to(intermediate_device())
        return (images, make_video(images, latent.get("frame_rate", 24.0)))


NODE_CLASS_MAPPINGS = {
    "MetaCanvasBackboneLoader": MetaCanvasBackboneLoader,
    "MetaCanvasProject": MetaCanvasProject,
    "MetaCanvasSampler": MetaCanvasSampler,
    "MetaCanvasDecode": MetaCanvasDecode,
    "MetaCanvasEditGuidance": MetaCanvasEditGuidance,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MetaCanvasBackboneLoader": "MetaCanvas Backbone Loader",
    "MetaCanvasProject": "MetaCanvas Project",
    "MetaCanvasSampler": "MetaCanvas Sampler",
    "MetaCanvasDecode": "MetaCanvas Decode",
    "MetaCanvasEditGuidance": "MetaCanvas Edit Guidance",
}
