"""Training data: JSONL manifests (one record kind per task), aspect-ratio buckets, a resumable order.

A manifest is a `.jsonl` file, one JSON object per line; file paths are relative to the manifest's
folder (or absolute). Every record has a `kind`:

    t2i         {"kind": "t2i", "image": "a.png", "prompt": "a red cube"}
    recon       {"kind": "recon", "image": "a.png"}                                   (+ optional "prompt")
    edit        {"kind": "edit", "source": "a.png", "instruction": "make it blue", "target": "b.png"}
    t2v         {"kind": "t2v", "video": "v.mp4", "prompt": "a dog runs"}
    i2v         {"kind": "i2v", "image": "f0.png", "video": "v.mp4", "prompt": "the dog runs"}
    video_edit  {"kind": "video_edit", "source": "a.mp4", "instruction": "make it night", "target": "b.mp4"}
    ref2v       {"kind": "ref2v", "references": ["p.png", "q.png"], "video": "v.mp4", "prompt": "..."}

Optional on every record: "width" and "height" of the target (saves opening the file for bucketing).
A video is a video file or a folder of frames. Input files (source, image of i2v/recon, references) go
to the MLLM and, for backbones that take input images, to the backbone as well (the paper's Fig. 1: both the MLLM's
visual encoder and the VAE encode them).

Every kind is validated; a backbone trains only on the kinds it can take (`BACKBONE_KINDS`).
A bad record (unknown kind, missing field, missing or unreadable file) raises `ManifestError` naming
the manifest, the record number, its line and the field; with `skip_bad_records` it is reported and
left out instead.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MetaCanvasInputError

log = logging.getLogger(__name__)


class ManifestError(MetaCanvasInputError):
    """A record that cannot be used; the message names manifest, record number, line and field."""


@dataclass(frozen=True)
class RecordKind:
    name: str
    text: str  # field of the prompt / instruction
    text_required: bool
    target: str  # field of the file to generate
    media: str  # "image" or "video": what the target is
    inputs: tuple[str, ...]  # fields of input files (to the MLLM, and to the backbone if it takes images)
    input_media: str = "image"
    backbone_inputs: bool = True  # the inputs also reach the backbone (recon: the MLLM only, it must describe them)


RECORD_KINDS: dict[str, RecordKind] = {
    k.name: k
    for k in (
        RecordKind("t2i", "prompt", True, "image", "image", ()),
        RecordKind("recon", "prompt", False, "image", "image", ("image",), backbone_inputs=False),
        RecordKind("edit", "instruction", True, "target", "image", ("source",)),
        RecordKind("t2v", "prompt", True, "video", "video", ()),
        RecordKind("i2v", "prompt", True, "video", "video", ("image",)),
        RecordKind("video_edit", "instruction", True, "target", "video", ("source",), "video"),
        RecordKind("ref2v", "prompt", True, "video", "video", ("references",)),
    )
}
# What each backbone trains on. A backbone not listed trains on text-to-image only.
BACKBONE_KINDS: dict[str, tuple[str, ...]] = {
    "sana": ("t2i", "recon"),
    "flux_kontext": ("edit",),  # FLUX-Kontext edits: every sample needs an input image
    "wan": tuple(RECORD_KINDS),
}
RECON_PROMPT = "Reconstruct this image."  # our choice (the paper gives none): a recon record without a prompt


@dataclass(frozen=True)
class Record:
    manifest: str
    number: int  # 1-based record number in the manifest (blank lines are not records)
    line: int
    kind: str
    text: str
    target: Path
    inputs: tuple[Path, ...]
    size: tuple[int, int]  # target (width, height)

    def where(self, field_name: str) -> str:
        return f"{self.manifest}, record {self.number} (line {self.line}), field '{field_name}'"


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _video_size(path: Path) -> tuple[int, int] | None:
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        return _image_size(frames[0]) if frames else None
    return None


def _parse(raw: str, manifest: str, number: int, line: int, root: Path) -> Record:
    def fail(msg: str, field_name: str | None = None) -> ManifestError:
        where = f"{manifest}, record {number} (line {line})" + (f", field '{field_name}'" if field_name else "")
        return ManifestError(f"{where}: {msg}")

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise fail("a record must be a JSON object")
    kind = obj.get("kind")
    if kind not in RECORD_KINDS:
        raise fail(f"unknown kind {kind!r}; one of {', '.join(RECORD_KINDS)}", "kind")
    spec = RECORD_KINDS[kind]
    text = obj.get(spec.text, None if spec.text_required else "")
    if not isinstance(text, str) or (spec.text_required and not text.strip()):
        raise fail(f"a {kind} record needs a non-empty string", spec.text)
    if kind == "recon" and not text:
        text = RECON_PROMPT

    def file_field(name: str, media: str) -> list[Path]:
        value = obj.get(name)
        values = value if name == "references" else [value]
        if name == "references" and (not isinstance(value, list) or not value):
            raise fail("a non-empty list of image files", name)
        out = []
        for v in values:
            if not isinstance(v, str) or not v:
                raise fail("a file path (string) is required", name)
            path = Path(v) if Path(v).is_absolute() else root / v
            if not path.exists():
                raise fail(f"file '{path}' does not exist", name)
            if media == "image":
                try:
                    _image_size(path)
                except (UnidentifiedImageError, OSError) as e:
                    raise fail(f"'{path}' is not a readable image ({e})", name) from None
            out.append(path)
        return out

    target = file_field(spec.target, spec.media)[0]
    inputs = tuple(p for name in spec.inputs for p in file_field(name, spec.input_media))
    if "width" in obj or "height" in obj:
        w, h = obj.get("width"), obj.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise fail("width and height must both be positive integers", "width")
        size = (w, h)
    elif spec.media == "image":
        size = _image_size(target)
    else:
        size = _video_size(target)
        if size is None:
            raise fail("a video record needs 'width' and 'height' (or a folder of frames)", spec.target)
    return Record(manifest, number, line, kind, text, target, inputs, size)


def read_manifest(
    path: str | Path, skip_bad_records: bool = False, kinds: tuple[str, ...] | None = None
) -> list[Record]:
    """Validated records of a JSONL manifest. `kinds`: the kinds the backbone trains on (others are errors)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' does not exist.")
    records, skipped, number = [], 0, 0
    for line_no, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        number += 1
        try:
            record = _parse(raw, str(path), number, line_no, path.parent)
            if kinds is not None and record.kind not in kinds:
                raise ManifestError(
                    f"{path}, record {number} (line {line_no}), field 'kind': this backbone trains on "
                    f"{', '.join(kinds)}, not {record.kind}"
                )
        except ManifestError as e:
            if not skip_bad_records:
                raise ManifestError(f"{e} (set skip_bad_records to leave bad records out)") from None
            log.warning("skipping bad record: %s", e)
            skipped += 1
            continue
        records.append(record)
    if not records:
        raise ManifestError(f"manifest '{path}' has no usable records ({skipped} skipped).")
    if skipped:
        log.warning("%s: %d bad records skipped, %d used", path, skipped, len(records))
    return records


# --- aspect-ratio buckets ------------------------------------------------------------------------
def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the (height, width) bucket whose aspect ratio is closest to `size` = (width, height)."""
    w, h = size
    ratio = math.log(w / h)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i))


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An RGB image resized to cover height × width and centre-cropped: (H, W, 3) float in 0..1."""
    with Image.open(path) as im:
        im = cover_crop(im.convert("RGB"), height, width)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def cover_crop(im: Image.Image, height: int, width: int) -> Image.Image:
    scale = max(height / im.height, width / im.width)
    rw, rh = max(width, round(im.width * scale)), max(height, round(im.height * scale))
    im = im.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return im.crop((left, top, left + width, top + height))


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_frames(path: Path, count: int, height: int, width: int) -> list[Image.Image]:
    """The first `count` frames of a video (a folder of frames, or a file read with imageio), cover-cropped."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)[:count]
        frames = [load_image(p, height, width) for p in files]
        if len(frames) < count:
            raise OSError(f"{len(frames)} frames, the recipe asks for {count}")
        return [Image.fromarray((f.numpy() * 255).round().astype(np.uint8)) for f in frames]
    return [cover_crop(f, height, width) for f in read_video(path, count)]


def read_video(uri: Path | bytes, count: int, extension: str | None = None) -> list[Image.Image]:
    """The first `count` frames of a video file (or its bytes, with `extension` such as ".mp4"), read with imageio's
    PyAV plugin (named, so imageio does not import its other plugins to guess)."""
    try:
        import av  # noqa: F401  (the plugin's library: missing, imageio would fail on the first file instead)
        import imageio.v3 as iio
    except ImportError:
        raise OSError(
            "reading video files needs imageio (pip install imageio[pyav]); or use a folder of frames"
        ) from None
    frames = []
    for frame in iio.imiter(uri, extension=extension, plugin="pyav"):
        frames.append(Image.fromarray(frame).convert("RGB"))
        if len(frames) == count:
            return frames
    raise OSError(f"{len(frames)} frames, the recipe asks for {count}")


def load_input_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# --- a resumable, deterministic order ------------------------------------------------------------
def _seed(*parts: int) -> int:
    s = 0x9E3779B97F4A7C15
    for p in parts:
        s = (s * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return s


@dataclass
class Source:
    """One manifest of the data mix, its records bucketed, and where its order stands."""

    name: str
    records: list[Record]
    weight: float
    buckets: list[tuple[int, int]]
    batch_size: int
    seed: int
    epoch: int = 0
    cursor: int = 0  # batches of this epoch already taken (by all processes together)
    bucket_of: list[int] = field(default_factory=list)
    _epoch_cache: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.bucket_of = [nearest_bucket(r.size, self.buckets) for r in self.records]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: records shuffled, grouped by bucket, cut into batches, batches shuffled."""
        g = torch.Generator().manual_seed(_seed(self.seed, epoch))
        perm = torch.randperm(len(self.records), generator=g).tolist()
        batches = []
        media = [RECORD_KINDS[r.kind].media for r in self.records]
        for b in range(len(self.buckets)):
            for m in ("image", "video"):  # image and video targets never share a batch
                members = [i for i in perm if self.bucket_of[i] == b and media[i] == m]
                batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def take(self, n: int) -> list[list[int]]:
        """The next `n` batches (one per process), crossing into the next epoch when one ends."""
        out = []
        for _ in range(n):
            if self._epoch_cache is None or self._epoch_cache[0] != self.epoch:
                self._epoch_cache = (self.epoch, self.epoch_batches(self.epoch))
            batches = self._epoch_cache[1]
            if self.cursor >= len(batches):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue_epoch = self.epoch_batches(self.epoch)
                self._epoch_cache = (self.epoch, continue_epoch)
                batches = continue_epoch
            out.append(batches[self.cursor])
            self.cursor += 1
        return out

    def draw(self, world: int, rank: int, accum: int) -> list[tuple[int, list[int]]]:
        """This process's micro-batches of the step, each with its place in the step's global batch."""
        batches = self.take(world * accum)
        return [(d, batches[d]) for d in range(rank * accum, (rank + 1) * accum)]

    def fixed(self, n: int) -> list[list[int]]:
        """The first `n` records, grouped by bucket and cut into batches (the evaluation set)."""
        groups: dict[int, list[int]] = {}
        for i in range(min(n, len(self.records))):
            groups.setdefault(self.bucket_of[i], []).append(i)
        return [g[i : i + self.batch_size] for g in groups.values() for i in range(0, len(g), self.batch_size)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def resume(self, states: list[dict], rank: int) -> None:
        """Continue from the states saved by every process (one shared order: any process's, whatever the count)."""
        self.load_state(states[0])


class DataMix:
    """Sources drawn by weight, one source per step (the same on every process), seeded by the step.

    A source is a manifest's `Source` or a `ShardSource` (WebDataset shards, `shards.py`).
    """

    def __init__(self, sources: list, seed: int) -> None:
        self.sources = sources
        self.seed = seed
        weights = torch.tensor([s.weight for s in sources], dtype=torch.float64)
        self.weights = weights / weights.sum()

    def pick(self, step: int) -> int:
        """The index of the step's source (`Source.draw` then gives each process its micro-batches of it)."""
        g = torch.Generator().manual_seed(_seed(self.seed, 7, step))
        return int(torch.multinomial(self.weights, 1, generator=g))

    def state(self) -> dict:
        """This process's position in every source."""
        return {s.name: s.state() for s in self.sources}

    def resume(self, states: list[dict], rank: int) -> None:
        """Continue from the positions saved by every process of a run (`states[r]` = `state()` of rank r)."""
        for s in self.sources:
            s.resume([state[s.name] for state in states], rank)
