"""The canvas connector's fuse block at real size: chunked over frames (bounded memory) with the same result, run in the
backbone's compute dtype, one clock (sigma·1000 in float32) on every backbone; stage S2's inert canvas skipped."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from metacanvas_core.backbones import Branch, load_backbone
from metacanvas_core.bench import LiveTensorBytes, measure_fuse, wan22_canvas_connector
from metacanvas_core.connectors import FUSE_CHUNK_TOKENS
from metacanvas_core.injection import CanvasInjection
from metacanvas_core.inputs import VisualInputs
from metacanvas_core.metacanvas import new_metacanvas
from metacanvas_core.text import TextContext

# Chunked and unchunked fuse agree to this fraction of the residual's largest magnitude. Measured on this CPU (torch
# 2.13; fp32 at width 3072, bf16 at 3072 and 256): max |diff| 0 (the chunks run the same kernels on fewer rows); the
# margin is for BLAS libraries that block a matrix product differently for another row count.
CHUNK_RTOL = 1e-5

# Stage S2's skipped canvas and the full path compute the same sums through different kernels (the prompt states read
# from the prompt alone or from prompt + canvas: other matrix shapes; autograd sums a tensor's uses in another order),
# so they agree to rounding, not bit for bit. Measured (torch 2.13, test_s2_skips_the_inert_canvas): on this CPU (Intel
# Xeon, AVX512 and AVX2 kernels, MKL's AVX512 and AVX2 paths, 1 and 2 threads) the losses bit-equal and the gradients
# at most 1.2 ulp of the largest gradient apart (1.5e-8 at |grad| 0.107); on an AMD EPYC (issue 25) the losses 1 ulp
# apart (1.5842665 vs 1.5842667) and the gradients 9e-9. Allowed: 4 ulp, of the loss and of the largest gradient.
S2_ULPS = 4


def _fuse_inputs(width: int | None):
    """Wan2.2-5B's connector (full width 3072 with 96 heads of 32, or narrower), random weights; a small token grid."""
    connector, grid = wan22_canvas_connector("cpu", width=width)
    assert grid == (31, 22, 40)  # 704×1280, 121 frames
    g = torch.Generator().manual_seed(0)
    t, h, w = 6, 4, 6
    d = connector.config.dit_dim
    tokens, canvas = (torch.randn(t, h * w, d, generator=g) for _ in range(2))
    return connector, tokens, canvas, torch.full((t,), 731.25), (h, w)


@pytest.fixture(scope="module")
def wan22():
    return _fuse_inputs(None)


@pytest.fixture(scope="module")
def narrow():
    """Width 256: bf16 matrix products are slow on CPUs without bf16 units; chunking does not depend on the width."""
    return _fuse_inputs(256)


@pytest.mark.parametrize("dtype, inputs", [(torch.float32, "wan22"), (torch.bfloat16, "narrow")])
def test_chunked_fuse_equals_unchunked(dtype, inputs, request):
    connector, tokens, canvas, clock, (h, w) = request.getfixturevalue(inputs)
    x, k = tokens.to(dtype), canvas.to(dtype)
    with torch.no_grad():
        whole = connector.fuse(x, k, clock, h, w, chunk_tokens=None)
        for frames in (1, 2, 4):
            chunked = connector.fuse(x, k, clock, h, w, chunk_tokens=frames * h * w)
            diff = (chunked.float() - whole.float()).abs().max()
            assert chunked.dtype == dtype and diff <= CHUNK_RTOL * whole.float().abs().max(), (frames, float(diff))


def test_fuse_runs_in_the_tokens_dtype(narrow):
    """bf16 patch tokens with an fp32 checkpoint: computed in bf16, near the fp32 result (bf16's 8-bit mantissa)."""
    connector, tokens, canvas, clock, (h, w) = narrow
    with torch.no_grad():
        full = connector.fuse(tokens, canvas, clock, h, w)
        half = connector.fuse(tokens.bfloat16(), canvas.bfloat16(), clock, h, w)
    assert next(connector.parameters()).dtype == torch.float32 and half.dtype == torch.bfloat16
    relative = (half.float() - full).abs().mean() / full.abs().mean()
    assert 0 < relative < 0.02, float(relative)


def test_fuse_memory_is_bounded_at_the_papers_video_size():
    """Real size on the meta device (shapes only): 704×1280×121 in bf16 stays under 1 GiB with chunks (the block's
    activations, its bf16 weight copy and the residual itself), against 2.6 GiB all frames at once."""
    connector, grid = wan22_canvas_connector("meta")
    chunked = measure_fuse(connector, grid, torch.bfloat16)
    whole = measure_fuse(connector, grid, torch.bfloat16, chunk_tokens=None)
    assert chunked.times == () and chunked.peak_bytes < 2**30 < 2 * 2**30 < whole.peak_bytes
    assert FUSE_CHUNK_TOKENS // (grid[1] * grid[2]) == 4  # frames per chunk at 704×1280


def test_live_tensor_bytes_counts_what_the_block_makes():
    x = torch.zeros(1000, 250)  # 1 MB, made before: not counted
    with LiveTensorBytes() as live:
        a = x + 1
        b = a * 2  # a and b alive: 2 MB
        del a
        c = b[:10]  # a view: free
        del b, c
        d = x.sum()
    assert live.peak == 2_000_000 and live.live == d.untyped_storage().nbytes()


@pytest.mark.parametrize("kind", ["sana", "flux_kontext", "wan"])
def test_one_clock_on_every_backbone(kind, tiny, planner):
    """Each backbone hands the fuse block the clock it is given (sigma·1000 in float32), not the DiT's int64 timestep,
    unrounded, even with a bf16 backbone and a bf16 connector (a bf16 clock would be 988 here)."""
    backbone = load_backbone(tiny[kind], dtype=torch.bfloat16, text_encoder=False)
    mc = new_metacanvas(planner.hidden_size, backbone.spec, "mllm").to(torch.bfloat16)
    s = backbone.pixel_stride * 2
    frames = 5 if backbone.is_video else 1
    grid = backbone.token_grid(s, s, frames)
    aligned = torch.randn(1, *mc.canvas_grid(s, s).as_thw(), backbone.width, dtype=torch.bfloat16)
    canvas = CanvasInjection.on_tokens(mc.canvas_connector, aligned, grid, slice(0, 1))
    text = TextContext(torch.randn(1, 3, backbone.text_dim), torch.ones(1, 3, dtype=torch.long))
    refs = None
    if kind == "flux_kontext":  # Kontext edits an image: its reference tokens ride along, untouched by the canvas
        refs = backbone.prepare_references(VisualInputs(images=[Image.new("RGB", (s, s))]), s, s)
    seen = []
    mc.canvas_connector.time_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    t, sigma_1000 = torch.tensor(987), torch.tensor(987.6543)  # a UniPC/DPM timestep and its step's sigma·1000
    with torch.no_grad():
        backbone.predict(backbone.initial_noise(0, 1, s, s, frames), t, Branch(text, canvas, refs), sigma_1000)
    (clock,) = seen
    assert clock.dtype == torch.float32 and bool((clock == sigma_1000).all()), clock


def test_s2_skips_the_inert_canvas(tiny, tmp_path):
    """Stage S2 (context MLP + cross-attention trained, the connector untrained and frozen): the canvas adds exact zeros,
    so the objective skips plan, projection and fuse; the RNG is the full path's exactly, the loss and the gradients
    to rounding (`S2_ULPS`)."""
    from metacanvas_core.training.config import TrainConfig
    from metacanvas_core.training.trainer import Trainer

    config = TrainConfig(
        name="s2",
        mllm=str(tiny["mllm"]),
        backbone=str(tiny["wan"]),
        trainable=["context_connector", "dit_cross_attention"],
        use_canvas=True,
        lr=1e-3,
        max_steps=1,
        batch_size=2,
        frames=5,
        cond_dropout=0.5,
        buckets=[[64, 64]],
        data=[{"synthetic": {"kind": "t2v", "count": 2, "seed": 0, "frames": 5}}],
        eval_samples=0,
    )
    config.validate()
    trainer = Trainer(config, tmp_path, progress=False)
    objective = trainer.objective
    assert config.canvas_on and objective.canvas_inert
    batch = trainer.batches.make(trainer.mix.sources[0], [0, 1])
    trained = [p for p in objective.parameters() if p.requires_grad]
    results = []
    for inert in (True, False):
        objective.canvas_inert = inert
        objective.zero_grad()
        torch.manual_seed(7)  # the context connector's dropout draws from the global generator
        loss = objective(batch, step=0)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trained], torch.get_rng_state()))
    (skip, skip_grads, skip_rng), (full, full_grads, full_rng) = results
    ulp = torch.finfo(torch.float32).eps
    assert math.isfinite(skip.item())
    torch.testing.assert_close(skip, full, rtol=S2_ULPS * ulp, atol=0)
    # A gradient's rounding follows the size of the terms summed, not of the sum (some cancel to ~1e-4): one scale.
    largest = max(float(g.abs().max()) for g in full_grads)
    for a, b in zip(skip_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=S2_ULPS * ulp * largest)
    assert torch.equal(skip_rng, full_rng)
