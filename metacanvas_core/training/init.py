"""Start MetaCanvas modules from another project's trained weights (`init_from` in a recipe).

`context_connector` <- UniWorld-V1's `denoise_projector` (the paper's editing setup initialises the FLUX-Kontext
context MLP from it). UniWorld's module is `Sequential(Linear(3584, 3·4096), SiLU, Linear(3·4096, 4096))`
(univa/models/modeling_univa_denoise_tower.py), so its keys are `denoise_projector.{0,2}.{weight,bias}` under
whatever prefix the file has (`denoise_tower.` in a whole UniWorld model shard); ours names the two Linears
`net.0` and `net.3` (SiLU and Dropout between them).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import MetaCanvasInputError
from ..metacanvas import MetaCanvas

UNIWORLD_LAYERS = {"0": "net.0", "2": "net.3"}  # UniWorld's denoise_projector index -> ContextConnector name


def uniworld_projector(path: Path) -> dict[str, torch.Tensor]:
    """The denoise_projector of a UniWorld-V1 safetensors file, renamed to ContextConnector keys."""
    if not path.is_file():
        raise MetaCanvasInputError(f"init_from: '{path}' does not exist.")
    pattern = re.compile(r"^(.*?)denoise_projector\.([02])\.(weight|bias)$")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys() if pattern.match(key)}
    except SafetensorError as e:
        raise MetaCanvasInputError(f"init_from: '{path}' is not a safetensors file ({e}).") from None
    matches = {pattern.match(key): value for key, value in tensors.items()}
    prefixes = {m.group(1) for m in matches}
    if len(prefixes) != 1:
        what = "no denoise_projector.0/.2 weights" if not prefixes else f"several denoise_projectors {sorted(prefixes)}"
        raise MetaCanvasInputError(
            f"init_from: '{path}' has {what}; expected UniWorld-V1's keys such as "
            "'denoise_projector.0.weight' and 'denoise_projector.2.weight'."
        )
    return {f"{UNIWORLD_LAYERS[m.group(2)]}.{m.group(3)}": value for m, value in matches.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Copy `state` into `module`, every key and shape checked, with an error naming the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise MetaCanvasInputError(f"init_from: '{path}' lacks {missing} for the {what}.")
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            want = tuple(own[key].shape) if key in own else "no such weight"
            raise MetaCanvasInputError(
                f"init_from: '{path}': {key} has shape {tuple(value.shape)}, the {what} needs {want} "
                "(made for another MLLM or backbone width?)."
            )
    module.load_state_dict(state)


def init_modules(mc: MetaCanvas, files: dict[str, Path]) -> None:
    """Load `files` (module name -> file) into the MetaCanvas; only `context_connector` has a known source."""
    for name, path in files.items():
        if name != "context_connector":
            raise MetaCanvasInputError(f"init_from: no known source for {name!r} (only 'context_connector').")
        if mc.context_connector is None:
            raise MetaCanvasInputError(
                "init_from: this MetaCanvas has no context connector (context_source is native); "
                "set context_source 'mllm' or train 'context_connector'."
            )
        load_into(mc.context_connector, uniworld_projector(path), path, "context connector")
