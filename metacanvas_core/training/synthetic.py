"""A small synthetic data set the trainer writes itself: coloured shapes on a plain background, with
captions that say what and where ("a red circle at the top left"), so a canvas has a layout to learn.

Kinds: t2i and recon (one image each), edit (the same scene before and after a recolouring), and every
video kind on a shape moving between two places (folders of `frames` frames): t2v, i2v (+ its first
frame), video_edit (recoloured clip), ref2v (+ a reference image of the shape).
Deterministic in `seed`; written as PNGs plus a `<kind>.jsonl` manifest.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}


def _draw(size: tuple[int, int], shape: str, colour: str, place: str, to: str | None = None, a: float = 0.0):
    w, h = size
    im = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(im)
    (x0, y0), (x1, y1) = PLACES[place], PLACES[to or place]
    cx, cy = ((1 - a) * x0 + a * x1) * w, ((1 - a) * y0 + a * y1) * h
    r = 0.2 * min(w, h)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def write_synthetic(
    folder: str | Path,
    kind: str = "t2i",
    count: int = 16,
    sizes: list[list[int]] | None = None,
    seed: int = 0,
    frames: int = 9,
) -> Path:
    """Write `count` records of `kind` with images of the given (height, width) sizes; returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / f"{kind}.jsonl"
    if manifest.is_file():  # written before with the same arguments (the name carries no arguments: check)
        meta = folder / f"{kind}.args.json"
        if meta.is_file() and json.loads(meta.read_text()) == [count, sizes, seed, frames]:
            return manifest
    rng = random.Random(seed)
    sizes = sizes or [[64, 64]]
    lines = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
        name = f"{kind}_{i:04d}"
        image = _draw((w, h), shape, colour, place)
        if kind == "edit":
            new = rng.choice([c for c in COLOURS if c != colour])
            image.save(folder / f"{name}_src.png")
            _draw((w, h), shape, new, place).save(folder / f"{name}_tgt.png")
            record = {
                "kind": "edit",
                "source": f"{name}_src.png",
                "instruction": f"make the {shape} {new}",
                "target": f"{name}_tgt.png",
            }
        elif kind in ("t2i", "recon"):
            image.save(folder / f"{name}.png")
            record = {"kind": kind, "image": f"{name}.png"}
            record["prompt"] = f"a {colour} {shape} at the {place}"
        elif kind in ("t2v", "i2v", "video_edit", "ref2v"):
            to = rng.choice([p for p in PLACES if p != place])
            new = rng.choice([c for c in COLOURS if c != colour])

            def clip(folder_name: str, col: str, scene=(w, h, shape, place, to)) -> str:
                w_, h_, shape_, place_, to_ = scene
                (folder / folder_name).mkdir(exist_ok=True)
                for f in range(frames):
                    a = f / max(frames - 1, 1)
                    _draw((w_, h_), shape_, col, place_, to_, a).save(folder / folder_name / f"{f:04d}.png")
                return folder_name

            moving = f"a {colour} {shape} moving from the {place} to the {to}"
            record = {"kind": kind, "video": clip(name, colour), "prompt": moving}
            if kind == "i2v":
                record["image"] = f"{name}/0000.png"
                record["prompt"] = f"the {shape} moves to the {to}"
            elif kind == "video_edit":
                record = {
                    "kind": kind,
                    "source": clip(name, colour),
                    "instruction": f"make the {shape} {new}",
                    "target": clip(f"{name}_tgt", new),
                }
            elif kind == "ref2v":
                _draw((w, h), shape, colour, "top left").save(folder / f"{name}_ref.png")
                record["references"] = [f"{name}_ref.png"]
                record["prompt"] = f"the {shape} of the reference moving from the {place} to the {to}"
        else:
            raise ValueError(f"the synthetic set has no {kind!r} records (t2i, recon, edit and the video kinds)")
        lines.append(json.dumps(record))
    manifest.write_text("\n".join(lines) + "\n")
    (folder / f"{kind}.args.json").write_text(json.dumps([count, sizes, seed, frames]))
    return manifest
