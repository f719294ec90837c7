"""The command lines as an artist meets them: the README's generation runs on tiny models, quietly, leaving no
temporary folder; partial or missing inputs are refused in one `error:` line before any model loads."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from metacanvas_core.files import SafetensorsFile
from metacanvas_core.generate import main
from metacanvas_core.schedulers import SCHEDULERS


def run(*args: str, module: str = "metacanvas_core.generate", **env: str):
    """The command as an artist runs it: without the test session's own quieting of the libraries."""
    clean = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**clean, **env})


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in result.stderr


def test_cli_generates_an_image_with_tiny_models_quietly_and_cleans_up(tmp_path):
    out, temp = tmp_path / "image.png", tmp_path / "tmp"
    temp.mkdir()
    result = run("--steps", "2", "--out", str(out), TMPDIR=str(temp))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # no loading bars, no torchvision notice
    lines = result.stdout.splitlines()  # blank lines count too (a tokenizer trainer's progress once printed 15)
    assert len(lines) == 2 and "TINY RANDOM models" in lines[0] and lines[1].startswith(f"{out}: 64×64")
    assert Image.open(out).size == (64, 64)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert not [p.name for p in temp.iterdir() if p.name.startswith("metacanvas")]


def test_cli_edits_an_image_with_tiny_flux_kontext_verbosely(tmp_path):
    photo, out = tmp_path / "photo.png", tmp_path / "edited.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(photo)
    result = run(
        *("--image", str(photo), "--prompt", "make it blue", "--steps", "2", "--width", "64", "--height", "64"),
        *("--scheduler", "flow_euler", "--image-cfg", "1.5", "--verbose", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TINY RANDOM models" in result.stdout
    assert "Loading weights" in result.stderr  # --verbose keeps the libraries' bars
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--mllm", "models/LLM/Qwen2.5-VL-7B-Instruct"], ["--mllm given without --backbone"]),
        (["--backbone", "models/diffusers/sana"], ["--backbone given without --mllm"]),
        (["--checkpoint", "mine.safetensors"], ["--checkpoint needs the --mllm and --backbone"]),
        (["--image", "no-such-photo.png"], ["--image 'no-such-photo.png'", "No such file"]),
        (["--steps", "0"], ["--steps", "not a positive integer"]),
        (["--out", "image.txt"], ["--out 'image.txt'", ".png"]),
    ],
)
def test_cli_refuses_bad_input_in_one_line_before_loading(args, words):
    result = run(*args)
    assert_one_line_error(result, *words)
    assert result.stdout == ""


def test_cli_refuses_a_file_that_is_no_image(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert_one_line_error(run("--image", str(notes)), "is not an image")


def test_cli_debug_shows_the_traceback():
    result = run("--mllm", "models/LLM/Qwen2.5-VL-7B-Instruct", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "MetaCanvasInputError" in result.stderr


def test_cli_checks_the_checkpoint_before_loading_any_model(tmp_path):
    """Model folders without weights: the damaged checkpoint is found before any loader asks for weights."""
    mllm, backbone, checkpoint = tmp_path / "qwen", tmp_path / "sana", tmp_path / "mine.safetensors"
    mllm.mkdir()
    backbone.mkdir()
    (mllm / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (backbone / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    checkpoint.write_bytes(b"half a download")
    result = run("--mllm", str(mllm), "--backbone", str(backbone), "--checkpoint", str(checkpoint))
    assert_one_line_error(result, "deserializing header")


def bare_single_file(single_file, path):
    """`single_file` as ComfyUI's real ones are: weights only, no tokenizer in its metadata."""
    metadata = {k: v for k, v in SafetensorsFile.open(single_file, "MLLM").metadata.items() if k != "tokenizer"}
    save_file(load_file(str(single_file)), str(path), metadata=metadata)
    return path


def test_cli_plans_from_a_comfyui_single_file_exactly_as_from_its_folder(tiny, models_dir, tmp_path, monkeypatch):
    """The tiny planner as ComfyUI's single file (fp32 like its folder, so like is compared with like) gives the
    folder's image bit for bit, with its own tokenizer or with --mllm-tokenizer; the scaled-fp8 file of the same
    weights gives another image, so the planner's weights do reach the pixels; --mllm-weight-dtype fp8 keeps the
    folder and the file of the same weights in the same fp8 (the same image, not the fp32 one). Paths relative to the current folder
    work (the CLI has no models root: issue 17 leaves plain paths to the user)."""
    assert {t.dtype for t in load_file(str(tiny["mllm_file"])).values()} == {torch.float32}
    assert {t.dtype for t in load_file(str(tiny["mllm"] / "model.safetensors")).values()} == {torch.float32}
    bare = bare_single_file(tiny["mllm_file"], tmp_path / "qwen_2.5_vl_tiny.safetensors")
    monkeypatch.chdir(models_dir)
    relative = {name: str(tiny[name].relative_to(models_dir)) for name in ("mllm", "mllm_file", "mllm_fp8", "sana")}
    checkpoint = str(tiny["sana_metacanvas"].relative_to(models_dir))
    planners = {
        "folder": ["--mllm", relative["mllm"]],
        "file": ["--mllm", relative["mllm_file"]],
        "bare file": ["--mllm", str(bare), "--mllm-tokenizer", relative["mllm"]],
        "fp8 file": ["--mllm", relative["mllm_fp8"]],
        "folder kept in fp8": ["--mllm", relative["mllm"], "--mllm-weight-dtype", "fp8_e4m3fn"],
        "file kept in fp8": ["--mllm", relative["mllm_file"], "--mllm-weight-dtype", "fp8_e4m3fn"],
    }
    images = {}
    for name, mllm in planners.items():
        out = tmp_path / f"{name}.png"
        args = [*mllm, "--backbone", relative["sana"], "--checkpoint", checkpoint, "--steps", "2", "--out", str(out)]
        assert main(args) == 0, name
        images[name] = np.asarray(Image.open(out))
    assert np.array_equal(images["file"], images["folder"]) and np.array_equal(images["bare file"], images["folder"])
    assert not np.array_equal(images["fp8 file"], images["folder"])
    assert np.array_equal(images["folder kept in fp8"], images["file kept in fp8"])
    assert not np.array_equal(images["folder kept in fp8"], images["folder"])


def test_cli_refuses_a_damaged_wrong_or_tokenizerless_single_file_naming_it(tiny, tmp_path, capsys):
    data = tiny["mllm_file"].read_bytes()
    damaged = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    damaged.write_bytes(data[: len(data) // 2])  # an interrupted download
    bare = bare_single_file(tiny["mllm_file"], tmp_path / "bare.safetensors")
    nowhere = tmp_path / "nowhere"
    cases = [
        ([damaged], [damaged, "is not a readable .safetensors file", "truncated"]),
        ([tiny["sana_metacanvas"]], [tiny["sana_metacanvas"], "holds a MetaCanvas checkpoint", "not Qwen2.5-VL"]),
        ([bare], [bare, "holds weights only: give --mllm-tokenizer"]),
        ([bare, "--mllm-tokenizer", nowhere], [nowhere, "is not a folder"]),
        ([tiny["mllm"], "--mllm-tokenizer", tiny["mllm"]], [tiny["mllm"], "is for a single file"]),
    ]
    for mllm, words in cases:
        assert main(["--mllm", *map(str, mllm), "--backbone", str(tiny["sana"])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --mllm") and err.count("\n") == 1, err
        assert all(str(word) in err for word in words), err


def test_bench_refuses_a_partial_model_pair():
    result = run("--sana", "models/diffusers/sana", module="metacanvas_core.bench")
    assert_one_line_error(result, "--sana given without --mllm")


def test_help_is_quiet_and_lists_the_schedulers_without_importing_torch():
    result = run("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert all(name in result.stdout for name in SCHEDULERS)
    probe = "import sys, metacanvas_core.generate; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert imported.stdout == "[]\n", imported.stderr[-2000:]
