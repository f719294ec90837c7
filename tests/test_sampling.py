"""The sampler is SANA when the canvas is off, seeds are reproducible, schedulers are the real ones."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaPipeline

from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.conditioning import project
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.sampling import sample
from metacanvas_core.schedulers import SCHEDULERS

PROMPT, NEGATIVE = "a red circle at the top left and a blue square", "low quality"


@pytest.fixture(scope="module")
def fresh_cond(planner, sana):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    return project(mc.plan(planner, PROMPT, 64, 64, negative_prompt=NEGATIVE), mc, sana)


@pytest.mark.parametrize("scheduler", ["dpm_solver_flow", "flow_euler"])
def test_untrained_equals_sana_pipeline(sana, fresh_cond, scheduler):
    """Same arithmetic as diffusers' SanaPipeline (its prompt encoding, batching and CFG): exact equality."""
    ours = sample(sana, fresh_cond, seed=7, steps=3, cfg=4.5, height=64, width=64, scheduler=scheduler)
    pipe = SanaPipeline(
        tokenizer=sana.pipeline.tokenizer,
        text_encoder=sana.text_encoder,
        vae=sana.vae,
        transformer=sana.transformer,
        scheduler=sana.make_scheduler(scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=3,
        guidance_scale=4.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
        use_resolution_binning=False,
    ).images
    assert torch.equal(ours, ref)
    image = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
    assert torch.equal(sana.decode(ours), (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_connector_clock_is_sigma_times_1000_in_float32(sana, fresh_cond, scheduler):
    """Every scheduler: the fuse block's clock is the step's sigma·1000 in float32 (what training and ComfyUI's native path
    give it), not the scheduler's timestep, which UniPC and DPM round down to int64 for the DiT."""
    seen = []
    hook = fresh_cond.connector.time_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        sample(sana, fresh_cond, seed=0, steps=4, cfg=4.5, height=64, width=64, scheduler=scheduler)
    finally:
        hook.remove()
    reference = sana.make_scheduler(scheduler)
    sana.set_timesteps(reference, 4, 64, 64)
    expected = reference.sigmas[:4].to(torch.float32) * 1000
    clocks = torch.cat(seen)
    assert clocks.dtype == torch.float32 and torch.equal(clocks, expected), (clocks, reference.timesteps)
    if reference.timesteps.dtype == torch.int64:  # the DiT's timestep: below the clock by up to one unit
        gap = clocks - reference.timesteps
        assert bool((gap >= 0).all() and (gap < 1).all() and (gap > 0).any()), gap


def test_same_seed_same_image(sana, tiny, planner):
    mc = load_metacanvas(tiny["sana_metacanvas"])
    cond = project(mc.plan(planner, PROMPT, 64, 96), mc, sana)
    kw = dict(steps=2, cfg=3.0, height=64, width=96, scheduler="flow_euler")
    a, b = sample(sana, cond, seed=1, **kw), sample(sana, cond, seed=1, **kw)
    assert a.shape == (1, 4, 16, 24) and torch.equal(a, b)
    assert not torch.equal(a, sample(sana, cond, seed=2, **kw))
    steps_seen = []
    sample(sana, cond, seed=1, on_step=lambda i, n: steps_seen.append((i, n)), **kw)
    assert steps_seen == [(0, 2), (1, 2)]


def test_canvas_resized_to_another_output_size(sana, tiny, planner):
    mc = load_metacanvas(tiny["sana_metacanvas"])
    cond = project(mc.plan(planner, PROMPT, 64, 64), mc, sana)
    out = sample(sana, cond, seed=0, steps=1, cfg=1.0, height=128, width=64, scheduler="flow_euler")
    assert out.shape == (1, 4, 32, 16)


def test_bad_sampler_input(sana, fresh_cond):
    with pytest.raises(MetaCanvasInputError, match="height 30 is not a positive multiple of 4"):
        sample(sana, fresh_cond, seed=0, steps=1, cfg=1.0, height=30, width=64, scheduler="flow_euler")
    with pytest.raises(MetaCanvasInputError, match="scheduler 'ddim' is not one of"):
        sample(sana, fresh_cond, seed=0, steps=1, cfg=1.0, height=64, width=64, scheduler="ddim")


def test_interrupt_stops_the_loop(sana, fresh_cond):
    class Interrupted(Exception):
        pass

    def on_step(i, n):
        raise Interrupted

    with pytest.raises(Interrupted):
        sample(sana, fresh_cond, seed=0, steps=5, cfg=1.0, height=64, width=64, scheduler="flow_euler", on_step=on_step)


def test_bf16_backbone_with_fp32_checkpoint(tiny, planner):
    from metacanvas_core.backbones import load_backbone

    sana16 = load_backbone(tiny["sana"], dtype=torch.bfloat16)
    mc = load_metacanvas(tiny["sana_metacanvas"])
    cond = project(mc.plan(planner, PROMPT, 64, 64), mc, sana16)
    kw = dict(seed=0, steps=2, cfg=4.5, height=64, width=64, scheduler="flow_euler")
    on, off = sample(sana16, cond, **kw), sample(sana16, cond, use_canvas=False, **kw)
    assert on.dtype == torch.float32 and torch.isfinite(on).all() and not torch.equal(on, off)
    assert torch.isfinite(sana16.decode(on)).all()


def test_negative_from_another_conditioning(sana, fresh_cond, planner):
    mc = new_metacanvas(planner.hidden_size, sana.spec, "native")
    other = project(mc.plan(planner, "a green tree", 64, 64), mc, sana)
    swapped = fresh_cond.with_negative(other)
    assert swapped.negative is other.positive and swapped.positive is fresh_cond.positive
    kw = dict(seed=0, steps=2, cfg=4.5, height=64, width=64, scheduler="flow_euler")
    assert not torch.equal(sample(sana, swapped, **kw), sample(sana, fresh_cond, **kw))
