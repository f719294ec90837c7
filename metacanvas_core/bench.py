"""Benchmarks that print figures (speed claims live here, not in tests).

    python -m metacanvas_core.bench [--sana FOLDER --mllm FOLDER|FILE [--mllm-tokenizer FOLDER]] [--repeats N]
        [--tokens N]

1. Our sampler vs diffusers' SanaPipeline, per denoising step, same model and prompt embeddings,
   canvas off and on (tiny models unless real folders are given).
2. The canvas connector's per-step cost (its fuse half: the align half runs once per generation) as a
   share of one backbone step, at the real models' widths: each backbone is built from its shipped
   config with random weights and 1 or 3 layers of each kind; a full step is extrapolated per layer.
3. Whole graph in a real ComfyUI vs the same core calls made directly: `tests/test_comfyui_e2e.py`
   drives the server; this command reports where COMFYUI_HARNESS is set (otherwise says so).
4. MetaCanvas on ComfyUI's native Wan2.2-5B and FLUX-Kontext: the native model sampled by ComfyUI's own sampler with
   ÷ without MetaCanvas Apply, per step (and peak memory on a GPU), run in ComfyUI's Python
   (`experiments/native_step.py`) when --comfyui (or COMFYUI_HARNESS) names a ComfyUI: tiny models on a CPU, random
   weights at the real configs and sizes on a GPU.
5. Memory: the weights each node of each shipped workflow holds on the GPU, from the real configs (footprint.py).
6. The canvas connector at the paper's video size (Wan2.2-5B, 704×1280×121): the fuse block's peak activation memory
   (tensor bytes tracked exactly, on the meta device) and its time as a share of one Wan2.2-5B step at that size.
   On a GPU both are measured at the real width in bf16; on a CPU they are measured at two reduced widths over the
   full token grid in fp32 and extrapolated to width 3072 (cost = a·w² + b·w per layer), and printed as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from . import cli, footprint, realconfigs  # noqa: E402
from .connectors import CanvasConnector  # noqa: E402
from .errors import MetaCanvasInputError  # noqa: E402


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


def _interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per callable, timed in alternation so machine load drifts hit all alike."""
    for fn in runs.values():
        fn()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}


EXTRA_LAYERS = 2  # a layer's cost = (model with 1 + EXTRA_LAYERS layers − model with 1) / EXTRA_LAYERS


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
        step = times["base"] + sum((config[key] - 1) * per_layer[key] for key in layer_keys)
        layers = ", ".join(f"{config[k]} × {per_layer[k] * 1e3:.0f} ms" for k in layer_keys)
        print(
            f"    {name} (width {width}): step ≈ {step * 1e3:.0f} ms ({layers}), connector "
            f"{times['connector'] * 1e3:.1f} ms = {100 * times['connector'] / step:.2f}% of a step"
        )


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m metacanvas_core.bench", description=__doc__)
    cli.add_mllm_options(p, " for [1] (with --sana)")
    p.add_argument("--sana", type=Path, help="SANA diffusers folder for [1] (with --mllm)")
    p.add_argument("--steps", type=cli.positive_int, default=10)
    p.add_argument("--repeats", type=cli.positive_int, default=3)
    p.add_argument("--tokens", type=cli.positive_int, default=256, help="image tokens for the connector share")
    p.add_argument("--comfyui", type=Path, help="a ComfyUI folder (with main.py) for [4]")
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
    native_step(args.comfyui, args.comfyui_python, args.steps, args.repeats)
    print("[5] weights on the GPU per workflow node (GiB; real configs on the meta device; activations not counted)")
    print(footprint.table())
    connector_at_video_size(args.repeats)


WAN_VIDEO = (704, 1280, 121)
CPU_WIDTHS = (384, 768)  # reduced DiT widths for the CPU extrapolation (multiples of 128: Wan's heads)


def _wan_step_seconds(width: int, layers: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """One Wan2.2-5B transformer call at 704×1280×121 with `layers` blocks of width `width` (random weights)."""
    from diffusers import WanTransformer3DModel

    cfg = {k: v for k, v in realconfigs.load("wan2_2_ti2v_5b")["transformer"].items() if not k.startswith("_")}
    real = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    cfg.update(num_layers=layers, num_attention_heads=width // cfg["attention_head_dim"])
    cfg["ffn_dim"] = cfg["ffn_dim"] * width // real
    with torch.device(device):
        model = WanTransformer3DModel.from_config(cfg).eval()
    torch.nn.Module.to(model, dtype=dtype)  # all in `dtype` (diffusers' `to` warns of its fp32 norms: timing only)
    h, w, frames = WAN_VIDEO
    x = torch.randn(1, cfg["in_channels"], (frames - 1) // 4 + 1, h // 16, w // 16, device=device, dtype=dtype)
    text = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    with torch.no_grad():
        seconds = _interleaved({"step": lambda: model(x, t, text)}, repeats)["step"]
        if device.type == "cuda":
            torch.cuda.synchronize()
    return seconds


def connector_at_video_size(repeats: int) -> None:
    """[6]: the fuse block at 704×1280×121 — peak memory exactly, time vs one Wan2.2-5B step (measured or fitted)."""
    from .connectors import measure_fuse
    from .metacanvas import wan22_canvas_connector

    layers = realconfigs.load("wan2_2_ti2v_5b")["transformer"]["num_layers"]
    meta, grid = wan22_canvas_connector("meta")
    print(f"[6] canvas connector at 704×1280×121 (token grid {grid[0]}×{grid[1]}×{grid[2]}), Wan2.2-5B + Qwen2.5-VL-7B")
    for dtype in (torch.bfloat16, torch.float32):
        peak = measure_fuse(meta, grid, dtype).peak_bytes
        print(f"    peak of the fuse block, {str(dtype)[6:]}: {peak / 2**20:.0f} MiB (exact tensor bytes, chunked)")
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        connector, _ = wan22_canvas_connector(device, dtype)
        cost = measure_fuse(connector, grid, dtype, repeats)
        step = _wan_step_seconds(3072, layers, device, dtype, repeats)
        print(
            f"    measured, bf16: connector {cost.seconds * 1e3:.0f} ms (CUDA peak {cost.cuda_peak_bytes / 2**20:.0f} "
            f"MiB), Wan2.2-5B step {step * 1e3:.0f} ms: {100 * cost.seconds / step:.2f}% of a step"
        )
        return
    connector_s, layer_s = [], []
    for width in CPU_WIDTHS:
        connector, _ = wan22_canvas_connector("cpu", torch.float32, width=width)
        connector_s.append(measure_fuse(connector, grid, torch.float32, repeats=1).seconds)
        layer_s.append(_wan_step_seconds(width, 1, torch.device("cpu"), torch.float32, repeats=1))
        print(
            f"    measured, CPU fp32, width {width}: connector {connector_s[-1]:.2f} s, one DiT layer {layer_s[-1]:.2f} s"
        )

    def fit(seconds: list[float]) -> float:
        """a·w² + b·w through the two measured widths, at width 3072."""
        (w1, w2), (s1, s2) = CPU_WIDTHS, seconds
        a = (s2 / w2 - s1 / w1) / (w2 - w1)
        return a * 3072**2 + (s1 / w1 - a * w1) * 3072

    connector, step = fit(connector_s), layers * fit(layer_s)
    print(
        f"    extrapolated to width 3072 (CPU, fp32; not measured): connector {connector:.1f} s, Wan2.2-5B step "
        f"{step:.0f} s ({layers} layers): {100 * connector / step:.2f}% of a step"
    )


def native_step(comfyui: Path | None, python: Path | None, steps: int, repeats: int) -> None:
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
    size = "real" if torch.cuda.is_available() else "tiny"
    cmd = [str(python or sys.executable), "-m", "experiments.native_step", "--comfyui", str(comfyui), "--size", size]
    cmd += ["--steps", str(min(steps, 4)), "--repeats", str(repeats)]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("[4]", "    "))]
    print("\n".join(lines))
    if done.returncode != 0:
        raise RuntimeError(f"[4] failed in ComfyUI's Python:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    sys.exit(main())
