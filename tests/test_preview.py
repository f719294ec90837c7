"""MetaCanvas Plan Preview: PCA of the aligned canvas as RGB, deterministic, at the output size, one image per keyframe,
blended over a generated image on request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.graph import run

from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.preview import keyframe_images, pca_rgb, plan_preview


def test_pca_colours_follow_the_structure():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=g)
    labels = torch.arange(40) % 2
    x = labels[:, None] * direction + 0.01 * torch.randn(40, 32, generator=g)  # two groups along one direction
    rgb = pca_rgb(x)
    assert rgb.shape == (40, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[:, 0]
    assert (first[labels == 0].max() < 0.2 and first[labels == 1].min() > 0.8) or (
        first[labels == 1].max() < 0.2 and first[labels == 0].min() > 0.8
    )
    for c in range(3):  # each component stretched over 0..1
        assert rgb[:, c].min() == 0 and rgb[:, c].max() == 1


def test_pca_is_deterministic():
    """Same colours on every call and whatever the row order (the sign of each component is fixed, not random)."""
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pca_rgb(x), pca_rgb(x.clone()))
    order = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pca_rgb(x[order]), pca_rgb(x)[order], rtol=0, atol=1e-5)


def test_empty_canvas_is_grey():
    assert torch.equal(pca_rgb(torch.zeros(12, 8)), torch.full((12, 3), 0.5))
    rank_one = torch.arange(12.0)[:, None] * torch.ones(1, 8)  # one component carries everything
    rgb = pca_rgb(rank_one)
    assert torch.equal(rgb[:, 1:], torch.full((12, 2), 0.5)) and rgb[:, 0].max() == 1


def test_preview_size_keyframes_and_blend():
    aligned = torch.randn(1, 3, 2, 4, 16, generator=torch.Generator().manual_seed(3))
    plan = plan_preview(aligned, (64, 128))
    assert plan.shape == (3, 64, 128, 3)
    assert torch.equal(plan[0, :32, :32], plan[0, :1, :1].expand(32, 32, 3))  # one canvas token = one block
    video = torch.rand(9, 32, 64, 3)
    assert torch.equal(keyframe_images(video, 3), video[[1, 4, 7]])  # each keyframe's centre frame
    assert torch.equal(keyframe_images(video[:1], 3), video[[0, 0, 0]])
    over = plan_preview(aligned, (64, 128), video, blend=0.25)
    under = F.interpolate(video[[1, 4, 7]].permute(0, 3, 1, 2), size=(64, 128), mode="bilinear", antialias=True)
    under = under.clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(over, 0.25 * plan + 0.75 * under)
    assert torch.equal(plan_preview(aligned, (64, 128), video, blend=1.0), plan)


@pytest.fixture(scope="module")
def nodes(pack):
    m = pack.NODE_CLASS_MAPPINGS
    (mllm,) = run(m["MetaCanvasMLLMLoader"], mllm_folder="tiny-qwen2_5-vl", dtype="fp32")
    return m, mllm


def _plan(nodes, backbone_folder, checkpoint, width, height, **plan_inputs):
    m, mllm = nodes
    (backbone,) = run(m["MetaCanvasBackboneLoader"], backbone_folder=backbone_folder, dtype="fp32")
    (mc,) = run(m["MetaCanvasConnectorLoader"], mllm=mllm, backbone=backbone, checkpoint=checkpoint)
    kw = dict(prompt="a red ball on the left", negative_prompt="", width=width, height=height)
    (plan,) = run(m["MetaCanvasPlan"], mllm=mllm, metacanvas=mc, **kw, **plan_inputs)
    return plan, mc


def test_node_one_image_per_keyframe_at_the_output_size(nodes, pack, models_dir):
    m, mllm = nodes
    plan, mc = _plan(nodes, "tiny-sana", "tiny-sana-metacanvas.safetensors", 96, 64)
    (image,) = run(m["MetaCanvasPlanPreview"], plan=plan, metacanvas=mc)
    assert image.shape == (1, 64, 96, 3) and image.dtype == torch.float32 and image.std() > 0
    (again,) = run(m["MetaCanvasPlanPreview"], plan=plan, metacanvas=mc)
    assert torch.equal(image, again)
    generated = torch.rand(1, 64, 96, 3)
    (half,) = run(m["MetaCanvasPlanPreview"], plan=plan, metacanvas=mc, image=generated, blend=0.5)
    torch.testing.assert_close(half, 0.5 * image + 0.5 * generated)

    # Wan2.2 runs natively in ComfyUI: its checkpoint as the Connector Loader hands it on for a native MODEL.
    wan_mc = load_metacanvas(models_dir / "metacanvas" / "tiny-wan2_2-metacanvas.safetensors")
    video_mc = pack.nodes.runtime.Loaded(wan_mc, {"metacanvas": wan_mc})
    kw = dict(prompt="a red ball rolls", negative_prompt="", width=128, height=128)
    (video_plan,) = run(m["MetaCanvasPlan"], mllm=mllm, metacanvas=video_mc, **kw)
    (frames,) = run(m["MetaCanvasPlanPreview"], plan=video_plan, metacanvas=video_mc, image=torch.rand(5, 128, 128, 3))
    assert frames.shape == (3, 128, 128, 3)  # Wan2.2's 3 keyframes


def test_node_untrained_is_grey_and_plans_must_match(nodes):
    from metacanvas_core.errors import MetaCanvasInputError

    m, _ = nodes
    plan, mc = _plan(nodes, "tiny-sana", "new (untrained)", 64, 64)
    (image,) = run(m["MetaCanvasPlanPreview"], plan=plan, metacanvas=mc)
    assert torch.equal(image, torch.full((1, 64, 64, 3), 0.5))
    _, other = _plan(nodes, "tiny-sana", "tiny-sana-metacanvas.safetensors", 64, 64)
    with pytest.raises(MetaCanvasInputError, match="give the Plan node and this node the same Connector Loader"):
        run(m["MetaCanvasPlanPreview"], plan=plan, metacanvas=other)
