"""What MetaCanvas costs on ComfyUI's native models: the same native Wan2.2-TI2V-5B / FLUX.1-Kontext MODEL sampled by
ComfyUI's own sampler (comfy.sample, euler, CFG so both branches run) with and without MetaCanvas Apply, timed per
step (interleaved repeats, median), and on a GPU the peak memory of each. The connector is random and nonzero, so the
canvas path really runs. Run with ComfyUI's Python (the pack's benchmark command starts it when it knows ComfyUI):

    python -m experiments.native_step --comfyui PATH/TO/ComfyUI [--size tiny|block|real] [--steps N] [--repeats N]

tiny: narrow models at small sizes (on CPU this measures the patch's overhead, not model time); real: random weights
at the real configs (Wan2.2-TI2V-5B at 704×1280×121, FLUX.1-Kontext at 1024² with a 1024² reference), bf16, on a GPU;
block: the real width and sizes with one block of each kind (what a CPU can run), bf16, cfg 1 (one model call a step:
CFG's second call runs no connector, so the ratio is an upper bound), each block timed in the run: the real depth's
step is derived as the measured step + (depth - 1) x the measured block, with and without the canvas.
Target (issue 12): with ÷ without <= 1.05 per step; memory: + the connector's weights only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 3584  # Qwen2.5-VL-7B: the canvas states' width
SIZES = {  # (height, width, frames) of the output
    ("wan", "tiny"): (64, 64, 9),
    ("wan", "real"): (704, 1280, 121),
    ("flux", "tiny"): (64, 64, 1),
    ("flux", "real"): (1024, 1024, 1),
}
BLOCKS = {"wan": ("blocks",), "flux": ("double_blocks", "single_blocks")}  # the DiT's block lists, by kind


def comfy_modules(comfyui: Path):
    """ComfyUI's modules, on CPU when no GPU is there; the pack imported as ComfyUI imports a custom node."""
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    spec = importlib.util.spec_from_file_location(
        "metacanvas_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["metacanvas_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def flux_from_diffusers(model) -> dict:
    """A diffusers FluxTransformer2DModel's weights in ComfyUI's (BFL's) layout, through ComfyUI's own key map."""
    import comfy.utils

    c = model.config
    layout = {"depth": c.num_layers, "depth_single_blocks": c.num_single_layers, "hidden_size": model.inner_dim}
    state, pieces, source = {}, {}, model.state_dict()
    for dkey, target in comfy.utils.flux_to_diffusers(layout, output_prefix="").items():
        if dkey not in source:
            continue
        if isinstance(target, str):
            state[target] = source[dkey]
        elif target[1] is None:  # (BFL key, None, fn): a whole weight, transformed (scale/shift swapped)
            state[target[0]] = target[2](source[dkey])
        else:  # (BFL key, (dim, offset, size)[, fn]): one part of a fused weight (e.g. q of qkv)
            fn = target[2] if len(target) > 2 else (lambda a: a)
            pieces.setdefault(target[0], []).append((target[1], fn(source[dkey])))
    for key, parts in pieces.items():
        state[key] = torch.cat([value for _, value in sorted(parts, key=lambda p: p[0][1])], parts[0][0][0])
    return state


def comfy_model_config(state: dict):
    """ComfyUI's own model config for weights in its layout, from its own detection, so every field a release
    requires is there. FLUX: releases before 0.3.76 fix the width at 3072 with 24 heads instead of reading them; the
    width is read from `img_in` and the heads are width / head size, as later releases detect them."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(state, "")
    if config.get("image_model") == "flux":
        hidden = state["img_in.weight"].shape[0]
        config.update(hidden_size=hidden, num_heads=hidden // sum(config["axes_dim"]))
    return comfy.model_detection.model_config_from_unet_config(config, state)


def native_model(kind: str, size: str, device: torch.device, dtype: torch.dtype):
    """ComfyUI's own model class, picked and configured by its detection from the weights' layout, random weights
    (FLUX tiny: 2 heads, one block of each kind)."""
    import comfy.model_patcher

    from metacanvas_core import realconfigs
    from metacanvas_core.comfy_files import wan_original_state
    from metacanvas_core.tiny import tiny_native_wan

    if kind == "wan":
        if size == "tiny":
            model = tiny_native_wan()
        else:
            model = realconfigs.build("wan2_2_ti2v_5b/transformer", **({"num_layers": 1} if size == "block" else {}))
        state = wan_original_state(model.state_dict())
    else:
        depth = {"tiny": {"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1}}
        depth["block"] = {"num_layers": 1, "num_single_layers": 1}
        model = realconfigs.build("flux_1_kontext_dev/transformer", **depth.get(size, {}))
        state = flux_from_diffusers(model)
    state = {k: v.to("meta") for k, v in state.items()}
    config = comfy_model_config(state)
    config.set_inference_dtype(dtype, None)
    base = config.get_model(state, "", device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def conditioning(pack, model, kind: str, hw: tuple[int, int]):
    """Random text conditioning; the same with a random plan's canvas (nonzero connector) attached; the checkpoint."""
    from metacanvas_core.metacanvas import align_canvas, new_metacanvas

    native = sys.modules["metacanvas_pack.nodes.model_patch"]
    runtime = sys.modules["metacanvas_pack.nodes.runtime"]
    mc = new_metacanvas(HIDDEN, native.native_spec(model), "mllm")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):  # a stand-in for training
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
        grid = mc.canvas_grid(*hw)
        aligned = align_canvas(
            mc.canvas_connector, torch.randn(1, grid.frames * grid.height * grid.width, HIDDEN, generator=g), grid
        )
    extra = {"pooled_output": torch.randn(1, 768, generator=g)} if kind == "flux" else {}
    text = [[torch.randn(1, 64, 4096, generator=g), extra]]
    negative = [[torch.randn(1, 64, 4096, generator=g), dict(extra)]]
    canvas = native.NativeCanvas(aligned, mc.name, mc.identity, hw)
    with_canvas = [[text[0][0], {**extra, native.CANVAS_KEY: canvas}]]
    return text, with_canvas, negative, runtime.Loaded(mc, {"metacanvas": mc})


def latent_and_refs(kind: str, hw_frames: tuple[int, int, int], device: torch.device):
    """The empty latent (Wan2.2: 48 channels, /16 spatial, /4 temporal; FLUX: 16, /8) and FLUX's reference latent."""
    h, w, frames = hw_frames
    if kind == "wan":
        return torch.zeros(1, 48, (frames - 1) // 4 + 1, h // 16, w // 16), None
    return torch.zeros(1, 16, h // 8, w // 8), torch.randn(1, 16, h // 8, w // 8)


def _timed_blocks(dm, kind: str) -> tuple[dict[str, list[float]], list]:
    """Seconds spent in the first block of each kind of `dm` (appended per call), and the hook handles."""
    spent: dict[str, list[float]] = {name: [] for name in BLOCKS[kind]}
    handles = []
    for name in BLOCKS[kind]:
        block, started = getattr(dm, name)[0], []
        handles.append(block.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter())))
        handles.append(
            block.register_forward_hook(lambda *_, s=started, n=name: spent[n].append(time.perf_counter() - s.pop()))
        )
    return spent, handles


def _depths(kind: str) -> dict[str, int]:
    """The real model's number of blocks of each kind (the shipped config)."""
    from metacanvas_core import realconfigs

    c = realconfigs.load("wan2_2_ti2v_5b" if kind == "wan" else "flux_1_kontext_dev")["transformer"]
    return (
        {"blocks": c["num_layers"]}
        if kind == "wan"
        else {"double_blocks": c["num_layers"], "single_blocks": c["num_single_layers"]}
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.native_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder (with main.py)")
    p.add_argument("--size", choices=("tiny", "block", "real"), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    pack = comfy_modules(args.comfyui)
    import comfy.model_management
    import comfy.sample

    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" or args.size == "block" else torch.float32
    cfg = 1.0 if args.size == "block" else 3.0
    apply = pack.NODE_CLASS_MAPPINGS["MetaCanvasApply"]()
    print(f"[4] native model with ÷ without MetaCanvas Apply, per step ({args.size}, {device}, {dtype}, cfg {cfg})")
    for kind in ("wan", "flux"):
        hwf = SIZES[kind, "tiny" if args.size == "tiny" else "real"]
        model = native_model(kind, args.size, device, dtype)
        plain, with_canvas, negative, loaded = conditioning(pack, model, kind, hwf[:2])
        (patched,) = apply.apply(model, loaded)
        latent, reference = latent_and_refs(kind, hwf, device)
        if reference is not None:  # Kontext: the reference latent on both branches (the canvas never touches it)
            plain, with_canvas, negative = (
                [[t, {**d, "reference_latents": [reference]}] for t, d in c] for c in (plain, with_canvas, negative)
            )
        runs = {"without": (model, plain), "with": (patched, with_canvas)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        blocks: dict[str, list[float]] = {name: [] for name in BLOCKS[kind]}
        peaks: dict[str, int] = {}
        noise = comfy.sample.prepare_noise(latent, 0)
        spent, handles = _timed_blocks(model.model.diffusion_model, kind)
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, (m, positive) in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for calls in spent.values():
                    calls.clear()
                start = time.perf_counter()
                comfy.sample.sample(
                    m, noise, args.steps, cfg, "euler", "simple", positive, negative, latent, seed=0, disable_pbar=True
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = torch.cuda.max_memory_allocated()
                if repeat:
                    times[name].append((time.perf_counter() - start) / args.steps)
                    for block, calls in spent.items():
                        blocks[block].append(sum(calls) / args.steps)
        for handle in handles:
            handle.remove()
        step = {name: statistics.median(t) for name, t in times.items()}
        h, w, frames = hwf
        size = f"{h}×{w}" + (f"×{frames}" if kind == "wan" else "")
        line = (
            f"    {kind} {size}: {step['without'] * 1e3:.1f} ms/step without, {step['with'] * 1e3:.1f} ms/step with "
            f"= {step['with'] / step['without']:.3f}× (median of {args.repeats}; min "
            f"{min(times['with']) / min(times['without']):.3f}×)"
        )
        if args.size == "block":  # the real depth: the measured step plus (depth - 1) more of each measured block
            more = sum((n - 1) * statistics.median(blocks[b]) for b, n in _depths(kind).items())
            full = {name: t + more for name, t in step.items()}
            timed = ", ".join(f"{b} {statistics.median(blocks[b]):.2f} s x {n}" for b, n in _depths(kind).items())
            line += (
                f"\n      real depth ({timed}, derived): {full['without']:.1f} s/step without, "
                f"{full['with']:.1f} s/step with = {full['with'] / full['without']:.4f}×"
            )
        if peaks:
            connector = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            line += (
                f"; peak {peaks['without'] / 2**30:.2f} -> {peaks['with'] / 2**30:.2f} GiB "
                f"(connector weights {connector / 2**30:.2f} GiB)"
            )
        print(line)
        del model, patched, runs
        comfy.model_management.soft_empty_cache()


if __name__ == "__main__":
    main()
