"""Batch assembly: records of a data source -> target latents, prompts and what each sample shows.

Targets are encoded by the backbone's VAE (images) or video VAE (clips), or read from a latent cache
built once at the start (manifest sources); an experiment may give its own image encoder. Samples of
WebDataset shards (`shards.py`) arrive decoded and cropped to their bucket. Inputs (source images,
first frames, references, a source clip) become a `VisualInputs` per sample: the MLLM reads them,
and the backbone takes them too when the record kind says so (`RecordKind.backbone_inputs`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..backbones import Backbone
from ..errors import MetaCanvasInputError
from ..inputs import NO_INPUTS, ImageRole, VisualInputs
from .data import RECORD_KINDS, DataMix, ManifestError, Record, Source, load_frames, load_image, load_input_image
from .shards import ShardSample, ShardSource

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # images (B, H, W, 3) in 0..1 -> latents (B, C, h, w)


@dataclass
class Batch:
    """One step's samples: target latents of one bucket, prompts, and what each sample shows."""

    source: str
    records: list[Record | ShardSample]
    latents: torch.Tensor  # (B, C, h, w), or (B, C, F, h, w) on video backbones; float32
    texts: list[str]
    inputs: list[VisualInputs]  # per sample: what the MLLM reads besides the prompt
    to_backbone: list[bool]  # per sample: whether the backbone takes its inputs too
    height: int
    width: int


class BatchMaker:
    """Makes batches for one backbone; `encode` replaces the backbone's image VAE (e.g. an exact pixel codec)."""

    def __init__(
        self,
        backbone: Backbone,
        frames: int,
        cache: Path | None = None,
        encode: ImageEncoder | None = None,
    ) -> None:
        self.backbone = backbone
        self.frames = frames
        self.cache = cache
        self.encode_images = encode or backbone.encode

    # --- targets ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, records: list[Record], height: int, width: int) -> torch.Tensor:
        """Target latents: (B, C, h, w) for image backbones, (B, C, F, h, w) for video ones (an image: F = 1)."""
        pixels = []
        for r in records:
            field_name = RECORD_KINDS[r.kind].target
            try:
                if RECORD_KINDS[r.kind].media == "video":
                    if not self.backbone.is_video:
                        raise ManifestError(f"{r.where('kind')}: {r.kind} records need a video backbone")
                    pixels.append(load_frames(r.target, self.frames, height, width))
                else:
                    pixels.append(load_image(r.target, height, width))
            except OSError as e:
                raise ManifestError(f"{r.where(field_name)}: cannot read '{r.target}' ({e})") from None
        return self.encode_pixels(pixels, height, width)

    def encode_pixels(self, pixels: list, height: int, width: int) -> torch.Tensor:
        """Latents of images (H, W, 3) in 0..1, or of clips (lists of frames) on video backbones."""
        if not self.backbone.is_video:
            return self.encode_images(torch.stack(pixels)).float()
        out = []
        for p in pixels:
            frames = p if isinstance(p, list) else [Image.fromarray((p.numpy() * 255).round().astype("uint8"))]
            out.append(self.backbone.encode_video(frames, height, width).float())
        return torch.cat(out)

    def _cache_path(self, source: Source, index: int, height: int, width: int) -> Path:
        return self.cache / re.sub(r"\W", "_", source.name) / f"{index:08d}_{height}x{width}.safetensors"

    def build_cache(self, mix: DataMix) -> None:
        """Encode every record's target at its bucket size once (call on the main process only)."""
        vae = self.backbone.vae
        fingerprint = {"backbone": self.backbone.kind, "vae": vae.config.get("_class_name", "")}
        fingerprint["vae_config"] = json.dumps(dict(vae.config), sort_keys=True, default=str)
        meta = self.cache / "cache.json"
        self.cache.mkdir(parents=True, exist_ok=True)
        if meta.is_file() and json.loads(meta.read_text()) != fingerprint:
            raise MetaCanvasInputError(f"latent cache '{self.cache}' was made with another VAE: use a new folder.")
        meta.write_text(json.dumps(fingerprint))
        for source in mix.sources:
            if isinstance(source, ShardSource):  # streamed: encoded as they come
                continue
            for index, (record, b) in enumerate(zip(source.records, source.bucket_of, strict=True)):
                h, w = source.buckets[b]
                path = self._cache_path(source, index, h, w)
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_file({"latent": self.encode([record], h, w)[0].cpu().contiguous()}, str(path))

    # --- batches ----------------------------------------------------------------------------
    def make(self, source: Source | ShardSource, draw: list) -> Batch:
        """The batch of a source's draw: record indices of a manifest, or decoded shard samples."""
        if isinstance(source, ShardSource):
            return self.from_samples(source, draw)
        indices = draw
        records = [source.records[i] for i in indices]
        h, w = source.buckets[source.bucket_of[indices[0]]]
        if self.cache is not None:
            latents = torch.stack([load_file(str(self._cache_path(source, i, h, w)))["latent"] for i in indices])
        else:
            latents = self.encode(records, h, w)
        inputs = [self.visual_inputs(r, h, w) for r in records]
        to_backbone = [RECORD_KINDS[r.kind].backbone_inputs and bool(i) for r, i in zip(records, inputs, strict=True)]
        return Batch(source.name, records, latents.float(), [r.text for r in records], inputs, to_backbone, h, w)

    def from_samples(self, source: ShardSource, samples: list[ShardSample]) -> Batch:
        h, w = source.buckets[samples[0].bucket]
        video = RECORD_KINDS[samples[0].kind].media == "video"
        if video and not self.backbone.is_video:
            raise ManifestError(f"{samples[0].where('kind')}: {samples[0].kind} samples need a video backbone")
        pixels = [_frames(s.target) if video else s.target.float() / 255 for s in samples]
        latents = self.encode_pixels(pixels, h, w)
        inputs = [self.sample_inputs(s) for s in samples]
        to_backbone = [RECORD_KINDS[s.kind].backbone_inputs and bool(i) for s, i in zip(samples, inputs, strict=True)]
        return Batch(source.name, samples, latents, [s.text for s in samples], inputs, to_backbone, h, w)

    def sample_inputs(self, s: ShardSample) -> VisualInputs:
        """A shard sample's inputs as a request carries them (as `visual_inputs` does for a record)."""
        kind = RECORD_KINDS[s.kind]
        if not s.inputs:
            return NO_INPUTS
        if kind.input_media == "video":
            return VisualInputs(video=_frames(s.inputs[0]))
        if s.kind == "edit" and self.backbone.is_video:
            return VisualInputs(video=[_image(s.inputs[0])])
        role = ImageRole.FIRST_FRAME if s.kind == "i2v" else ImageRole.REFERENCES
        return VisualInputs(images=[_image(x) for x in s.inputs], role=role)

    def visual_inputs(self, r: Record, height: int, width: int) -> VisualInputs:
        """A record's inputs as a request carries them: images (and their role) or a source video."""
        kind = RECORD_KINDS[r.kind]
        try:
            if kind.input_media == "video":  # video_edit: the source clip, as long as the target
                return VisualInputs(video=load_frames(r.inputs[0], self.frames, height, width))
            if r.kind == "edit" and self.backbone.is_video:  # an image edit on a video backbone: a one-frame video
                return VisualInputs(video=[load_input_image(r.inputs[0])])
            role = ImageRole.FIRST_FRAME if r.kind == "i2v" else ImageRole.REFERENCES
            return VisualInputs(images=[load_input_image(p) for p in r.inputs], role=role)
        except OSError as e:
            raise ManifestError(f"{r.where(kind.inputs[0])}: cannot read its input ({e})") from None


def _image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.numpy())


def _frames(clip: torch.Tensor) -> list[Image.Image]:
    return [_image(f) for f in clip]
