"""The MetaCanvas checkpoint: everything MetaCanvas adds to an MLLM + backbone, in one .safetensors file.

Tensors: `canvas.*` (canvas embeddings and start marker), `canvas_connector.*`,
`context_connector.*` (MLLM-context backbones only), `lora.*` (optional canvas LoRA, peft key names).
Header metadata (strings): format, format_version, backbone, mllm_hidden_size, dit_width, text_dim,
canvas_grid [K, H, W], canvas_factor, context_source, and the JSON configs of the modules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .backbones import Backbone
from .canvas import CanvasEmbedding, CanvasGrid, canvas_grid_for
from .connectors import CanvasConnector, ConditionEmbedding, ContextConnector
from .errors import MetaCanvasInputError
from .planner import CanvasLora, Planner

FORMAT = "metacanvas"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint was made for; compared against the loaded MLLM and backbone."""

    backbone: str
    mllm_hidden_size: int
    dit_width: int
    pixel_stride: int  # pixels per DiT token of the backbone (sizes the canvas for an output size)
    text_dim: int
    canvas_grid: tuple[int, int, int]
    canvas_factor: int
    context_source: str  # "native" or "mllm"
    canvas_connector: dict  # CanvasConnector config
    context_connector: dict | None  # ContextConnector config
    lora: dict | None  # LoraConfig kwargs of the canvas LoRA
    condition_embedding: dict | None = None  # ConditionEmbedding config (Wan: source video + masks)

    def to_metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        meta.update({k: json.dumps(v) for k, v in asdict(self).items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: str) -> CheckpointInfo:
        if meta.get("format") != FORMAT:
            raise MetaCanvasInputError(f"'{path}' is not a MetaCanvas checkpoint (no 'format: metacanvas' header).")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise MetaCanvasInputError(
                f"'{path}' has checkpoint format {meta['format_version']}; this MetaCanvas reads up to "
                f"{FORMAT_VERSION}: update the MetaCanvas nodes."
            )
        fields = cls.__dataclass_fields__
        missing = [k for k, f in fields.items() if k not in meta and f.default is dataclasses.MISSING]
        if missing:
            raise MetaCanvasInputError(f"'{path}' lacks the header fields {missing}; the file is damaged.")
        values = {k: json.loads(meta[k]) for k in fields if k in meta}
        values["canvas_grid"] = tuple(values["canvas_grid"])
        return cls(**values)


class MetaCanvas(nn.Module):
    """Canvas embeddings + connectors (+ canvas LoRA) for one MLLM + backbone pair."""

    def __init__(self, info: CheckpointInfo, name: str = "new (untrained)") -> None:
        super().__init__()
        self.info = info
        self.name = name
        self.canvas = CanvasEmbedding(info.mllm_hidden_size, CanvasGrid(*info.canvas_grid))
        self.canvas_connector = CanvasConnector(**info.canvas_connector)
        self.context_connector = ContextConnector(**info.context_connector) if info.context_connector else None
        self.condition_embedding = ConditionEmbedding(**info.condition_embedding) if info.condition_embedding else None
        self.lora: CanvasLora | None = None

    def canvas_grid(self, height: int, width: int, keyframes: int | None = None) -> CanvasGrid:
        """The canvas for an output of height × width: the token grid divided by the canvas factor,
        with `keyframes` (default: the checkpoint's) for video."""
        s = self.info.pixel_stride
        if height % s or width % s or height <= 0 or width <= 0:
            raise MetaCanvasInputError(
                f"{width}×{height} is not a multiple of {s}, the pixel stride of the {self.info.backbone} backbone "
                f"this checkpoint is for: use {max(s, width // s * s)}×{max(s, height // s * s)}."
            )
        return canvas_grid_for(
            (1, height // s, width // s), self.info.canvas_factor, keyframes or self.info.canvas_grid[0]
        )

    def check_compatible(self, planner: Planner, backbone: Backbone) -> None:
        """Refuse an MLLM or backbone this checkpoint was not made for, naming both sides."""
        i = self.info
        if (i.backbone, i.dit_width, i.pixel_stride) != (backbone.kind, backbone.width, backbone.pixel_stride):
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made for a {i.backbone} backbone of width {i.dit_width} "
                f"(pixel stride {i.pixel_stride}), but the loaded backbone '{backbone.folder}' is {backbone.kind} "
                f"of width {backbone.width} (pixel stride {backbone.pixel_stride}). "
                "Load the checkpoint trained for this backbone, or choose 'new (untrained)'."
            )
        if i.mllm_hidden_size != planner.hidden_size:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made for an MLLM of hidden size {i.mllm_hidden_size}, "
                f"but the loaded MLLM '{planner.folder}' has hidden size {planner.hidden_size}. Load the MLLM it "
                "was trained with (3584 = Qwen2.5-VL-7B, 2048 = Qwen2.5-VL-3B), or choose 'new (untrained)'."
            )
        if i.text_dim != backbone.text_dim:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' expects a text slot of width {i.text_dim}, but backbone "
                f"'{backbone.folder}' has {backbone.text_dim}."
            )
        if i.context_source == "native" and not backbone.has_text_encoder:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was made with the backbone's native text encoder as context, "
                f"but backbone '{backbone.folder}' was loaded without it: turn load_text_encoder on in the Backbone "
                "Loader (the folder must hold it)."
            )

    def check_context_source(self, wanted: str) -> None:
        """Refuse a checkpoint whose context source is not the one asked for, naming both."""
        if wanted != self.info.context_source:
            raise MetaCanvasInputError(
                f"MetaCanvas checkpoint '{self.name}' was trained with '{self.info.context_source}' context, not "
                f"'{wanted}': set context to 'auto' or '{self.info.context_source}', or load a checkpoint trained "
                f"with '{wanted}' context."
            )


CONTEXT_SOURCES = ("native", "mllm")


def new_metacanvas(planner: Planner, backbone: Backbone, context_source: str | None = None) -> MetaCanvas:
    """A fresh MetaCanvas, seeded: zero-initialised canvas projections, so until trained the canvas changes nothing.

    `context_source`: "native" (the backbone's own text encoder: with the canvas untrained, exactly the plain
    backbone) or "mllm" (a context connector, which needs training first). Default: native when the
    backbone's text encoder is loaded, else mllm.
    """
    if context_source is None:
        context_source = "native" if backbone.has_text_encoder else "mllm"
    if context_source not in CONTEXT_SOURCES:
        raise MetaCanvasInputError(f"context source '{context_source}' is not one of {CONTEXT_SOURCES}.")
    heads, head_dim = backbone.attention_heads
    token_grid = backbone.token_grid(*backbone.default_size)
    grid = canvas_grid_for(token_grid, backbone.canvas_factor, backbone.keyframes)
    context = None
    if context_source == "mllm":
        context = {
            "mllm_dim": planner.hidden_size,
            "hidden_dim": backbone.context_hidden_dim(planner.hidden_size),
            "text_dim": backbone.text_dim,
            "dropout": backbone.context_dropout,
        }
    info = CheckpointInfo(
        backbone=backbone.kind,
        mllm_hidden_size=planner.hidden_size,
        dit_width=backbone.width,
        pixel_stride=backbone.pixel_stride,
        text_dim=backbone.text_dim,
        canvas_grid=(grid.frames, grid.height, grid.width),
        canvas_factor=backbone.canvas_factor,
        context_source=context_source,
        canvas_connector={
            "mllm_dim": planner.hidden_size,
            "dit_dim": backbone.width,
            "num_heads": heads,
            "head_dim": head_dim,
        },
        context_connector=context,
        lora=None,
        condition_embedding=(
            {"in_channels": backbone.condition_channels, "width": backbone.width, "patch_size": backbone.patch_size}
            if backbone.condition_channels
            else None
        ),
    )
    # Seeded, without touching the caller's RNG: 'new (untrained)' is the same checkpoint on every load, so a
    # graph gives the same image each run (the random parts are the canvas tokens and the context connector).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mc = MetaCanvas(info)
    return mc.to(backbone.device)


def save_metacanvas(mc: MetaCanvas, path: str | Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in mc.state_dict().items()}
    if mc.lora is not None:
        tensors.update({f"lora.{k}": v.detach().contiguous().cpu() for k, v in mc.lora.state_dict.items()})
    save_file(tensors, str(path), metadata=mc.info.to_metadata())


def load_metacanvas(path: str | Path, device: str | torch.device = "cpu") -> MetaCanvas:
    """Load a checkpoint file; shapes are checked against its own header, names in errors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MetaCanvasInputError(f"'{path.name}': MetaCanvas loads only .safetensors checkpoints.")
    if not path.is_file():
        raise MetaCanvasInputError(f"MetaCanvas checkpoint '{path}' does not exist.")
    with safe_open(str(path), framework="pt") as f:
        info = CheckpointInfo.from_metadata(f.metadata() or {}, str(path))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mc = MetaCanvas(info, name=path.name)
    lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    try:
        mc.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetaCanvasInputError(f"'{path.name}' does not match its own header ({e}); the file is damaged.") from e
    if info.lora:
        mc.lora = CanvasLora(name=path.stem, config=info.lora, state_dict=lora)
    return mc.to(device)
