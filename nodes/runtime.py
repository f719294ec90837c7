"""ComfyUI's services when the nodes run inside ComfyUI (model folders, devices, the memory manager, progress, video);
plain torch equivalents when they don't. `Loaded` is what loader nodes hand on: a model whose parts ComfyUI's memory
manager loads one by one.

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
from typing import Any

import torch
from torch import nn

from metacanvas_core.casting import make_castable
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.files import inside

# Model folder kinds the pack reads that stock ComfyUI lacks: registered (and created) under models/ on first use.
PACK_KINDS = ("LLM", "metacanvas")


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
    if fp is None:
        return [Path(os.environ.get("METACANVAS_MODELS", "models")) / kind]
    if kind not in fp.folder_names_and_paths and kind in PACK_KINDS:
        folder = os.path.join(fp.models_dir, kind)
        os.makedirs(folder, exist_ok=True)  # so artists see where the files go
        fp.folder_names_and_paths[kind] = ([folder], {".safetensors"})
    return [Path(p) for p in fp.get_folder_paths(kind)]


def _walk(root: Path):
    """(folder, file names) under root, following symlinked folders as ComfyUI does."""
    for folder, _, files in os.walk(root, followlinks=True):
        yield Path(folder), files


def list_files(kinds: tuple[str, ...], suffix: str = ".safetensors") -> list[str]:
    """Names (relative to their model folder) of the files of these kinds."""
    names = {
        str((folder / f).relative_to(root))
        for kind in kinds
        for root in models_dirs(kind)
        for folder, files in _walk(root)
        for f in files
        if f.endswith(suffix)
    }
    return sorted(names)


def list_folders(kinds: tuple[str, ...], marker: str) -> list[str]:
    """Names (relative to their model folder) of the model folders of these kinds: folders holding `marker`."""
    names = {
        str(folder.relative_to(root))
        for kind in kinds
        for root in models_dirs(kind)
        for folder, files in _walk(root)
        if marker in files and folder != root
    }
    return sorted(names)


def find_model(kinds: tuple[str, ...], name: str, what: str) -> Path:
    """The full path of the model `name` (a name inside one of the kinds' folders), or an error saying where to put
    it. A name that leaves the model folders (absolute, or climbing out with '..') is refused."""
    roots = [root for kind in kinds for root in models_dirs(kind)]
    for root in roots:
        path = inside(root, name, what)
        if path.exists():
            return path
    where = " or ".join(str(root) for root in roots)
    raise MetaCanvasInputError(f"{what} '{name}' was not found. Put it in {where} and refresh the page.")


def validate_model(kinds: tuple[str, ...], name: str, what: str) -> bool | str:
    """VALIDATE_INPUTS for a model name: True, or the message."""
    try:
        find_model(kinds, name, what)
    except MetaCanvasInputError as e:
        return str(e)
    return True


def bundled_qwen_tokenizer() -> Path | None:
    """ComfyUI's bundled Qwen2.5 tokenizer folder (comfy/text_encoders/qwen25_tokenizer), when inside ComfyUI."""
    text_encoders = _comfy("comfy.text_encoders")
    if text_encoders is None:
        return None
    folder = Path(text_encoders.__path__[0]) / "qwen25_tokenizer"
    return folder if folder.is_dir() else None


class Part:
    """One module of a `Loaded` model, registered with ComfyUI's memory manager (a ModelPatcher of its own), or moved
    by hand outside ComfyUI.

    Inside ComfyUI its weights become castable (`casting.make_castable`): a model larger than the free VRAM is loaded
    partially and the rest streamed layer by layer, by ComfyUI's own manager (never a second one). Its buffers (RoPE
    tables, which partial loading does not move) follow the compute device on every load.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.patcher = None
        mm = _comfy("comfy.model_management")
        if mm is not None:
            from comfy.model_patcher import ModelPatcher

            make_castable(module)
            # A container: ModelPatcher sets `.device` on its model, which transformers models make read-only.
            self.patcher = ModelPatcher(nn.ModuleDict({"model": module}), mm.get_torch_device(), offload_device())
            self.patcher.add_callback(patcher_extension().CallbacksMP.ON_LOAD, _buffers_to)


class Loaded:
    """What a loader node hands on (the planner, the SANA adapter, a MetaCanvas): the model and its parts by role
    ("mllm", "transformer", "vae", "text_encoder"...), each a `Part` of its own, so a node loads only the parts it
    runs and one part can be offloaded while another runs."""

    def __init__(self, model: Any, parts: dict[str, nn.Module]) -> None:
        self.model = model
        self._parts = {name: Part(module) for name, module in parts.items()}

    def parts(self, *names: str) -> list[Part]:
        """These parts (every part when none is named); names of parts this model lacks are skipped."""
        return [self._parts[n] for n in names or self._parts if n in self._parts]

    def on(self, device: torch.device) -> Any:
        """The model, told where its computation runs (its weights may be streamed there)."""
        if not isinstance(self.model, nn.Module):
            self.model.device = device
        return self.model

    def ready(self, *names: str) -> Any:
        """The model with these parts (all when none is named) loaded, as far as they fit."""
        return self.on(load(*self.parts(*names)))


def patcher_extension():
    """comfy.patcher_extension (its presence is checked at start-up: compat.py)."""
    return importlib.import_module("comfy.patcher_extension")


def _buffers_to(patcher, device_to, *_args) -> None:
    """ON_LOAD: every buffer on the device the model was loaded to (partial loading moves only weights)."""
    if device_to is None:
        return
    for module in patcher.model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device_to)


def load(*parts: Part) -> torch.device:
    """Load these parts together, as far as they fit (ComfyUI's partial loading streams the rest); returns the
    device the computation runs on."""
    mm = _comfy("comfy.model_management")
    if mm is None:
        for part in parts:
            part.module.to(torch_device())
        return torch_device()
    mm.load_models_gpu([part.patcher for part in parts])
    return mm.get_torch_device()


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
