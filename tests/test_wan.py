"""Wan2.2-TI2V video: keyframe canvas, zero-init identity, equality with diffusers' Wan pipelines,
image-to-video first frame, canvas never on reference tokens; the pack's nodes refuse Wan (it runs natively)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image
from support.graph import run

from metacanvas_core.backbones import Branch, load_backbone
from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.conditioning import project
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.injection import CanvasInjection
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.sampling import sample

H = W = 64  # tiny Wan: pixel stride 32, canvas factor 2 -> a 1×1 canvas per keyframe; 128 -> 2×2
PROMPT = "a red ball rolls from left to right"


@pytest.fixture(scope="module")
def wan(tiny):
    return load_backbone(tiny["wan"])


@pytest.fixture(scope="module")
def fresh(planner, wan):
    return new_metacanvas(planner.hidden_size, wan.spec, "native")


@pytest.fixture(scope="module")
def trained(tiny):
    return load_metacanvas(tiny["wan_metacanvas"])


def _image(color=(220, 30, 30), size=(H, W)):
    return Image.new("RGB", size[::-1], color)


def _cond(planner, wan, mc, h=H, w=W, keyframes=None, **inputs):
    return project(mc.plan(planner, PROMPT, h, w, VisualInputs(**inputs), "blurry", keyframes), mc, wan)


def _injection(cond, wan, h, w, frames):
    return CanvasInjection.on_tokens(cond.connector, cond.canvas, wan.token_grid(h, w, frames), slice(0, 1))


def test_keyframe_canvas_shapes(planner, wan, trained):
    assert trained.config.canvas_grid == (3, 11, 20)  # the paper's 3 × 11×20 at 704×1280
    assert trained.canvas_grid(128, 128).as_thw() == [3, 2, 2]
    assert trained.canvas_grid(128, 128, keyframes=1).as_thw() == [1, 2, 2]
    for k in (1, 3):
        cond = _cond(planner, wan, trained, 128, 128, keyframes=k)
        assert cond.canvas.shape == (1, k, 2, 2, wan.width)


def test_zero_init_is_the_plain_backbone(planner, wan, fresh):
    source = [_image()] * 9
    cond = _cond(planner, wan, fresh, video=source)
    refs = cond.references  # the source is encoded once the length is known
    assert len(refs.source_frames) == 9 and refs.source is None and refs.condition is fresh.condition_embedding
    refs = wan.fit_references(refs, 9)
    assert not refs.source_frames and refs.source.shape[2] == 3
    latents = wan.initial_noise(0, 1, H, W, 9)
    inj = _injection(cond, wan, H, W, 9)
    t = torch.tensor(700.0)
    with_all = wan.predict(latents, t, Branch(cond.positive, inj, refs))
    plain = wan.predict(latents, t, Branch(cond.positive))
    assert torch.equal(with_all, plain)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_untrained_equals_diffusers_wan_pipelines(planner, wan, fresh, task):
    """Canvas on, fresh checkpoint: the same latents as WanPipeline / WanImageToVideoPipeline (expand_timesteps)
    given the same prompt embeddings (here the context connector's), seed, steps, guidance and scheduler."""
    image = _image((30, 200, 90))
    cond = _cond(planner, wan, fresh, **({"images": [image], "role": "first frame"} if task == "i2v" else {}))
    ours = sample(wan, cond, seed=5, steps=3, cfg=5.0, height=H, width=W, scheduler="unipc_flow", frames=9)
    parts = dict(vae=wan.vae, transformer=wan.transformer, scheduler=wan.make_scheduler("unipc_flow"))
    call = dict(
        prompt_embeds=cond.positive.embeds,
        negative_prompt_embeds=cond.negative.embeds,
        height=H,
        width=W,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    )
    if task == "t2v":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, expand_timesteps=True, **parts)
        ref = pipe(**call).frames
    else:
        pipe = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None, expand_timesteps=True, **parts
        )
        ref = pipe(image=image, **call).frames
    assert torch.equal(ours, ref)


def test_image_to_video_keeps_the_first_frame(planner, wan, trained):
    cond = _cond(planner, wan, trained, images=[_image()], role="first frame")
    latents = sample(wan, cond, seed=0, steps=2, cfg=4.0, height=H, width=W, scheduler="unipc_flow", frames=9)
    assert torch.equal(latents[:, :, :1], cond.references.first_frame)
    frames = wan.decode(latents)
    assert frames.shape == (9, H, W, 3)


def _first_block_input(wan, fn):
    seen = {}
    handle = wan.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        fn()
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("kind", ["references", "first frame"])
def test_canvas_never_reaches_clean_tokens(planner, wan, trained, kind):
    images = [_image(), _image((10, 10, 240))] if kind == "references" else [_image()]
    cond = _cond(planner, wan, trained, 128, 128, images=images, role=kind)
    latents = wan.initial_noise(1, 1, 128, 128, 9)
    inj = _injection(cond, wan, 128, 128, 9)
    t = torch.tensor(500.0)
    on = _first_block_input(wan, lambda: wan.predict(latents, t, Branch(cond.positive, inj, cond.references)))
    off = _first_block_input(wan, lambda: wan.predict(latents, t, Branch(cond.positive, None, cond.references)))
    clean_frames = 2 if kind == "references" else 1
    per_frame = (128 // 32) ** 2
    n = clean_frames * per_frame
    assert torch.equal(on[:, :n], off[:, :n])  # reference / first-frame tokens untouched
    assert not torch.allclose(on[:, n:], off[:, n:])  # noisy target tokens get the canvas


def test_chunked_decode_equals_the_vae(wan):
    latents = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = wan.decode(latents)
    reference = wan.vae.decode(wan._normalize(latents, inverse=True)).sample
    assert torch.equal(ours, (reference.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0))


def test_bad_video_input(planner, wan, trained, tiny, sana):
    cond = _cond(planner, wan, trained)
    with pytest.raises(MetaCanvasInputError, match="length 8 is not 4k\\+1 .*set length to 5 or 9"):
        sample(wan, cond, seed=0, steps=1, cfg=1.0, height=H, width=W, scheduler="unipc_flow", frames=8)
    with pytest.raises(MetaCanvasInputError, match="width 80 is not a positive multiple of 32"):
        sample(wan, cond, seed=0, steps=1, cfg=1.0, height=H, width=80, scheduler="unipc_flow", frames=5)
    short = _cond(planner, wan, trained, video=[_image()] * 5)
    with pytest.raises(MetaCanvasInputError, match="video: the source video gives 5 usable frames, fewer than the 9"):
        sample(wan, short, seed=0, steps=1, cfg=1.0, height=H, width=W, scheduler="unipc_flow", frames=9)
    with pytest.raises(MetaCanvasInputError, match="4 reference images; MetaCanvas video takes 1 to 3"):
        _cond(planner, wan, trained, images=[_image()] * 4)
    with pytest.raises(MetaCanvasInputError, match="made for a sana backbone"):
        load_metacanvas(tiny["sana_metacanvas"]).check_compatible(planner.hidden_size, "", wan.spec, "")
    with pytest.raises(MetaCanvasInputError, match="length 5: the sana backbone .* makes images"):
        sana.check_size(64, 64, 5)


NATIVE_WAN = ("native_text_to_video", "native_image_to_video", "native_video_editing", "native_in_context_video")


@pytest.mark.parametrize("folder", ["tiny-wan2_2-ti2v", "Wan2.2-TI2V-5B-Diffusers"])
def test_the_backbone_loader_refuses_wan(pack, folder):
    """Wan2.2 runs in ComfyUI only as the native patch: the pack's Backbone Loader does not list a Wan folder and
    refuses one at validation (a saved graph naming the installed tiny folder, or the real one not installed), with
    one message naming the folder and what replaces it: core Load Diffusion Model + MetaCanvas Apply, the native
    templates. Run anyway, it raises the same message."""
    loader = pack.NODE_CLASS_MAPPINGS["MetaCanvasBackboneLoader"]
    choices = loader.INPUT_TYPES()["required"]["backbone_folder"][0]
    assert "tiny-sana" in choices and folder not in choices
    message = loader.VALIDATE_INPUTS(backbone_folder=folder)
    assert isinstance(message, str) and message.startswith(f"Backbone folder '{folder}' is Wan2.2"), message
    for needle in ("SANA only", "Load Diffusion Model", "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors"):
        assert needle in message, needle
    assert "MetaCanvas Apply" in message and all(name in message for name in NATIVE_WAN), message
    with pytest.raises(MetaCanvasInputError) as raised:
        run(loader, backbone_folder=folder, dtype="fp32")
    assert str(raised.value) == message


def test_the_sampler_makes_images_only(pack):
    """The pack's Sampler samples SANA: a video length (a saved Wan graph's 121) is refused at validation, naming
    the native Wan graphs; length 1, as every saved SANA graph holds, passes."""
    sampler = pack.NODE_CLASS_MAPPINGS["MetaCanvasSampler"]
    assert sampler.VALIDATE_INPUTS(width=W, height=H, length=1) is True
    message = sampler.VALIDATE_INPUTS(width=W, height=H, length=121)
    assert isinstance(message, str) and message.startswith("length 121: MetaCanvas Sampler samples SANA"), message
    assert "native_text_to_video" in message and "MetaCanvas Apply" in message


def test_native_wan_inputs_reach_the_vae_as_in_training(pack):
    """MetaCanvas Wan Inputs resizes reference images and source frames the one way training does (`injection.vae_pixels`:
    diffusers' VideoProcessor, Lanczos): the 0..1 pixels it hands ComfyUI's VAE become, once that VAE maps them to
    [-1, 1] (x * 2 - 1), training's pixels to float32 rounding; the bicubic resize it used before differs."""
    import numpy as np
    from PIL import Image

    from metacanvas_core.injection import vae_pixels

    nodes_native = __import__("metacanvas_pack.nodes.nodes_native", fromlist=["_encode"])
    frames = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (48, 80, 3), dtype=np.uint8)) for k in range(3)]

    class RecordingVAE:  # stands in for ComfyUI's VAE: records the pixels it is given
        def encode(self, pixels):
            self.pixels = pixels
            return torch.zeros(1)

    vae = RecordingVAE()
    nodes_native._encode(vae, frames, 64, 32)
    trained = vae_pixels(frames, 32, 64, 16)[0].permute(1, 2, 3, 0)  # (n, H, W, 3) in [-1, 1]
    assert vae.pixels.shape == (3, 32, 64, 3)
    torch.testing.assert_close(vae.pixels * 2 - 1, trained, rtol=0, atol=2.4e-7)
    bicubic = np.stack([np.asarray(f.resize((64, 32), Image.BICUBIC)) for f in frames]).astype(np.float32) / 255
    assert (torch.from_numpy(bicubic) * 2 - 1 - trained).abs().max() > 1e-2
