"""Configs of the real supported models, shipped with the code (no hub access needed for shapes)."""

from __future__ import annotations

import json
from pathlib import Path

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
