"""MetaCanvas inside the artist's own graph: native Wan2.2-TI2V-5B and FLUX.1-Kontext from core loaders, sampled
by the core samplers (KSampler, SamplerCustomAdvanced, DualCFGGuider), with core LoRA loaders, fp8 weights, GGUF
and ComfyUI's memory manager as they are.

- MetaCanvas Apply (MODEL -> MODEL): the canvas patch on the native model (`model_patch.py`).
- MetaCanvas Text Conditioning (plan -> positive, negative): the MLLM's prompt through the context connector, as
  native CONDITIONING (the paper's text path for Wan2.2 and FLUX-Kontext; no umT5/T5 needed).
- MetaCanvas Attach Canvas (CONDITIONING -> CONDITIONING): the plan's canvas on a positive conditioning — from Text
  Conditioning, or from core Load CLIP + CLIP Text Encode (context 'native': the model's own text encoder) — with strength and mask.
- MetaCanvas Wan Inputs: reference images / a source video of the plan, encoded by the native Wan2.2 VAE, for
  in-context video and video editing (image-to-video's first frame goes through core Wan22ImageToVideoLatent).
"""

from __future__ import annotations

import torch
from PIL import Image

from metacanvas_core.conditioning import mllm_context, mllm_pooled
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.injection import vae_pixels
from metacanvas_core.inputs import ContextSource, ImageRole
from metacanvas_core.specs import WAN_VAE_STRIDE

from .model_patch import CANVAS_KEY, PATCH_KEY, WAN_KEY, MetaCanvasPatch, NativeCanvas, WanConditions, native_spec
from .runtime import Loaded, intermediate_device, load, patcher_extension
from .widgets import CANVAS_DIAL, CATEGORY, check_numbers


def _with(conditioning: list, key: str, value) -> list:
    """CONDITIONING with `key` set on every entry (new lists and dicts: a node never mutates its inputs)."""
    return [[t, {**d, key: value}] for t, d in conditioning]


class MetaCanvasApply:
    DESCRIPTION = (
        "Patches a native Wan2.2-TI2V-5B or FLUX.1-Kontext MODEL (core Load Diffusion Model, after any LoRA) so the "
        "canvas attached to the positive conditioning steers it: the canvas connector's residual is added to the "
        "patch embeddings of the noisy target tokens of the positive branch only. Sample with the core samplers."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model, patched (weights untouched: LoRAs, fp8 and other patches keep working).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "Native Wan2.2-TI2V-5B or FLUX.1-Kontext-dev (core Load Diffusion Model)."},
                ),
                "metacanvas": (
                    "METACANVAS",
                    {"tooltip": "The MetaCanvas checkpoint for this model (Connector Loader)."},
                ),
            }
        }

    def apply(self, model, metacanvas: Loaded):
        extension = patcher_extension()
        spec = native_spec(model)
        mc = metacanvas.model
        mc.check_backbone(spec, "the native MODEL", has_text_encoder=True)
        if model.get_wrappers(extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY):
            raise MetaCanvasInputError("model: MetaCanvas Apply is already on this model; apply it once.")
        patched = model.clone()
        patch = MetaCanvasPatch(mc, spec)
        patched.add_wrapper_with_key(extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, patch.outer_sample)
        patched.add_wrapper_with_key(extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY, patch.diffusion_model)
        patched.set_additional_models(PATCH_KEY, [m.patcher for m in metacanvas.parts()])
        return (patched,)


class MetaCanvasTextConditioning:
    DESCRIPTION = (
        "The prompt (and negative prompt) as native CONDITIONING, from where the checkpoint takes it. Native context "
        "('new (untrained)' on a native model, or a checkpoint trained so): the model's own text encoder, core Load "
        "CLIP + CLIP Text Encode connected to clip_positive / clip_negative, passed through unchanged, so untrained "
        "the graph gives the plain model's output. MLLM context (the paper's path): the plan's prompt states through "
        "the checkpoint's context connector into the backbone's text slot (Wan2.2: the cross-attention context; FLUX: "
        "the T5 slot and the pooled vector the checkpoint stores); the CLIP inputs are then not run."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = (
        "The prompt: attach the canvas to it (MetaCanvas Attach Canvas).",
        "The negative prompt: it never gets the canvas.",
    )
    CLIP_INPUTS = ("clip_positive", "clip_negative")

    @classmethod
    def INPUT_TYPES(cls):
        clip = "{} from core CLIP Text Encode (the model's own text encoder, e.g. umt5_xxl for Wan2.2, clip_l + t5xxl for FLUX): used when the checkpoint takes context 'native', the model's own text encoder ('new (untrained)' on a native model); not run when it takes MLLM context."
        return {
            "required": {
                "plan": ("METACANVAS_PLAN", {"tooltip": "The MLLM's plan (MetaCanvas Plan)."}),
                "metacanvas": ("METACANVAS", {"tooltip": "The checkpoint the plan was made with."}),
            },
            "optional": {
                "clip_positive": ("CONDITIONING", {"lazy": True, "tooltip": clip.format("The prompt")}),
                "clip_negative": ("CONDITIONING", {"lazy": True, "tooltip": clip.format("The negative prompt")}),
            },
        }

    def check_lazy_status(self, plan, metacanvas: Loaded, **clip):
        """The CLIP inputs are evaluated (their text encoder loaded and run) only for a checkpoint with native
        context; linked inputs not yet evaluated arrive as None."""
        if metacanvas.model.config.context_source != ContextSource.TEXT_ENCODER:
            return []
        return [name for name in self.CLIP_INPUTS if name in clip and clip[name] is None]

    def encode(self, plan, metacanvas: Loaded, clip_positive=None, clip_negative=None):
        mc = metacanvas.model
        mc.check_plan(plan)
        if mc.config.context_source == ContextSource.TEXT_ENCODER:
            if clip_positive is None or clip_negative is None:
                raise MetaCanvasInputError(
                    f"MetaCanvas checkpoint {mc.describe()} takes the prompt from the model's own text encoder "
                    "(context 'native'): connect core CLIP Text Encode (Load CLIP: umt5_xxl for Wan2.2, "
                    "DualCLIPLoader clip_l + t5xxl for FLUX) to clip_positive and clip_negative, or set the Connector "
                    "Loader's context to 'mllm' (a checkpoint trained with MLLM context)."
                )
            return (clip_positive, clip_negative)
        pooled = mllm_pooled(mc)
        device = load(*metacanvas.parts())
        out = intermediate_device()
        with torch.no_grad():
            texts = [
                mllm_context(mc.context_connector, [states.to(device)], pooled)
                for states in (plan.context, plan.negative_context)
            ]
        conditioning = []
        for text in texts:
            extra = {} if text.pooled is None else {"pooled_output": text.pooled.to(out)}
            conditioning.append([[text.embeds.to(out), extra]])
        return tuple(conditioning)


class MetaCanvasAttachCanvas:
    DESCRIPTION = (
        "Attaches the plan's canvas (aligned by the checkpoint's canvas connector) to a positive CONDITIONING — from "
        "MetaCanvas Text Conditioning or from a core CLIP Text Encode. A model patched by MetaCanvas Apply adds it to "
        "the noisy target tokens when it samples that conditioning; the negative never gets it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "attach"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("The same conditioning carrying the canvas.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The positive conditioning."}),
                "plan": ("METACANVAS_PLAN", {"tooltip": "The MLLM's plan (MetaCanvas Plan)."}),
                "metacanvas": ("METACANVAS", {"tooltip": "The checkpoint the plan was made with."}),
                "canvas_strength": CANVAS_DIAL["canvas_strength"],
            },
            "optional": {"canvas_mask": CANVAS_DIAL["canvas_mask"]},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, canvas_strength=None):
        return check_numbers(cls, canvas_strength=canvas_strength)

    def attach(self, conditioning: list, plan, metacanvas: Loaded, canvas_strength: float, canvas_mask=None):
        mc = metacanvas.model
        with torch.no_grad():
            aligned = mc.align(plan, load(*metacanvas.parts()))
        mask = None if canvas_mask is None else canvas_mask.to(intermediate_device())
        canvas = NativeCanvas(aligned.to(intermediate_device()), mc.name, mc.identity, plan.size, canvas_strength, mask)
        return (_with(conditioning, CANVAS_KEY, canvas),)


class MetaCanvasWanInputs:
    DESCRIPTION = (
        "Wan2.2 in-context video and video editing: the plan's reference images (image_role 'references') and source "
        "video, resized (stretched) to the plan's size and encoded by the native Wan2.2 VAE, go to the DiT through the "
        "checkpoint's condition embedding — reference images as clean frames before the video, the source video "
        "frame by frame. Image-to-video's first frame goes through core Wan22ImageToVideoLatent instead."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("The positive conditioning carrying the encoded references / source video.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The positive conditioning (before or after Attach Canvas)."}),
                "vae": ("VAE", {"tooltip": "The Wan2.2 VAE (vae/wan2.2_vae.safetensors, core Load VAE)."}),
                "plan": ("METACANVAS_PLAN", {"tooltip": "The plan whose images / video the DiT should see."}),
            }
        }

    def encode(self, positive: list, vae, plan):
        height, width = plan.size
        inputs = plan.inputs
        references = None
        if inputs.images and inputs.role == ImageRole.REFERENCES:
            references = torch.cat([_encode(vae, [image], width, height) for image in inputs.images], 2)
        source = _encode(vae, list(inputs.video), width, height) if inputs.video else None
        if references is None and source is None:
            raise MetaCanvasInputError(
                "plan: it has no reference images (image_role 'references') and no source video for the Wan DiT: connect "
                "them to MetaCanvas Plan, or leave this node out."
            )
        return (_with(positive, WAN_KEY, WanConditions(references, source)),)


def _encode(vae, frames: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Frames resized (stretched) to width × height as training resizes them (`injection.vae_pixels`), encoded by a core
    VAE (which takes pixels in 0..1): raw latents (1, z, frames', h, w)."""
    pixels = (vae_pixels(frames, height, width, WAN_VAE_STRIDE)[0].permute(1, 2, 3, 0) + 1) / 2
    return vae.encode(pixels).to(intermediate_device())


NODE_CLASS_MAPPINGS = {
    "MetaCanvasApply": MetaCanvasApply,
    "MetaCanvasTextConditioning": MetaCanvasTextConditioning,
    "MetaCanvasAttachCanvas": MetaCanvasAttachCanvas,
    "MetaCanvasWanInputs": MetaCanvasWanInputs,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MetaCanvasApply": "MetaCanvas Apply",
    "MetaCanvasTextConditioning": "MetaCanvas Text Conditioning",
    "MetaCanvasAttachCanvas": "MetaCanvas Attach Canvas",
    "MetaCanvasWanInputs": "MetaCanvas Wan Inputs",
}
