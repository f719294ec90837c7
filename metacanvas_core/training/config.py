"""Training recipes: JSON files (see metacanvas_core/recipes/), read into a validated `TrainConfig`.

Model paths may use environment variables ($METACANVAS_MODELS, default `models`; $METACANVAS_DATA,
default `data`) and are relative to the working directory; `tiny:mllm`, `tiny:sana`,
`tiny:flux_kontext` name the tiny random models, which the trainer writes itself.
Keys starting with `_` (comments, the paper's numbers) are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import get_args, get_origin, get_type_hints

from ..errors import MetaCanvasInputError
from ..planner import CANVAS_LORA_SETTINGS

# Named trainable parts; "dit:<regex>" selects DiT parameters by name (re.search).
PARTS = (
    "canvas",  # canvas embeddings and start marker
    "canvas_connector",
    "context_connector",  # MLLM → text-slot MLP (MLLM-context backbones)
    "condition_embedding",  # Wan: the zero-initialised input channels for source video / reference frames
    "mllm_lora",  # canvas-only (activated) LoRA on the MLLM; needs `mllm_lora` settings
    "dit",  # every DiT parameter
    "dit_cross_attention",
    "dit_image_stream",  # FLUX "vision branch": the image stream of the double-stream blocks
    "dit_lora",  # a LoRA on the DiT; needs `dit_lora` settings
)
DIT_PATTERNS = {
    "dit": r".",
    "dit_cross_attention": r"(^|\.)(attn2|norm2)\.",  # SANA / Wan cross-attention (+ its norm where affine)
    # FLUX double-stream blocks: everything not of the text stream (*_context, attn.add_*, norm_added_*, to_add_out).
    "dit_image_stream": r"^transformer_blocks\.\d+\.(?!.*(context|\.add_|_added_|to_add_out))",
}
CANVAS_PARTS = ("canvas", "canvas_connector", "mllm_lora")
SOURCE_KINDS = ("manifest", "synthetic", "webdataset")


@dataclass
class TrainConfig:
    name: str
    mllm: str
    backbone: str
    trainable: list[str]
    lr: float
    max_steps: int
    batch_size: int
    buckets: list[list[int]]  # (height, width) pairs
    data: list[dict]
    init_checkpoint: str | None = None  # a MetaCanvas file to start from (e.g. the previous stage's)
    init_from: dict | None = None  # module → weights file in another project's layout (`init.py`)
    context_source: str | None = None  # new checkpoints: "native" or "mllm" (default: mllm when the context MLP trains)
    use_canvas: bool | None = None  # default: when a canvas part is trained or an init checkpoint is given
    mllm_lora: dict | None = None  # LoraConfig kwargs: r, lora_alpha, lora_dropout, target_modules
    dit_lora: dict | None = None
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cond_dropout: float = 0.1
    timestep_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # σ → shift·σ / (1 + (shift − 1)·σ), as the backbone's scheduler shifts
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: a resumable state only at the end
    keep_checkpoints: int = 2
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, none on CPU), "bf16", "no"
    sharding: str = "ddp"  # "ddp" (replicas) or "fsdp" (FSDP2: trained modules sharded over the processes)
    grad_accum: int = 1  # micro-batches per optimizer step and process (global batch: batch_size × processes × this)
    gradient_checkpointing: bool = False
    frozen_dtype: str = "fp32"  # dtype of models that are not trained at all ("bf16" for the real ones)
    latent_cache: str | None = None  # folder for VAE latents (relative: in the output folder); built at the start
    text_cache_size: int = 1024  # prompts whose frozen text-encoder states are kept in memory
    skip_bad_records: bool = False
    frames: int = 1  # frames per video sample (4k+1 for Wan); image samples are one frame
    eval_samples: int = 4  # records of a fixed evaluation loss logged at start and end (0: none)
    codec: str = "vae"  # "vae" (the backbone's) or "pixels" (an exact pixel codec, for the tiny random models)
    samples: int = 0  # images sampled at the end beside their targets (samples.png; image backbones)

    @property
    def canvas_on(self) -> bool:
        if self.use_canvas is not None:
            return self.use_canvas
        return any(p in self.trainable for p in CANVAS_PARTS) or self.init_checkpoint is not None

    def validate(self) -> None:
        def bad(msg: str) -> MetaCanvasInputError:
            return MetaCanvasInputError(f"recipe '{self.name}': {msg}")

        for f in fields(self):
            value, kinds = getattr(self, f.name), _kinds(HINTS[f.name])
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise bad(f"{f.name} must be {names}, not {value!r}")
        if any(not isinstance(p, str) for p in self.trainable) or len(self.betas) != 2:
            raise bad("trainable is a list of part names and betas a pair of numbers")
        for part in self.trainable:
            if part not in PARTS and not part.startswith("dit:"):
                raise bad(f"unknown trainable part {part!r}; one of {', '.join(PARTS)} or 'dit:<regex>'")
        for part, settings in (("mllm_lora", self.mllm_lora), ("dit_lora", self.dit_lora)):
            if part in self.trainable and not settings:
                raise bad(f"'{part}' is trained but the recipe has no '{part}' settings (r, lora_alpha, ...)")
        unknown = sorted(set(self.mllm_lora or {}) - set(CANVAS_LORA_SETTINGS))
        if unknown:  # inference applies the canvas LoRA without peft, with these settings only
            raise bad(f"mllm_lora sets {unknown}; a canvas LoRA takes {', '.join(CANVAS_LORA_SETTINGS)}")
        if not self.trainable:
            raise bad("nothing is trainable")
        for key in ("max_steps", "batch_size", "grad_accum", "frames", "log_every"):
            if getattr(self, key) < 1:
                raise bad(f"{key} must be at least 1")
        for key in (
            "eval_samples",
            "samples",
            "save_every",
            "warmup_steps",
            "warmup_start_lr",
            "weight_decay",
            "grad_clip",
        ):
            if getattr(self, key) < 0:
                raise bad(f"{key} must not be negative")
        if self.lr <= 0:
            raise bad("lr must be positive")
        if not self.buckets or not all(_pair(b) for b in self.buckets):
            raise bad("buckets must be a list of [height, width] pairs")
        if not self.data:
            raise bad("no data sources")
        for i, src in enumerate(self.data):
            if not isinstance(src, dict) or sum(k in src for k in SOURCE_KINDS) != 1:
                raise bad(f"data[{i}] needs exactly one of {', '.join(repr(k) for k in SOURCE_KINDS)}")
            weight = src.get("weight", 1.0)
            if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
                raise bad(f"data[{i}]: weight must be positive")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise bad("timestep_sampling is 'logit_normal' or 'uniform'")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise bad("mixed_precision is 'auto', 'bf16' or 'no'")
        if self.frozen_dtype not in ("fp32", "bf16"):
            raise bad("frozen_dtype is 'fp32' or 'bf16'")
        if self.codec not in ("vae", "pixels"):
            raise bad("codec is 'vae' or 'pixels'")
        if self.sharding not in ("ddp", "fsdp"):
            raise bad("sharding is 'ddp' or 'fsdp'")


HINTS = get_type_hints(TrainConfig)


def _pair(b) -> bool:
    return isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)


def _kinds(hint) -> tuple[type, ...]:
    """The runtime types a field's annotation allows (a float field takes an int too)."""
    kinds = tuple(get_origin(h) or h for h in (get_args(hint) if get_origin(hint) is UnionType else (hint,)))
    return kinds + ((int,) if float in kinds else ())


def _coerce(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe; `overrides` are `key=value` strings (value parsed as JSON when it is JSON)."""
    path = Path(path)
    if not path.is_file():
        raise MetaCanvasInputError(f"recipe '{path}' does not exist.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetaCanvasInputError(f"recipe '{path}' is not valid JSON: {e}") from None
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MetaCanvasInputError(f"override '{item}' is not key=value")
        raw[key.strip()] = _coerce(value)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MetaCanvasInputError(f"recipe '{path}': unknown keys {unknown}")
    try:
        config = TrainConfig(**raw)
    except TypeError as e:
        raise MetaCanvasInputError(f"recipe '{path}': {e}") from None
    config.validate()
    return config


def resolve_path(value: str) -> Path:
    for key, default in (("METACANVAS_MODELS", "models"), ("METACANVAS_DATA", "data")):
        value = value.replace("${" + key + "}", os.environ.get(key, default)).replace(
            "$" + key, os.environ.get(key, default)
        )
    return Path(os.path.expanduser(os.path.expandvars(value)))
