"""Configs of the real supported models, shipped with the code (no hub access needed for shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"


def load(name: str) -> dict:
    """A shipped config by file stem, e.g. 'qwen2_5_vl_7b_instruct' or 'sana_1600m_512px'."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise KeyError(f"no shipped config '{name}'; known: {known}")
    return json.loads(path.read_text())


def chat_template() -> str:
    """Qwen2.5-VL-Instruct's chat template (images as <|vision_start|><|image_pad|><|vision_end|>)."""
    return (CONFIG_DIR / "qwen2_vl_chat_template.jinja").read_text().rstrip("\n")


# Shipped configs of the models that are not diffusers pipeline parts: stem -> (transformers class, config class).
TRANSFORMERS_MODELS = {
    "qwen2_5_vl_7b_instruct": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    "qwen2_5_vl_3b_instruct": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    "umt5_xxl_encoder": ("UMT5EncoderModel", "UMT5Config"),
    "t5_v1_1_xxl_encoder": ("T5EncoderModel", "T5Config"),
    "clip_vit_large_patch14_text": ("CLIPTextModel", "CLIPTextConfig"),
}


def build(name: str, device: str | torch.device = "meta", **overrides) -> nn.Module:
    """A real model: a shipped config's stem, or 'stem/part' for a part of a shipped diffusers pipeline config (e.g.
    'wan2_2_ti2v_5b/transformer'). On the meta device (the default) its shapes only, no weights, no memory; on another
    device with the library's random initialisation (to time it). `overrides` change config values (a narrower model
    of the same kind, fewer layers)."""
    import diffusers
    import transformers

    stem, _, part = name.partition("/")
    config = load(stem)
    with torch.device(device):
        if not part:
            model_cls, config_cls = TRANSFORMERS_MODELS[stem]
            settings = {k: v for k, v in config.items() if not k.startswith("_")} | overrides
            return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))
        if part == "text_encoder" and stem == "sana_1600m_512px":  # SANA's Gemma-2 (saved via .get_decoder())
            return transformers.Gemma2Model(transformers.Gemma2Config(**config[part], **overrides))
        cls = getattr(diffusers, config[part]["_class_name"])
        accepted = cls._get_init_keys(cls)  # the published file may hold keys later versions dropped (Wan's VAE)
        settings = {k: v for k, v in config[part].items() if k in accepted or k.startswith("_")} | overrides
        return cls.from_config(settings)
