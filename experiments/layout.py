"""Toy-scale rerun of the paper's T2I study (§4, Table 3): does the canvas beat global conditioning on layout?

Every arm has the same frozen tiny MLLM (Qwen2.5-VL, width 64, taught the toy language by text-only grounding
in `toy_mllm`, or with `--mllm random` left random), the same tiny SANA-style DiT trained from scratch
(random init per seed, all parameters trained), the same data, steps, seed and learning rate, run by the
pack's own trainer (`training.Trainer`):

  global           context connector only (MLLM prompt states -> DiT cross-attention), no canvas
  canvas           MetaCanvas: canvas + canvas connector (align + fuse) + the same context connector
  no_timestep      canvas, the fuse block without timestep conditioning          (Table 3 row 2)
  no_fuse          canvas, no fuse block: the aligned canvas added to the patches (Table 3 row 3)
  before_patchify  canvas, no fuse block, added to the noisy latent before patchify (Table 3 row 5)
  canvas_lora      canvas + the MLLM's canvas-only LoRA trained (so canvas tokens can learn to read the prompt)

Data: 48×48 images with 1–3 objects (shape × colour × cell of a 3×3 grid, distinct colours and cells) and
prompts naming them ("a red circle at the top left and a blue square in the center"); seeded. Some
(shape, colour, cell) triples never occur in training; half of the held-out prompts contain one, and no
held-out prompt is a training prompt. The "VAE" is a fixed exact pixel autoencoder (4×4 average pool to
12×12×3, plus a zero channel; nearest upsampling back), because the tiny DC-AE is random and cannot
reconstruct: a judge would only see its noise. The DiT sees 12×12 = 144 tokens; the canvas is 12×12.

Judge (no learned model): every pixel is classified by hue to a palette colour (or none, when unsaturated
or dark); per named object it checks its colour's mass peaks in its named cell (position), that the named
cell's dominant colour is its colour (colour binding), and that its cell holds some object (cell: placement
alone); per image, that the number of occupied cells is the number of objects (count). `object` = position
and colour both right; `all` = every object right and the count right.

    python -m experiments.layout --out runs/layout [--steps N --seeds K --workers W --mllm random]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from metacanvas_core.training.preview import PixelCodec

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
BACKGROUND = (245, 245, 240)
SHAPES = ("circle", "square", "triangle")
CELLS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
SIZE = 48  # pixels; 12×12 latent tokens, 4×4 per grid cell
STRIDE = 4  # pixels per latent token (the pixel autoencoder's pool)
ARMS = {
    "global": None,
    "canvas": {},
    "no_timestep": {"timestep_cond": False},
    "no_fuse": {"fuse": "none"},
    "before_patchify": {"fuse": "none", "inject": "latent", "latent_channels": 4},
    "canvas_lora": {},
}
# Arms that also train the MLLM's canvas-only LoRA (the paper's T2I variant with LoRA r=32; here r=16).
LORA_ARMS = {
    "canvas_lora": {
        "r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": r"model\.language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
    }
}
DEFAULT_ARMS = [a for a in ARMS if a not in LORA_ARMS]  # the arms; add canvas_lora with --arms

Obj = tuple[str, str, int]  # (shape, colour, cell)
METRICS = ("object", "position", "colour", "cell", "count", "all")  # the judge's scores


# --- data -------------------------------------------------------------------------------------
def prompt_of(scene: list[Obj]) -> str:
    return " and ".join(f"a {colour} {shape} {CELLS[cell]}" for shape, colour, cell in scene)


def draw(scene: list[Obj], size: int = SIZE, jitter: tuple[float, float] | None = None) -> Image.Image:
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    c = size / 3
    r = 0.34 * c
    for i, (shape, colour, cell) in enumerate(scene):
        jx, jy = (jitter[0], jitter[1]) if jitter else (0.0, 0.0)
        jx, jy = (jx * (i + 1)) % 3 - 1.5, (jy * (i + 1)) % 3 - 1.5
        cx, cy = (cell % 3 + 0.5) * c + jx, (cell // 3 + 0.5) * c + jy
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            s = 0.85 * r
            d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            d.polygon([(cx, cy - 1.15 * r), (cx - 1.15 * r, cy + 0.85 * r), (cx + 1.15 * r, cy + 0.85 * r)], fill=fill)
    return im


def _scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 3)
    colours = rng.sample(sorted(COLOURS), n)
    cells = rng.sample(range(9), n)
    return sorted((rng.choice(SHAPES), colour, cell) for colour, cell in zip(colours, cells, strict=True))


@dataclass
class LayoutData:
    train: list[list[Obj]]
    test: list[list[Obj]]
    held_out: list[Obj]  # triples never in training
    jitter: list[tuple[float, float]] = field(default_factory=list)  # per training image


def make_data(seed: int = 0, n_train: int = 2000, n_test: int = 32) -> LayoutData:
    """Deterministic in `seed`: training scenes, held-out test scenes and the held-out triples."""
    rng = random.Random(seed)
    triples = [(s, c, k) for s in SHAPES for c in sorted(COLOURS) for k in range(9)]
    held = sorted(rng.sample(triples, len(triples) // 9))
    held_set = set(held)
    train: list[list[Obj]] = []
    while len(train) < n_train:
        scene = _scene(rng)
        if not held_set.intersection(scene):
            train.append(scene)
    seen = {prompt_of(s) for s in train}
    test: list[list[Obj]] = []
    while len(test) < n_test:
        scene = _scene(rng)
        novel = bool(held_set.intersection(scene))
        if prompt_of(scene) not in seen and novel == (len(test) % 2 == 0):
            seen.add(prompt_of(scene))
            test.append(scene)
    jitter = [(rng.uniform(0, 3), rng.uniform(0, 3)) for _ in train]
    return LayoutData(train, test, held, jitter)


def write_data(data: LayoutData, folder: Path) -> Path:
    """Training images + a t2i manifest (+ layout.json with every scene) the trainer reads."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, jit) in enumerate(zip(data.train, data.jitter, strict=True)):
        draw(scene, jitter=jit).save(folder / "img" / f"{i:05d}.png")
        lines.append(json.dumps({"kind": "t2i", "image": f"img/{i:05d}.png", "prompt": prompt_of(scene)}))
    (folder / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "layout.json").write_text(json.dumps({"train": data.train, "test": data.test, "held_out": data.held_out}))
    return folder / "t2i.jsonl"


# --- judge ------------------------------------------------------------------------------------
def _hsv(image) -> np.ndarray:
    """(H, W, 3) uint8 hue, saturation, value (PIL's HSV, each 0..255) of an RGB image in 0..255 or 0..1."""
    x = np.asarray(image, dtype=np.float32)
    if x.max() <= 1.0 + 1e-6:
        x = x * 255
    return np.asarray(Image.fromarray(x.round().clip(0, 255).astype(np.uint8), "RGB").convert("HSV")).astype(np.int32)


_HUES = _hsv(np.array([list(COLOURS.values())], dtype=np.uint8))[0, :, 0]


def colour_mass(image) -> np.ndarray:
    """(colours, 9): the fraction of each grid cell's pixels of each palette colour.

    A pixel is coloured when saturated and bright enough (S >= 0.35, V >= 0.25; the background is not) and
    takes the palette colour of nearest hue, so a darker or paler shade of blue still counts as blue, as a
    person (or GenEval's colour classifier) would say.
    """
    hsv = _hsv(image)
    diff = np.abs(hsv[:, :, :1] - _HUES[None, None])
    diff = np.minimum(diff, 256 - diff)  # hue is circular
    label = np.where((hsv[:, :, 1] >= 90) & (hsv[:, :, 2] >= 64), diff.argmin(-1), -1)
    h, w = label.shape
    mass = np.zeros((len(COLOURS), 9))
    for k in range(9):
        cell = label[(k // 3) * h // 3 : (k // 3 + 1) * h // 3, (k % 3) * w // 3 : (k % 3 + 1) * w // 3]
        for j in range(len(COLOURS)):
            mass[j, k] = (cell == j).mean()
    return mass


def judge(image, scene: list[Obj], threshold: float = 0.05) -> dict[str, float]:
    """Scores of one image against its scene: per-object means of position, colour, object and cell, and per
    image count and all (0/1).

    position: the object's colour mass peaks in its named cell; colour: the named cell's dominant colour is
    its colour; object: both; cell: its named cell holds some object, whatever the colour (placement alone;
    recall only, so colourful noise in every cell passes it: read it with count, which fails extra blobs).
    """
    mass = colour_mass(image)
    names = list(COLOURS)
    pos = col = obj = placed = 0
    for _shape, colour, cell in scene:
        j = names.index(colour)
        p = mass[j, cell] >= threshold and int(mass[j].argmax()) == cell
        c = mass[:, cell].max() >= threshold and int(mass[:, cell].argmax()) == j
        pos, col, obj = pos + p, col + c, obj + (p and c)
        placed += mass[:, cell].sum() >= threshold
    n = len(scene)
    occupied = int((mass.sum(0) >= threshold).sum())
    count = float(occupied == n)
    return {
        "position": pos / n,
        "colour": col / n,
        "object": obj / n,
        "cell": placed / n,
        "count": count,
        "all": float(obj == n and count),
    }


def judge_all(images, scenes) -> dict[str, float]:
    scores = [judge(im, s) for im, s in zip(images, scenes, strict=True)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


# --- the pixel autoencoder --------------------------------------------------------------------
# (B, H, W, 3) in 0..1 <-> (B, 4, H/4, W/4): 4×4 means in -1..1 plus a zero channel (the DiT has 4).
PIXELS = PixelCodec(STRIDE, 4)


# --- models -----------------------------------------------------------------------------------
MLLMS = ("language", "random")


def language_scenes(data: LayoutData, n: int = 20_000, seed: int = 1) -> list[list[Obj]]:
    """The MLLM's own text corpus: seeded scenes over every triple (it knows the language), no test prompt."""
    rng = random.Random(seed)
    test = {prompt_of(s) for s in data.test}
    out: list[list[Obj]] = []
    while len(out) < n:
        scene = _scene(rng)
        if prompt_of(scene) not in test:
            out.append(scene)
    return out


def write_models(
    root: Path,
    seeds: list[int],
    data: LayoutData,
    mllm: str = "language",
    mllm_steps: int = 1500,
    width: int = 64,
    layers: int = 4,
) -> dict:
    """The frozen tiny MLLM (one for all arms) and a from-scratch DiT per seed (SANA-style, width × layers).

    `mllm`: "language" = trained on the toy language first (`toy_mllm`), "random" = random weights.
    """
    from diffusers import SanaTransformer2DModel

    from metacanvas_core.tiny import write_tiny_qwen, write_tiny_sana

    from .toy_mllm import write_language_mllm

    if mllm not in MLLMS:
        raise ValueError(f"mllm must be one of {MLLMS}, got {mllm!r}")
    folder = root / f"mllm-{mllm}"
    grounding = folder / "grounding.json"
    if mllm == "random" and not (folder / "model.safetensors").is_file():
        write_tiny_qwen(folder, seed=0)
    if mllm == "language" and not (grounding.is_file() and json.loads(grounding.read_text())["steps"] == mllm_steps):
        write_language_mllm(folder, language_scenes(data), data.test, CELLS, prompt_of, steps=mllm_steps)
    dits = {}
    for seed in seeds:
        dit = root / f"dit-{seed}"
        if not (dit / "transformer" / "config.json").is_file():
            write_tiny_sana(dit, seed=seed)
            shutil.rmtree(dit / "transformer")
            torch.manual_seed(seed)
            heads = width // 16
            SanaTransformer2DModel(
                in_channels=4,
                out_channels=4,
                num_attention_heads=heads,
                attention_head_dim=16,
                num_layers=layers,
                num_cross_attention_heads=heads,
                cross_attention_head_dim=16,
                cross_attention_dim=width,
                caption_channels=width,
                mlp_ratio=2.5,
                sample_size=SIZE // STRIDE,
                patch_size=1,
                norm_elementwise_affine=False,
            ).save_pretrained(dit / "transformer", safe_serialization=True)
        dits[seed] = dit
    return {
        "mllm": folder,
        "mllm_kind": mllm,
        "grounding": json.loads(grounding.read_text()) if grounding.is_file() else None,
        "dits": dits,
    }


def write_init_checkpoint(path: Path, mllm: Path, dit: Path, seed: int, connector: dict) -> Path:
    """A new MetaCanvas with MLLM context; canvas and context connector seeded by `seed`, the same in every arm."""
    from metacanvas_core.backbones import load_backbone
    from metacanvas_core.checkpoint import save_metacanvas
    from metacanvas_core.metacanvas import new_metacanvas
    from metacanvas_core.planner import Planner

    planner = Planner.from_folder(mllm)
    backbone = load_backbone(dit, text_encoder=False)
    save_metacanvas(new_metacanvas(planner.hidden_size, backbone.spec, "mllm", connector, seed=seed), path)
    return path


# --- one arm ----------------------------------------------------------------------------------
@dataclass
class Settings:
    steps: int = 1000
    eval_every: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    sample_steps: int = 12
    cfg: float = 3.0
    test_prompts: int = 32
    grid_prompts: int = 8
    threads: int = 1
    eval_at_start: bool = True  # judge the untrained model at step 0 too
    mllm_steps: int = 1500  # grounding steps of the toy-language MLLM (`toy_mllm`)


@torch.no_grad()
def generate(trainer, scenes: list[list[Obj]], use_canvas: bool, s: Settings) -> list[np.ndarray]:
    """Held-out images from the trainer's current weights through the pack's Plan -> Project -> sample path."""
    from metacanvas_core.conditioning import project
    from metacanvas_core.sampling import sample

    mc, planner, backbone = trainer.mc, trainer.planner, trainer.backbone
    modules = [*mc.modules(), *backbone.transformer.modules()]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    out = []
    for i, scene in enumerate(scenes):
        cond = project(mc.plan(planner, prompt_of(scene), SIZE, SIZE), mc, backbone)
        latents = sample(
            backbone,
            cond,
            seed=10_000 + i,
            steps=s.sample_steps,
            cfg=s.cfg,
            height=SIZE,
            width=SIZE,
            scheduler="flow_euler",
            use_canvas=use_canvas,
        )
        out.append((PIXELS.decode(latents)[0].numpy() * 255).round().astype(np.uint8))
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    return out


def run_arm(arm: str, seed: int, manifest: Path, models: dict, out: Path, s: Settings, test: list) -> dict:
    """Train one arm for one seed with evaluations every `eval_every` steps; returns its curve and samples."""
    from metacanvas_core.training.config import TrainConfig
    from metacanvas_core.training.trainer import Trainer

    torch.set_num_threads(s.threads)
    logging_off()
    start = time.perf_counter()
    folder = out / "runs" / f"{arm}-s{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    connector = ARMS[arm]
    init = write_init_checkpoint(
        folder / "init.safetensors", models["mllm"], models["dits"][seed], seed, connector or {}
    )
    use_canvas = connector is not None
    trainable = (["canvas", "canvas_connector"] if use_canvas else []) + ["context_connector", "dit"]
    trainable += ["mllm_lora"] if arm in LORA_ARMS else []
    config = TrainConfig(
        name=f"layout-{arm}",
        mllm=str(models["mllm"]),
        backbone=str(models["dits"][seed]),
        trainable=trainable,
        lr=s.lr,
        max_steps=s.steps,
        batch_size=s.batch_size,
        buckets=[[SIZE, SIZE]],
        data=[{"manifest": str(manifest)}],
        init_checkpoint=str(init),
        mllm_lora=LORA_ARMS.get(arm),
        use_canvas=use_canvas,
        warmup_steps=s.warmup,
        warmup_start_lr=s.lr / 10,
        flow_shift=3.0,  # as the sampler's flow_euler scheduler
        seed=seed,
        log_every=10,
        keep_checkpoints=1,
        eval_samples=0,
    )
    config.validate()
    trainer = Trainer(config, folder, progress=False, encode=PIXELS.encode)  # the exact pixel autoencoder
    test = test[: s.test_prompts]
    curve, losses = [], []
    points = sorted({*range(0 if s.eval_at_start else s.eval_every, s.steps, s.eval_every), s.steps})
    for target in points:
        if target > trainer.step:
            trainer.max_steps = target
            losses += trainer.train()
        images = generate(trainer, test, use_canvas, s)
        curve.append({"step": target, **judge_all(images, test)})
    share = prompt_share(trainer, test) if use_canvas else None
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder / "backbone", ignore_errors=True)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "final_loss": float(np.mean(tail)) if tail else float("nan"),
        "seconds": time.perf_counter() - start,
        "prompt_share": share,
        "samples": images[: s.grid_prompts],
    }


@torch.no_grad()
def prompt_share(trainer, scenes: list[list[Obj]]) -> dict[str, float]:
    """How much the canvas depends on the prompt: the share of its variance (over prompts × positions) that is
    across prompts, for the MLLM's canvas states and for the aligned canvas. Near 0: a per-position embedding."""
    mc, planner = trainer.mc, trainer.planner
    states, aligned = [], []
    for scene in scenes:
        plan = mc.plan(planner, prompt_of(scene), SIZE, SIZE, negative=False)
        states.append(plan.canvas[0].float())
        aligned.append(mc.align(plan)[0].flatten(0, 2))
    out = {}
    for name, x in (("states", torch.stack(states)), ("aligned", torch.stack(aligned))):
        total = x.var(dim=(0, 1)).sum()
        out[name] = float(x.var(dim=0).mean(0).sum() / total) if total > 0 else 0.0
    return out


def logging_off() -> None:
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("metacanvas_core").setLevel(logging.WARNING)


def _job(args):
    return run_arm(*args)


# --- report -----------------------------------------------------------------------------------
ARM_COLOURS = {
    "global": (90, 90, 90),
    "canvas": (200, 30, 30),
    "no_timestep": (230, 140, 0),
    "no_fuse": (30, 110, 210),
    "before_patchify": (40, 160, 70),
    "canvas_lora": (150, 60, 200),
}


def plot(results: list[dict], path: Path, metric: str = "object") -> None:
    """Judge score vs step per arm (seed mean thick, each seed thin), drawn with PIL."""
    w, h, left, right, top, bottom = 640, 400, 56, 150, 24, 44
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    steps = sorted({p["step"] for r in results for p in r["curve"]})
    smax = max(steps) or 1

    def xy(step, value):
        return left + (w - left - right) * step / smax, top + (h - top - bottom) * (1 - value)

    for v in (0, 0.25, 0.5, 0.75, 1.0):
        y = xy(0, v)[1]
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.2f}", fill="black")
    for step in steps:
        x = xy(step, 0)[0]
        d.text((x - 10, h - bottom + 6), str(step), fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, h - 18), f"training step   (judge: {metric} accuracy on held-out prompts)", fill="black")
    for i, arm in enumerate(a for a in ARMS if any(r["arm"] == a for r in results)):
        colour = ARM_COLOURS[arm]
        runs = [r for r in results if r["arm"] == arm]
        for r in runs:
            d.line([xy(p["step"], p[metric]) for p in r["curve"]], fill=tuple(c // 2 + 127 for c in colour), width=1)
        mean = [
            xy(step, statistics.mean(p[metric] for r in runs for p in r["curve"] if p["step"] == step))
            for step in steps
        ]
        d.line(mean, fill=colour, width=3)
        y = top + 10 + 18 * i
        d.line([(w - right + 10, y), (w - right + 30, y)], fill=colour, width=3)
        d.text((w - right + 36, y - 6), arm, fill="black")
    im.save(path)


def sample_grid(results: list[dict], test: list, path: Path, scale: int = 2) -> None:
    """Rows: ground truth, then each arm's first seed; columns: the first held-out prompts."""
    rows = [("ground truth", [np.asarray(draw(s)) for s in test])]
    for arm in ARMS:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if runs:
            rows.append((arm, runs[0]["samples"]))
    n = min(len(r[1]) for r in rows)
    cell, label = SIZE * scale, 110
    im = Image.new("RGB", (label + n * (cell + 4), len(rows) * (cell + 4)), "white")
    d = ImageDraw.Draw(im)
    for i, (name, images) in enumerate(rows):
        y = i * (cell + 4)
        d.text((4, y + cell // 2 - 6), name, fill="black")
        for j in range(n):
            tile = Image.fromarray(np.asarray(images[j], dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
            im.paste(tile, (label + j * (cell + 4), y))
    im.save(path)


def _fmt(values: list[float]) -> str:
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def summarise(results: list[dict]) -> dict:
    table = {}
    for arm in ARMS:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        final = [r["curve"][-1] for r in runs]
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            **{k: [f[k] for f in final] for k in METRICS},
            "final_loss": [r["final_loss"] for r in runs],
            "prompt_share": [r["prompt_share"]["states"] for r in runs if r.get("prompt_share")],
            "seconds": [r["seconds"] for r in runs],
            "curve": {
                p["step"]: statistics.mean(q["object"] for r in runs for q in r["curve"] if q["step"] == p["step"])
                for p in runs[0]["curve"]
            },
        }
    return table


def write_report(
    results: list[dict], data: LayoutData, s: Settings, out: Path, wall: float, gt: dict, shuffled: dict, models: dict
):
    table = summarise(results)
    lines = [
        "# Layout experiment: canvas vs global conditioning (toy scale)",
        "",
        f"Steps {s.steps}, batch {s.batch_size}, lr {s.lr} (warm-up {s.warmup}), seeds "
        f"{sorted({r['seed'] for r in results})}, {len(data.train)} training images, {s.test_prompts} held-out "
        f"prompts (half with a (shape, colour, cell) never seen in training), sampler flow_euler "
        f"{s.sample_steps} steps, cfg {s.cfg}. Wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores "
        f"({torch.__version__}).",
        "",
        f"Judge sanity: ground truth (through the pixel autoencoder) object {gt['object']:.3f}, all {gt['all']:.3f}; "
        f"shuffled images object {shuffled['object']:.3f}, cell {shuffled['cell']:.3f}, count "
        f"{shuffled['count']:.3f}, all {shuffled['all']:.3f}.",
        "",
        _mllm_line(models),
        "",
        "Final judge scores on held-out prompts, mean ± std over seeds (per-seed values in results.json):",
        "",
        "| arm | object | position | colour | cell | count | all correct | train loss (last 10%) | canvas prompt share "
        "| s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, t in table.items():
        cells = [_fmt(t[k]) for k in (*METRICS, "final_loss")]
        share = _fmt(t["prompt_share"]) if t["prompt_share"] else "–"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {share} | {statistics.mean(t['seconds']):.0f} |")
    steps = sorted({p["step"] for r in results for p in r["curve"]})
    lines += [
        "",
        "Canvas prompt share: the share of the MLLM canvas states' variance that is across prompts "
        "(0: the canvas is a per-position embedding that ignores the prompt).",
    ]
    lines += ["", "Object accuracy (seed mean) vs step:", "", "| arm | " + " | ".join(map(str, steps)) + " |"]
    lines.append("|---|" + "---|" * len(steps))
    for arm, t in table.items():
        lines.append(f"| {arm} | " + " | ".join(f"{t['curve'][k]:.3f}" for k in steps) + " |")
    lines += ["", "![object accuracy vs step](layout_plot.png)", "", "![samples](layout_samples.png)", ""]
    (out / "layout_report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "wall_s": wall,
                "judge_ground_truth": gt,
                "judge_shuffled": shuffled,
                "mllm": {"kind": models["mllm_kind"], "grounding": models["grounding"]},
                "table": table,
                "runs": [{k: v for k, v in r.items() if k != "samples"} for r in results],
            },
            indent=1,
        )
    )


def _mllm_line(models: dict) -> str:
    g = models["grounding"]
    if g is None:
        return "MLLM: the tiny Qwen2.5-VL with random weights (frozen)."
    return (
        f"MLLM: the tiny Qwen2.5-VL trained on the toy language ({g['steps']} steps of text-only grounding), "
        f"frozen; held-out grounding answers: {g['test']['token']:.3f} of tokens right, {g['test']['exact']:.3f} "
        "exactly right (teacher-forced)."
    )


def judge_sanity(data: LayoutData) -> tuple[dict, dict]:
    """The judge on ground-truth test images through the pixel autoencoder, and on shuffled ones."""
    images = [np.asarray(draw(s)) for s in data.test]
    x = torch.from_numpy(np.stack(images)).float() / 255
    recon = [(im.numpy() * 255).round().astype(np.uint8) for im in PIXELS.decode(PIXELS.encode(x))]
    shuffled = recon[1:] + recon[:1]
    return judge_all(recon, data.test), judge_all(shuffled, data.test)


def run_experiment(
    out: Path,
    seeds: int = 2,
    settings: Settings | None = None,
    arms: list[str] | None = None,
    workers: int = 2,
    n_train: int = 2000,
    mllm: str = "language",
) -> dict:
    s = settings or Settings()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_data(0, n_train=n_train)
    manifest = write_data(data, out / "data")
    seed_list = list(range(seeds))
    models = write_models(out / "models", seed_list, data, mllm, s.mllm_steps)
    gt, shuffled = judge_sanity(data)
    jobs = [(arm, seed, manifest, models, out, s, data.test) for seed in seed_list for arm in (arms or DEFAULT_ARMS)]
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    wall = time.perf_counter() - start
    write_report(results, data, s, out, wall, gt, shuffled, models)
    plot(results, out / "layout_plot.png")
    sample_grid(results, data.test[: s.grid_prompts], out / "layout_samples.png")
    return {"results": results, "table": summarise(results), "wall_s": wall, "judge": (gt, shuffled)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one CPU thread each)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    p.add_argument("--mllm", choices=MLLMS, default="language", help="the frozen MLLM: toy-language-trained or random")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--lr", type=float, default=Settings.lr)
    p.add_argument("--test-prompts", type=int, default=Settings.test_prompts)
    p.add_argument("--sample-steps", type=int, default=Settings.sample_steps)
    a = p.parse_args(argv)
    s = Settings(
        steps=a.steps,
        eval_every=a.eval_every or max(1, a.steps // 4),
        batch_size=a.batch_size,
        lr=a.lr,
        test_prompts=a.test_prompts,
        sample_steps=a.sample_steps,
    )
    r = run_experiment(a.out, a.seeds, s, a.arms.split(","), a.workers, mllm=a.mllm)
    print((a.out / "layout_report.md").read_text())
    print(f"wall {r['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
