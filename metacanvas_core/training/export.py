"""Export: what a training run hands to users — a MetaCanvas checkpoint, and the trained DiT as a pipeline folder
(the trainer's own input: resuming, the next stage, the CLI) and, for Wan2.2 and FLUX.1-Kontext, as the single file
ComfyUI's core Load Diffusion Model reads (inside ComfyUI these run only as its native MODEL + MetaCanvas Apply).

All are written from full (gathered) state dicts, so they are the same whether the run was sharded or not.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_metacanvas
from ..comfy_files import SINGLE_FILE_BASES, config_metadata, single_file_name, write_single_file
from ..metacanvas import MetaCanvas, MetaCanvasConfig
from ..planner import CanvasLora


def lora_merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-wrapped model's state with its LoRA merged into the base weights (plain module names)."""
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key, a in state.items():
        m = re.match(r"(.*)\.lora_A\.([^.]+)\.weight$", key)
        if m:
            b = state[f"{m.group(1)}.lora_B.{m.group(2)}.weight"]
            w = out[f"{m.group(1)}.weight"]
            out[f"{m.group(1)}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def export_metacanvas(
    state: dict[str, torch.Tensor], config: MetaCanvasConfig, lora: CanvasLora | None, path: Path
) -> None:
    """The MetaCanvas checkpoint from its module state and the canvas LoRA (trained or as loaded)."""
    mc = MetaCanvas(config, name=path.name)
    mc.load_state_dict(state)
    save_metacanvas(mc.with_lora(lora), path)


def export_backbone(
    state: dict[str, torch.Tensor],
    transformer: nn.Module,
    source: Path,
    folder: Path,
    lora_scale: float | None,
    kind: str | None = None,
    run: str | None = None,
    single_file_dtype: torch.dtype | None = None,
) -> Path | None:
    """A diffusers pipeline folder: the trained transformer (its DiT LoRA merged), the other parts linked to `source`.

    For a `kind` ComfyUI runs natively (Wan2.2, FLUX.1-Kontext) also the same weights as a ComfyUI single file,
    `<folder's parent>/diffusion_models/<run>_<model>_<dtype>.safetensors` (`comfy_files`), in `single_file_dtype`
    (None: the trained dtype); returns its path (None for SANA, which ComfyUI has no model for: the Backbone Loader
    reads the folder)."""
    if lora_scale is not None:
        state = lora_merged_state(state, lora_scale)
    fresh = type(transformer).from_config(transformer.config)
    fresh.load_state_dict(state)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    fresh.save_pretrained(folder / "transformer", safe_serialization=True)
    for entry in source.iterdir():
        if entry.name != "transformer":
            target = folder / entry.name
            if entry.is_file():
                shutil.copy2(entry, target)  # model_index.json and other small files
            else:
                target.symlink_to(entry.resolve(), target_is_directory=True)
    if kind not in SINGLE_FILE_BASES:
        return None
    weights = fresh.state_dict()
    if single_file_dtype is not None:
        weights = {k: v.to(single_file_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    dtype = next(iter(weights.values())).dtype
    path = folder.parent / "diffusion_models" / single_file_name(run or folder.parent.name, kind, dtype)
    metadata = {
        "metacanvas.run": run or "",
        "metacanvas.source": source.name,
        "metacanvas.dit_lora": "merged" if lora_scale is not None else "none",
        "metacanvas.diffusers_class": type(fresh).__name__,
        "metacanvas.diffusers_config": config_metadata(fresh.config),
    }
    return write_single_file(kind, weights, path, metadata)
