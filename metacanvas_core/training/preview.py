"""What a short run leaves for a person to judge: sample images from the trained weights, beside the targets.

The tiny models' VAE is random, so images through it are noise whatever the DiT learned. A recipe with
`codec: "pixels"` trains on an exact pixel codec instead (the mean colour of each VAE-stride square, in the
first three latent channels), so its samples show what the DiT and canvas learned; the T2I quick start uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import Source, load_image


class PixelCodec:
    """Images (B, H, W, 3) in 0..1 <-> latents (B, C, H/s, W/s): s×s means in -1..1, the other channels zero."""

    def __init__(self, stride: int, channels: int) -> None:
        self.stride, self.channels = stride, channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(images.permute(0, 3, 1, 2).float() * 2 - 1, self.stride)
        return torch.cat([x, x.new_zeros(x.shape[0], self.channels - 3, *x.shape[2:])], 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(latents[:, :3].float(), scale_factor=self.stride, mode="nearest")
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def write_samples(trainer, path: Path, count: int, steps: int = 20, cfg: float = 3.0) -> Path:
    """A grid: the first `count` targets of the first source (top row) and samples for their prompts (bottom row),
    drawn through the pack's Plan -> Project -> sampler path with the trained weights."""
    from ..conditioning import project
    from ..sampling import sample

    source: Source = trainer.mix.sources[0]
    mc, planner, backbone = trainer.mc, trainer.planner, trainer.backbone
    decode = trainer.codec.decode if trainer.codec is not None else backbone.decode
    rows: list[list[np.ndarray]] = [[], []]
    for i, record in enumerate(source.records[:count]):
        h, w = source.buckets[source.bucket_of[i]]
        cond = project(mc.plan(planner, record.text, h, w), mc, backbone)
        latents = sample(backbone, cond, seed=i, steps=steps, cfg=cfg, height=h, width=w, scheduler="flow_euler")
        rows[0].append(load_image(record.target, h, w).numpy())
        rows[1].append(decode(latents)[0].cpu().numpy())
    height = max(im.shape[0] for im in rows[0])
    grid = np.concatenate(
        [
            np.concatenate(
                [np.pad(im, ((0, height - im.shape[0]), (0, 2), (0, 0)), constant_values=1) for im in row], 1
            )
            for row in rows
        ]  # fmt: skip
    )
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    return path
