"""The canvas as a dial on the pack's own sampler path: strength 0 and an all-zero mask are exactly no canvas,
strength 1 is the residual as trained, and a mask confines the residual to its region (video: per frame or one for
all frames)."""

from __future__ import annotations

import pytest
import torch

from metacanvas_core.backbones import Branch, load_backbone
from metacanvas_core.canvas import interpolate_canvas
from metacanvas_core.checkpoint import load_metacanvas
from metacanvas_core.conditioning import project
from metacanvas_core.injection import CanvasInjection
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.sampling import sample

PROMPT = "a red circle at the top left and a blue square at the bottom right"
SIZE = 64


@pytest.fixture(scope="module")
def cond(planner, sana, tiny):
    """A checkpoint with nonzero projections (the tiny stand-in for a trained one) projected for SANA."""
    mc = load_metacanvas(tiny["sana_metacanvas"])
    with torch.no_grad():
        return project(mc.plan(planner, PROMPT, SIZE, SIZE, negative_prompt="blurry"), mc, sana)


def run(sana, cond, **kw):
    return sample(sana, cond, seed=3, steps=2, cfg=4.5, height=SIZE, width=SIZE, scheduler="flow_euler", **kw)


def test_strength_zero_and_zero_mask_are_no_canvas(sana, cond):
    off = run(sana, cond, use_canvas=False)
    assert not torch.equal(run(sana, cond), off)  # this checkpoint's canvas changes the image
    assert torch.equal(run(sana, cond, canvas_strength=0.0), off)
    assert torch.equal(run(sana, cond, canvas_mask=torch.zeros(1, 1, SIZE, SIZE)), off)


def test_strength_one_is_the_residual_as_trained(sana, cond):
    """Strength 1 without a mask: the sampler's output equals its default, and one model call equals the undialled
    injection (the aligned canvas on the token grid, nothing scaled)."""
    assert torch.equal(run(sana, cond, canvas_strength=1.0), run(sana, cond))
    assert torch.equal(run(sana, cond, canvas_strength=1.0, canvas_mask=torch.ones(1, 1, SIZE, SIZE)), run(sana, cond))
    grid = sana.token_grid(SIZE, SIZE)
    plain = CanvasInjection(cond.connector, interpolate_canvas(cond.canvas, grid), slice(0, 1))
    dialled = CanvasInjection.on_tokens(cond.connector, cond.canvas, grid, slice(0, 1), 1.0)
    assert dialled.strength is None and dialled.mask is None
    latents, t = sana.initial_noise(0, 1, SIZE, SIZE), torch.tensor(600.0)
    a = sana.predict(latents, t, Branch(cond.positive, plain))
    assert torch.equal(a, sana.predict(latents, t, Branch(cond.positive, dialled)))


def _first_block_input(backbone, fn):
    """The patch embeddings as the DiT's first block receives them (canvas included)."""
    blocks = getattr(backbone.transformer, "transformer_blocks", None) or backbone.transformer.blocks
    seen = {}
    handle = blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        fn()
    finally:
        handle.remove()
    return seen["x"]


def _tokens(backbone, cond, frames, mask=None, strength=1.0, on=True):
    """The first block's input for one conditional call, with the canvas dialled (or none), as a (T, H, W, D) grid."""
    grid = backbone.token_grid(SIZE, SIZE, frames)
    canvas = CanvasInjection.on_tokens(cond.connector, cond.canvas, grid, slice(0, 1), strength, mask) if on else None
    latents, t = backbone.initial_noise(0, 1, SIZE, SIZE, frames), torch.tensor(600.0)
    branch = Branch(cond.positive, canvas, cond.references)
    return _first_block_input(backbone, lambda: backbone.predict(latents, t, branch))[0].unflatten(0, grid)


def test_half_mask_confines_the_residual(sana, cond):
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1  # the left half
    off, full = _tokens(sana, cond, 1, on=False), _tokens(sana, cond, 1)
    half = _tokens(sana, cond, 1, mask)
    left = full.shape[2] // 2
    assert torch.equal(half[:, :, left:], off[:, :, left:])  # right half: exactly no canvas
    assert torch.equal(half[:, :, :left], full[:, :, :left])  # left half: the full residual
    assert not torch.equal(full[:, :, :left], off[:, :, :left])
    # a strength between scales the residual
    torch.testing.assert_close(_tokens(sana, cond, 1, strength=0.5) - off, 0.5 * (full - off))


@pytest.fixture(scope="module")
def wan_cond(planner, tiny):
    wan = load_backbone(tiny["wan"])
    mc = load_metacanvas(tiny["wan_metacanvas"])
    with torch.no_grad():
        return wan, project(mc.plan(planner, PROMPT, SIZE, SIZE, VisualInputs(), "blurry"), mc, wan)


def test_video_masks_per_frame_and_one_for_all(wan_cond):
    """9 frames -> 3 latent frames. A per-frame mask on the first pixel frame only reaches latent frame 0 (frames map
    onto latent frames linearly, ends aligned); one mask for all frames confines every frame to its region."""
    wan, cond = wan_cond
    frames = 9
    off, full = _tokens(wan, cond, frames, on=False), _tokens(wan, cond, frames)
    assert off.shape[0] == 3 and not torch.equal(full, off)

    per_frame = torch.zeros(1, frames, SIZE, SIZE)
    per_frame[:, 0] = 1
    first = _tokens(wan, cond, frames, per_frame)
    assert torch.equal(first[0], full[0]) and torch.equal(first[1:], off[1:])

    top = torch.zeros(1, 1, SIZE, SIZE)
    top[:, :, : SIZE // 2] = 1  # the top half of every frame
    half = _tokens(wan, cond, frames, top)
    rows = full.shape[1] // 2
    assert torch.equal(half[:, :rows], full[:, :rows]) and torch.equal(half[:, rows:], off[:, rows:])
    assert torch.equal(_tokens(wan, cond, frames, torch.zeros(1, frames, SIZE, SIZE)), off)


def test_the_fuse_block_computes_in_the_dits_dtype():
    """ComfyUI's Wan embeds patches in float32 and runs its DiT in bf16: with `compute_dtype` the residual is made in
    bf16 and added to the float32 tokens (as the float32 residual, to bf16's precision); rows without the canvas stay
    exact."""
    from dataclasses import replace

    from metacanvas_core.connectors import CanvasConnector

    torch.manual_seed(0)
    connector = CanvasConnector(mllm_dim=32, dit_dim=32, num_heads=2, head_dim=16)
    with torch.no_grad():
        connector.out_proj.weight.normal_(0, 0.2)
    tokens, clock = torch.randn(2, 1, 2, 2, 32), torch.tensor([500.0, 500.0])
    full = CanvasInjection.on_tokens(connector, torch.randn(1, 1, 2, 2, 32), (1, 2, 2), slice(1, 2))
    half = replace(full, compute_dtype=torch.bfloat16)
    assert half.residual(tokens, clock).dtype == torch.bfloat16
    out = half.add_to(tokens, clock)
    assert out.dtype == torch.float32 and torch.equal(out[0], tokens[0])
    exact = full.residual(tokens, clock)
    assert exact.abs().max() > 0.1 and not torch.equal(out[1:] - tokens[1:], exact)
    torch.testing.assert_close(out[1:] - tokens[1:], exact, rtol=0.05, atol=0.05)
