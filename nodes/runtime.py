"""ComfyUI's services when the nodes run inside ComfyUI; plain torch equivalents when they don't.

Nothing here imports ComfyUI at module import time: each helper looks for it when called, so the
nodes load on any ComfyUI release and are tested without one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from metacanvas_core.errors import MetaCanvasInputError

# ComfyUI model folder kinds this pack reads: kind -> (default subfolder, what marks an entry).
MODEL_KINDS = {
    "LLM": "config.json",
    "text_encoders": "config.json",
    "diffusers": "model_index.json",
    "metacanvas": ".safetensors",
}


def _comfy(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def torch_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE outputs live (CPU in ComfyUI)."""
    mm = _comfy("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def resolve_dtype(choice: str) -> torch.dtype:
    """auto: bf16 where the compute device supports it, else fp32 (fp16 overflows in Qwen2.5-VL)."""
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]
    device = torch_device()
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def models_dirs(kind: str) -> list[Path]:
    """Search folders for a model kind: ComfyUI's (with extra_model_paths.yaml), else $METACANVAS_MODELS/kind."""
    fp = _comfy("folder_paths")
    if fp is not None:
        if kind not in fp.folder_names_and_paths:
            suffixes = {MODEL_KINDS[kind]} if MODEL_KINDS[kind].startswith(".") else set()
            fp.folder_names_and_paths[kind] = ([os.path.join(fp.models_dir, kind)], suffixes)
        return [Path(p) for p in fp.get_folder_paths(kind)]
    return [Path(os.environ.get("METACANVAS_MODELS", "models")) / kind]


def list_models(kind: str) -> list[str]:
    """Entries of a kind: model folders (holding config.json / model_index.json) or .safetensors files."""
    marker = MODEL_KINDS[kind]
    names: set[str] = set()
    for root in models_dirs(kind):
        if not root.is_dir():
            continue
        if marker.startswith("."):
            names.update(str(p.relative_to(root)) for p in root.rglob(f"*{marker}"))
        else:
            names.update(str(p.parent.relative_to(root)) for p in root.rglob(marker) if p.parent != root)
    return sorted(names)


def find_model(kinds: tuple[str, ...], name: str, what: str) -> Path:
    """The full path of `name` in the first folder of `kinds` that has it, or an error saying where to put it."""
    for kind in kinds:
        for root in models_dirs(kind):
            if (root / name).exists():
                return root / name
    where = " or ".join(str(d) for kind in kinds for d in models_dirs(kind))
    raise MetaCanvasInputError(f"{what} '{name}' was not found. Put it in {where} and refresh the page.")


class Managed:
    """Modules registered with ComfyUI's memory manager, or moved by hand outside ComfyUI.

    Weights stay on the offload device until a node needs them; `load()` asks ComfyUI to make room
    (it may move other models, e.g. the MLLM after planning, off the GPU) and loads them fully.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.container = nn.ModuleDict(modules)
        self.patcher = None
        mm = _comfy("comfy.model_management")
        if mm is not None:
            from comfy.model_patcher import ModelPatcher

            self.patcher = ModelPatcher(
                self.container, load_device=mm.get_torch_device(), offload_device=offload_device()
            )

    def load(self) -> None:
        if self.patcher is not None:
            _comfy("comfy.model_management").load_models_gpu([self.patcher], force_full_load=True)
        else:
            self.container.to(torch_device())


def step_callback(total: int) -> Callable[[int, int], None]:
    """Per-step progress for ComfyUI's progress bar, and the point where an interrupt stops the loop."""
    mm = _comfy("comfy.model_management")
    utils = _comfy("comfy.utils")
    bar = utils.ProgressBar(total) if utils is not None else None

    def on_step(i: int, n: int) -> None:
        if bar is not None:
            bar.update_absolute(i + 1, n)
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()

    return on_step


@dataclass
class Video:
    """Outside ComfyUI: the components ComfyUI's VIDEO holds (frames [T, H, W, C] and a frame rate)."""

    images: torch.Tensor
    frame_rate: Fraction


def make_video(frames: torch.Tensor, frame_rate: float):
    """A VIDEO for core Save Video: ComfyUI's own video type inside ComfyUI."""
    rate = Fraction(frame_rate).limit_denominator(1001)
    if _comfy("comfy_api.input_impl") is None:
        return Video(frames, rate)
    from comfy_api.input_impl import VideoFromComponents
    from comfy_api.util import VideoComponents

    return VideoFromComponents(VideoComponents(images=frames, audio=None, frame_rate=rate))
