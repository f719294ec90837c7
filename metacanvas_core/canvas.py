"""Canvas tokens: the learnable grid the MLLM writes its plan into, and its geometry.

A canvas is a (K, Hc, Wc) grid: K = 1 for images, K sparse keyframes for video. How its grid follows the output
size is a checkpoint's canvas rule (`CANVAS_RULES`). Its learnable embeddings are stored at the grid they were trained
at and resized (like ViT position embeddings) when a plan asks for another grid, so one checkpoint serves every size
and aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MetaCanvasInputError


@dataclass(frozen=True)
class CanvasGrid:
    """Canvas shape in tokens: keyframes × rows × columns."""

    frames: int
    height: int
    width: int

    @property
    def numel(self) -> int:
        return self.frames * self.height * self.width

    def as_thw(self) -> list[int]:
        return [self.frames, self.height, self.width]


FACTOR_RULE = "factor"
FIXED_RULE = "fixed"
CANVAS_RULES = (FACTOR_RULE, FIXED_RULE)
"""How a checkpoint's canvas grid follows the output size (`MetaCanvasConfig.canvas_rule`).

"factor": the DiT token grid divided by an integer factor, keeping the aspect ratio (`canvas_grid_for`). The paper
says the 2D grid "adapts to the image resolution" and gives the grids at the sizes it trained (SANA 16×16 at 512²,
Wan2.2 3 × 11×20 at 704×1280); the integer factor is this project's decision, so that each canvas cell covers whole
DiT tokens. SANA (factor 1) and Wan2.2 (factor 2) use it, as did FLUX-Kontext checkpoints written before issue 25.
"fixed": the stored grid at every size, interpolated to the token grid like any canvas. FLUX-Kontext since issue 25:
the paper states 32×32 = 1024 canvas tokens for editing, not a grid that grows with the resolution; at Kontext's own
resolutions (about 1024², 64×64 tokens) the factor rule would give a 4096-token canvas no 512²-trained checkpoint
ever saw.
"""


def canvas_grid_for(token_grid: tuple[int, int, int], factor: int, keyframes: int = 1) -> CanvasGrid:
    """Canvas grid for a DiT token grid (T, H, W) under the factor rule: the spatial grid divided by `factor`."""
    _, h, w = token_grid
    if h % factor or w % factor:
        raise MetaCanvasInputError(
            f"The canvas grid must divide the DiT token grid: {h}×{w} tokens is not divisible by the "
            f"checkpoint's canvas factor {factor}. Choose a width/height that gives a token grid divisible "
            f"by {factor} (a multiple of {factor} × the backbone's pixel stride)."
        )
    return CanvasGrid(keyframes, h // factor, w // factor)


class CanvasEmbedding(nn.Module):
    """Learnable canvas tokens plus the start marker that opens the canvas in the MLLM sequence.

    The start marker is the invocation token of the canvas LoRA: everything from it on is canvas.
    """

    def __init__(self, hidden_size: int, grid: CanvasGrid) -> None:
        super().__init__()
        self.grid = grid
        self.tokens = nn.Parameter(torch.randn(grid.frames, grid.height, grid.width, hidden_size) * 0.02)
        self.start = nn.Parameter(torch.randn(hidden_size) * 0.02)

    def forward(self, grid: CanvasGrid) -> torch.Tensor:
        """The MLLM input rows: start marker, then the canvas at `grid` frame-major: (1 + K·H·W, D)."""
        tokens = self.tokens
        if grid != self.grid:
            x = tokens.permute(3, 0, 1, 2)[None]  # (1, D, K, H, W)
            x = F.interpolate(x.float(), size=grid.as_thw(), mode="trilinear", align_corners=False)
            tokens = x[0].permute(1, 2, 3, 0).to(self.tokens.dtype)
        return torch.cat([self.start[None], tokens.reshape(grid.numel, -1)])


CANVAS_POSITIONS = "qwen2.5-vl"
"""The mRoPE position scheme of the planner's sequence, recorded in every checkpoint (`MetaCanvasConfig`).

This project's decision: the paper says only that the canvas tokens take Qwen2.5-VL's multimodal RoPE (Fig. 1), not
which temporal ids the keyframes of a video canvas get. The rule chosen is Qwen2.5-VL's as Qwen's own code computes it
under transformers 4.x (`get_rope_index`, Qwen's qwen-vl-finetune `get_rope_index_25`): text counts on from the last
position + 1; a visual grid (t, h, w) typed as an image starts at s = last + 1 with temporal id s for every token
(images get `second_per_grid_t = 0`), height id s + row, width id s + column; text after it continues at the grid's
largest id + 1. The canvas is typed as an image, so a K-keyframe canvas has one temporal id for all its keyframes (they
differ by their learned embeddings and their order under causal attention): ours, not the paper's statement. Why this
rule: the paper builds on BLIP3o, which runs Qwen2.5-VL under transformers 4.x, so this is what its released code would
have trained with. transformers 5.x changed it for multi-frame image grids (5.3 scaled image temporal ids by
`tokens_per_second`, huggingface/transformers#45325; later releases give keyframe k the id s + k), so the pack computes
the positions itself instead of asking the installed release. For a one-frame grid every release agrees, so only video
canvases (K > 1) depend on the rule.
"""


def visual_positions(start: int, frames: int, height: int, width: int) -> torch.Tensor:
    """(3, frames·height·width) mRoPE ids of a visual grid starting at `start` (CANVAS_POSITIONS), frame-major."""
    _, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros_like(h).flatten(), h.flatten(), w.flatten()]) + start


def sequence_positions(visual: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """(3, L) mRoPE ids of one sequence (CANVAS_POSITIONS): `visual` (L,) marks visual tokens (1) among text (0);
    `grids` are the (t, h, w) token grids of its visual runs in order (after the vision merge)."""
    runs = torch.unique_consecutive(visual, return_counts=True)
    parts, position, grid = [], 0, iter(grids)
    for kind, length in zip(*runs, strict=True):
        if kind:
            t, h, w = next(grid)
            if t * h * w != int(length):
                raise ValueError(f"a visual run of {int(length)} tokens does not fit its grid {(t, h, w)}")
            block = visual_positions(position, t, h, w)
        else:
            block = torch.arange(int(length)).expand(3, -1) + position
        parts.append(block)
        position = int(block.max()) + 1
    return torch.cat(parts, dim=1)


def canvas_rope_positions(prev_max: torch.Tensor | int, grid: CanvasGrid) -> torch.Tensor:
    """mRoPE (t, h, w) ids of a start marker followed by the canvas, after a prompt ending at `prev_max`.

    The marker is text at s = prev_max + 1; the canvas is a visual grid (K, Hc, Wc) at s + 1. Returns (3, 1 + K·H·W).
    """
    s = int(prev_max) + 1
    return torch.cat([torch.full((3, 1), s), visual_positions(s + 1, *grid.as_thw())], dim=1)


def interpolate_canvas(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resize per-position canvas outputs (B, K, Hc, Wc, D) to the token grid (B, T, H, W, D).

    Bilinear for single-frame canvases, trilinear across keyframes (the paper's linear interpolation
    of the sparse 3D canvas to every latent frame), `align_corners=False`. Same size is returned as is.
    """
    b, k, hc, wc, d = x.shape
    t, h, w = size
    if (k, hc, wc) == (t, h, w):
        return x
    dtype = x.dtype
    if k == 1 and t == 1:
        y = F.interpolate(x[:, 0].permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear", align_corners=False)
        return y.permute(0, 2, 3, 1)[:, None].to(dtype)
    y = F.interpolate(x.permute(0, 4, 1, 2, 3).float(), size=size, mode="trilinear", align_corners=False)
    return y.permute(0, 2, 3, 4, 1).to(dtype)
