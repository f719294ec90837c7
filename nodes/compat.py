"""The ComfyUI interfaces the pack relies on, checked once at start-up.

ComfyUI's internals change between releases; the pack uses only these names. When the running ComfyUI lacks one,
the pack logs one line naming the release and what is missing, and every MetaCanvas node refuses to run with that
line (instead of an AttributeError deep inside a sampler). Tested releases: README, "ComfyUI releases".
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from metacanvas_core.errors import MetaCanvasInputError

# module -> the dotted names the pack reads from it.
INTERFACES: dict[str, tuple[str, ...]] = {
    "comfy.model_management": (
        "get_torch_device",
        "unet_offload_device",
        "intermediate_device",
        "should_use_bf16",
        "load_models_gpu",
        "throw_exception_if_processing_interrupted",
    ),
    "comfy.model_patcher": (
        "ModelPatcher.clone",
        "ModelPatcher.add_callback",
        "ModelPatcher.add_wrapper_with_key",
        "ModelPatcher.get_wrappers",
        "ModelPatcher.set_additional_models",
    ),
    "comfy.patcher_extension": ("WrappersMP.OUTER_SAMPLE", "WrappersMP.DIFFUSION_MODEL", "CallbacksMP.ON_LOAD"),
    "comfy.model_base": ("WAN22", "Flux", "BaseModel.process_latent_in"),
    "comfy.ldm.wan.model": ("WanModel",),
    "comfy.ldm.flux.model": ("Flux",),
    "comfy.utils": ("ProgressBar",),
    "folder_paths": ("models_dir", "folder_names_and_paths", "get_folder_paths"),
    "comfy_api.input_impl": ("VideoFromComponents",),
    "comfy_api.util": ("VideoComponents",),
}


def comfyui_version() -> str:
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "(unknown version)"


def missing_interfaces() -> list[str]:
    """The names of INTERFACES this ComfyUI lacks ([] when all are there)."""
    missing = []
    for module_name, names in INTERFACES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        for name in names:
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"{module_name}.{name}")
                    break
    return missing


def incompatibility(missing: list[str]) -> str:
    """The one line that names the release and what it lacks."""
    return (
        f"MetaCanvas cannot run on ComfyUI {comfyui_version()}: it lacks {', '.join(missing)}. Update ComfyUI (or "
        "MetaCanvas); the README lists the ComfyUI releases MetaCanvas is tested on."
    )


def refusing(node_class: type, message: str) -> type:
    """`node_class` with its function replaced by one that refuses with `message` (inputs, names and ids unchanged,
    so saved workflows still load and show what is wrong when queued)."""

    def refuse(self, **_inputs):
        raise MetaCanvasInputError(message)

    return type(node_class.__name__, (node_class,), {node_class.FUNCTION: refuse, "__module__": node_class.__module__})


def checked(mappings: dict[str, type]) -> dict[str, type]:
    """The node mappings as they are outside ComfyUI (tests, the command line) and on a ComfyUI that has every
    interface; otherwise refusing ones, logged once."""
    if importlib.util.find_spec("comfy") is None:
        return mappings
    missing = missing_interfaces()
    if not missing:
        return mappings
    message = incompatibility(missing)
    logging.warning(message)
    return {name: refusing(cls, message) for name, cls in mappings.items()}
