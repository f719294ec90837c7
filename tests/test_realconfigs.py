"""The shipped configs of the real models give the paper's shapes, offline and without weights."""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, AutoencoderKL, FluxTransformer2DModel, SanaTransformer2DModel
from transformers import Qwen2_5_VLConfig

from metacanvas_core import realconfigs
from metacanvas_core.backbones.flux import FluxKontextBackbone
from metacanvas_core.backbones.sana import SanaBackbone
from metacanvas_core.canvas import CanvasGrid, canvas_grid_for
from metacanvas_core.connectors import CanvasConnector, ContextConnector
from metacanvas_core.metacanvas import new_metacanvas


def test_qwen_widths():
    assert Qwen2_5_VLConfig(**realconfigs.load("qwen2_5_vl_7b_instruct")).text_config.hidden_size == 3584
    assert Qwen2_5_VLConfig(**realconfigs.load("qwen2_5_vl_3b_instruct")).text_config.hidden_size == 2048


def test_sana_1600m_geometry_and_connector():
    cfg = realconfigs.load("sana_1600m_512px")
    with torch.device("meta"):
        transformer = SanaTransformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderDC.from_config(cfg["vae"])
    sana = SanaBackbone("Sana_1600M_512px_diffusers", transformer, vae, cfg["scheduler"], None, None)
    assert (sana.width, sana.pixel_stride, sana.default_size, sana.text_dim) == (2240, 32, (512, 512), 2304)
    assert canvas_grid_for(sana.token_grid(512, 512), sana.spec.canvas_factor) == CanvasGrid(1, 16, 16)  # the paper's
    assert sana.spec.canvas_rule == "factor" and sana.spec.canvas_grid() == CanvasGrid(1, 16, 16)
    assert sana.make_scheduler("dpm_solver_flow").config.flow_shift == cfg["scheduler"]["flow_shift"]
    with torch.device("meta"):
        connector = CanvasConnector(3584, sana.width, *sana.attention_heads)
    params = sum(p.numel() for p in connector.parameters())
    dit = sum(p.numel() for p in transformer.parameters())
    assert 1.5e9 < dit < 1.7e9  # SANA-1.6B
    assert params < 0.12 * dit  # light: ~172M next to the 1.6B DiT (align + fuse blocks at width 2240)


def test_flux_kontext_geometry_and_connectors():
    cfg = realconfigs.load("flux_1_kontext_dev")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderKL.from_config(cfg["vae"])
    flux = FluxKontextBackbone("FLUX.1-Kontext-dev", transformer, vae, cfg["scheduler"])
    assert (flux.width, flux.pixel_stride, flux.default_size, flux.text_dim) == (3072, 16, (1024, 1024), 4096)
    assert flux.token_grid(1024, 1024) == (1, 64, 64)  # Kontext's own size
    assert flux.spec.canvas_rule == "fixed" and flux.spec.canvas_grid() == CanvasGrid(1, 32, 32)  # the paper's 32×32
    assert flux.spec.context_hidden_dim == 3 * 4096  # UniWorld-V1's: Linear(3584 -> 3·4096) -> SiLU -> Linear(-> 4096)
    with torch.device("meta"):
        mc = new_metacanvas(3584, flux.spec, "mllm")
    for h, w in [(1024, 1024), (832, 1248), (1568, 672), (512, 512)]:  # Kontext's resolutions and the paper's 512²
        assert mc.canvas_grid(h, w) == CanvasGrid(1, 32, 32), (h, w)
    with torch.device("meta"):
        context = ContextConnector(3584, flux.spec.context_hidden_dim, flux.text_dim)
        canvas = CanvasConnector(3584, flux.width, *flux.attention_heads)
    dit = sum(p.numel() for p in transformer.parameters())
    assert 11.5e9 < dit < 12.5e9  # the 12B FLUX transformer
    assert sum(p.numel() for p in context.parameters()) < 0.1e9
    assert sum(p.numel() for p in canvas.parameters()) < 0.05 * dit


def test_wan2_2_ti2v_5b_geometry_and_connectors():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from metacanvas_core.backbones.wan import WanBackbone

    cfg = realconfigs.load("wan2_2_ti2v_5b")
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(cfg["transformer"])
        vae = AutoencoderKLWan.from_config(cfg["vae"])
    wan = WanBackbone("Wan2.2-TI2V-5B-Diffusers", transformer, vae, cfg["scheduler"])
    assert (wan.width, wan.pixel_stride, wan.text_dim, wan.spec.attention_heads) == (3072, 32, 4096, (96, 32))  # Alg. 1
    assert wan.token_grid(704, 1280, 121) == (31, 22, 40)  # the paper's 31×22×40
    assert canvas_grid_for(wan.token_grid(704, 1280, 121), wan.spec.canvas_factor, wan.spec.keyframes) == CanvasGrid(
        3, 11, 20
    )
    assert wan.spec.canvas_rule == "factor"
    assert wan.spec.condition == {"in_channels": 48 + 2, "width": 3072, "patch_size": (1, 2, 2)}
    assert wan.make_scheduler("unipc_flow").config.flow_shift == 5.0
    dit = sum(p.numel() for p in transformer.parameters())
    assert 4.9e9 < dit < 5.1e9  # the 5B transformer
    with torch.device("meta"):
        mc = new_metacanvas(3584, wan.spec, "mllm")  # the paper's context MLP 3584 -> 4× -> 4096
    context = mc.context_connector
    assert context.net[0].out_features == 4 * 3584 and context.net[-1].out_features == 4096
    assert mc.config.context_connector["dropout"] == 0.1 and mc.config.canvas_grid == (3, 11, 20)


def test_build_on_a_device_has_random_weights():
    """Shapes only on the meta device (the default); elsewhere the library's random initialisation (the benchmark
    times a real-width Wan2.2 block built so)."""
    narrow = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64}
    assert next(realconfigs.build("wan2_2_ti2v_5b/transformer", **narrow).parameters()).is_meta
    model = realconfigs.build("wan2_2_ti2v_5b/transformer", device="cpu", **narrow)
    weight = model.blocks[0].attn1.to_q.weight
    assert weight.device.type == "cpu" and weight.shape == (32, 32) and weight.std() > 0
