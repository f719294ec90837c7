"""The plan made visible, as the paper's Fig. 5 shows it: the aligned canvas features (what the canvas connector adds
to the DiT, before the fuse block) reduced by PCA to three components, shown as RGB: one image per keyframe at the
output size, optionally blended over a generated image. Tokens the plan treats alike get alike colours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A component whose singular value is below this fraction of the first one carries rounding noise, not the plan:
# it is shown flat (0.5) instead of stretched to 0..1.
NOISE_FLOOR = 1e-6


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """(N, D) features -> (N, 3) in 0..1: the first three principal components, each scaled to 0..1 over the N rows.

    Deterministic: an exact SVD of the centred features (float64, CPU), each component's sign fixed so that its
    largest-magnitude loading is positive. Components that do not exist or carry no variance (an untrained
    checkpoint's canvas is all zeros) are 0.5: grey.
    """
    x = features.detach().to("cpu", torch.float64)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = min(3, vh.shape[0])
    components = vh[:keep]
    peak = components.abs().argmax(1)
    components = components * torch.where(components[torch.arange(keep), peak] < 0, -1.0, 1.0)[:, None]
    projected = x @ components.T
    lo, hi = projected.amin(0), projected.amax(0)
    live = s[:keep] > NOISE_FLOOR * s[0] if s.numel() and s[0] > 0 else torch.zeros(keep, dtype=torch.bool)
    rgb = torch.full((x.shape[0], 3), 0.5, dtype=torch.float64)
    rgb[:, :keep] = torch.where(live, (projected - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny), 0.5)
    return rgb.float()


def keyframe_images(images: torch.Tensor, keyframes: int) -> torch.Tensor:
    """The images (B, H, W, C) that stand for each of `keyframes` keyframes: all B frames of a video are spread over
    the keyframes as the canvas spreads its keyframes over the video (centres, `align_corners=False`); one image
    stands for all."""
    b = images.shape[0]
    index = [min(b - 1, max(0, round((k + 0.5) * b / keyframes - 0.5))) for k in range(keyframes)]
    return images[index]


def plan_preview(
    aligned: torch.Tensor, size: tuple[int, int], image: torch.Tensor | None = None, blend: float = 0.5
) -> torch.Tensor:
    """The aligned canvas (1, K, Hc, Wc, D) as K RGB images (K, height, width, 3) in 0..1, each canvas token a block
    of pixels (nearest). `image` (B, H, W, C) in 0..1, e.g. the generated image or video frames: shown under the plan,
    resized to the output size; `blend` is how much of the plan shows over it (1: the plan only, 0: the image only).
    """
    _, k, hc, wc, d = aligned.shape
    rgb = pca_rgb(aligned.reshape(-1, d)).reshape(k, hc, wc, 3).permute(0, 3, 1, 2)
    out = F.interpolate(rgb, size=size, mode="nearest")
    if image is not None:
        under = keyframe_images(image[..., :3].float().cpu(), k).permute(0, 3, 1, 2)
        if tuple(under.shape[-2:]) != tuple(size):
            under = F.interpolate(under, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        out = blend * out + (1 - blend) * under
    return out.permute(0, 2, 3, 1).contiguous()
