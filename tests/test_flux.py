"""FLUX.1-Kontext editing on the tiny models: packing, reference tokens, the canvas on target tokens only,
zero-init identity, equality with diffusers' FluxKontextPipeline, bad input; the pack's nodes refuse FLUX-Kontext
(it runs natively)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image
from support.graph import run

from metacanvas_core.backbones import Branch
from metacanvas_core.backbones.flux import FluxKontextBackbone, pack, reference_size, unpack
from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.conditioning import project
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.injection import CanvasInjection
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.sampling import sample

PROMPT, NEGATIVE = "make the sky purple and add a yellow sun", "low quality"


def photo(width: int = 96, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def flux(models_dir):
    from metacanvas_core.backbones import load_backbone

    return load_backbone(models_dir / "diffusers" / "tiny-flux-kontext")


@pytest.fixture(scope="module")
def trained(models_dir):
    return load_metacanvas(models_dir / "metacanvas" / "tiny-flux-kontext-metacanvas.safetensors")


def make_cond(planner, flux, mc, image=None, size=(64, 64), negative=NEGATIVE):
    inputs = VisualInputs([photo() if image is None else image])
    return project(mc.plan(planner, PROMPT, *size, inputs, negative), mc, flux)


def check(mc, planner, backbone):
    mc.check_compatible(planner.hidden_size, planner.folder, backbone.spec, backbone.folder, backbone.has_text_encoder)


def test_backbone_geometry(flux, trained, planner):
    assert isinstance(flux, FluxKontextBackbone) and flux.kind == "flux_kontext"
    assert flux.pixel_stride == 16 and flux.vae_stride == 8  # f8 VAE + 2×2 packing, as FLUX
    assert flux.default_size == (1024, 1024) and trained.config.canvas_grid == (1, 32, 32)  # the paper's 32×32
    assert trained.config.canvas_rule == "fixed" and trained.canvas_grid(1024, 512).as_thw() == [1, 32, 32]
    connector = trained.context_connector.net  # Linear(MLLM -> 3·text) -> SiLU -> Linear(-> text)
    assert (connector[0].in_features, connector[0].out_features) == (planner.hidden_size, 3 * flux.text_dim)
    assert connector[-1].out_features == flux.text_dim == flux.transformer.config.joint_attention_dim
    assert flux.pooled.shape == (1, flux.transformer.config.pooled_projection_dim) and flux.pooled.abs().sum() > 0
    check(trained, planner, flux)


def test_packing_round_trip(flux):
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack(latents)
    assert tokens.shape == (2, 3 * 5, 64)
    assert torch.equal(unpack(tokens, 6, 10, flux.vae_stride), latents)
    assert flux.latent_shape(1, 96, 160) == (1, 16, 12, 20)


def test_reference_size_rule():
    # At FLUX's 1024² output area it is exactly Kontext's own preferred-resolution pick.
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        assert reference_size(w, h, 1024, 1024, 16) == (h, w)
    assert reference_size(3000, 1000, 1024, 1024, 16) == (672, 1568)  # very wide input: widest bucket, no crop
    # At 512² output: half the sides, still the input's aspect ratio, multiples of 16.
    assert reference_size(1200, 800, 512, 512, 16) == (416, 624)
    assert reference_size(1200, 800, 512, 1024, 16) == (576, 880)  # the output's aspect ratio does not matter
    assert reference_size(800, 1200, 512, 512, 16) == (624, 416)


def test_reference_tokens_follow_kontext(planner, flux, trained):
    cond = make_cond(planner, flux, trained, image=photo(96, 48))
    refs = cond.references
    rh, rw = refs.size
    assert (rh, rw) == (32, 80)  # 2:1 input -> Kontext's 1456×720 bucket, scaled to the 64² output area
    n = (rh // 16) * (rw // 16)
    assert refs.tokens.shape == (1, n, 64) and refs.ids.shape == (n, 3)
    assert torch.all(refs.ids[:, 0] == 1)  # first id channel 1, as FluxKontextPipeline
    assert refs.ids[:, 1].max() == rh // 16 - 1 and refs.ids[:, 2].max() == rw // 16 - 1


def capture_block_inputs(flux):
    """Record the hidden states entering the first double block: image rows and text rows."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone()))

    return seen, flux.transformer.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_canvas_changes_only_target_tokens(planner, flux, trained):
    cond = make_cond(planner, flux, trained)
    latents = flux.initial_noise(0, 1, 64, 64)
    t = torch.tensor(700.0)
    canvas = CanvasInjection.on_tokens(cond.connector, cond.canvas, flux.token_grid(64, 64), slice(0, 1))
    seen, handle = capture_block_inputs(flux)
    try:
        with torch.no_grad():
            on = flux.predict(latents, t, Branch(cond.positive, canvas, cond.references, 2.5))
            off = flux.predict(latents, t, Branch(cond.positive, None, cond.references, 2.5))
    finally:
        handle.remove()
    (img_on, txt_on), (img_off, txt_off) = seen
    n_target = 4 * 4
    assert img_on.shape[1] == n_target + cond.references.tokens.shape[1]
    assert not torch.equal(img_on[:, :n_target], img_off[:, :n_target])  # target tokens get the canvas
    assert torch.equal(img_on[:, n_target:], img_off[:, n_target:])  # reference tokens untouched
    assert torch.equal(txt_on, txt_off)  # text stream untouched
    assert on.shape == off.shape == latents.shape and not torch.equal(on, off)


def test_untrained_connector_is_exact_identity(planner, flux):
    mc = new_metacanvas(planner.hidden_size, flux.spec, "mllm")
    cond = make_cond(planner, flux, mc)
    kw = dict(seed=3, steps=2, cfg=3.0, height=64, width=64, scheduler="flow_euler", guidance=2.5, image_cfg=1.5)
    assert torch.equal(sample(flux, cond, use_canvas=True, **kw), sample(flux, cond, use_canvas=False, **kw))


def test_canvas_off_equals_flux_kontext_pipeline(planner, flux, trained):
    """One branch (no CFG), canvas off: the same arithmetic as diffusers' FluxKontextPipeline, bit for bit."""
    image = photo(96, 48)
    cond = make_cond(planner, flux, trained, image=image)
    ours = sample(
        flux,
        cond,
        seed=5,
        steps=3,
        cfg=1.0,
        height=64,
        width=64,
        scheduler="flow_euler",
        guidance=2.5,
        use_canvas=False,
    )
    rh, rw = cond.references.size
    pipe = FluxKontextPipeline(
        scheduler=flux.make_scheduler("flow_euler"),
        vae=flux.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=flux.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        image=pipe.image_processor.resize(image, rh, rw),  # our reference-size rule; the pipeline then keeps it
        prompt_embeds=cond.positive.embeds,
        pooled_prompt_embeds=flux.pooled,
        height=64,
        width=64,
        max_area=64 * 64,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
        _auto_resize=False,
    ).images
    assert torch.equal(pack(ours), ref)


def test_guidance_and_image_guidance_change_the_result(planner, flux, trained):
    cond = make_cond(planner, flux, trained)
    kw = dict(seed=1, steps=2, height=64, width=64, scheduler="flow_euler")
    base = sample(flux, cond, cfg=3.0, guidance=2.5, **kw)
    assert torch.equal(base, sample(flux, cond, cfg=3.0, guidance=2.5, image_cfg=1.0, **kw))
    assert not torch.equal(base, sample(flux, cond, cfg=3.0, guidance=2.5, image_cfg=1.5, **kw))
    assert not torch.equal(base, sample(flux, cond, cfg=3.0, guidance=4.0, **kw))
    assert not torch.equal(base, sample(flux, cond, cfg=1.0, guidance=2.5, **kw))
    # Values set on the conditioning (the Edit Guidance node) are the defaults of `sample`.
    from dataclasses import replace

    assert torch.equal(
        sample(flux, replace(cond, guidance=2.5, image_cfg=1.5), cfg=3.0, **kw),
        sample(flux, cond, cfg=3.0, guidance=2.5, image_cfg=1.5, **kw),
    )


def test_output_depends_on_the_input_image(planner, flux, trained):
    kw = dict(seed=0, steps=2, cfg=1.0, height=64, width=48, scheduler="flow_euler")
    a = sample(flux, make_cond(planner, flux, trained, image=photo(seed=1)), **kw)
    b = sample(flux, make_cond(planner, flux, trained, image=photo(seed=2)), **kw)
    assert a.shape == (1, 16, 8, 6) and not torch.equal(a, b)


def test_bad_input(planner, flux, trained, tiny):
    with pytest.raises(MetaCanvasInputError, match="images: this MetaCanvas checkpoint is for flux_kontext"):
        trained.plan(planner, PROMPT, 64, 64)
    plan = dataclasses.replace(trained.plan(planner, PROMPT, 64, 64, VisualInputs([photo()])), inputs=VisualInputs())
    with pytest.raises(MetaCanvasInputError, match="images: the FLUX.1-Kontext backbone edits an input image"):
        project(plan, trained, flux)
    plan = trained.plan(planner, PROMPT, 64, 64, VisualInputs([photo(), photo()]))
    with pytest.raises(MetaCanvasInputError, match="edits one input image, the plan has 2"):
        project(plan, trained, flux)
    cond = make_cond(planner, flux, trained)
    with pytest.raises(MetaCanvasInputError, match="width 72 is not a positive multiple of 16"):
        sample(flux, cond, seed=0, steps=1, cfg=1.0, height=64, width=72, scheduler="flow_euler")
    with pytest.raises(MetaCanvasInputError, match="is for sana, the backbone is flux_kontext"):
        project(plan, load_metacanvas(tiny["sana_metacanvas"]), flux)
    with pytest.raises(MetaCanvasInputError, match="made for a sana backbone"):
        check(load_metacanvas(tiny["sana_metacanvas"]), planner, flux)


# --- the pack's nodes: FLUX-Kontext runs in ComfyUI only as the native patch (native_image_editing) ---------------


@pytest.mark.parametrize("folder", ["tiny-flux-kontext", "FLUX.1-Kontext-dev"])
def test_the_backbone_loader_refuses_flux_kontext(pack, folder):
    """The pack's Backbone Loader does not list a FLUX-Kontext folder and refuses one at validation (installed, or
    named by a saved graph and not installed) with one message naming the folder and its replacement: core Load
    Diffusion Model + MetaCanvas Apply, the template native_image_editing. Run anyway, it raises the same message."""
    loader = pack.NODE_CLASS_MAPPINGS["MetaCanvasBackboneLoader"]
    assert folder not in loader.INPUT_TYPES()["required"]["backbone_folder"][0]
    message = loader.VALIDATE_INPUTS(backbone_folder=folder)
    assert isinstance(message, str) and message.startswith(f"Backbone folder '{folder}' is FLUX.1-Kontext"), message
    for needle in ("SANA only", "Load Diffusion Model", "MetaCanvas Apply", "native_image_editing"):
        assert needle in message, needle
    with pytest.raises(MetaCanvasInputError) as raised:
        run(loader, backbone_folder=folder, dtype="fp32")
    assert str(raised.value) == message


def test_edit_guidance_is_deprecated(pack):
    """Edit Guidance served only the pack's FLUX graph: marked DEPRECATED (ComfyUI hides it from search and still
    loads old graphs), with its inputs and defaults as saved graphs hold them; running it stops with a message that
    names what replaces it in native_image_editing."""
    cls = pack.NODE_CLASS_MAPPINGS["MetaCanvasEditGuidance"]
    assert cls.DEPRECATED is True and "Deprecated" in cls.DESCRIPTION
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["MetaCanvasEditGuidance"] == "MetaCanvas Edit Guidance"
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["cond", "guidance", "image_cfg"]
    assert required["guidance"][1]["default"] == 2.5 and required["image_cfg"][1]["default"] == 1.5
    assert cls.VALIDATE_INPUTS(guidance=2.5, image_cfg=1.5) is True  # an old graph's values pass validation
    with pytest.raises(MetaCanvasInputError, match="Edit Guidance is deprecated") as raised:
        run(cls, cond=None, guidance=2.5, image_cfg=1.5)
    for needle in ("native_image_editing", "FluxGuidance", "DualCFGGuider"):
        assert needle in str(raised.value), needle
    others = {n for n, c in pack.NODE_CLASS_MAPPINGS.items() if getattr(c, "DEPRECATED", False)}
    assert others == {"MetaCanvasEditGuidance"}


def test_plan_node_documents_its_images(pack):
    """In ComfyUI FLUX-Kontext runs natively: the image to edit is scaled by core FluxKontextImageScale."""
    tip = pack.NODE_CLASS_MAPPINGS["MetaCanvasPlan"].INPUT_TYPES()["optional"]["images"][1]["tooltip"]
    assert "FluxKontextImageScale" in tip and "ReferenceLatent" in tip


def test_one_pooled_rule_under_mllm_context(planner, flux):
    """FLUX with MLLM context takes the pooled vector the checkpoint stores, on every path (the pack's projection,
    training, the native Text Conditioning: `conditioning.mllm_pooled`); a checkpoint from before it stored one is
    refused, no longer given the backbone's default on the pack's path only."""
    from metacanvas_core.conditioning import mllm_pooled

    mc = new_metacanvas(planner.hidden_size, flux.spec, "mllm", pooled=torch.randn(1, flux.spec.pooled_dim))
    with torch.no_grad():
        plan = mc.plan(planner, PROMPT, 64, 64, VisualInputs([photo()]), NEGATIVE)
        cond = project(plan, mc, flux)
    assert torch.equal(mllm_pooled(mc), mc.pooled) and torch.equal(cond.positive.pooled, mc.pooled)
    mc.pooled = None  # as a FLUX checkpoint from before the pooled vector was stored
    with pytest.raises(MetaCanvasInputError, match="stores no pooled vector for FLUX's pooled slot"):
        project(plan, mc, flux)
