"""Qwen2.5-VL from ComfyUI's single file (`text_encoders/qwen_2.5_vl_7b*.safetensors`, Qwen-Image's text
encoder, vision tower included) into transformers' `Qwen2_5_VLForConditionalGeneration`.

Layout: `model.embed_tokens/norm/layers.*` is transformers' `model.language_model.*`, `visual.*` is
`model.visual.*` (the rename transformers' own loader applies); there is no `lm_head` (the planner never
decodes: it is tied to the embeddings). Scaled fp8 files (`scaled_fp8` marker) hold float8 Linear weights
with a scalar `<layer>.scale_weight`: those layers become `ScaledFP8Linear`, so the weights stay fp8 in
memory and are made (weight·scale) in the compute dtype at each forward; dropping the scale would give
wrong weights silently. `<layer>.scale_input` (ComfyUI's fp8 matmul inputs) is not used.

The file holds weights only. Its transformers config is the shipped one of the Qwen2.5-VL of its width
(3B: 2048, 7B: 3584), unless the file's metadata carries one (`config`, as the pack's tiny files do).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import realconfigs
from .casting import FP8_DTYPES, ScaledFP8Linear, fp8_dtype
from .errors import MetaCanvasInputError
from .files import SafetensorsFile
from .inputs import WeightDtype

SHIPPED_BY_WIDTH = {2048: "qwen2_5_vl_3b_instruct", 3584: "qwen2_5_vl_7b_instruct"}
MARKERS = ("model.layers.0.self_attn.k_proj.bias", "visual.patch_embed.proj.weight", "model.embed_tokens.weight")
IGNORED = ("scaled_fp8",)  # ComfyUI's marker tensor


def is_qwen25_vl(header: SafetensorsFile) -> bool:
    return header.has(*MARKERS)


def transformers_key(key: str) -> str:
    """A single-file key under transformers' Qwen2_5_VLForConditionalGeneration names."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("visual."):
        return "model." + key
    return key


def config_for(header: SafetensorsFile) -> dict:
    """The transformers config of the file: its own (metadata `config`) or the shipped one of its width."""
    if "config" in header.metadata:
        return json.loads(header.metadata["config"])
    width = header.shapes["model.embed_tokens.weight"][1]
    if width not in SHIPPED_BY_WIDTH:
        raise MetaCanvasInputError(
            f"'{header.path.name}' is a Qwen2.5-VL of width {width}; MetaCanvas knows Qwen2.5-VL-3B (2048) and "
            "-7B (3584): use one of those."
        )
    return realconfigs.load(SHIPPED_BY_WIDTH[width])


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters of the modules made inside go to the meta device (no memory: the file's tensors are assigned later),
    buffers stay real (RoPE tables are computed, not stored): accelerate's init_empty_weights(include_buffers=False) in
    plain torch, as accelerate is no dependency of the node pack (it pulls torch)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_qwen25_vl(
    header: SafetensorsFile, dtype: torch.dtype, weight_dtype: WeightDtype | str = WeightDtype.DEFAULT
) -> nn.Module:
    """The model of a checked single file, in `dtype` (fp8 layers stay fp8; `weight_dtype` fp8 makes them so)."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    fp8 = fp8_dtype(weight_dtype)
    config = Qwen2_5_VLConfig(**config_for(header))
    with parameters_on_meta():  # filled below
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = {transformers_key(k): v for k, v in load_file(str(header.path)).items() if k not in IGNORED}
    _quantise(model, state, fp8)
    state = {k: v if v.dtype in FP8_DTYPES or k.endswith(".scale_weight") else v.to(dtype) for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(".scale_input")}
    expected = set(model.state_dict()) - {"lm_head.weight"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MetaCanvasInputError(
            f"'{header.path.name}' does not fit Qwen2.5-VL of width {config.text_config.hidden_size}: "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:2]}). It is damaged or another model: use Qwen2.5-VL's single file."
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise MetaCanvasInputError(f"'{header.path.name}' does not fit Qwen2.5-VL's shapes: {e}") from None
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # never used to decode
    return model.eval().requires_grad_(False)


def _quantise(model: nn.Module, state: dict[str, torch.Tensor], weight_dtype: torch.dtype | None) -> None:
    """Linear layers stored in fp8 (or asked to be, `weight_dtype`) become ScaledFP8Linear, before loading."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or f"{name}.weight" not in state:
            continue
        stored = state[f"{name}.weight"].dtype
        if stored not in FP8_DTYPES:
            if weight_dtype is None:
                continue
            # a bf16/fp16 file kept in fp8: scale 1, as ComfyUI's weight_dtype choice does
            state[f"{name}.weight"] = state[f"{name}.weight"].to(weight_dtype)
        state.setdefault(f"{name}.scale_weight", torch.ones(()))
        fp8 = state[f"{name}.weight"].dtype
        layer = ScaledFP8Linear(module.in_features, module.out_features, module.bias is not None, fp8, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
