"""Model files checked before use: names that stay inside their model folders, and safetensors files that are
what a loader expects, with errors that name the file and say what to do.

A loader never hands a damaged or wrong file to a library (which would answer "Error while deserializing
header" or a shape mismatch deep inside a model); it opens the header here first (`SafetensorsFile`), and
`describe` names what a file holds when it is not what was asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from safetensors import SafetensorError, safe_open

from .errors import MetaCanvasInputError


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name` for a model name that stays inside `root`; a refusal for absolute names or `..` that climb out.

    The check is on the name, not on where it resolves: an entry inside the folder may be a symlink to
    elsewhere (ComfyUI allows that too), but the name itself cannot leave the folder.
    """
    normal = os.path.normpath(name)
    if (
        PurePath(name).is_absolute()
        or os.path.splitdrive(name)[0]
        or normal == ".."
        or normal.startswith(".." + os.sep)
    ):
        raise MetaCanvasInputError(
            f"{what} '{name}' is not a name inside a model folder: pick one from the list (a path relative to "
            f"{root}); absolute paths and '..' are not accepted."
        )
    return root / normal


@dataclass
class SafetensorsFile:
    """The header of a safetensors file: tensor names, dtypes and shapes, and its metadata. No tensor is read."""

    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, what: str) -> SafetensorsFile:
        """Read the header of `path`, or refuse naming the file: missing, not safetensors, truncated."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise MetaCanvasInputError(f"{what} '{path.name}': only .safetensors files are read (never pickles).")
        if not path.is_file():
            raise MetaCanvasInputError(f"{what} '{path}' does not exist (or is not a file).")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                slices = {k: f.get_slice(k) for k in f.keys()}
                shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                dtypes = {k: s.get_dtype() for k, s in slices.items()}
        except (SafetensorError, OSError, ValueError) as e:
            raise MetaCanvasInputError(
                f"{what} '{path}' is not a readable .safetensors file ({e}): it is truncated (an interrupted "
                "download or copy) or in another format renamed to .safetensors. Download or copy it again."
            ) from None
        return cls(path, metadata, shapes, dtypes)

    def has(self, *keys: str) -> bool:
        return all(k in self.shapes for k in keys)

    def describe(self) -> str:
        """What the file holds, in words, for error messages."""
        return describe(self.metadata, self.shapes)


# Markers of what a safetensors file holds: (description, keys that are all present, keys that are all absent).
# The keys are those of the files users have: ComfyUI single files (Comfy-Org repackaged), diffusers and
# transformers folders' shards.
_KINDS = [
    (
        "a Qwen2.5-VL MLLM (ComfyUI single file)",
        ("model.layers.0.self_attn.k_proj.bias", "visual.patch_embed.proj.weight"),
        (),
    ),
    (
        "a Qwen2.5 text model without a vision tower",
        ("model.layers.0.self_attn.k_proj.bias",),
        ("visual.patch_embed.proj.weight",),
    ),
    ("a Qwen3 text encoder", ("model.layers.0.self_attn.q_norm.weight",), ()),
    ("a Qwen-Image DiT", ("transformer_blocks.0.img_mod.1.weight", "txt_norm.weight"), ()),
    ("a Wan DiT", ("head.modulation", "patch_embedding.weight"), ()),
    ("a FLUX DiT", ("double_blocks.0.img_attn.norm.key_norm.scale",), ()),
    ("a FLUX DiT (diffusers layout)", ("x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"), ()),
    ("a Wan VAE", ("decoder.middle.0.residual.0.gamma",), ()),
    ("a FLUX/SD VAE", ("decoder.conv_in.weight",), ("decoder.middle.0.residual.0.gamma",)),
    ("a T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.k.weight",), ()),
    ("a CLIP text encoder", ("text_model.encoder.layers.0.mlp.fc1.weight",), ()),
]


def describe(metadata: dict[str, str], shapes: dict) -> str:
    """What a safetensors file holds: a MetaCanvas checkpoint, a known model, or an unknown set of tensors."""
    if metadata.get("format") == "metacanvas":
        backbone = json.loads(metadata["backbone"]) if "backbone" in metadata else "unknown"
        return f"a MetaCanvas checkpoint for the {backbone} backbone"
    for words, present, absent in _KINDS:
        if all(k in shapes for k in present) and not any(k in shapes for k in absent):
            return words
    return f"{len(shapes)} tensors of no model MetaCanvas knows"
