"""The nodes both paths share: the planner MLLM and the MetaCanvas checkpoint loaders, the plan (the MLLM reads the
prompt, images and video with the checkpoint's canvas tokens and writes its plan into them) and its preview.

Every model name is resolved inside its model folders (never outside them) and every file is checked before it is
read, so a wrong or damaged file is refused with its name at validation. Each loaded part registers with ComfyUI's
memory manager on its own and is loaded when a node needs it.
"""

from __future__ import annotations

import torch

from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.files import SafetensorsFile
from metacanvas_core.inputs import ContextSource, ImageRole, VisualInputs, WeightDtype
from metacanvas_core.metacanvas import UNTRAINED, default_context_source, new_metacanvas
from metacanvas_core.planner import Planner
from metacanvas_core.preview import plan_preview
from metacanvas_core.qwen_file import is_qwen25_vl
from metacanvas_core.specs import WAN_MAX_REFERENCES

from .model_patch import latent_size, native_spec
from .runtime import (
    Loaded,
    bundled_qwen_tokenizer,
    find_model,
    intermediate_device,
    list_files,
    list_folders,
    load,
    offload_device,
    resolve_dtype,
)
from .widgets import CATEGORY, DTYPES, check_numbers, check_size, images_to_pil, size_inputs

MLLM_KINDS = ("text_encoders", "LLM")


class MetaCanvasMLLMLoader:
    DESCRIPTION = (
        "Loads the planner MLLM (Qwen2.5-VL) that writes the layout plan into canvas tokens: ComfyUI's single file "
        "(the one Qwen-Image uses, vision tower included; fp8 scaled or bf16) or a Hugging Face folder."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("METACANVAS_MLLM",)
    RETURN_NAMES = ("mllm",)
    OUTPUT_TOOLTIPS = ("The loaded Qwen2.5-VL planner.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = list_files(MLLM_KINDS) + list_folders(MLLM_KINDS, "config.json")
        return {
            "required": {
                "mllm_folder": (
                    names,
                    {
                        "tooltip": "Qwen2.5-VL: ComfyUI's single file in models/text_encoders (qwen_2.5_vl_7b_fp8_scaled.safetensors, the first choice, or the bf16 one), or a Hugging Face folder (config.json, *.safetensors, tokenizer) in models/text_encoders or models/LLM, e.g. Qwen2.5-VL-7B-Instruct."
                    },
                ),
                "dtype": (
                    DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Compute precision. auto = bf16 where the GPU supports it, else fp32.",
                    },
                ),
                "weight_dtype": (
                    WeightDtype.values(),
                    {
                        "default": "default",
                        "tooltip": "Weights in memory. default = as stored (an fp8 scaled file stays fp8). fp8_e4m3fn / fp8_e5m2 keep the linear layers of a bf16 file or folder in fp8 (half the memory; computed in the compute precision), as the core loaders do.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mllm_folder):
        try:
            path = find_model(MLLM_KINDS, mllm_folder, "MLLM")
            if path.is_file():
                header = SafetensorsFile.open(path, "MLLM file")
                if not is_qwen25_vl(header):
                    return (
                        f"MLLM '{mllm_folder}' holds {header.describe()}; the planner is Qwen2.5-VL (e.g. "
                        "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors)."
                    )
        except MetaCanvasInputError as e:
            return str(e)
        return True

    def load(self, mllm_folder: str, dtype: str, weight_dtype: str = "default"):
        path = find_model(MLLM_KINDS, mllm_folder, "MLLM")
        planner = Planner.load(path, resolve_dtype(dtype), offload_device(), bundled_qwen_tokenizer(), weight_dtype)
        return (Loaded(planner, {"mllm": planner.model}),)


class MetaCanvasConnectorLoader:
    DESCRIPTION = (
        "Loads a MetaCanvas checkpoint (canvas tokens + connectors) for this MLLM and backbone — the pack's backbone, "
        "or a native MODEL from the core Load Diffusion Model — checking that it fits both. 'new (untrained)' makes a "
        "zero-initialised one: the canvas then changes nothing."
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
                "checkpoint": (
                    [UNTRAINED] + list_files(("metacanvas",)),
                    {
                        "tooltip": "A .safetensors file in models/metacanvas, or 'new (untrained)': a zero-initialised connector that leaves the backbone's output unchanged."
                    },
                ),
                "context": (
                    ["auto", *ContextSource.values()],
                    {
                        "default": "auto",
                        "tooltip": "Where the prompt reaches the backbone's text slot from. native = the backbone's own text encoder (with 'new (untrained)': exactly the plain backbone); mllm = the MLLM through the context connector (the paper's path for Wan2.2 and FLUX-Kontext: MetaCanvas Text Conditioning; noise until trained). auto = the checkpoint's own; for 'new (untrained)': native (a native model: core Load CLIP + CLIP Text Encode into MetaCanvas Text Conditioning; the pack's backbone: its own text encoder, when loaded), else mllm.",
                    },
                ),
            },
            "optional": {
                "backbone": (
                    "METACANVAS_BACKBONE",
                    {"tooltip": "The pack's backbone the checkpoint is for (the pack's sampler). Give this or model."},
                ),
                "model": (
                    "MODEL",
                    {
                        "tooltip": "A native Wan2.2-TI2V-5B or FLUX.1-Kontext MODEL (core Load Diffusion Model) the checkpoint is for (native graphs with MetaCanvas Apply). Give this or backbone."
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint):
        if checkpoint == UNTRAINED:
            return True
        try:
            header = SafetensorsFile.open(
                find_model(("metacanvas",), checkpoint, "MetaCanvas checkpoint"), "checkpoint"
            )
        except MetaCanvasInputError as e:
            return str(e)
        if header.metadata.get("format") != "metacanvas":
            return f"checkpoint '{checkpoint}' is not a MetaCanvas checkpoint: it holds {header.describe()}."
        return True

    def load(self, mllm: Loaded, checkpoint: str, context: str = "auto", backbone: Loaded | None = None, model=None):
        if (backbone is None) == (model is None):
            raise MetaCanvasInputError(
                "MetaCanvas Connector Loader: connect exactly one of backbone (the pack's Backbone Loader) or model "
                "(a native MODEL from the core Load Diffusion Model)."
            )
        planner = mllm.model
        if backbone is not None:
            bb = backbone.model
            spec, name, has_text_encoder, pooled = bb.spec, bb.folder, bb.has_text_encoder, bb.default_pooled()
        else:
            # a native model's text encoder is core Load CLIP's (MetaCanvas Text Conditioning's CLIP inputs)
            spec, name, has_text_encoder, pooled = native_spec(model), "the native MODEL", True, None
        wanted = None if context == "auto" else context
        if checkpoint == UNTRAINED:
            source = wanted or default_context_source(has_text_encoder)
            mc = new_metacanvas(planner.hidden_size, spec, source, pooled=pooled).to(offload_device())
        else:
            mc = load_metacanvas(find_model(("metacanvas",), checkpoint, "MetaCanvas checkpoint"), offload_device())
            if wanted is not None:
                mc.check_context_source(wanted)
        mc.check_compatible(planner.hidden_size, planner.folder, spec, name, has_text_encoder)
        return (Loaded(mc, {"metacanvas": mc}),)


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


NODE_CLASS_MAPPINGS = {
    "MetaCanvasMLLMLoader": MetaCanvasMLLMLoader,
    "MetaCanvasConnectorLoader": MetaCanvasConnectorLoader,
    "MetaCanvasPlan": MetaCanvasPlan,
    "MetaCanvasPlanPreview": MetaCanvasPlanPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MetaCanvasMLLMLoader": "MetaCanvas MLLM Loader",
    "MetaCanvasConnectorLoader": "MetaCanvas Connector Loader",
    "MetaCanvasPlan": "MetaCanvas Plan",
    "MetaCanvasPlanPreview": "MetaCanvas Plan Preview",
}
