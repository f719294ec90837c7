"""requirements.txt (what ComfyUI-Manager installs) never brings torch: resolved by pip from the package index, its
whole dependency closure holds no torch, and installing it where torch is installed changes no installed
distribution. Needs the package index; skipped when pip cannot reach it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve(tmp_path: Path, *args: str) -> dict[str, str]:
    """What `pip install -r requirements.txt` would install here ({name: version}), from pip's --dry-run report."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *args]
    try:
        res = subprocess.run([*cmd, "-r", str(ROOT / "requirements.txt")], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not resolve requirements.txt within 15 minutes: is the package index reachable?")
    output = res.stdout + res.stderr
    if res.returncode != 0 and any(marker in output for marker in OFFLINE):
        pytest.skip(f"pip cannot reach the package index:\n{output[-1500:]}")
    assert res.returncode == 0, output[-3000:]
    return {
        canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }


def test_the_dependency_closure_holds_no_torch(tmp_path):
    """From nothing installed (--ignore-installed): every package the requirements pull in, transitively."""
    closure = resolve(tmp_path, "--ignore-installed")
    assert {"transformers", "diffusers"} <= closure.keys(), closure  # the report does list the closure
    pulled = sorted(n for n in closure if n in ("torch", "accelerate", "peft") or n.startswith("nvidia-"))
    assert not pulled, f"requirements.txt pulls {pulled} (torch is ComfyUI's: Manager would replace its CUDA build)"


def test_installing_beside_torch_changes_no_installed_package(tmp_path):
    """In this environment (torch installed, as in ComfyUI's): nothing installed is replaced or moved."""
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert "torch" in installed
    changed = {n: (installed[n], v) for n, v in resolve(tmp_path).items() if n in installed}
    assert not changed, f"installing requirements.txt would change {changed} (installed, wanted)"
