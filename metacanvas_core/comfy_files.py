"""Trained DiTs as ComfyUI single files: the layout ComfyUI's core Load Diffusion Model (UNETLoader, files in
`models/diffusion_models/`) reads, made from a diffusers transformer's state dict. Inside ComfyUI, Wan2.2-TI2V-5B and
FLUX.1-Kontext run only as ComfyUI's native MODEL with MetaCanvas Apply's patch, so a training run that trains their
DiT hands it over in this form too (`training/export.py`).

- Wan2.2-TI2V-5B (diffusers `WanTransformer3DModel`): the original Wan names (Comfy-Org's files, ComfyUI's `WanModel`):
  diffusers' own conversion (`convert_wan_transformer_to_diffusers`) read backwards. ComfyUI detects a Wan DiT only
  under these names.
- FLUX.1-Kontext (diffusers `FluxTransformer2DModel`): the diffusers layout as it is. ComfyUI's loader converts it
  itself: `comfy.sd.load_diffusion_model_state_dict` finds no model under diffusers names, then
  `comfy.model_detection.convert_diffusers_mmdit` (its `'x_embedder.weight' in state_dict` branch, FLUX) maps the
  keys to BFL's layout with `comfy.utils.flux_to_diffusers` (fused qkv, swapped final scale/shift) and detects Flux
  with guidance from them; so on ComfyUI 0.3.64 and 0.33.0, the releases the tests run. Converting here would
  repeat ComfyUI's own converter.
- SANA: none (ComfyUI has no SANA model; the pack's Backbone Loader reads its diffusers folder).

No ComfyUI import here: tests/test_comfyui_native.py loads the files with real ComfyUI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .specs import FLUX_KONTEXT, WAN

# diffusers' Wan transformer names -> the original (ComfyUI's, Comfy-Org's files) names: diffusers' own conversion
# (`convert_wan_transformer_to_diffusers`) read backwards. norm2/norm3 swap places (cross-attention's norm).
_WAN_ORIGINAL_NAMES = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm__swap."),
    (".norm3.", ".norm2."),
    (".norm__swap.", ".norm3."),
]

# What ComfyUI calls each backbone's DiT (Comfy-Org's file names): the middle of an exported file's name.
SINGLE_FILE_BASES = {WAN: "wan2.2_ti2v_5B", FLUX_KONTEXT: "flux1-dev-kontext"}
_LAYOUTS = {WAN: "original Wan names (Comfy-Org's files)", FLUX_KONTEXT: "diffusers (ComfyUI converts it on load)"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def wan_original_state(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel's weights under the original names ComfyUI's single files use."""
    out = {}
    for key, value in diffusers_state.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("proj_out."):
            key = "head.head." + key[len("proj_out.") :]
        else:
            for old, new in _WAN_ORIGINAL_NAMES:
                key = key.replace(old, new)
            key = key.replace(".scale_shift_table", ".modulation")
        out[key] = value
    return out


def comfyui_state(kind: str, diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers transformer's weights in the single-file layout ComfyUI's core loader reads (module docstring)."""
    if kind == WAN:
        return wan_original_state(diffusers_state)
    if kind == FLUX_KONTEXT:
        return dict(diffusers_state)
    raise ValueError(f"no ComfyUI single file for the {kind} backbone (ComfyUI has no such model)")


def single_file_name(run: str, kind: str, dtype: torch.dtype) -> str:
    """`<run>_<ComfyUI's name of the DiT>_<dtype>.safetensors`: which run, which model, which precision."""
    return f"{run}_{SINGLE_FILE_BASES[kind]}_{_DTYPE_NAMES.get(dtype, str(dtype).removeprefix('torch.'))}.safetensors"


def write_single_file(
    kind: str, diffusers_state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write the DiT of `kind` as a ComfyUI single file (safetensors, the weights' own dtype) at `path`, whole or not
    at all: written under a hidden temporary name in the same folder, then renamed. The metadata says what it is."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in comfyui_state(kind, diffusers_state).items()}
    meta = {
        "metacanvas.content": f"a DiT trained with MetaCanvas ({kind} backbone), in ComfyUI's single-file layout",
        "metacanvas.backbone": kind,
        "metacanvas.layout": _LAYOUTS[kind],
        "metacanvas.load_with": "ComfyUI core Load Diffusion Model (models/diffusion_models/), then MetaCanvas Apply",
        **(metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        save_file(state, str(temporary), metadata=meta)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def config_metadata(config) -> str:
    """A diffusers model config as JSON (what a reader needs to rebuild the diffusers model)."""
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list)
