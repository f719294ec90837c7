"""Train MetaCanvas weights from a recipe.

    python -m metacanvas_core.train CONFIG --output-dir DIR [--max-steps N] [--resume DIR] [--set key=value ...]
    accelerate launch -m metacanvas_core.train CONFIG --output-dir DIR          (several GPUs / nodes)

CONFIG is a recipe (metacanvas_core/recipes/*.json, or a name there such as `tiny_sana_t2i`).
DIR receives metrics.jsonl, checkpoints/step_*/ (resumable states), `<name>.safetensors` (the
MetaCanvas checkpoint for models/metacanvas/) and, when DiT weights were trained, backbone/ (a
diffusers pipeline folder for models/diffusers/). See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = Path(__file__).parent / "recipes"


def recipe_path(value: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    named = RECIPES / (value if value.endswith(".json") else f"{value}.json")
    return named if named.is_file() else path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="recipe file, or the name of one in metacanvas_core/recipes")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: the recipe's)")
    p.add_argument("--resume", type=Path, help="an output folder (its latest state) or a checkpoints/step_* folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (JSON value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .errors import MetaCanvasInputError
    from .training.config import load_config
    from .training.trainer import Trainer

    start = time.perf_counter()
    try:
        config = load_config(recipe_path(args.config), args.set)
        trainer = Trainer(
            config, args.output_dir, max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress
        )
        trainer.train()
    except MetaCanvasInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        out = args.output_dir
        print(f"trained {trainer.step} steps in {time.perf_counter() - start:.1f} s")
        print(f"MetaCanvas checkpoint: {out / (config.name + '.safetensors')} (copy it to models/metacanvas/)")
        if trainer.trains_dit:
            print(f"trained backbone: {out / 'backbone'} (copy or link it to models/diffusers/<name>)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
