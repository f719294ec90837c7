"""Exported backbone weights: a DiT LoRA is merged into a plain diffusers transformer that predicts as the
LoRA-wrapped one did."""

from __future__ import annotations

import torch

from metacanvas_core.backbones import Branch, load_backbone
from metacanvas_core.text import TextContext
from metacanvas_core.training.config import TrainConfig
from metacanvas_core.training.trainer import Trainer


def test_dit_lora_is_merged_on_export(tiny, tmp_path):
    config = TrainConfig(
        name="lora",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["sana"]),
        trainable=["canvas_connector", "dit_lora"],
        dit_lora={"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        lr=1e-2,
        max_steps=3,
        batch_size=2,
        buckets=[[64, 64]],
        data=[{"synthetic": {"kind": "t2i", "count": 2, "seed": 0}}],
        eval_samples=0,
    )
    config.validate()
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.train()
    exported = load_backbone(tmp_path / "backbone")
    original = load_backbone(tiny["sana"])
    assert exported.transformer.state_dict().keys() == original.transformer.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    args = (torch.tensor(500.0), Branch(TextContext(context, torch.ones(1, 5, dtype=torch.long))))
    trainer.backbone.transformer.eval()
    with torch.no_grad():
        with_lora = trainer.backbone.predict(x, *args)
        merged = exported.predict(x, *args)
        plain = original.predict(x, *args)
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # the LoRA learned something and it is in the export
