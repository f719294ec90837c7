"""Training recipes: JSON files (see metacanvas_core/recipes/), read into a validated `TrainConfig`.

Model paths may use environment variables ($METACANVAS_MODELS, default `models`; $METACANVAS_DATA,
default `data`) and are relative to the working directory; `tiny:mllm`, `tiny:sana`,
`tiny:flux_kontext` name the tiny random models, which the trainer writes itself.
Keys starting with `_` (comments, the paper's numbers) are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import get_args, get_origin, get_type_hints

import torch

from ..errors import MetaCanvasInputError
from ..planner import CANVAS_LORA_SETTINGS

# Named trainable parts; "dit:<regex>" selects DiT parameters by name (re.search).
PARTS = (
    "canvas",  # canvas embeddings and start marker
    "canvas_connector",
    "context_connector",  # MLLM -> text-slot MLP (MLLM-context backbones)
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
SINGLE_FILE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    init_from: dict | None = None  # module -> weights file in another project's layout (`init.py`)
    # module -> the weights the paper starts it from (and keeps frozen). A run whose init_from (or init_checkpoint)
    # does not give one starts that module fresh and trains it, and says so at start (`fresh_modules`).
    init_expected: dict | None = None
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
    flow_shift: float = 1.0  # sigma -> shift·sigma / (1 + (shift - 1)·sigma), as the backbone's scheduler shifts
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: a resumable state only at the end
    keep_checkpoints: int = 2
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, none on CPU), "bf16", "no"
    sharding: str = "ddp"  # "ddp" (replicas) or "fsdp" (FSDP2: trained modules sharded over the processes)
    grad_accum: int = 1  # micro-batches per optimizer step and process (global batch: batch_size × processes × this)
    # Samples per optimizer step over all processes (the paper's effective batch): the run takes
    # global_batch / (batch_size × processes) micro-batches per process (`accumulation`). A data source may set its
    # own `batch_size` and `global_batch` (images and videos of one stage). None: grad_accum micro-batches.
    global_batch: int | None = None
    gradient_checkpointing: bool = False
    frozen_dtype: str = "fp32"  # dtype of models that are not trained at all ("bf16" for the real ones)
    # dtype of the trained Wan/FLUX DiT's ComfyUI single file (`export.py`): bf16 as ComfyUI computes these DiTs
    # (Comfy-Org's files are 16-bit; an fp32 Wan2.2-5B file would be 20 GB); the diffusers folder keeps the trained dtype
    single_file_dtype: str = "bf16"
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
        if self.global_batch is not None and self.global_batch < 1:
            raise bad("global_batch must be at least 1")
        if self.global_batch is not None and self.grad_accum != 1:
            raise bad(
                f"grad_accum {self.grad_accum} and global_batch {self.global_batch} both set the accumulation: set one "
                "(--set global_batch=null to count micro-batches with grad_accum)"
            )
        unknown = sorted(set(self.init_expected or {}) - {"context_connector"})
        if unknown:
            raise bad(f"init_expected names {unknown}; only 'context_connector' has a known source (init_from)")
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
            for key in ("batch_size", "global_batch"):
                value = src.get(key, 1)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise bad(f"data[{i}]: {key} must be an integer of at least 1, not {value!r}")
            if "global_batch" in src and self.grad_accum != 1:
                raise bad(f"data[{i}] sets global_batch and grad_accum is {self.grad_accum}: set one of them")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise bad("timestep_sampling is 'logit_normal' or 'uniform'")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise bad("mixed_precision is 'auto', 'bf16' or 'no'")
        if self.frozen_dtype not in ("fp32", "bf16"):
            raise bad("frozen_dtype is 'fp32' or 'bf16'")
        if self.single_file_dtype not in SINGLE_FILE_DTYPES:
            raise bad(f"single_file_dtype is one of {', '.join(SINGLE_FILE_DTYPES)}")
        if self.codec not in ("vae", "pixels"):
            raise bad("codec is 'vae' or 'pixels'")
        if self.sharding not in ("ddp", "fsdp"):
            raise bad("sharding is 'ddp' or 'fsdp'")


HINTS = get_type_hints(TrainConfig)


def source_batches(config: TrainConfig, source: dict) -> tuple[int, int | None]:
    """A data source's micro-batch per process and its global batch per step (None: grad_accum micro-batches)."""
    return source.get("batch_size", config.batch_size), source.get("global_batch", config.global_batch)


def accumulation(config: TrainConfig, source: dict, name: str, processes: int) -> int:
    """Micro-batches per process and optimizer step for a data source, so that micro-batch × processes × this is
    its global batch; refuses a global batch the processes and micro-batch do not divide, naming the fix."""
    batch, total = source_batches(config, source)
    if total is None:
        return config.grad_accum
    per_step = batch * processes
    if total % per_step:
        fits = [n for n in range(1, total // batch + 1) if total % (batch * n) == 0]
        raise MetaCanvasInputError(
            f"recipe '{config.name}', source '{name}': global_batch {total} is not a multiple of batch_size {batch} x "
            f"{processes} processes = {per_step}: run on a number of GPUs that divides it ({', '.join(map(str, fits))}"
            f"), or change batch_size or global_batch (--set)."
        )
    return total // per_step


def fresh_modules(config: TrainConfig) -> dict[str, str]:
    """The modules of `init_expected` this run starts fresh (neither init_from nor init_checkpoint gives them), with
    what the paper starts them from: they train, though the paper keeps them as initialised."""
    if config.init_checkpoint:
        return {}
    given = config.init_from or {}
    return {module: what for module, what in (config.init_expected or {}).items() if module not in given}


def as_run(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The config a run trains with (its fresh modules added to `trainable`) and the notices to show at start."""
    fresh = fresh_modules(config)
    notices = [
        f"recipe '{config.name}': {module} starts from random weights and trains, where the paper starts it from "
        f'{what} and keeps it frozen: give that file with --set \'init_from={{"{module}": "FILE"}}\' '
        "(docs/TRAINING.md)."
        for module, what in fresh.items()
    ]
    trainable = config.trainable + [m for m in fresh if m not in config.trainable]
    return replace(config, trainable=trainable), notices


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
