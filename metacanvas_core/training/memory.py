"""The memory plan of a recipe: parameters trained and frozen, and the bytes of weights, gradients and AdamW state
per GPU under DDP and under FSDP, from the shipped configs of the real models built on the meta device; and each data
source's batch per optimizer step on that many GPUs (micro-batch per GPU × GPUs × micro-batches accumulated), which
the trainer derives from the recipe's `global_batch` the same way (`config.accumulation`).

Counted: every model the trainer loads (MLLM, DiT, VAE, SANA's Gemma-2) in the dtype it loads it in, the trained
parameters' fp32 gradients and AdamW's two fp32 moments. Not counted: activations (recipes checkpoint them), the
CUDA context, DDP's gradient buckets, the one layer FSDP gathers at a time, and FLUX's and Wan's native text
encoders (no shipped config; their context comes from the MLLM). Under FSDP the trained modules (the MetaCanvas
modules, the DiT when DiT weights train, the MLLM when its LoRA trains) are sharded over the GPUs; models that do
not train stay whole on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import realconfigs
from ..errors import MetaCanvasInputError
from ..metacanvas import new_metacanvas
from .config import TrainConfig, accumulation, as_run, source_batches
from .parts import add_dit_lora, select_parameters

# Model folder names of the recipes (or of folders exported from them) -> shipped configs (metacanvas_core/configs/).
SHIPPED = {
    "qwen2.5-vl-3b-instruct": "qwen2_5_vl_3b_instruct",
    "qwen2.5-vl-7b-instruct": "qwen2_5_vl_7b_instruct",
    "sana_1600m_512px": "sana_1600m_512px",
    "flux.1-kontext-dev": "flux_1_kontext_dev",
    "wan2.2-ti2v-5b": "wan2_2_ti2v_5b",
}
GIB = 1024**3


@dataclass
class Module:
    name: str
    params: int
    trained: int
    bytes_per_param: int  # as loaded
    sharded: bool  # in the objective: sharded under FSDP


@dataclass
class MemoryPlan:
    recipe: str
    modules: list[Module]
    config: TrainConfig  # as run: the batches per step come from its data sources

    def per_gpu(self, gpus: int, fsdp: bool) -> dict[str, float]:
        """GiB per GPU of weights, gradients and optimizer state (and their total)."""
        out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
        for m in self.modules:
            share = gpus if fsdp and m.sharded else 1
            out["weights"] += m.params * m.bytes_per_param / share / GIB
            out["gradients"] += m.trained * 4 / share / GIB
            out["optimizer"] += m.trained * 8 / share / GIB
        out["total"] = sum(out.values())
        return out

    def table(self, gpus: int) -> str:
        lines = [f"{self.recipe}", f"  {'module':<34}{'parameters':>12}{'trained':>12}{'dtype':>7}"]
        for m in self.modules:
            dtype = {4: "fp32", 2: "bf16"}[m.bytes_per_param]
            lines.append(f"  {m.name:<34}{m.params / 1e9:>11.3f}B{m.trained / 1e9:>11.3f}B{dtype:>7}")
        lines.append(f"  {'per GPU (GiB)':<34}{'weights':>10}{'gradients':>11}{'optimizer':>11}{'total':>9}")
        for label, fsdp in (("DDP", False), (f"FSDP over {gpus}", True)):
            g = self.per_gpu(gpus, fsdp)
            row = "".join(f"{g[k]:>{w}.1f}" for k, w in (("weights", 10), ("gradients", 11), ("optimizer", 11)))
            lines.append(f"  {label:<34}{row}{g['total']:>9.1f}")
        lines.append(f"  batch per step on {gpus} GPUs (accumulating micro-batches adds nothing to the memory above)")
        for i, source in enumerate(self.config.data):
            name = source.get("name") or f"data[{i}]"
            per_gpu, _ = source_batches(self.config, source)
            accum = accumulation(self.config, source, name, gpus)
            lines.append(f"  {name:<34}{per_gpu * gpus * accum:>6} = {per_gpu}/GPU x {gpus} GPUs x {accum} accumulated")
        return "\n".join(lines)


def shipped_config(value: str) -> str:
    name = Path(value).name.lower()
    for prefix, config in SHIPPED.items():
        if name.startswith(prefix):
            return config
    known = ", ".join(sorted(SHIPPED))
    raise MetaCanvasInputError(f"--plan: '{value}' is not a real model with a shipped config ({known}...).")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(config: TrainConfig) -> MemoryPlan:
    """Build the recipe's models on the meta device (no weights, no memory) and count what it trains and holds."""
    from peft import LoraConfig, inject_adapter_in_model

    from ..backbones import BACKBONES

    config, _ = as_run(config)  # with the modules it starts fresh (trained) when init_from does not give them
    stem = shipped_config(config.backbone)
    cfg = realconfigs.load(stem)
    kind = next(k for k, cls in BACKBONES.items() if cfg["model_index"]["_class_name"] in cls.pipeline_class_names)
    mllm = realconfigs.build(shipped_config(config.mllm))
    transformer, vae = realconfigs.build(f"{stem}/transformer"), realconfigs.build(f"{stem}/vae")
    text_encoder = realconfigs.build(f"{stem}/text_encoder") if "text_encoder" in cfg else None
    with torch.device("meta"):
        extra = (text_encoder, None) if kind == "sana" else ()
        backbone = BACKBONES[kind](Path(config.backbone).name, transformer, vae, cfg["scheduler"], *extra)
        source = config.context_source or ("native" if kind == "sana" else "mllm")
        mc = new_metacanvas(mllm.config.text_config.hidden_size, backbone.spec, source)
        if "mllm_lora" in config.trainable:
            inject_adapter_in_model(LoraConfig(**config.mllm_lora), mllm)
        if "dit_lora" in config.trainable:
            add_dit_lora(transformer, dict(config.dit_lora))
    trained = set(map(id, select_parameters(config, mc, transformer, kind, mllm).values()))
    trains_dit = any(p.startswith("dit") for p in config.trainable)
    frozen = {"fp32": 4, "bf16": 2}[config.frozen_dtype]
    backbone_bytes = 4 if trains_dit else frozen

    def module(name: str, m: torch.nn.Module, nbytes: int, sharded: bool) -> Module:
        return Module(name, _count(m), sum(p.numel() for p in m.parameters() if id(p) in trained), nbytes, sharded)

    modules = [
        module(f"MLLM {Path(config.mllm).name}", mllm, frozen, "mllm_lora" in config.trainable),
        module(f"DiT {kind}", transformer, backbone_bytes, trains_dit),
        module("VAE", vae, backbone_bytes, False),
        module("MetaCanvas modules", mc, 4, True),
    ]
    if text_encoder is not None:
        modules.insert(3, module("text encoder", text_encoder, backbone_bytes, False))
    return MemoryPlan(config.name, modules, config)
