"""Benchmarks that print figures (speed claims live here, not in tests).

    python -m metacanvas_core.bench [--sana FOLDER --mllm FOLDER|FILE [--mllm-tokenizer FOLDER]] [--repeats N]
        [--tokens N] [--video-repeats N] [--video-dtype bf16|fp32]

1. Our sampler vs diffusers' SanaPipeline, per denoising step, same model and prompt embeddings,
   canvas off and on (tiny models unless real folders are given).
2. The canvas connector's per-step cost (its fuse half: the align half runs once per generation) as a
   share of one backbone step, at the real models' widths: each backbone is built from its shipped
   config with random weights and 1 or 3 layers of each kind; a full step is extrapolated per layer (a fit whose
   extra layers measured no slower, on a loaded machine, is reported as failed).
3. Whole graph in a real ComfyUI vs the same core calls made directly: `tests/test_comfyui_e2e.py`
   drives the server; this command reports where COMFYUI_HARNESS is set (otherwise says so).
4. MetaCanvas on ComfyUI's native Wan2.2-5B and FLUX-Kontext: the native model sampled by ComfyUI's own sampler with
   ÷ without MetaCanvas Apply, per step (and peak memory on a GPU), run in ComfyUI's Python
   (`experiments/native_step.py`) when --comfyui (or COMFYUI_HARNESS) names a ComfyUI: tiny models on a CPU, random
   weights at the real configs and sizes on a GPU.
5. Memory: the weights each node of each shipped workflow holds on the GPU, from the real configs (footprint.py).
6. The canvas connector at the paper's video size (Wan2.2-5B, 704×1280×121): the fuse block's peak activation memory
   (tensor bytes tracked exactly, on the meta device), and its time against the model's transformer blocks over the
   same 27280 tokens: the connector and one real-width Wan2.2-5B block (shipped config, random weights) both
   measured on this machine (the GPU, else the CPU) in --video-dtype, min and median of --video-repeats runs; the
   blocks' time is one block's × the config's 30 layers. Nothing is extrapolated. On this project's 2-core CPU a bf16
   run takes ~15 s (connector) and ~25 s (block).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from . import cli, footprint, realconfigs  # noqa: E402
from .connectors import FUSE_CHUNK_TOKENS, CanvasConnector  # noqa: E402
from .errors import MetaCanvasInputError  # noqa: E402
from .specs import wan_spec  # noqa: E402


def sampler_vs_pipeline(mllm: Path, sana_folder: Path, steps: int, repeats: int, tokenizer: Path | None = None) -> None:
    from diffusers import SanaPipeline

    from .backbones import load_backbone
    from .conditioning import project
    from .metacanvas import new_metacanvas
    from .planner import Planner
    from .sampling import sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    planner, sana = Planner.load(mllm, device=device, tokenizer=tokenizer), load_backbone(sana_folder, device=device)
    h, w = sana.default_size
    prompt = "a red cube left of a blue ball on a wooden table"
    conds = {}
    for name in ("canvas off", "canvas on"):
        mc = new_metacanvas(planner.hidden_size, sana.spec, "native").to(device)
        if name == "canvas on":  # a connector with nonzero projections, so the canvas path really runs
            for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):
                torch.nn.init.normal_(layer.weight, std=0.02)
        with torch.no_grad():
            conds[name] = project(mc.plan(planner, prompt, h, w), mc, sana)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=sana.vae, transformer=sana.transformer, scheduler=None)
    pipe.set_progress_bar_config(disable=True)
    cond = conds["canvas off"]

    def run_pipeline():
        pipe.scheduler = sana.make_scheduler("flow_euler")
        pipe(
            prompt_embeds=cond.positive.embeds,
            prompt_attention_mask=cond.positive.mask,
            negative_prompt=None,
            negative_prompt_embeds=cond.negative.embeds,
            negative_prompt_attention_mask=cond.negative.mask,
            num_inference_steps=steps,
            guidance_scale=4.5,
            height=h,
            width=w,
            output_type="latent",
            use_resolution_binning=False,
            complex_human_instruction=None,
        )

    runs = {"SanaPipeline": run_pipeline}
    for name, c in conds.items():
        runs[f"ours, {name}"] = lambda c=c, on=name == "canvas on": sample(
            sana, c, seed=0, steps=steps, cfg=4.5, height=h, width=w, scheduler="flow_euler", use_canvas=on
        )
    times = _interleaved(runs, repeats)
    base = times["SanaPipeline"] / steps
    print(f"[1] SANA sampler vs SanaPipeline ({Path(sana_folder).name}, {w}×{h}, {steps} steps, CFG, {device})")
    print(f"    SanaPipeline: {base * 1e3:.2f} ms/step")
    for name, seconds in times.items():
        if name != "SanaPipeline":
            print(f"    {name}: {seconds / steps * 1e3:.2f} ms/step = {seconds / steps / base:.3f}× the pipeline")


def _timed(
    runs: dict[str, Callable], repeats: int, sync: Callable[[], object] = lambda: None
) -> dict[str, list[float]]:
    """Seconds of each callable's `repeats` runs after one warm-up, timed in alternation so machine load drifts hit all
    alike; `sync` waits for the device's queued work."""
    for fn in runs.values():
        fn()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return samples


def _interleaved(runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per callable (`_timed`)."""
    return {name: statistics.median(ts) for name, ts in _timed(runs, repeats).items()}


EXTRA_LAYERS = 2  # a layer's cost = (model with 1 + EXTRA_LAYERS layers - model with 1) / EXTRA_LAYERS


def connector_share(tokens: int, repeats: int) -> None:
    """Connector fuse vs one backbone step at real widths, random weights, `tokens` image tokens."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, WanTransformer3DModel

    side = int(tokens**0.5)
    g = torch.Generator().manual_seed(0)
    print(f"[2] canvas connector (fuse, per step) vs one backbone step, {side}×{side} tokens, fp32, 1 CPU/GPU run")

    def sana_inputs(m):
        c = m.config
        return dict(
            hidden_states=torch.randn(1, c.in_channels, side, side, generator=g),
            encoder_hidden_states=torch.randn(1, 32, c.caption_channels, generator=g),
            timestep=torch.tensor([500.0]),
        )

    def wan_inputs(m):
        c = m.config
        return dict(
            hidden_states=torch.randn(1, c.in_channels, 1, 2 * side, 2 * side, generator=g),
            encoder_hidden_states=torch.randn(1, 32, c.text_dim, generator=g),
            timestep=torch.tensor([500.0]),
        )

    def flux_inputs(m):
        c = m.config
        return dict(
            hidden_states=torch.randn(1, tokens, c.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 32, c.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([2.5]),
            img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(32, 3),
        )

    flux_cfg = realconfigs.load("flux_1_kontext_dev")["transformer"]
    backbones = [
        (
            "SANA-1.6B",
            SanaTransformer2DModel,
            realconfigs.load("sana_1600m_512px")["transformer"],
            {"num_layers": None},
            sana_inputs,
            (70, 32),
        ),
        (
            "FLUX.1-Kontext",
            FluxTransformer2DModel,
            flux_cfg,
            {"num_layers": None, "num_single_layers": None},
            flux_inputs,
            (96, 32),
        ),
        (
            "Wan2.2-TI2V-5B",
            WanTransformer3DModel,
            realconfigs.load("wan2_2_ti2v_5b")["transformer"],
            {"num_layers": None},
            wan_inputs,
            (96, 32),
        ),
    ]
    for name, cls, config, layer_keys, inputs, (heads, head_dim) in backbones:
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        width = heads * head_dim
        base = {**config, **{k: 1 for k in layer_keys}}
        variants = {"base": base, **{key: {**base, key: 1 + EXTRA_LAYERS} for key in layer_keys}}
        runs = {}
        with torch.no_grad():
            for label, cfg in variants.items():
                model = cls.from_config(cfg).eval()
                model_inputs = inputs(model)
                runs[label] = lambda m=model, x=model_inputs: m(**x)
            connector = CanvasConnector(3584, width, heads, head_dim).eval()
            x, canvas = torch.randn(1, tokens, width, generator=g), torch.randn(1, tokens, width, generator=g)
            t = torch.tensor([500.0])
            runs["connector"] = lambda c=connector, x=x, k=canvas, t=t: c.fuse(x, k, t, side, side)
            times = _interleaved(runs, repeats)
        del runs
        per_layer = {key: (times[key] - times["base"]) / EXTRA_LAYERS for key in layer_keys}
        if min(per_layer.values()) <= 0:
            measured = ", ".join(f"{1 + EXTRA_LAYERS} {k} {times[k] * 1e3:.0f} ms" for k in layer_keys)
            print(
                f"    {name} (width {width}): fit failed, more layers measured no slower (1 layer each "
                f"{times['base'] * 1e3:.0f} ms, {measured}; a loaded machine): no step time, no share"
            )
            continue
        step = times["base"] + sum((config[key] - 1) * per_layer[key] for key in layer_keys)
        layers = ", ".join(f"{config[k]} × {per_layer[k] * 1e3:.0f} ms" for k in layer_keys)
        print(
            f"    {name} (width {width}): step ~ {step * 1e3:.0f} ms ({layers}), connector "
            f"{times['connector'] * 1e3:.1f} ms = {100 * times['connector'] / step:.2f}% of a step"
        )


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m metacanvas_core.bench", description=__doc__)
    cli.add_mllm_options(p, " for [1] (with --sana)")
    p.add_argument("--sana", type=Path, help="SANA diffusers folder for [1] (with --mllm)")
    p.add_argument("--steps", type=cli.positive_int, default=10)
    p.add_argument("--repeats", type=cli.positive_int, default=3)
    p.add_argument("--tokens", type=cli.positive_int, default=256, help="image tokens for the connector share")
    p.add_argument(
        "--video-repeats",
        type=cli.positive_int,
        default=2,
        help="timed runs of [6]'s connector and Wan2.2-5B block at 704×1280×121, after a warm-up (default 2)",
    )
    p.add_argument(
        "--video-dtype",
        choices=list(VIDEO_DTYPES),
        default="bf16",
        help="[6]'s compute dtype (default bf16, as the model runs; on a CPU without bf16 units fp32 is faster)",
    )
    p.add_argument("--comfyui", type=Path, help="a ComfyUI folder (with main.py) for [4]")
    p.add_argument(
        "--native-size",
        choices=("auto", "tiny", "block", "real"),
        default="auto",
        help="[4]'s models: tiny; block (the real width and sizes, one block of each kind, the real depth derived from "
        "the timed blocks: what a CPU can run, minutes); real (a GPU); auto: real on a GPU, block on a CPU",
    )
    p.add_argument(
        "--comfyui-python", type=Path, help="ComfyUI's Python for [4] (default: this one; a harness: its venv's)"
    )
    args = p.parse_args(argv)
    return cli.run(lambda: run_all(args), debug=args.debug)


def run_all(args: argparse.Namespace) -> None:
    """[1] on the given models (or tiny random ones when none are given), then [2] to [5]."""
    real = cli.models_given(args.mllm, args.mllm_tokenizer, args.sana, "--sana")
    if not args.verbose:
        cli.quiet_libraries()
    if real and cli.check_models(args.mllm, args.mllm_tokenizer, args.sana, "--sana") != "sana":
        raise MetaCanvasInputError(f"--sana '{args.sana}' is not a SANA pipeline folder.")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
    )
    if real:
        sampler_vs_pipeline(args.mllm, args.sana, args.steps, args.repeats, args.mllm_tokenizer)
    else:
        print("(no --sana/--mllm: [1] runs the tiny random models, so it measures per-step overhead, not model time)")
        with cli.tiny_models() as tiny:
            sampler_vs_pipeline(tiny["mllm"], tiny["sana"], args.steps, args.repeats)
    connector_share(args.tokens, args.repeats)
    if os.environ.get("COMFYUI_HARNESS"):
        print("[3] ComfyUI vs direct: run `python -m pytest tests/test_comfyui_e2e.py -k timing -s`")
    else:
        print("[3] ComfyUI vs direct: skipped (set COMFYUI_HARNESS to a prepared ComfyUI harness)")
    native_size = args.native_size if args.native_size != "auto" else "real" if torch.cuda.is_available() else "block"
    native_step(args.comfyui, args.comfyui_python, native_size, args.steps, args.repeats)
    print("[5] weights on the GPU per workflow node (GiB; real configs on the meta device; activations not counted)")
    print(footprint.table())
    connector_at_video_size(args.video_repeats, VIDEO_DTYPES[args.video_dtype])


VIDEO_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_TOKENS = 512  # Wan2.2's text slot (umT5's max_sequence_length in diffusers' Wan pipelines)


class _Captured(Exception):
    """Stops a model where the block to time begins, its arguments captured."""


def _wan_block(device: torch.device, dtype: torch.dtype, grid: tuple[int, int, int]) -> Callable[[], torch.Tensor]:
    """One call of one real-width Wan2.2-5B block (shipped config, random weights) over a (T, H, W) token grid, with
    the arguments the model hands it: per-token timesteps (`expand_timesteps`, as the pack's Wan runs) and
    TEXT_TOKENS text tokens."""
    model = realconfigs.build("wan2_2_ti2v_5b/transformer", device=device, num_layers=1).eval()
    torch.nn.Module.to(model, dtype=dtype)  # all in `dtype` (diffusers' `to` warns of its fp32 norms: timing only)
    cfg, block, seen = model.config, model.blocks[0], {}
    latent = [n * p for n, p in zip(grid, cfg.patch_size, strict=True)]
    x = torch.randn(1, cfg.in_channels, *latent, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=device, dtype=dtype)
    timestep = torch.full((1, math.prod(grid)), 500.0, device=device)

    def capture(_module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad(), suppress(_Captured):
        model(x, timestep, text)
    handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]

    @torch.no_grad()
    def call() -> torch.Tensor:
        return block(*args, **kwargs)

    return call


def _spread(seconds: list[float] | tuple[float, ...]) -> str:
    """Min (the least disturbed run) and median."""
    return f"min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s"


# --- Measurement, for [6] ---------------------------------------------------------------------------------------------
# Only the benchmark (and tests/test_fuse.py, which checks these tools) uses them, so they live here, not in the
# library: a connector at Wan2.2-5B's real size, a fuse call's time and peak memory, and the live-tensor counter.


def wan22_canvas_connector(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    width: int | None = None,
    frames: int = 121,
    seed: int = 0,
) -> tuple[CanvasConnector, tuple[int, int, int]]:
    """The canvas connector of Wan2.2-TI2V-5B + Qwen2.5-VL-7B (shipped configs; built as `metacanvas.new_metacanvas`
    builds it) with random weights, its zero-initialised projections included, so it computes as a trained one; and the
    DiT token grid (T, H, W) of a `frames`-frame video at Wan2.2's 704×1280 (121: the paper's 5 s at 24 fps). For [6]
    (`measure_fuse`) and tests/test_fuse.py.

    `width`: a narrower DiT (a multiple of 32: Algorithm 1's heads of 32) to measure on a CPU and extrapolate; the
    MLLM side stays 3584. `device` "meta": shapes only, no memory (`measure_fuse` then reports memory, not time).
    """
    config = realconfigs.load("wan2_2_ti2v_5b")
    dit, vae = config["transformer"], config["vae"]
    spec = wan_spec(
        width or dit["num_attention_heads"] * dit["attention_head_dim"],
        dit["text_dim"],
        dit["in_channels"],
        tuple(dit["patch_size"]),
        vae["scale_factor_spatial"],
    )
    heads, head_dim = spec.attention_heads
    mllm = realconfigs.load("qwen2_5_vl_7b_instruct")["hidden_size"]
    meta = torch.device(device).type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        connector = CanvasConnector(mllm, spec.width, heads, head_dim)
        if not meta:
            for layer in (connector.align_out, connector.out_proj):
                nn.init.normal_(layer.weight, std=0.02)
    height, width_px = spec.default_size
    grid = (
        (frames - 1) // vae["scale_factor_temporal"] + 1,
        height // spec.pixel_stride,
        width_px // spec.pixel_stride,
    )
    return nn.Module.to(connector, device, dtype).eval(), grid  # plain `to`: it has no fp32-only modules to warn of


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensors made inside the block while they are alive: `peak` is the most at once.

    Storage by storage (views are free), on any device: the meta device gives real-size figures without computing.
    What existed before the block (inputs, weights) is not counted; the allocator's caching and rounding are not
    either, so a CUDA allocator's peak is somewhat higher."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()
        self._before: set[int] = set()  # storages made before the block (seen as inputs of an op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self._alive:
                self._before.add(id(t.untyped_storage()))
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._alive and id(storage) not in self._before:
                    self._alive.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes


@dataclass(frozen=True)
class FuseCost:
    """What one fuse-block call over a whole video costs (the connector's per-step work)."""

    times: tuple[float, ...]  # wall seconds of each timed call (after a warm-up); none on the meta device
    peak_bytes: int  # most bytes alive at once of what the call makes (`LiveTensorBytes`): activations + cast weights
    cuda_peak_bytes: int | None  # CUDA only: the allocator's peak above what was allocated before the call


@torch.no_grad()
def measure_fuse(
    connector: CanvasConnector,
    token_grid: tuple[int, int, int],
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 3,
    chunk_tokens: int | None = FUSE_CHUNK_TOKENS,
) -> FuseCost:
    """Time and memory of `connector.fuse` on random patch tokens and canvas of a (T, H, W) token grid in `dtype` (the
    backbone's compute dtype), on the connector's device; one sample, all T frames, as one denoising step calls it."""
    device = next(connector.parameters()).device
    t, h, w = token_grid
    width = connector.config.dit_dim
    tokens = torch.randn(t, h * w, width, device=device, dtype=dtype)
    canvas = torch.randn(t, h * w, width, device=device, dtype=dtype)
    clock = torch.full((t,), 500.0, device=device)

    def call():
        return connector.fuse(tokens, canvas, clock, h, w, chunk_tokens)

    with LiveTensorBytes() as live:  # on a real device also the warm-up: the same kernels, untimed
        call()
    if device.type == "meta":
        return FuseCost((), live.peak, None)
    cuda = device.type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    cuda_peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return FuseCost(tuple(times), live.peak, cuda_peak)


def connector_at_video_size(repeats: int, dtype: torch.dtype) -> None:
    """[6]: the fuse block at 704×1280×121 — peak memory exactly; its time against Wan2.2-5B's blocks, both measured
    at the real width (one block × the config's layers)."""
    layers = realconfigs.load("wan2_2_ti2v_5b")["transformer"]["num_layers"]
    meta, grid = wan22_canvas_connector("meta")
    tokens = math.prod(grid)
    print(
        f"[6] canvas connector at 704×1280×121 (token grid {grid[0]}×{grid[1]}×{grid[2]} = {tokens} tokens), "
        "Wan2.2-5B + Qwen2.5-VL-7B"
    )
    for peak_dtype in (torch.bfloat16, torch.float32):
        peak = measure_fuse(meta, grid, peak_dtype).peak_bytes
        print(
            f"    peak of the fuse block, {str(peak_dtype)[6:]}: {peak / 2**20:.0f} MiB (exact tensor bytes, chunked)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    connector, _ = wan22_canvas_connector(device, dtype)
    width = connector.config.dit_dim
    fuse = measure_fuse(connector, grid, dtype, repeats)
    del connector
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    block = _timed({"block": _wan_block(device, dtype, grid)}, repeats, sync)["block"]
    cuda = "" if fuse.cuda_peak_bytes is None else f" (CUDA peak {fuse.cuda_peak_bytes / 2**20:.0f} MiB)"
    print(
        f"    measured, {device.type} {str(dtype)[6:]}, width {width}, {repeats} runs after a warm-up: connector "
        f"{_spread(fuse.times)}{cuda}; one Wan2.2-5B block {_spread(block)}"
    )
    low = min(fuse.times) / (layers * min(block))
    mid = statistics.median(fuse.times) / (layers * statistics.median(block))
    print(
        f"    connector ÷ {layers} blocks (one model call's; a CFG step makes two calls, the connector runs in one): "
        f"{100 * low:.2f}% (min ÷ min), {100 * mid:.2f}% (median ÷ median)"
    )


def native_step(comfyui: Path | None, python: Path | None, size: str, steps: int, repeats: int) -> None:
    """[4]: experiments/native_step.py in ComfyUI's Python (this package never imports ComfyUI itself)."""
    checkout = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    harness = os.environ.get("COMFYUI_HARNESS")
    if comfyui is None and harness:
        comfyui, python = Path(harness) / "ComfyUI", python or Path(harness) / "venv" / "bin" / "python"
        stubs = Path(harness) / "cuda_stubs"  # the harness's CPU machines load CUDA stub libraries
        if stubs.is_dir():
            env["LD_LIBRARY_PATH"] = f"{stubs}:{env.get('LD_LIBRARY_PATH', '')}"
    if comfyui is None:
        print("[4] native model with ÷ without MetaCanvas: skipped (give --comfyui PATH/TO/ComfyUI)")
        return
    if not (comfyui / "main.py").is_file():
        raise MetaCanvasInputError(f"--comfyui '{comfyui}' is not a ComfyUI folder (no main.py).")
    if not (checkout / "experiments" / "native_step.py").is_file():
        raise MetaCanvasInputError("[4] needs a checkout of the pack (experiments/native_step.py is not installed).")
    cmd = [str(python or sys.executable), "-m", "experiments.native_step", "--comfyui", str(comfyui), "--size", size]
    cmd += [
        "--steps",
        str(1 if size == "block" else min(steps, 4)),
        "--repeats",
        str(min(repeats, 2) if size == "block" else repeats),
    ]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("[4]", "    "))]
    print("\n".join(lines))
    if done.returncode != 0:
        raise RuntimeError(f"[4] failed in ComfyUI's Python:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    sys.exit(main())
