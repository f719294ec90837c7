"""Backbone adapters, chosen by the `_class_name` in a diffusers folder's model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MetaCanvasInputError
from ..files import SafetensorsFile
from .base import SCHEDULERS, Backbone, Branch
from .flux import FluxKontextBackbone
from .sana import SanaBackbone
from .wan import WanBackbone

BACKBONES: dict[str, type[Backbone]] = {cls.kind: cls for cls in (SanaBackbone, FluxKontextBackbone, WanBackbone)}


def pipeline_class_name(folder: str | Path) -> str | None:
    """The `_class_name` in a diffusers folder's model_index.json; None when the folder has no readable one."""
    try:
        name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def backbone_class_for(folder: str | Path) -> type[Backbone]:
    """The adapter for a diffusers folder, with an error naming the folder when none fits."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise MetaCanvasInputError(
            f"'{folder}' has no model_index.json: the Backbone Loader needs a diffusers-format pipeline folder "
            "(e.g. Sana_1600M_512px_diffusers or FLUX.1-Kontext-dev)."
        )
    name = pipeline_class_name(folder)
    for cls in BACKBONES.values():
        if name in cls.pipeline_class_names:
            return cls
    known = ", ".join(n for cls in BACKBONES.values() for n in cls.pipeline_class_names)
    raise MetaCanvasInputError(f"'{folder}' is a '{name}' folder; MetaCanvas backbones are: {known}.")


def load_backbone(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    text_encoder: bool = True,
) -> Backbone:
    """Load a backbone; `text_encoder`: also its native text encoder(s) when the folder has them.

    Every weight file of the folder is checked first, so a damaged one is named instead of failing deep inside
    diffusers or transformers.
    """
    cls = backbone_class_for(folder)
    for part in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for weights in sorted(part.glob("*.safetensors")):
            SafetensorsFile.open(weights, f"{part.name} weights")
    return cls.from_folder(Path(folder), dtype, device, text_encoder)


__all__ = [
    "BACKBONES",
    "SCHEDULERS",
    "Backbone",
    "Branch",
    "backbone_class_for",
    "pipeline_class_name",
    "load_backbone",
]
