"""Train MetaCanvas weights from a recipe, or print a recipe's memory plan.

    python -m metacanvas_core.train RECIPE --output-dir DIR [--max-steps N] [--resume DIR] [--set key=value ...]
    python -m metacanvas_core.train RECIPE --plan [--gpus N]      parameters and bytes per GPU, DDP and FSDP, and
                                                                  the batch per step on N GPUs
    accelerate launch -m metacanvas_core.train RECIPE --output-dir DIR          (several GPUs / nodes)

RECIPE is a recipe file, or the name of one in metacanvas_core/recipes (such as `tiny_sana_t2i`).
DIR receives metrics.jsonl, checkpoints/step_*/ (resumable states), `<name>.safetensors` (the
MetaCanvas checkpoint for models/metacanvas/) and, when DiT weights were trained, backbone/ (a
diffusers pipeline folder for models/diffusers/). See docs/TRAINING.md.

Quiet by default (--verbose: loading logs and progress bars); library warnings other than known noise stay
(`cli.quiet_libraries`). Where a run departs from the paper's recipe (a module the paper starts from another
project's weights, started fresh because no file was given), one `note:` line on stderr says so at start. A mistake
in the input (recipe, data, option, an unreadable file) is one line on stderr and exit status 2; --debug shows its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import cli
from .errors import MetaCanvasInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = Path(__file__).parent / "recipes"


def recipe_path(value: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    named = RECIPES / (value if value.endswith(".json") else f"{value}.json")
    return named if named.is_file() else path


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m metacanvas_core.train", description=__doc__)
    p.add_argument("config", help="recipe file, or the name of one in metacanvas_core/recipes")
    p.add_argument("--output-dir", type=Path, help="where the run writes (required to train)")
    p.add_argument("--max-steps", type=cli.positive_int, help="stop after this many steps (default: the recipe's)")
    p.add_argument("--resume", type=Path, help="an output folder (its latest state) or a checkpoints/step_* folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (JSON value)")
    p.add_argument("--plan", action="store_true", help="print the recipe's memory plan per GPU instead of training")
    p.add_argument("--gpus", type=cli.positive_int, default=8, help="GPU count of the memory plan (default 8)")
    return p


def train(args: argparse.Namespace) -> None:
    """Check the recipe and options, then print the memory plan or train and say where the results are."""
    from .training.config import load_config

    config = load_config(recipe_path(args.config), args.set)
    if not args.plan and args.output_dir is None:
        raise MetaCanvasInputError("--output-dir is required to train (or give --plan).")
    if args.verbose:  # the trainer's own loading logs (resumed from ...)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        cli.quiet_libraries()
    if args.plan:
        from .training.memory import plan

        print(plan(config).table(args.gpus))
        return
    from .training.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(config, args.output_dir, max_steps=args.max_steps, resume=args.resume, progress=args.verbose)
    if trainer.accelerator.is_main_process:
        for notice in trainer.notices:  # where the run departs from the paper's recipe, before the first step
            print(f"note: {notice}", file=sys.stderr, flush=True)
    trainer.train()
    if trainer.accelerator.is_main_process:
        out = args.output_dir
        print(f"trained {trainer.step} steps in {time.perf_counter() - start:.1f} s")
        print(f"MetaCanvas checkpoint: {out / (config.name + '.safetensors')} (copy it to models/metacanvas/)")
        if "diffusion_model" in trainer.exported:  # Wan2.2, FLUX.1-Kontext: ComfyUI's native MODEL
            print(
                f"trained DiT: {trainer.exported['diffusion_model']} (copy it to models/diffusion_models/ and load it "
                "with Load Diffusion Model in the native_* templates; the folder "
                f"{out / 'backbone'} is for training from it)"
            )
        elif trainer.trains_dit:
            print(f"trained backbone: {out / 'backbone'} (copy or link it to models/diffusers/<name>)")
        if trainer.samples is not None:
            print(
                f"samples: {trainer.samples} (top row: training images; bottom row: samples for their captions, "
                "which should show the same coloured shape at the same place)"
            )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.run(lambda: train(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
