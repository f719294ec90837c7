"""CI installs and tests exactly as the README tells a developer to, so the two cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    (develop,) = [block for block in bash_blocks(section("Install")) if block[0].startswith("git clone")]
    assert any(line.startswith("pip install -e") and "torch==" in line for line in develop)
    clone, *install = develop  # CI runs inside its clone
    assert clone.startswith("git clone https://github.com/")
    (test,) = [line for block in bash_blocks(section("Two commands")) for line in block if "pytest" in line]
    for line in [*install, test]:
        assert line in ci, f"README line missing from .ci/run: {line}"
    # .ci/run installs nothing the README does not say.
    assert [line for line in ci if "pip install" in line] == [line for line in install if "pip install" in line]
