"""Calling nodes as ComfyUI calls them, in this process: one node, or a whole API-format prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def run(node_cls, **kwargs):
    """One node's FUNCTION with these inputs: its output tuple."""
    return getattr(node_cls(), node_cls.FUNCTION)(**kwargs)


def load_image(path: Path) -> torch.Tensor:
    """A PNG as core LoadImage makes it: (1, H, W, 3) float32 = uint8 / 255."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None]


def as_saved(frames) -> np.ndarray:
    """(N, H, W, 3) float images -> the uint8 arrays ComfyUI's SaveImage writes (nodes.py, SaveImage.save_images)."""
    return np.stack([np.clip(255.0 * i.cpu().numpy(), 0, 255).astype(np.uint8) for i in frames])


def run_in_process(pack, api: dict, input_dir: Path, done: dict | None = None) -> dict:
    """The API prompt's nodes called directly in this process, as ComfyUI calls them: the pack's node functions;
    core LoadImage done as ComfyUI does it; output nodes skipped.
    Returns {node id: outputs} (pass `done` to reuse what earlier calls computed)."""
    done = {} if done is None else done
    classes = pack.NODE_CLASS_MAPPINGS

    def value(v):
        return outputs(v[0])[v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v

    def outputs(nid: str):
        if nid not in done:
            kind, raw = api[nid]["class_type"], api[nid]["inputs"]
            kw = {k: value(v) for k, v in raw.items() if k != "upload"}
            if kind == "LoadImage":
                done[nid] = (load_image(input_dir / kw["image"]),)
            else:
                done[nid] = run(classes[kind], **kw)
        return done[nid]

    for nid, node in api.items():
        if node["class_type"] not in ("SaveImage", "SaveVideo", "PreviewImage"):
            outputs(nid)
    return done
