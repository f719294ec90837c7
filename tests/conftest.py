"""Shared fixtures: tiny models written once per session in ComfyUI's models layout, and the pack
imported the way ComfyUI imports a custom-node folder."""

from __future__ import annotations

import os

# Before any Hugging Face import: never touch the network, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, torch.get_num_threads()))
if str(ROOT) not in sys.path:  # the research scripts in experiments/ (outside the installed package)
    sys.path.append(str(ROOT))


@pytest.fixture(scope="session")
def _tiny_models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    from metacanvas_core.tiny import write_all

    root = tmp_path_factory.mktemp("models")
    return root, write_all(root)


@pytest.fixture(scope="session")
def models_dir(_tiny_models) -> Path:
    """ComfyUI-style models folder with every tiny model (python -m metacanvas_core.tiny)."""
    return _tiny_models[0]


@pytest.fixture(scope="session")
def tiny(_tiny_models) -> dict[str, Path]:
    """Paths of the tiny models by name: mllm, sana, sana_metacanvas, flux_kontext, wan, ..."""
    return _tiny_models[1]


@pytest.fixture(scope="session")
def planner(tiny):
    from metacanvas_core.planner import Planner

    return Planner.from_folder(tiny["mllm"])


@pytest.fixture(scope="session")
def sana(tiny):
    from metacanvas_core.backbones import load_backbone

    return load_backbone(tiny["sana"])


@pytest.fixture(scope="session")
def pack(models_dir, monkeypatch_session):
    """The pack as ComfyUI loads it: a package made from the folder's __init__.py."""
    monkeypatch_session.setenv("METACANVAS_MODELS", str(models_dir))
    name = "metacanvas_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
