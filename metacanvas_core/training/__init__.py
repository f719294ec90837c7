"""Training MetaCanvas weights: manifests and buckets (data), recipes (config), the trainer.

    python -m metacanvas_core.train metacanvas_core/recipes/tiny_sana_t2i.json --output-dir runs/tiny

See docs/TRAINING.md.
"""

from .config import TrainConfig, load_config
from .data import RECORD_KINDS, ManifestError, read_manifest

__all__ = ["RECORD_KINDS", "ManifestError", "TrainConfig", "load_config", "read_manifest"]
