"""The training CLI: memory plans of the real recipes, input errors as one line with exit status 2, and the
UniWorld-V1 connector as the context connector's starting weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.train import main
from metacanvas_core.training.init import init_modules

RECIPES = Path(__file__).resolve().parents[1] / "metacanvas_core" / "recipes"
REAL = sorted(p.stem for p in RECIPES.glob("*.json") if not p.stem.startswith("tiny_"))


@pytest.mark.parametrize("recipe", REAL)
def test_memory_plan_prints_for_every_real_recipe(recipe, capsys):
    assert main([recipe, "--plan", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    ddp = next(line for line in out.splitlines() if line.strip().startswith("DDP"))
    fsdp = next(line for line in out.splitlines() if "FSDP over 8" in line)
    total = lambda line: float(line.split()[-1])  # noqa: E731
    assert 0 < total(fsdp) <= total(ddp)  # sharding never adds to what a GPU holds
    assert "MLLM Qwen2.5-VL-" in out and "MetaCanvas modules" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "batch_size=abc"], "error: recipe 'tiny-sana-t2i': batch_size must be int, not 'abc'"),
        (["--set", "lr=-1"], "error: recipe 'tiny-sana-t2i': lr must be positive"),
        (["--set", "buckets=[[64]]"], "error: recipe 'tiny-sana-t2i': buckets must be a list of [height, width] pairs"),
        (
            ["--set", "colour=red"],
            "tiny_sana_t2i.json': unknown keys ['colour']",
        ),
    ],
)
def test_input_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["tiny_sana_t2i", "--output-dir", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.strip().endswith(message.removeprefix("error: "))
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and not any(tmp_path.iterdir())  # refused before anything is written


def test_missing_recipe_or_output_dir_and_debug(tmp_path, capsys):
    assert main(["no_such_recipe", "--output-dir", str(tmp_path)]) == 2
    assert "recipe 'no_such_recipe' does not exist" in capsys.readouterr().err
    assert main(["tiny_sana_t2i"]) == 2
    assert "--output-dir is required" in capsys.readouterr().err
    with pytest.raises(MetaCanvasInputError):  # --debug: the traceback
        main(["tiny_sana_t2i", "--output-dir", str(tmp_path), "--set", "batch_size=abc", "--debug"])
    for option in ("--max-steps", "--gpus"):  # refused by the option parser: one line, the same status
        with pytest.raises(SystemExit) as refused:
            main(["tiny_sana_t2i", "--output-dir", str(tmp_path), option, "0"])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.count("\n") == 1 and f"{option}: 0 is not a positive integer" in err
    assert not any(tmp_path.iterdir())


def test_training_is_quiet_by_default(tiny, tmp_path):
    """As a user runs it (without the test session's quieting): the results on stdout and nothing on stderr, with
    the canvas LoRA of the editing recipe (peft once brought a library deprecation notice)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    cmd = [sys.executable, "-m", "metacanvas_core.train", "tiny_flux_kontext_edit", "--output-dir", str(tmp_path)]
    cmd += ["--max-steps", "1", "--set", f"mllm={tiny['mllm']}", "--set", f"backbone={tiny['flux_kontext']}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.startswith("trained 1 steps") and "MetaCanvas checkpoint" in done.stdout


def uniworld_file(path: Path, mllm: int, hidden: int, text: int, prefix: str = "denoise_tower.") -> Path:
    """A file in UniWorld-V1's layout: denoise_projector = Sequential(Linear, SiLU, Linear)."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{prefix}denoise_projector.0.weight": torch.randn(hidden, mllm, generator=g),
        f"{prefix}denoise_projector.0.bias": torch.randn(hidden, generator=g),
        f"{prefix}denoise_projector.2.weight": torch.randn(text, hidden, generator=g),
        f"{prefix}denoise_projector.2.bias": torch.randn(text, generator=g),
        f"{prefix}vae_projector.0.weight": torch.randn(4, 4, generator=g),  # other UniWorld modules are left alone
    }
    save_file(tensors, str(path))
    return path


def test_context_connector_starts_from_uniworld_denoise_projector(tiny, tmp_path):
    from metacanvas_core.backbones import load_backbone
    from metacanvas_core.metacanvas import new_metacanvas

    spec = load_backbone(tiny["flux_kontext"]).spec
    mc = new_metacanvas(64, spec, "mllm")
    hidden, text = mc.context_connector.net[0].out_features, mc.context_connector.net[3].out_features
    path = uniworld_file(tmp_path / "uniworld.safetensors", 64, hidden, text)
    init_modules(mc, {"context_connector": path})
    theirs = load_file(str(path))
    assert torch.equal(mc.context_connector.net[0].weight, theirs["denoise_tower.denoise_projector.0.weight"])
    assert torch.equal(mc.context_connector.net[3].bias, theirs["denoise_tower.denoise_projector.2.bias"])

    wrong = uniworld_file(tmp_path / "wrong.safetensors", 3584, hidden, text, prefix="")
    with pytest.raises(MetaCanvasInputError, match=r"wrong.safetensors': net.0.weight has shape \(.*, 3584\)"):
        init_modules(mc, {"context_connector": wrong})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MetaCanvasInputError, match="other.safetensors' has no denoise_projector"):
        init_modules(mc, {"context_connector": tmp_path / "other.safetensors"})
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(MetaCanvasInputError, match="junk.safetensors' is not a safetensors file"):
        init_modules(mc, {"context_connector": tmp_path / "junk.safetensors"})


def test_editing_recipe_takes_the_uniworld_file(tiny, tmp_path):
    from metacanvas_core.training.config import load_config
    from metacanvas_core.training.trainer import Trainer

    overrides = [f"mllm={tiny['mllm']}", f"backbone={tiny['flux_kontext']}", "eval_samples=0"]
    config = load_config(RECIPES / "tiny_flux_kontext_edit.json", overrides)
    probe = Trainer(config, tmp_path / "probe", max_steps=1, progress=False).mc.context_connector
    path = uniworld_file(tmp_path / "u.safetensors", 64, probe.net[0].out_features, probe.net[3].out_features)
    init = f'init_from={{"context_connector": "{path}"}}'
    config = load_config(RECIPES / "tiny_flux_kontext_edit.json", [*overrides, init])
    trainer = Trainer(config, tmp_path / "run", max_steps=1, progress=False)
    theirs = load_file(str(path))["denoise_tower.denoise_projector.0.bias"]
    assert torch.equal(trainer.mc.context_connector.net[0].bias, theirs)
