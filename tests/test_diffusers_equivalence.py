"""Untrained MetaCanvas + the backbone's own text encoder = the backbone itself: the adapters' sampler against
diffusers' own pipelines, given only prompt strings (the pipelines run their own text encoders). Canvas on
(zero-initialised).
SANA's (SanaPipeline, both schedulers, decoded images too) is in test_sampling.py.

All comparisons are exact (`torch.equal`): the prompt encoding is the pipelines' own method, the noise
comes from the same CPU generator, and the model calls, guidance and scheduler steps are the same
operations in the same order (SANA batches its two CFG branches as SanaPipeline does; Wan and FLUX call
the model once per branch as theirs do).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from metacanvas_core.backbones import load_backbone
from metacanvas_core.conditioning import project
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import default_context_source, new_metacanvas
from metacanvas_core.sampling import sample

PROMPT, NEGATIVE = "a red fox sits left of a blue lamp", "blurry, low quality"


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _ours(planner, backbone, height, width, **inputs):
    mc = new_metacanvas(planner.hidden_size, backbone.spec, default_context_source(backbone.has_text_encoder))
    assert mc.config.context_source == "native"
    return project(mc.plan(planner, PROMPT, height, width, VisualInputs(**inputs), NEGATIVE), mc, backbone)


@pytest.fixture(scope="module")
def wan(tiny):
    return load_backbone(tiny["wan"])


@pytest.fixture(scope="module")
def flux(tiny):
    return load_backbone(tiny["flux_kontext"])


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_wan(planner, wan, task):
    image = _image(64, 64, seed=3)
    plan_kw = {"images": [image], "role": "first frame"} if task == "i2v" else {}
    cond = _ours(planner, wan, 64, 64, **plan_kw)
    ours = sample(wan, cond, seed=11, steps=3, cfg=5.0, height=64, width=64, scheduler="unipc_flow", frames=9)
    parts = dict(
        tokenizer=wan.pipeline.tokenizer,
        text_encoder=wan.text_encoder,
        vae=wan.vae,
        transformer=wan.transformer,
        scheduler=wan.make_scheduler("unipc_flow"),
        expand_timesteps=True,
    )
    call = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="latent",
    )
    if task == "t2v":
        pipe = WanPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(**call).frames
    else:
        pipe = WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(image=image, **call).frames
    assert torch.equal(ours, ref)


def test_flux_kontext(planner, flux):
    image = _image(64, 64, seed=5)
    cond = _ours(planner, flux, 64, 64, images=[image])
    ours = sample(flux, cond, seed=11, steps=3, cfg=2.0, guidance=2.5, height=64, width=64, scheduler="flow_euler")
    p = flux.pipeline
    pipe = FluxKontextPipeline(
        scheduler=flux.make_scheduler("flow_euler"),
        vae=flux.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        text_encoder_2=p.text_encoder_2,
        tokenizer_2=p.tokenizer_2,
        transformer=flux.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        true_cfg_scale=2.0,
        guidance_scale=2.5,
        height=64,
        width=64,
        max_area=64 * 64,
        num_inference_steps=3,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(11),
        _auto_resize=False,
    ).images
    assert torch.equal(ours, flux_unpack(ref, flux))


def flux_unpack(packed, flux):
    from metacanvas_core.backbones.flux import unpack

    return unpack(packed, 64 // flux.vae_stride, 64 // flux.vae_stride, flux.vae_stride)


def test_no_text_encoder_means_mllm_context_and_native_is_refused(planner, tiny):
    from metacanvas_core.errors import MetaCanvasInputError

    bare = load_backbone(tiny["wan"], text_encoder=False)
    assert not bare.has_text_encoder and default_context_source(bare.has_text_encoder) == "mllm"
    native = new_metacanvas(planner.hidden_size, bare.spec, default_context_source(True))
    with pytest.raises(MetaCanvasInputError, match="loaded without it: turn load_text_encoder on"):
        native.check_compatible(planner.hidden_size, planner.folder, bare.spec, bare.folder, bare.has_text_encoder)
    with pytest.raises(MetaCanvasInputError, match="trained with 'native' context, not 'mllm'"):
        native.check_context_source("mllm")
