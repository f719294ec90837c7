"""Command-line text-to-image and image editing with MetaCanvas, the same core calls the ComfyUI graph makes.

    python -m metacanvas_core.generate --prompt "a red cube left of a blue ball" --out image.png \
        --mllm models/LLM/Qwen2.5-VL-7B-Instruct --backbone models/diffusers/Sana_1600M_512px_diffusers \
        [--checkpoint models/metacanvas/FILE.safetensors]
    python -m metacanvas_core.generate --image photo.png --prompt "make the sky purple" --out edited.png \
        --mllm models/LLM/Qwen2.5-VL-7B-Instruct --backbone models/diffusers/FLUX.1-Kontext-dev \
        --checkpoint models/metacanvas/FILE.safetensors --scheduler flow_euler --cfg 3 --image-cfg 1.5

With no model paths it writes the tiny random models to a temporary folder and runs those (tiny
FLUX-Kontext with --image, tiny SANA without; the image is then noise-like: it shows the pipeline
works, not what trained models draw).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .backbones import SCHEDULERS, load_backbone  # noqa: E402
from .checkpoint import load_metacanvas  # noqa: E402
from .conditioning import project  # noqa: E402
from .inputs import VisualInputs  # noqa: E402
from .metacanvas import default_context_source, new_metacanvas  # noqa: E402
from .planner import Planner  # noqa: E402
from .sampling import sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a red circle at the top left and a blue square at the bottom right")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--mllm", type=Path, help="Qwen2.5-VL folder")
    p.add_argument("--backbone", type=Path, help="diffusers pipeline folder (SANA, or FLUX.1-Kontext for editing)")
    p.add_argument("--image", type=Path, help="input image: the MLLM sees it; FLUX-Kontext edits it")
    p.add_argument("--guidance", type=float, help="FLUX embedded guidance (default: the pipeline's, 3.5)")
    p.add_argument("--image-cfg", type=float, default=1.0, help="image guidance for editing backbones; 1 = off")
    p.add_argument("--checkpoint", type=Path, help="MetaCanvas .safetensors (default: new, untrained)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpm_solver_flow")
    p.add_argument("--no-canvas", action="store_true", help="plain backbone, for A/B comparison")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32" if not torch.cuda.is_available() else "bf16"
    )
    p.add_argument("--out", type=Path, default=Path("metacanvas.png"))
    args = p.parse_args()

    if args.mllm is None or args.backbone is None:
        from .tiny import write_all

        tiny = write_all(Path(tempfile.mkdtemp(prefix="metacanvas-tiny-")))
        kind = "flux_kontext" if args.image else "sana"
        args.mllm, args.backbone = tiny["mllm"], tiny[kind]
        args.checkpoint = args.checkpoint or tiny[f"{kind}_metacanvas"]
        print(f"No --mllm/--backbone given: running the TINY RANDOM models from {tiny['mllm'].parents[1]}.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    t0 = time.perf_counter()
    planner = Planner.from_folder(args.mllm, dtype, device)
    backbone = load_backbone(args.backbone, dtype, device)
    if args.checkpoint:
        mc = load_metacanvas(args.checkpoint, device)
    else:
        source = default_context_source(backbone.has_text_encoder)
        mc = new_metacanvas(planner.hidden_size, backbone.spec, source).to(device)
    mc.check_compatible(planner.hidden_size, planner.folder, backbone.spec, backbone.folder, backbone.has_text_encoder)
    height, width = args.height or backbone.default_size[0], args.width or backbone.default_size[1]
    t1 = time.perf_counter()
    images = (Image.open(args.image).convert("RGB"),) if args.image else ()
    with torch.no_grad():
        plan = mc.plan(planner, args.prompt, height, width, VisualInputs(images), args.negative_prompt)
    cond = project(plan, mc, backbone)
    latents = sample(
        backbone,
        cond,
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
    image = backbone.decode(latents)[0]
    t2 = time.perf_counter()
    Image.fromarray((image.cpu().numpy() * 255).round().astype(np.uint8)).save(args.out)
    print(
        f"{args.out}: {width}×{height}, checkpoint {mc.name}, canvas {'off' if args.no_canvas else plan.grid.as_thw()}; "
        f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s on {device}"
    )


if __name__ == "__main__":
    main()
