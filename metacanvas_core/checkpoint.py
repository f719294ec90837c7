"""The MetaCanvas checkpoint file: one .safetensors holding a `MetaCanvas`, its config in the header.

Tensors: `canvas.*` (canvas embeddings and start marker), `canvas_connector.*`,
`context_connector.*` (MLLM-context backbones only), `condition_embedding.*` (Wan), `lora.*`
(optional canvas LoRA, peft key names). Header metadata (strings): format, format_version, content_sha256 (what the
checkpoint is, whatever its file is called) and each field of `MetaCanvasConfig` as JSON, among them `canvas_positions` (the planner's position scheme) and
`visual_tokens` (the MLLM's token budget per input picture), so inference plans as training did.

Checkpoints from before issue 25 (format 1): without `canvas_rule` they follow the factor rule they were trained with (FLUX-Kontext
files too: canvas factor 1, a canvas as large as the token grid); their canvas connector's config has no
`attention_bias`, and its fuse block carries the q/k/v biases of diffusers' default, so it is read as True (new ones
record False, as the paper's Algorithm 1 builds the block). A rule this version does not know is refused.

Checkpoints from before `canvas_positions` and `visual_tokens`: without `visual_tokens` they were trained with the image
processor's own limit and run with it (None). Without `canvas_positions` they got their canvas positions from the
transformers release installed when they were trained; for a one-keyframe canvas (SANA, FLUX-Kontext) every release
gives the pack's positions, so they load; a multi-keyframe (video) one is refused, since its keyframes' temporal ids
depended on that release (0/1/2 under transformers 5.x since the fix of huggingface/transformers#45325, scaled by
tokens_per_second in 5.3) and cannot be converted: retrain it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .canvas import CANVAS_POSITIONS, CANVAS_RULES, FACTOR_RULE
from .errors import MetaCanvasInputError
from .files import SafetensorsFile
from .metacanvas import MetaCanvas, MetaCanvasConfig
from .planner import CanvasLora

FORMAT = "metacanvas"
# 2 (issue 25): `canvas_rule` and the connector's `attention_bias`, which a version reading 1 would ignore (sizing a
# fixed FLUX-Kontext canvas by the factor rule) or fail on; so such a version refuses these files by their number.
FORMAT_VERSION = 2
CONTENT_HASH = "content_sha256"  # header field: `content_hash` of the file's tensors


def config_to_metadata(config: MetaCanvasConfig) -> dict[str, str]:
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    meta.update({k: json.dumps(v) for k, v in dataclasses.asdict(config).items()})
    return meta


def config_from_metadata(meta: dict[str, str], path: str) -> MetaCanvasConfig:
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise MetaCanvasInputError(
            f"'{path}' has checkpoint format {meta['format_version']}; this MetaCanvas reads up to "
            f"{FORMAT_VERSION}: update the MetaCanvas nodes."
        )
    fields = {f.name: f for f in dataclasses.fields(MetaCanvasConfig)}
    missing = [k for k, f in fields.items() if k not in meta and f.default is dataclasses.MISSING]
    if missing:
        raise MetaCanvasInputError(f"'{path}' lacks the header fields {missing}; the file is damaged.")
    values = {k: json.loads(meta[k]) for k in fields if k in meta}
    values["canvas_grid"] = tuple(values["canvas_grid"])
    check_canvas_positions(values.get("canvas_positions"), values["canvas_grid"][0], path)
    rule = values.get("canvas_rule", FACTOR_RULE)
    if rule not in CANVAS_RULES:
        raise MetaCanvasInputError(
            f"'{path}' sizes its canvas by the rule '{rule}', which this version does not know (it knows "
            f"{', '.join(CANVAS_RULES)}): update the MetaCanvas nodes, or load a checkpoint written by this version."
        )
    # Written before the fuse block lost its q/k/v biases (issue 25): the file holds them.
    values["canvas_connector"] = {"attention_bias": True, **values["canvas_connector"]}
    return MetaCanvasConfig(**values)


def check_canvas_positions(scheme: str | None, keyframes: int, path: str) -> None:
    """Refuse a checkpoint whose canvas positions are not the pack's (`canvas.CANVAS_POSITIONS`), naming both;
    `scheme` None: from before the scheme was recorded (see the module docstring)."""
    if scheme == CANVAS_POSITIONS or (scheme is None and keyframes == 1):
        return
    if scheme is None:
        raise MetaCanvasInputError(
            f"'{path}' has a {keyframes}-keyframe canvas trained before checkpoints recorded their canvas positions: "
            "its keyframes got the temporal positions of the transformers release installed then, which differ "
            f"between releases, and this version always uses its own rule ('{CANVAS_POSITIONS}': Qwen2.5-VL's "
            "positions under transformers 4.x, one temporal id for every keyframe). "
            "Retrain it with this version (python -m metacanvas_core.train, e.g. stage S3 from its S2 checkpoint)."
        )
    raise MetaCanvasInputError(
        f"'{path}' was trained with canvas positions '{scheme}', this version computes '{CANVAS_POSITIONS}' only: "
        "load it with the MetaCanvas version that wrote it, or retrain it with this one."
    )


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """'sha256:<hex>' of the tensors' names, dtypes, shapes and bytes, in name order: what a checkpoint is, whatever
    its file is called (recorded in its header when it is written)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def save_metacanvas(mc: MetaCanvas, path: str | Path) -> None:
    """Write `mc` (readable by every user: 0644, as a model file copied between machines should be), with its content
    hash in the header (`MetaCanvas.identity` of the loaded file)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in mc.state_dict().items()}
    if mc.lora is not None:
        tensors.update({f"lora.{k}": v.detach().contiguous().cpu() for k, v in mc.lora.state_dict.items()})
    metadata = {**config_to_metadata(mc.config), CONTENT_HASH: content_hash(tensors)}
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o644)


def load_metacanvas(path: str | Path, device: str | torch.device = "cpu") -> MetaCanvas:
    """Load a checkpoint file: checked first (readable, a MetaCanvas checkpoint), shapes against its own header."""
    header = SafetensorsFile.open(path, "MetaCanvas checkpoint")
    path = header.path
    if header.metadata.get("format") != FORMAT:
        raise MetaCanvasInputError(
            f"'{path}' is not a MetaCanvas checkpoint: it holds {header.describe()}. The Connector Loader takes the "
            "files `python -m metacanvas_core.train` writes (models/metacanvas/); the backbone's own files go to "
            "its loaders."
        )
    config = config_from_metadata(header.metadata, str(path))
    tensors = load_file(str(path))
    # Files written before the hash was recorded get it computed now (the same value writing them again records).
    mc = MetaCanvas(config, name=path.name, identity=header.metadata.get(CONTENT_HASH) or content_hash(tensors))
    lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    try:
        mc.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetaCanvasInputError(f"'{path.name}' does not match its own header ({e}); the file is damaged.") from e
    if config.lora:
        mc.lora = CanvasLora(name=path.stem, config=config.lora, state_dict=lora)
    return mc.to(device)
