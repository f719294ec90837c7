"""The vocabulary every layer shares: image roles, context sources, weight dtypes, and the visual inputs of a
request.

Low level on purpose (no torch, no model code): the planner, the backbones, the trainer and the nodes
all speak it, so none of them has to import another to know what "first frame" or "mllm" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from PIL import Image


class _Choice(str, Enum):
    """A string choice: compares, prints and serialises as its value (a widget value, a header field)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [c.value for c in cls]


class ImageRole(_Choice):
    """What the input images are to a video backbone (image backbones only show them to the MLLM)."""

    REFERENCES = "references"  # reference-images-to-video: clean frames the video draws from
    FIRST_FRAME = "first frame"  # image-to-video: the image is exactly the first frame


class ContextSource(_Choice):
    """Where a backbone's text slot is filled from."""

    # The backbone's own text encoder (Gemma-2, umT5, T5 + CLIP); "native" in checkpoints and the Connector Loader's
    # widget, where saved files and workflows keep it.
    TEXT_ENCODER = "native"
    MLLM = "mllm"  # the MLLM's prompt states through the context connector (the paper's Wan/FLUX path)


class WeightDtype(_Choice):
    """How the planner's Linear weights are kept in memory (ComfyUI's `weight_dtype` choice of its core loaders)."""

    DEFAULT = "default"  # as stored: a bf16 file stays bf16 (in the compute dtype), a scaled fp8 file stays fp8
    FP8_E4M3FN = "fp8_e4m3fn"  # kept in fp8 (scale 1), computed in the compute dtype: half the memory of bf16
    FP8_E5M2 = "fp8_e5m2"


@dataclass(frozen=True)
class VisualInputs:
    """What a request shows besides its prompt: input images (with their role) and a source video's frames."""

    images: tuple[Image.Image, ...] = ()
    video: tuple[Image.Image, ...] = field(default=(), repr=False)
    role: ImageRole = ImageRole.REFERENCES

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "video", tuple(self.video))
        object.__setattr__(self, "role", ImageRole(self.role))

    def __bool__(self) -> bool:
        return bool(self.images or self.video)


NO_INPUTS = VisualInputs()  # a text-only request
