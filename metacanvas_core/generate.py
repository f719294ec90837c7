"""Command-line text-to-image and image editing with MetaCanvas, the same core calls the ComfyUI graph makes.

    python -m metacanvas_core.generate --prompt "a red cube left of a blue ball" --out image.png \\
        --mllm models/LLM/Qwen2.5-VL-7B-Instruct --backbone models/diffusers/Sana_1600M_512px_diffusers \\
        [--checkpoint models/metacanvas/FILE.safetensors]
    python -m metacanvas_core.generate --image photo.png --prompt "make the sky purple" --out edited.png \\
        --mllm models/LLM/Qwen2.5-VL-7B-Instruct --backbone models/diffusers/FLUX.1-Kontext-dev \\
        --checkpoint models/metacanvas/FILE.safetensors --scheduler flow_euler --cfg 3 --image-cfg 1.5

--mllm is a Hugging Face folder or ComfyUI's single file, which takes ComfyUI's tokenizer folder:
        --mllm ComfyUI/models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors \\
        --mllm-tokenizer ComfyUI/comfy/text_encoders/qwen25_tokenizer

Paths are plain paths (absolute, or relative to the current folder): no models folder is searched.

--mllm and --backbone go together. With neither (and no --checkpoint) it runs tiny random models written
to a temporary folder (tiny FLUX-Kontext with --image, tiny SANA without): the image is then noise-like,
it shows the pipeline works, not what trained models draw. Every input is checked before a model loads;
a mistake prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import cli
from .errors import MetaCanvasInputError
from .inputs import WeightDtype
from .schedulers import SCHEDULERS

if TYPE_CHECKING:
    import PIL.Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m metacanvas_core.generate", description=__doc__)
    p.add_argument("--prompt", default="a red circle at the top left and a blue square at the bottom right")
    p.add_argument("--negative-prompt", default="")
    cli.add_mllm_options(p)
    p.add_argument(
        "--mllm-weight-dtype",
        choices=WeightDtype.values(),
        default=WeightDtype.DEFAULT.value,
        help="the MLLM's linear weights in memory, as the MLLM Loader's weight_dtype: default keeps the file's own "
        "(a scaled fp8 file stays fp8); fp8_e4m3fn/fp8_e5m2 halve a bf16 planner's memory (computed in --dtype)",
    )
    p.add_argument("--backbone", type=Path, help="diffusers pipeline folder (SANA, or FLUX.1-Kontext for editing)")
    p.add_argument("--image", type=Path, help="input image: the MLLM sees it; FLUX-Kontext edits it")
    p.add_argument("--guidance", type=float, help="FLUX embedded guidance (default: the pipeline's, 3.5)")
    p.add_argument("--image-cfg", type=float, default=1.0, help="image guidance for editing backbones; 1 = off")
    p.add_argument("--checkpoint", type=Path, help="MetaCanvas .safetensors (default: new, untrained)")
    p.add_argument("--width", type=cli.positive_int, help="default: the backbone's")
    p.add_argument("--height", type=cli.positive_int, help="default: the backbone's")
    p.add_argument("--steps", type=cli.positive_int, default=20)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpm_solver_flow")
    p.add_argument("--no-canvas", action="store_true", help="plain backbone, for A/B comparison")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--out", type=Path, default=Path("metacanvas.png"), help="image file (.png, .jpg, .webp, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.run(lambda: generate(args), debug=args.debug)


def generate(args: argparse.Namespace) -> None:
    real = cli.models_given(args.mllm, args.mllm_tokenizer, args.backbone, "--backbone")
    if args.checkpoint is not None and not real:
        raise MetaCanvasInputError(
            "--checkpoint needs the --mllm and --backbone it was trained with: it cannot run on the tiny random models."
        )
    image = check_files(args)
    if not args.verbose:
        cli.quiet_libraries()
    if real:
        cli.check_models(args.mllm, args.mllm_tokenizer, args.backbone)
        render(args, image, args.mllm, args.backbone, args.checkpoint)
        return
    kind = "flux_kontext" if image else "sana"
    print("No --mllm/--backbone given: running TINY RANDOM models (noise-like output, a pipeline check only).")
    with cli.tiny_models() as tiny:
        render(args, image, tiny["mllm"], tiny[kind], tiny[f"{kind}_metacanvas"])


def check_files(args: argparse.Namespace) -> PIL.Image.Image | None:
    """Every input file readable and the output writable-looking before any model loads; the decoded --image."""
    from PIL import Image, UnidentifiedImageError

    if args.checkpoint is not None:
        cli.readable_file(args.checkpoint, "--checkpoint")
    if not args.out.parent.is_dir():
        raise MetaCanvasInputError(f"--out '{args.out}': the folder '{args.out.parent}' does not exist.")
    if args.out.suffix.lower() not in Image.registered_extensions():
        raise MetaCanvasInputError(f"--out '{args.out}': name an image file, e.g. ending in .png.")
    if args.image is None:
        return None
    cli.readable_file(args.image, "--image")
    try:
        with Image.open(args.image) as picture:
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MetaCanvasInputError(f"--image '{args.image}' is not an image this program can read ({e}).") from None


def render(
    args: argparse.Namespace, image: PIL.Image.Image | None, mllm: Path, backbone_folder: Path, checkpoint: Path | None
) -> None:
    """Load the checkpoint (small) first, then the MLLM and the backbone; plan, sample, decode, save."""
    import time

    import numpy as np
    import torch
    from PIL import Image

    from .backbones import load_backbone
    from .checkpoint import load_metacanvas
    from .conditioning import project
    from .inputs import VisualInputs
    from .metacanvas import default_context_source, new_metacanvas
    from .planner import Planner
    from .sampling import sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = ("bf16" if device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

    t0 = time.perf_counter()
    mc = load_metacanvas(checkpoint, device) if checkpoint else None
    if mc is not None and args.width and args.height:
        mc.canvas_grid(args.height, args.width)  # refuses a size the checkpoint cannot plan, before the big loads
    planner = Planner.load(mllm, dtype, device, args.mllm_tokenizer, args.mllm_weight_dtype)
    backbone = load_backbone(backbone_folder, dtype, device)
    if mc is None:
        mc = new_metacanvas(planner.hidden_size, backbone.spec, default_context_source(backbone.has_text_encoder))
        mc = mc.to(device)
    mc.check_compatible(planner.hidden_size, planner.folder, backbone.spec, backbone.folder, backbone.has_text_encoder)
    height, width = args.height or backbone.default_size[0], args.width or backbone.default_size[1]
    t1 = time.perf_counter()
    with torch.no_grad():
        inputs = VisualInputs((image,) if image else ())
        plan = mc.plan(planner, args.prompt, height, width, inputs, args.negative_prompt)
    latents = sample(
        backbone,
        project(plan, mc, backbone),
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        height=height,
        width=width,
        scheduler=args.scheduler,
        use_canvas=not args.no_canvas,
        guidance=args.guidance,
        image_cfg=args.image_cfg,
    )
    pixels = backbone.decode(latents)[0]
    t2 = time.perf_counter()
    Image.fromarray((pixels.cpu().numpy() * 255).round().astype(np.uint8)).save(args.out)
    print(
        f"{args.out}: {width}×{height}, checkpoint {mc.name}, canvas {'off' if args.no_canvas else plan.grid.as_thw()}; "
        f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s on {device}"
    )


if __name__ == "__main__":
    sys.exit(main())
