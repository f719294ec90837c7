"""Loaders: the planner MLLM, the pack's own SANA backbone (a diffusers folder), and MetaCanvas checkpoints.

Every model name is resolved inside its model folders (never outside them) and every file is checked before it
is read, so a wrong or damaged file is refused with its name at validation. Each loaded part registers with
ComfyUI's memory manager on its own and is loaded when a node needs it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath

from metacanvas_core.backbones import load_backbone
from metacanvas_core.backbones.flux import FluxKontextBackbone
from metacanvas_core.backbones.sana import SanaBackbone
from metacanvas_core.backbones.wan import WanBackbone
from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.files import SafetensorsFile
from metacanvas_core.inputs import ContextSource, WeightDtype
from metacanvas_core.metacanvas import UNTRAINED, default_context_source, new_metacanvas
from metacanvas_core.planner import Planner
from metacanvas_core.qwen_file import is_qwen25_vl

from .runtime import (
    Loaded,
    bundled_qwen_tokenizer,
    find_model,
    list_files,
    list_folders,
    offload_device,
    resolve_dtype,
)
from .widgets import CATEGORY, DTYPES

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


def _pipeline_class(folder: Path) -> str | None:
    """The `_class_name` in a diffusers folder's model_index.json, or None when it cannot be read."""
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


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
    pipeline = _pipeline_class(folder)
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
        if _pipeline_class(find_model(DIFFUSERS, n, BACKBONE_FOLDER)) in SanaBackbone.pipeline_class_names
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
                        "tooltip": "Also load SANA's own Gemma-2 text encoder from the folder (native context: the plain SANA output with an untrained MetaCanvas). Off saves memory when the checkpoint takes its context from the MLLM.",
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
            from .model_patch import native_spec

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


NODE_CLASS_MAPPINGS = {
    "MetaCanvasMLLMLoader": MetaCanvasMLLMLoader,
    "MetaCanvasBackboneLoader": MetaCanvasBackboneLoader,
    "MetaCanvasConnectorLoader": MetaCanvasConnectorLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MetaCanvasMLLMLoader": "MetaCanvas MLLM Loader",
    "MetaCanvasBackboneLoader": "MetaCanvas Backbone Loader",
    "MetaCanvasConnectorLoader": "MetaCanvas Connector Loader",
}
