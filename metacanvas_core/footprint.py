"""The weights each node of a shipped workflow holds on the GPU while it runs, computed from the shipped configs of
the real models built on the meta device (no weights, no memory): the benchmark's memory table and the README's
VRAM column.

ComfyUI's memory manager loads a part only while the node that uses it runs (the pack registers the MLLM, each
backbone part and the MetaCanvas modules separately), so a workflow fully loads within its largest row; with less
free VRAM the manager streams the rest layer by layer (slower, not out of memory). Activations, the CUDA context
and the sampler's latents come on top: they are not counted here (the benchmark measures peaks on a GPU).

Bytes per parameter: 'bf16' stores every weight in 2 bytes (bf16/fp16 files, the pack's 'auto' dtype on a GPU);
'fp8' stores Linear weights in 1 byte and the rest in 2 (a `*_fp8_scaled` file, or `weight_dtype` fp8 on the MLLM
Loader or the core Load Diffusion Model, as ComfyUI's fp8 layers and `casting.ScaledFP8Linear` hold them) —
only for the models whose loader offers it. MetaCanvas modules count as their checkpoints store them (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from . import realconfigs
from .inputs import ContextSource

GIB = 1024**3


@dataclass(frozen=True)
class Weights:
    """One model's parameters: all of them, and those in Linear weight matrices (what fp8 stores in one byte)."""

    total: int
    linear: int

    def gib(self, precision: str) -> float:
        per_param = {"bf16": 2 * self.total, "fp8": 2 * self.total - self.linear, "fp32": 4 * self.total}
        return per_param[precision] / GIB


def count(model: nn.Module, skip: tuple[str, ...] = ()) -> Weights:
    params = {n: p for n, p in model.named_parameters() if not n.startswith(skip)}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return Weights(sum(p.numel() for p in params.values()), sum(p.numel() for n, p in params.items() if n in linear))


# Model label -> shipped config ('stem' or 'stem/part'). Qwen2.5-VL without its lm_head: the planner never decodes,
# and ComfyUI's single file has none (the pack ties it to the embeddings).
MODELS = {
    "Qwen2.5-VL-7B": "qwen2_5_vl_7b_instruct",
    "SANA-1.6B DiT": "sana_1600m_512px/transformer",
    "Gemma-2-2B": "sana_1600m_512px/text_encoder",
    "DC-AE": "sana_1600m_512px/vae",
    "FLUX.1-Kontext DiT": "flux_1_kontext_dev/transformer",
    "FLUX AE": "flux_1_kontext_dev/vae",
    "T5-XXL": "t5_v1_1_xxl_encoder",
    "CLIP-L": "clip_vit_large_patch14_text",
    "Wan2.2-5B DiT": "wan2_2_ti2v_5b/transformer",
    "Wan2.2 VAE": "wan2_2_ti2v_5b/vae",
    "umT5-XXL": "umt5_xxl_encoder",
}
BACKBONE_CONFIGS = {"sana": "sana_1600m_512px", "flux_kontext": "flux_1_kontext_dev", "wan": "wan2_2_ti2v_5b"}


@cache
def weights(model: str) -> Weights:
    """Parameters of a model label of `MODELS`, or 'MetaCanvas <backbone> <context source>'."""
    if model.startswith("MetaCanvas "):
        _, backbone, source = model.split()
        return count(_metacanvas(backbone, ContextSource(source)))
    return count(realconfigs.build(MODELS[model]), skip=("lm_head",))


def _metacanvas(kind: str, source: ContextSource) -> nn.Module:
    """The MetaCanvas modules for the real 7B planner and a real backbone (on the meta device)."""
    from .backbones import BACKBONES
    from .metacanvas import new_metacanvas

    stem = BACKBONE_CONFIGS[kind]
    cfg = realconfigs.load(stem)
    transformer, vae = realconfigs.build(f"{stem}/transformer"), realconfigs.build(f"{stem}/vae")
    extra = (None, None) if kind == "sana" else ()
    backbone = BACKBONES[kind](stem, transformer, vae, cfg["scheduler"], *extra)
    hidden = realconfigs.load(MODELS["Qwen2.5-VL-7B"])["hidden_size"]
    with torch.device("meta"):
        return new_metacanvas(hidden, backbone.spec, source)


@dataclass(frozen=True)
class Step:
    """A node and the models it holds on the GPU while it runs; `fp8`: those its loader can keep in fp8."""

    node: str
    models: tuple[str, ...]
    fp8: tuple[str, ...] = ()

    def gib(self, precision: str) -> float:
        return sum(
            weights(m).gib("fp32" if m.startswith("MetaCanvas ") else precision if m in self.fp8 else "bf16")
            for m in self.models
        )


PLAN = Step("MetaCanvas Plan", ("Qwen2.5-VL-7B",), fp8=("Qwen2.5-VL-7B",))


def _pack(kind: str, dit: str, vae: str, text: tuple[str, ...], encodes: bool) -> tuple[Step, ...]:
    """The pack's own graph with an untrained checkpoint: context 'native' (the backbone's own text encoder in Project)."""
    mc = f"MetaCanvas {kind} native"
    project = Step("MetaCanvas Project", (*text, mc, *((vae,) if encodes else ())))
    return PLAN, project, Step("MetaCanvas Sampler", (dit, mc)), Step("MetaCanvas Decode", (vae,))


def _native(kind: str, dit: str, vae: str, encodes: bool) -> tuple[Step, ...]:
    """A native graph: MLLM context (Text Conditioning), the core sampler runs the patched native model."""
    mc = f"MetaCanvas {kind} mllm"
    steps = [PLAN, Step("Text Conditioning + Attach Canvas", (mc,))]
    if encodes:
        steps.append(Step("VAE Encode" if kind == "flux_kontext" else "Wan22ImageToVideoLatent / Wan Inputs", (vae,)))
    steps += [Step("KSampler (MetaCanvas Apply)", (dit, mc), fp8=(dit,)), Step("VAE Decode", (vae,))]
    return tuple(steps)


WAN, FLUX = ("Wan2.2-5B DiT", "Wan2.2 VAE"), ("FLUX.1-Kontext DiT", "FLUX AE")
WORKFLOWS: dict[str, tuple[Step, ...]] = {
    "text_to_image": _pack("sana", "SANA-1.6B DiT", "DC-AE", ("Gemma-2-2B",), encodes=False),
    "native_text_to_video": _native("wan", *WAN, encodes=False),
    "native_image_to_video": _native("wan", *WAN, encodes=True),
    "native_video_editing": _native("wan", *WAN, encodes=True),
    "native_in_context_video": _native("wan", *WAN, encodes=True),
    "native_image_editing": _native("flux_kontext", *FLUX, encodes=True),
}


def peak(workflow: str, precision: str) -> float:
    """GiB of weights the workflow's largest node holds: what a GPU needs to run it without streaming."""
    return max(step.gib(precision) for step in WORKFLOWS[workflow])


def table() -> str:
    """Per workflow, per node: GiB of weights on the GPU while the node runs, in bf16 and with fp8 where offered."""
    lines = [f"  {'workflow / node':<44}{'models on the GPU':<54}{'bf16':>7}{'fp8':>7}"]
    for name, steps in WORKFLOWS.items():
        lines.append(f"  {name:<98}{peak(name, 'bf16'):>7.1f}{peak(name, 'fp8'):>7.1f}  (largest node)")
        for step in steps:
            models = " + ".join(m.replace("MetaCanvas ", "MC ") for m in step.models)
            lines.append(f"    {step.node:<42}{models:<54}{step.gib('bf16'):>7.1f}{step.gib('fp8'):>7.1f}")
    return "\n".join(lines)
