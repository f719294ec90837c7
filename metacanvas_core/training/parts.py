"""Which parameters a recipe trains: its `trainable` parts resolved to named parameters (trainer and memory plan)."""

from __future__ import annotations

import re

from torch import nn

from ..errors import MetaCanvasInputError
from ..metacanvas import MetaCanvas
from .config import DIT_PATTERNS, TrainConfig

MC_PARTS = ("canvas", "canvas_connector", "context_connector", "condition_embedding")


def add_dit_lora(transformer: nn.Module, settings: dict) -> float:
    """Put the recipe's LoRA on the DiT (peft, adapter "dit"); returns its scale (alpha / r) for merging."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(**settings), adapter_name="dit")
    return settings.get("lora_alpha", settings["r"]) / settings["r"]


def select_parameters(
    config: TrainConfig, mc: MetaCanvas, transformer: nn.Module, kind: str, mllm: nn.Module | None = None
) -> dict[str, nn.Parameter]:
    """The trained parameters by name (`mc.`, `transformer.`, `mllm.` prefixes, as in the objective).

    LoRAs must be in place: `mllm` is the MLLM with its canvas LoRA when `mllm_lora` trains, and the DiT carries
    `add_dit_lora`'s adapter when `dit_lora` trains.
    """
    params: dict[str, nn.Parameter] = {}
    for part in config.trainable:
        if part in MC_PARTS:
            module = getattr(mc, part)
            if module is None:
                raise MetaCanvasInputError(
                    f"recipe '{config.name}': this MetaCanvas for the {kind} backbone has no {part} to "
                    "train (context_connector: only with context_source mllm; condition_embedding: Wan only)."
                )
            params.update({f"mc.{part}.{n}": p for n, p in module.named_parameters()})
        elif part == "mllm_lora":
            params.update({f"mllm.{n}": p for n, p in mllm.named_parameters() if "lora_" in n})
        elif part == "dit_lora":
            params.update({f"transformer.{n}": p for n, p in transformer.named_parameters() if ".lora_" in n})
        else:
            pattern = DIT_PATTERNS.get(part) or part[len("dit:") :]
            found = {
                f"transformer.{n}": p
                for n, p in transformer.named_parameters()
                if re.search(pattern, n) and ".lora_" not in n
            }
            if not found:
                raise MetaCanvasInputError(
                    f"recipe '{config.name}': trainable part '{part}' matches no parameter of the {kind} transformer."
                )
            params.update(found)
    return params
