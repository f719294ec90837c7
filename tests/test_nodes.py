"""The node chain called directly, as ComfyUI would call it (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch
from support.graph import run


@pytest.fixture(scope="module")
def loaded(pack):
    m = pack.NODE_CLASS_MAPPINGS
    (mllm,) = run(m["MetaCanvasMLLMLoader"], mllm_folder="tiny-qwen2_5-vl", dtype="fp32")
    (backbone,) = run(m["MetaCanvasBackboneLoader"], backbone_folder="tiny-sana", dtype="fp32")
    return m, mllm, backbone


def chain(loaded, checkpoint, seed=0, use_canvas=True, images=None):
    m, mllm, backbone = loaded
    (mc,) = run(m["MetaCanvasConnectorLoader"], mllm=mllm, backbone=backbone, checkpoint=checkpoint)
    (plan,) = run(
        m["MetaCanvasPlan"],
        mllm=mllm,
        metacanvas=mc,
        prompt="a red circle at the top left",
        negative_prompt="",
        width=64,
        height=64,
        images=images,
    )
    (cond,) = run(m["MetaCanvasProject"], plan=plan, metacanvas=mc, backbone=backbone)
    (latent,) = run(
        m["MetaCanvasSampler"],
        backbone=backbone,
        cond=cond,
        seed=seed,
        steps=2,
        cfg=4.5,
        width=64,
        height=64,
        scheduler="dpm_solver_flow",
        use_canvas=use_canvas,
    )
    image, video = run(m["MetaCanvasDecode"], backbone=backbone, latent=latent)
    assert torch.equal(video.images, image) and video.frame_rate == 24
    return image


def test_node_chain_makes_an_image(loaded):
    image = chain(loaded, "tiny-sana-metacanvas.safetensors")
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_node_chain_with_input_images(loaded):
    images = torch.rand(2, 56, 56, 3)
    assert chain(loaded, "tiny-sana-metacanvas.safetensors", images=images).shape == (1, 64, 64, 3)


def test_canvas_switch_and_untrained_connector(loaded):
    trained_on = chain(loaded, "tiny-sana-metacanvas.safetensors")
    trained_off = chain(loaded, "tiny-sana-metacanvas.safetensors", use_canvas=False)
    assert not torch.equal(trained_on, trained_off)
    assert torch.equal(chain(loaded, "new (untrained)"), trained_off)


def test_seed(loaded):
    a, b = chain(loaded, "new (untrained)", seed=3), chain(loaded, "new (untrained)", seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, chain(loaded, "new (untrained)", seed=4))


def test_every_node_documents_itself(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("MetaCanvas") and cls.CATEGORY == "MetaCanvas"
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in cls.INPUT_TYPES().values():
            for input_name, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS


def test_validation_messages(pack):
    m = pack.NODE_CLASS_MAPPINGS
    msg = m["MetaCanvasSampler"].VALIDATE_INPUTS(width=500, height=512)
    assert isinstance(msg, str) and "width 500" in msg and "multiple of 16" in msg
    msg = m["MetaCanvasSampler"].VALIDATE_INPUTS(width=512, height=512, length=5)
    assert msg.startswith("length 5: MetaCanvas Sampler samples SANA, which makes images") and "native_" in msg
    assert m["MetaCanvasPlan"].VALIDATE_INPUTS(width=512, height=512) is True
    msg = m["MetaCanvasMLLMLoader"].VALIDATE_INPUTS(mllm_folder="Qwen2.5-VL-7B-Instruct")
    assert "Qwen2.5-VL-7B-Instruct" in msg and "LLM" in msg and "Put it in" in msg
    msg = m["MetaCanvasConnectorLoader"].VALIDATE_INPUTS(checkpoint="missing.safetensors")
    assert "metacanvas" in msg
    assert m["MetaCanvasConnectorLoader"].VALIDATE_INPUTS(checkpoint="new (untrained)") is True


def test_runtime_errors_name_the_input(loaded):
    from metacanvas_core.errors import MetaCanvasInputError

    m, mllm, backbone = loaded
    with pytest.raises(MetaCanvasInputError, match="images: the image batch is empty"):
        chain(loaded, "new (untrained)", images=torch.zeros(0, 56, 56, 3))
    (mc,) = run(m["MetaCanvasConnectorLoader"], mllm=mllm, backbone=backbone, checkpoint="new (untrained)")
    (plan,) = run(m["MetaCanvasPlan"], mllm=mllm, metacanvas=mc, prompt="", negative_prompt="", width=64, height=64)
    (cond,) = run(m["MetaCanvasProject"], plan=plan, metacanvas=mc, backbone=backbone)
    with pytest.raises(MetaCanvasInputError, match=r"width 66 is not a positive multiple of 4 \(the pixel stride"):
        run(
            m["MetaCanvasSampler"],
            backbone=backbone,
            cond=cond,
            seed=0,
            steps=1,
            cfg=1.0,
            width=66,
            height=64,
            scheduler="flow_euler",
            use_canvas=True,
        )


def test_wrong_model_kind(pack, models_dir):
    from metacanvas_core.errors import MetaCanvasInputError

    m = pack.NODE_CLASS_MAPPINGS
    wrong = models_dir / "LLM" / "not-qwen"
    wrong.mkdir(exist_ok=True)
    (wrong / "config.json").write_text('{"model_type": "gemma2"}')
    with pytest.raises(MetaCanvasInputError, match="'gemma2' model; the MLLM Loader needs Qwen2.5-VL"):
        run(m["MetaCanvasMLLMLoader"], mllm_folder="not-qwen", dtype="fp32")


def test_the_backbone_loader_is_sana_only(pack, models_dir):
    """The pack's own loader and sampler serve SANA (ComfyUI has none); Wan2.2 and FLUX-Kontext run as the native
    patch (their refusals: test_wan.py, test_flux.py). The combo lists only folders whose model_index.json names a
    SANA pipeline; any other pipeline folder is refused at validation, named."""
    from metacanvas_core.backbones.sana import SanaBackbone
    from metacanvas_core.errors import MetaCanvasInputError

    loader = pack.NODE_CLASS_MAPPINGS["MetaCanvasBackboneLoader"]
    other = models_dir / "diffusers" / "not-sana"
    other.mkdir(exist_ok=True)
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    try:
        choices = loader.INPUT_TYPES()["required"]["backbone_folder"][0]
        assert "tiny-sana" in choices and "not-sana" not in choices
        assert not {"tiny-wan2_2-ti2v", "tiny-flux-kontext"} & set(choices)
        assert "SanaPipeline" in SanaBackbone.pipeline_class_names
        assert loader.VALIDATE_INPUTS(backbone_folder="tiny-sana") is True
        message = loader.VALIDATE_INPUTS(backbone_folder="not-sana")
        assert message.startswith("Backbone folder 'not-sana' is a 'StableDiffusionPipeline' folder"), message
        assert "loads SANA only" in message and "SanaPipeline" in message
        with pytest.raises(MetaCanvasInputError, match="'not-sana' is a 'StableDiffusionPipeline' folder"):
            run(loader, backbone_folder="not-sana", dtype="fp32")
    finally:
        (other / "model_index.json").unlink()
        other.rmdir()
    message = loader.VALIDATE_INPUTS(backbone_folder="Sana_1600M_512px_diffusers")  # not installed here
    assert "'Sana_1600M_512px_diffusers' was not found" in message and "Put it in" in message
