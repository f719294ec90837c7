"""End to end in a real ComfyUI: the five native workflows (workflows/native_*.json: core loaders, KSampler /
SamplerCustomAdvanced, core VAE, MetaCanvas Apply / Attach Canvas) on tiny native files, and model names that must
stay inside the model folders (issue 17), all through the server's own API.

- The editor (headless Chromium) loads each native workflow from ComfyUI's template endpoint with no unknown node
  type and exports it as API format; the FLUX-Kontext one also with FluxKontextImageScale bypassed, as a user
  would do for a small input image (its export equals the plain export with that node bypassed).
- Each export is shrunk the way a user edits widgets (64×64, 5 frames, 2 steps, the tiny files) and run through
  POST /prompt: the saved video has 5 frames of 64×64 at the expected rate, the frames (an added core SaveImage:
  SaveVideo is lossy) are not one colour, the sampled latent (an added core SaveLatent) is finite.
- With "new (untrained)" the saved pixels equal, bit for bit, those of the same native graph without the canvas
  nodes (Apply, Attach Canvas, Wan Inputs removed and rewired) for text-to-video, image-to-video, video editing
  and image editing. Both graphs take their text from MetaCanvas Text Conditioning: ComfyUI builds umT5-XXL and
  T5-XXL at their real size whatever a file holds (comfy/text_encoders/umt5_config_xxl.json, t5_config_xxl.json,
  chosen by sd.detect_te_model from a 24th block 4096 wide), so no tiny file can stand in for core Load CLIP on
  this CPU; the text path is the same in both graphs, the canvas path is what is compared.
- A randomly initialised connector (zero-initialised parts of "new (untrained)" made non-zero, nothing else
  changed) makes the output differ from the plain graph; on image-to-video the given first frame stays exactly
  the plain graph's (latent and pixels: the Wan VAE decodes causally), on image editing the whole image changes.
  Its checkpoint lives in a folder elsewhere, reached through a symlinked folder inside models/metacanvas.
- Attach Canvas's dial with that connector: strength 0 and an all-zero mask from a core Solid Mask sample the plain
  graph's latent exactly, an all-one mask the undialled canvas's, strength 2 another one.
- A seed-only change re-runs only the sampler and what follows (the plan is cached).
- Bad input is refused with a message naming it and the server stays up: a Wan checkpoint on FLUX-Kontext, a plan
  size no backbone takes (validation), a plan or latent size Wan's canvas cannot take, a source video shorter than
  the latent.
- Issue 17: absolute and deep '../' names for the MLLM, the connector checkpoint and the backbone folder are
  refused at validation and the files they name are never read (their access times stay put); symlinked folders
  inside the model folders keep working (text_to_image on the pack's loaders with all three through them); a
  truncated .safetensors and a pickle renamed .safetensors are refused naming the file.

Tiny native files (python -m metacanvas_core.tiny --native: ~2.3 GB, ~30 s) are written once into
~/.cache/metacanvas-tests/native-<hash of tiny.py and the layouts> (or $XDG_CACHE_HOME) and reused.

    COMFYUI_HARNESS=/path/to/harness python -m pytest tests/test_comfyui_native_e2e.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from support.comfyui import (
    HARNESS,
    SKIP_REASON,
    ComfyServer,
    artifacts_dir,
    cached,
    execution_errors,
    ids,
    load_saved,
    one,
    rewire,
    validation_messages,
    write_png,
)

ROOT = Path(__file__).resolve().parents[1]
NATIVE = [
    "native_text_to_video",
    "native_image_to_video",
    "native_video_editing",
    "native_in_context_video",
    "native_image_editing",
]
BYPASSED = "native_image_editing_bypassed"  # FluxKontextImageScale bypassed in the editor (mode 4)
TINY_FILES = {  # the workflows' Comfy-Org file names -> the tiny files (metacanvas_core.tiny.write_tiny_native)
    "wan2.2_ti2v_5B_fp16.safetensors": "tiny-wan2.2_ti2v_5B.safetensors",
    "wan2.2_vae.safetensors": "tiny-wan2.2_vae.safetensors",
    "flux1-dev-kontext_fp8_scaled.safetensors": "tiny-flux1-dev-kontext.safetensors",
    "ae.safetensors": "tiny-flux-ae.safetensors",
}
MLLM_FILE = "tiny-qwen2_5-vl.safetensors"
# What the templates' Load CLIP nodes name in these runs: not a model, so a run that loaded it would fail. ComfyUI
# builds umT5-XXL / T5-XXL at full size whatever the file holds, so no tiny file can stand in for them: the runs set
# the Connector Loader's context to 'mllm' (a checkpoint trained with MLLM context), where Text Conditioning never
# asks for its CLIP inputs. Native context (what 'new (untrained)' takes in the templates) is tested in ComfyUI's
# Python with a stand-in conditioning (tests/test_comfyui_native.py).
NOT_A_TEXT_ENCODER = "not-a-text-encoder.safetensors"
SIZE, LENGTH, STEPS = 64, 5, 2
IMAGES = ("e2e_native_a.png", "e2e_native_b.png")  # same size: in_context_video's Image Batch keeps them as they are
VIDEO, VIDEO_FRAMES, VIDEO_FPS = "e2e_native_source.mp4", 9, 16
FRAMES_NODE, LATENT_NODE = "9001", "9002"  # added: core SaveImage on VAE Decode, core SaveLatent on the sampler
MASK_NODE = "9003"  # added: a core Solid Mask on Attach Canvas's canvas_mask
CANVAS_NODES = {"MetaCanvasApply": "model", "MetaCanvasAttachCanvas": "conditioning", "MetaCanvasWanInputs": "positive"}
SAMPLERS = {"KSampler", "SamplerCustomAdvanced"}
EXTRA_OUTPUTS = {"MetaCanvasPlanPreview"}  # MetaCanvas nodes beside the graph's own path (not in the plain graph)
LINK = "linked"  # the symlinked folder's name inside models/metacanvas, models/LLM and models/diffusers

pytestmark = pytest.mark.skipif(not HARNESS, reason=SKIP_REASON)


# --- files ------------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metacanvas-tests"


@pytest.fixture(scope="module")
def native_files() -> Path:
    """The tiny native files in ComfyUI's folders (diffusion_models/, vae/), written once per version of their
    writer (tiny.py, the shipped key layouts, torch) into the user's cache and reused; versions unused for a day are
    removed."""
    from metacanvas_core import tiny

    key = hashlib.sha256()
    sources = [Path(tiny.__file__), *sorted((ROOT / "metacanvas_core" / "configs" / "comfyui_layouts").glob("*.json"))]
    for path in sources:
        key.update(path.name.encode() + path.read_bytes())
    key.update(torch.__version__.encode())
    root = _cache_root() / f"native-{key.hexdigest()[:16]}"
    if not (root / "complete").is_file():
        building = root.with_name(f"{root.name}.{os.getpid()}.partial")
        shutil.rmtree(building, ignore_errors=True)
        tiny.write_tiny_native(building)
        (building / "complete").write_text("written by tests/test_comfyui_native_e2e.py\n")
        try:
            building.rename(root)
        except OSError:  # another session finished first: use its copy
            shutil.rmtree(building, ignore_errors=True)
        day = time.time() - 24 * 3600  # other versions unused for a day (a session running now may read one)
        for old in root.parent.glob("native-*"):
            marker = old / "complete" if not old.name.endswith(".partial") else old
            if old != root and marker.exists() and marker.stat().st_mtime < day:
                shutil.rmtree(old, ignore_errors=True)
    (root / "complete").touch()  # in use
    return root


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """models: model folders of this module (beside the session's tiny models); elsewhere: folders outside every
    model folder, reached through symlinked folders inside models; secret: files no model name may reach."""
    base = tmp_path_factory.mktemp("native_e2e_files")
    out = {name: base / name for name in ("models", "elsewhere", "secret")}
    for kind in ("metacanvas", "LLM", "diffusers"):
        (out["models"] / kind).mkdir(parents=True)
        (out["elsewhere"] / kind).mkdir(parents=True)
        (out["models"] / kind / LINK).symlink_to(out["elsewhere"] / kind, target_is_directory=True)
    out["secret"].mkdir()
    return out


def _native_specs(native_files: Path) -> dict:
    """The MetaCanvas backbone specs of the tiny native files, read from their headers as nodes/model_patch.py reads the
    loaded models (ComfyUI's FLUX has heads of 128)."""
    from metacanvas_core.files import SafetensorsFile
    from metacanvas_core.specs import flux_kontext_spec, wan_spec

    wan = SafetensorsFile.open(native_files / "diffusion_models" / TINY_FILES["wan2.2_ti2v_5B_fp16.safetensors"], "Wan")
    width, channels, *patch = wan.shapes["patch_embedding.weight"]
    text_dim = wan.shapes["text_embedding.0.weight"][1]
    flux = SafetensorsFile.open(
        native_files / "diffusion_models" / TINY_FILES["flux1-dev-kontext_fp8_scaled.safetensors"], "FLUX"
    )
    hidden = flux.shapes["img_in.weight"][0]
    return {
        "wan": wan_spec(width, text_dim, channels, tuple(patch), 16),
        "flux": flux_kontext_spec(
            hidden,
            (hidden // 128, 128),
            flux.shapes["txt_in.weight"][1],
            flux.shapes["vector_in.in_layer.weight"][1],
            8,
        ),
    }


@pytest.fixture(scope="module")
def random_connectors(native_files, places, models_dir) -> dict[str, str]:
    """A MetaCanvas checkpoint per native model: what the Connector Loader makes for "new (untrained)" on it (MLLM
    context, seed 0) with the canvas connector's zero-initialised projections drawn at random; a stand-in for a
    trained one. Written outside the model folders and named through the symlinked folder."""
    from metacanvas_core.checkpoint import save_metacanvas
    from metacanvas_core.metacanvas import new_metacanvas

    config = json.loads((models_dir / "LLM" / "tiny-qwen2_5-vl" / "config.json").read_text())
    hidden = config.get("text_config", config)["hidden_size"]
    names = {}
    for backbone, spec in _native_specs(native_files).items():
        mc = new_metacanvas(hidden, spec, "mllm")
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in (mc.canvas_connector.align_out, mc.canvas_connector.out_proj):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
        name = f"tiny-native-{backbone}-random.safetensors"
        save_metacanvas(mc, places["elsewhere"] / "metacanvas" / name)
        names[backbone] = f"{LINK}/{name}"
    return names


# --- the server and the editor ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return artifacts_dir(tmp_path_factory, "comfyui_native_e2e_out")


@pytest.fixture(scope="module")
def server(models_dir, native_files, places, tmp_path_factory):
    """A real ComfyUI reading the session's tiny models, the tiny native files and this module's folders. LRU
    caching keeps every model loaded across the tests (ComfyUI's default cache keeps only the last prompt's)."""
    mine = places["models"]
    (mine / "text_encoders").mkdir(exist_ok=True)
    (mine / "text_encoders" / NOT_A_TEXT_ENCODER).write_bytes(b"not a model: Load CLIP must not run in these tests")
    folders = {
        "LLM": [models_dir / "LLM", mine / "LLM"],
        "text_encoders": [models_dir / "text_encoders", mine / "text_encoders"],
        "diffusers": [models_dir / "diffusers", mine / "diffusers"],
        "metacanvas": [models_dir / "metacanvas", mine / "metacanvas"],
        "diffusion_models": native_files / "diffusion_models",
        "vae": native_files / "vae",
    }
    server = ComfyServer.start(tmp_path_factory.mktemp("comfyui_native"), folders, ("--cache-lru", "500"))
    try:
        _, object_info = server.http("GET", "/object_info")
        missing = [n for n in [*CANVAS_NODES, "MetaCanvasTextConditioning"] if n not in object_info]
        assert not missing, f"the pack's native nodes {missing} are not registered:\n{server.log_tail()}"
        yield server
    finally:
        try:
            peak = next(line for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if "VmHWM" in line)
            print(f"\nComfyUI: started in {server.startup_s:.1f}s, peak memory {peak.split(':')[1].strip()}")
        except (OSError, StopIteration):
            pass
        server.stop()


def workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def bypassed_scale(wf: dict) -> dict:
    """The FLUX-Kontext workflow with FluxKontextImageScale bypassed (Ctrl+B in the editor: mode 4), so a small input
    image goes to VAE Encode at its own size (the node would scale it to ~1 megapixel)."""
    wf = json.loads(json.dumps(wf))
    (node,) = [n for n in wf["nodes"] if n["type"] == "FluxKontextImageScale"]
    node["mode"] = 4
    return wf


@pytest.fixture(scope="module")
def editor(server, artifacts) -> dict[str, dict]:
    """The five native workflows from the template endpoint, the bypassed FLUX-Kontext one and text_to_image, loaded
    in one editor session and exported as API format."""
    pack = server.template_pack(NATIVE)
    sources = [[name, f"/api/workflow_templates/{pack}/{name}.json"] for name in NATIVE]
    sources += [[BYPASSED, bypassed_scale(workflow("native_image_editing"))]]
    sources += [["text_to_image", f"/api/workflow_templates/{pack}/text_to_image.json"]]
    kinds = {n["type"] for name in NATIVE for n in workflow(name)["nodes"]} - {"Note", "MarkdownNote"}
    return server.load_in_editor(sources, artifacts, sorted(kinds))


@pytest.fixture(scope="module")
def inputs(server) -> Path:
    """Two 64×64 PNGs and a 9-frame 16 fps 64×64 mp4 in ComfyUI's (temporary) input folder."""
    folder = server.work / "input"
    for k, name in enumerate(IMAGES):
        write_png(folder / name, SIZE, SIZE, seed=k)
    server.write_video(folder / VIDEO, VIDEO_FRAMES, SIZE, VIDEO_FPS)
    return folder


# --- prompts ----------------------------------------------------------------------------------------------------


def _is_video(api: dict) -> bool:
    return bool(ids(api, {"SaveVideo"}))


def shrink(api: dict, tag: str) -> dict:
    """The exported prompt as a user edits its widgets for a quick run: the tiny files, 64×64, 5 frames, 2 steps,
    the small inputs; its own file name prefixes; a core SaveImage on VAE Decode (video frames as lossless PNGs)
    and a core SaveLatent on the sampler."""
    api = json.loads(json.dumps(api))
    images = iter(IMAGES)
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        edits = {
            "MetaCanvasMLLMLoader": {"mllm_folder": MLLM_FILE},
            "MetaCanvasConnectorLoader": {"context": "mllm"},
            "CLIPLoader": {"clip_name": NOT_A_TEXT_ENCODER},
            "DualCLIPLoader": {"clip_name1": NOT_A_TEXT_ENCODER, "clip_name2": NOT_A_TEXT_ENCODER},
            "UNETLoader": {"unet_name": TINY_FILES.get(inputs.get("unet_name"))},
            "VAELoader": {"vae_name": TINY_FILES.get(inputs.get("vae_name"))},
            "MetaCanvasPlan": {"width": SIZE, "height": SIZE},
            "Wan22ImageToVideoLatent": {"width": SIZE, "height": SIZE, "length": LENGTH},
            "EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
            "KSampler": {"steps": STEPS},
            "BasicScheduler": {"steps": STEPS},
            "ImageFromBatch": {"length": LENGTH},
            "LoadVideo": {"file": VIDEO},
            "SaveImage": {"filename_prefix": tag},
            "SaveVideo": {"filename_prefix": tag},
        }.get(kind, {})
        if kind == "LoadImage":
            edits = {"image": next(images)}
        for name, value in edits.items():
            assert name in inputs and value is not None, f"{kind} has no widget {name} = {inputs.get(name)!r}"
            inputs[name] = value
    assert not ids(api, {"FluxKontextImageScale"}), "shrink the export with FluxKontextImageScale bypassed"
    (sampler,) = ids(api, SAMPLERS)
    if _is_video(api):
        decode = one(api, "VAEDecode")
        api[FRAMES_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [decode, 0], "filename_prefix": f"{tag}_frames"},
        }
    api[LATENT_NODE] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": tag}}
    return api


def drop(api: dict, nodes: set[str]) -> dict:
    """The prompt without these nodes and every node that reads one of them, directly or not."""
    api = json.loads(json.dumps(api))
    gone = set(nodes)
    while True:
        readers = {
            nid
            for nid, node in api.items()
            if nid not in gone and any(isinstance(v, list) and v and v[0] in gone for v in node["inputs"].values())
        }
        if not readers:
            break
        gone |= readers
    return {nid: node for nid, node in api.items() if nid not in gone}


def plain(api: dict) -> dict:
    """The same native graph without the canvas: MetaCanvas Apply, Attach Canvas and Wan Inputs removed, what read
    them reading their inputs (the model from the loader, the text conditioning as it is); output branches of other
    MetaCanvas nodes (a plan preview) left out."""
    for kind, through in CANVAS_NODES.items():
        for node in sorted(ids(api, {kind})):
            api = rewire(api, node, through)
    assert not ids(api, set(CANVAS_NODES))
    return drop(api, ids(api, EXTRA_OUTPUTS))


def latent_only(api: dict) -> dict:
    """The prompt up to the sampler's saved latent: no VAE decode nor what reads it (a quick run when only the
    latent matters)."""
    return drop(api, ids(api, {"VAEDecode"}))


def renamed(api: dict, tag: str) -> dict:
    """Its own file name prefixes (outputs of different runs never overwrite each other)."""
    api = json.loads(json.dumps(api))
    for node in ids(api, {"SaveImage", "SaveVideo", "SaveLatent"}):
        api[node]["inputs"]["filename_prefix"] = f"{tag}_{node}"
    return api


@dataclass
class Run:
    api: dict
    entry: dict
    frames: np.ndarray | None  # the saved PNGs, uint8 (N, H, W, 3); None for latent-only runs
    latent: torch.Tensor
    video: dict | None  # SaveVideo's mp4 probed with PyAV: frames, fps, size
    seconds: float


def execute(server: ComfyServer, api: dict, tag: str) -> Run:
    """POST the prompt, wait, and read what it saved."""
    from safetensors.torch import load_file

    api = renamed(api, tag)
    t0 = time.time()
    status, body = server.submit(api)
    assert status == 200, f"{tag}: refused at validation: {body}"
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", f"{tag}: {execution_errors(entry)}\n{server.log_tail()}"
    seconds = time.time() - t0
    out = server.work / "output"

    def files(node: str, key: str) -> list[dict]:
        return entry["outputs"][node][key]

    frames = video = None
    save = FRAMES_NODE if _is_video(api) else next(iter(ids(api, {"SaveImage"})), None)
    if save is not None:
        frames = np.concatenate([load_saved(out / f["subfolder"], [f]) for f in files(save, "images")])
    if _is_video(api):
        (mp4,) = files(one(api, "SaveVideo"), "images")
        video = server.probe_video(out / mp4["subfolder"] / mp4["filename"])
    (saved,) = files(LATENT_NODE, "latents")
    latent = load_file(str(out / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return Run(api, entry, frames, latent, video, seconds)


@pytest.fixture(scope="module")
def runs(server, editor, inputs):
    """Runs by tag, each made once and shared by the tests that need it."""
    done: dict[str, Run] = {}

    def get(tag: str, make) -> Run:
        if tag not in done:
            done[tag] = execute(server, make(), tag)
            print(f"{tag}: {done[tag].seconds:.1f}s")
        return done[tag]

    return get


SHORT_EDIT = "Put a small yellow sailboat at the bottom left."


def shipped(editor, name: str) -> dict:
    """The shrunk export of a workflow as shipped (FLUX-Kontext: with the image scale bypassed and a shorter
    instruction: the 3072-wide FLUX block's time grows with the prompt's tokens, 132 for the shipped one)."""
    if name != "native_image_editing":
        return shrink(editor[name], name)
    api = shrink(editor[BYPASSED], name)
    prompt, _ = api[one(api, "MetaCanvasPlan")]["inputs"]["prompt"]  # the String node the text encoder reads too
    api[prompt]["inputs"]["value"] = SHORT_EDIT
    return api


# --- the tests --------------------------------------------------------------------------------------------------


def test_native_workflows_load_in_the_editor(editor):
    """No unknown node type (load_in_editor asserts it), every node exported, Notes left out; bypassing
    FluxKontextImageScale in the editor sends the prompt without it, VAE Encode reading the loaded image."""
    for name in NATIVE:
        sent = sorted(n["type"] for n in workflow(name)["nodes"] if n["type"] not in ("Note", "MarkdownNote"))
        assert sorted(node["class_type"] for node in editor[name].values()) == sent, name
        assert {"MetaCanvasApply", "MetaCanvasAttachCanvas", "MetaCanvasPlan"} <= {
            node["class_type"] for node in editor[name].values()
        }
    full = editor["native_image_editing"]
    assert editor[BYPASSED] == rewire(full, one(full, "FluxKontextImageScale"), "image")


def _shipped(runs, editor, name: str) -> Run:
    return runs(name, lambda: shipped(editor, name))


def _plain(runs, editor, name: str) -> Run:
    return runs(f"{name}_plain", lambda: plain(shipped(editor, name)))


def _differ(a: np.ndarray, b: np.ndarray) -> str:
    diff = np.abs(a.astype(int) - b.astype(int))
    return f"{int((diff > 0).sum())} of {diff.size} values differ, by up to {diff.max()}"


@pytest.mark.parametrize("name", NATIVE)
def test_native_workflow_runs(name, runs, editor):
    """The shrunk workflow as shipped ("new (untrained)") runs to a saved video of 5 frames of 64×64 at its rate
    (video editing keeps the source's 16 fps) or a 64×64 image; frames not one colour, the latent finite."""
    run = _shipped(runs, editor, name)
    assert torch.isfinite(run.latent).all(), f"{name}: the sampled latent is not finite"
    if _is_video(run.api):
        assert run.latent.shape == (1, 48, (LENGTH - 1) // 4 + 1, SIZE // 16, SIZE // 16), run.latent.shape
        assert run.frames.shape == (LENGTH, SIZE, SIZE, 3), run.frames.shape
        rate = VIDEO_FPS if name == "native_video_editing" else 24
        assert run.video == {"frames": LENGTH, "fps": rate, "size": [SIZE, SIZE], "codec": "h264"}, run.video
    else:
        assert run.latent.shape == (1, 16, SIZE // 8, SIZE // 8), run.latent.shape
        assert run.frames.shape == (1, SIZE, SIZE, 3), run.frames.shape
    assert all(frame.std() > 0 for frame in run.frames), f"{name}: a saved frame is one colour"


# in_context_video is not here: MetaCanvas Wan Inputs puts the reference images before the video as clean latent
# frames in the DiT's sequence (timestep 0), which Wan's self-attention reads even with an untrained checkpoint, so
# its output differs from the plain graph by construction (test_native_workflow_runs checks that it runs).
UNTRAINED_EQUAL = ["native_text_to_video", "native_image_to_video", "native_video_editing", "native_image_editing"]


@pytest.mark.parametrize("name", UNTRAINED_EQUAL)
def test_untrained_canvas_is_the_plain_graph(name, runs, editor):
    """ "new (untrained)": the saved pixels (and the sampled latent) equal the same native graph's without MetaCanvas
    Apply, Attach Canvas and Wan Inputs, bit for bit. (Video editing: the untrained condition embedding adds exact
    zeros for the source video.)"""
    with_canvas, without = _shipped(runs, editor, name), _plain(runs, editor, name)
    assert not ids(without.api, set(CANVAS_NODES)) and ids(with_canvas.api, {"MetaCanvasApply"})
    assert torch.equal(with_canvas.latent, without.latent), f"{name}: the latents differ"
    assert with_canvas.frames.shape == without.frames.shape
    assert np.array_equal(with_canvas.frames, without.frames), f"{name}: {_differ(with_canvas.frames, without.frames)}"


@pytest.mark.parametrize(("name", "backbone"), [("native_image_to_video", "wan"), ("native_image_editing", "flux")])
def test_a_random_connector_changes_the_output(name, backbone, runs, editor, random_connectors):
    """The checkpoint with random canvas projections (through a symlinked folder): the output differs from the plain
    graph's. Its plain graph (no canvas nodes) samples exactly the untrained plain graph's latent, so the canvas is
    all that differs. Image-to-video: the given first frame stays the plain graph's exactly, in the latent and in
    the saved pixels (the canvas never reaches frames at timestep 0; the Wan VAE decodes causally)."""
    checkpoint = random_connectors[backbone]

    def with_checkpoint(api: dict) -> dict:
        api[one(api, "MetaCanvasConnectorLoader")]["inputs"]["checkpoint"] = checkpoint
        return api

    untrained_plain = _plain(runs, editor, name)
    if backbone == "wan":  # (a quick run: the tiny Wan DiT samples in a second; FLUX's 3072-wide block does not)
        trained_plain = runs(f"{name}_random_plain", lambda: latent_only(plain(with_checkpoint(shipped(editor, name)))))
        assert torch.equal(trained_plain.latent, untrained_plain.latent), "the checkpoint changed more than the canvas"
    trained = runs(f"{name}_random", lambda: with_checkpoint(shipped(editor, name)))
    assert torch.isfinite(trained.latent).all()
    assert trained.frames.shape == untrained_plain.frames.shape
    assert all(frame.std() > 0 for frame in trained.frames)
    if backbone == "wan":
        assert torch.equal(trained.latent[:, :, 0], untrained_plain.latent[:, :, 0]), "the canvas changed frame 0"
        assert np.array_equal(trained.frames[0], untrained_plain.frames[0]), "the given first frame changed"
        assert not torch.equal(trained.latent[:, :, 1:], untrained_plain.latent[:, :, 1:])
        assert not np.array_equal(trained.frames[1:], untrained_plain.frames[1:]), "the canvas changed nothing"
        changed = _differ(trained.frames[1:], untrained_plain.frames[1:])
    else:
        assert not np.array_equal(trained.frames, untrained_plain.frames), "the canvas changed nothing"
        changed = _differ(trained.frames, untrained_plain.frames)
    print(f"{name} with a random connector vs the plain graph: {changed}")


def test_editing_keeps_the_inputs_aspect(runs, editor, inputs):
    """native_image_editing on a 96×64 photo (FluxKontextImageScale bypassed): the sampler fills the input's own
    VAE-encoded latent, so the edit keeps its aspect, and the plan is made for that size (no size typed twice)."""
    write_png(inputs / "e2e_native_wide.png", 96, 64, seed=5)

    def wide() -> dict:
        api = latent_only(shipped(editor, "native_image_editing"))
        api[one(api, "LoadImage")]["inputs"]["image"] = "e2e_native_wide.png"
        return api

    assert runs("native_image_editing_wide", wide).latent.shape == (1, 16, 64 // 8, 96 // 8)


def test_strength_and_mask_through_the_server(runs, editor, random_connectors):
    """Attach Canvas's dial as an artist sets it, on native image-to-video with the random connector (latents):
    canvas_strength 0, and an all-zero mask from a core Solid Mask, sample the plain graph's latent exactly; an
    all-one mask samples the undialled canvas's exactly; strength 2 samples another latent than strength 1."""
    name = "native_image_to_video"

    def dialled(strength: float, mask: float | None) -> dict:
        api = shipped(editor, name)
        api[one(api, "MetaCanvasConnectorLoader")]["inputs"]["checkpoint"] = random_connectors["wan"]
        attach = api[one(api, "MetaCanvasAttachCanvas")]["inputs"]
        attach["canvas_strength"] = strength
        if mask is not None:
            api[MASK_NODE] = {"class_type": "SolidMask", "inputs": {"value": mask, "width": SIZE, "height": SIZE}}
            attach["canvas_mask"] = [MASK_NODE, 0]
        return latent_only(api)

    plain_latent = _plain(runs, editor, name).latent
    latent = {
        (strength, mask): runs(f"{name}_dial_{strength}_{mask}", lambda s=strength, m=mask: dialled(s, m)).latent
        for strength, mask in ((1.0, None), (0.0, None), (1.0, 0.0), (1.0, 1.0), (2.0, None))
    }
    assert not torch.equal(latent[1.0, None], plain_latent), "the random connector changed nothing"
    assert torch.equal(latent[0.0, None], plain_latent), "strength 0 is not the plain graph"
    assert torch.equal(latent[1.0, 0.0], plain_latent), "an all-zero mask is not the plain graph"
    assert torch.equal(latent[1.0, 1.0], latent[1.0, None]), "an all-one mask changed the canvas"
    assert not torch.equal(latent[2.0, None], latent[1.0, None]), "strength 2 is strength 1"


def test_seed_change_reruns_only_the_sampler(runs, editor):
    """Native text-to-video, the KSampler's seed changed: the loaders, the plan, the text conditioning, the canvas
    and the patched model come from ComfyUI's cache; only the sampler and what follows run again; Load CLIP and CLIP
    Text Encode never ran (MLLM context). (Up to the saved
    latent: VAE Decode, which follows too, is the slow part of these runs.)"""
    name = "native_text_to_video"
    first = runs(f"{name}_latent", lambda: latent_only(shipped(editor, name)))
    sampler = one(first.api, "KSampler")

    def reseeded() -> dict:
        api = latent_only(shipped(editor, name))
        api[sampler]["inputs"]["seed"] += 1
        return api

    second = runs(f"{name}_seed", reseeded)
    downstream = {sampler, LATENT_NODE}
    never_run = ids(second.api, {"CLIPLoader", "CLIPTextEncode"})  # MLLM context: Text Conditioning never asks
    from_cache = cached(second.entry)
    expected = set(second.api) - downstream - never_run
    assert from_cache == expected, f"cached {sorted(from_cache)}, downstream {sorted(downstream)}"
    assert {one(second.api, k) for k in ("MetaCanvasPlan", "MetaCanvasApply", "MetaCanvasAttachCanvas")} <= from_cache
    assert not torch.equal(first.latent, second.latent), "a new seed gave the same latent"


def _error_of(server: ComfyServer, api: dict) -> dict:
    """The one execution error of a prompt that passes validation and fails while running; the server stays up."""
    status, body = server.submit(api)
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = execution_errors(entry)
    server.healthy()
    return error


def _refusal(server: ComfyServer, api: dict, node: str) -> str:
    """The validation message for `node` of a prompt POST /prompt refuses (HTTP 400); nothing is queued."""
    status, body = server.submit(api)
    assert status == 400, body
    assert node in body["node_errors"], body
    server.healthy()
    return validation_messages(body, node)


def test_bad_input_is_refused_and_the_server_stays_up(server, editor, inputs, random_connectors):
    """Each mistake named in words a user can act on; nothing left running afterwards."""
    # A Wan2.2 checkpoint on FLUX-Kontext (the Connector Loader sees the MODEL only when it runs).
    api = latent_only(shipped(editor, "native_image_editing"))
    api[one(api, "MetaCanvasConnectorLoader")]["inputs"]["checkpoint"] = random_connectors["wan"]
    error = _error_of(server, renamed(api, "bad_checkpoint"))
    assert error["node_type"] == "MetaCanvasConnectorLoader", error
    message = error["exception_message"]
    assert "made for a wan backbone" in message and "is flux_kontext" in message, message

    t2v = latent_only(shipped(editor, "native_text_to_video"))
    plan = one(t2v, "MetaCanvasPlan")
    # A plan size no backbone takes: refused at validation.
    api = json.loads(json.dumps(t2v))
    api[plan]["inputs"].update(width=40)
    message = _refusal(server, renamed(api, "bad_plan_40"), plan)
    assert "width 40" in message and "multiple of 16" in message, message
    # A size Wan's canvas cannot take, from the latent the Plan reads (its width and height are then not used).
    api = json.loads(json.dumps(t2v))
    api[one(api, "Wan22ImageToVideoLatent")]["inputs"].update(width=80)
    error = _error_of(server, renamed(api, "bad_latent_80"))
    message = error["exception_message"]
    assert (
        error["node_type"] == "MetaCanvasPlan" and "latent: the plan takes its size from the latent, 80×64" in message
    )
    assert "64 or 128" in message and "Wan22ImageToVideoLatent" in message, message
    # The Plan's own size (its latent input disconnected): a width Wan's canvas cannot take.
    typed = json.loads(json.dumps(t2v))
    del typed[plan]["inputs"]["latent"]
    api = json.loads(json.dumps(typed))
    api[plan]["inputs"].update(width=80)
    error = _error_of(server, renamed(api, "bad_plan_80"))
    assert error["node_type"] == "MetaCanvasPlan" and "width 80" in error["exception_message"], error
    # A latent of another size than the plan's typed one (the canvas would be stretched over it): refused naming both.
    api = json.loads(json.dumps(typed))
    latent = api[one(api, "Wan22ImageToVideoLatent")]["inputs"]
    latent.update(width=2 * SIZE)
    error = _error_of(server, renamed(api, "plan_other_size"))
    message = error["exception_message"]
    assert error["node_type"] == "KSampler" and f"made for {SIZE}×{SIZE}" in message, error
    assert f"latent is {2 * SIZE}×{SIZE} (Wan22ImageToVideoLatent)" in message, message
    # A strength of NaN typed through the API (it passes ComfyUI's own min/max check): refused at validation.
    api = json.loads(json.dumps(t2v))
    attach = one(api, "MetaCanvasAttachCanvas")
    api[attach]["inputs"]["canvas_strength"] = "NaN"
    message = _refusal(server, renamed(api, "nan_strength"), attach)
    assert "canvas_strength is nan, not a finite number" in message, message
    # A source video shorter than the video to make (video editing: 1 frame for 5).
    api = latent_only(shipped(editor, "native_video_editing"))
    api[one(api, "ImageFromBatch")]["inputs"]["length"] = 1
    error = _error_of(server, renamed(api, "bad_source_length"))
    message = error["exception_message"]
    assert "source video gives 1 latent frames" in message and "length" in message, error
    print("refused:", message)


def test_the_text_encoder_runs_only_for_native_context(server, editor, inputs):
    """The runs above (context 'mllm') never load the file Load CLIP names, which is not a model. With 'auto' (native
    context for 'new (untrained)' on a native model, as shipped) Text Conditioning asks for CLIP Text Encode, and
    Load CLIP reads that file: the run stops there."""
    api = latent_only(shipped(editor, "native_text_to_video"))
    api[one(api, "MetaCanvasConnectorLoader")]["inputs"]["context"] = "auto"
    error = _error_of(server, renamed(api, "native_context"))
    assert error["node_type"] == "CLIPLoader", error
    server.healthy()


# --- issue 17: model names stay inside the model folders ---------------------------------------------------------


def _outside_the_folders(secret: Path, models_dir: Path, random_connectors, places) -> tuple[dict, list[Path]]:
    """Valid models of each loader kind outside every model folder (copies), each file's access time set before its
    modification time, so that reading it (relatime) moves it."""
    paths = {
        "mllm_file": secret / "qwen.safetensors",
        "mllm_folder": secret / "qwen",
        "checkpoint": secret / "metacanvas.safetensors",
        "backbone": secret / "sana",
    }
    if not paths["checkpoint"].exists():
        shutil.copy(models_dir / "text_encoders" / MLLM_FILE, paths["mllm_file"])
        shutil.copytree(models_dir / "LLM" / "tiny-qwen2_5-vl", paths["mllm_folder"])
        shutil.copy(places["elsewhere"] / "metacanvas" / Path(random_connectors["wan"]).name, paths["checkpoint"])
        shutil.copytree(models_dir / "diffusers" / "tiny-sana", paths["backbone"])
    files = sorted(p for p in secret.rglob("*") if p.is_file())
    for path in files:
        os.utime(path, (0, max(path.stat().st_mtime, 1e9)))
    return paths, files


def _access_times(files: list[Path]) -> dict[Path, float]:
    return {p: p.stat().st_atime for p in files}  # a stat never moves an access time; a read does


def test_model_names_outside_the_folders_are_refused(server, editor, places, models_dir, random_connectors):
    """An absolute path and a deep '../' path to a valid model outside the folders, for each of the pack's loader
    kinds (the MLLM's file and folder, the connector checkpoint, the backbone folder): refused by POST /prompt at
    validation, naming the input; no file or folder there is read (their access times do not move)."""
    outside, files = _outside_the_folders(places["secret"], models_dir, random_connectors, places)
    before = _access_times(files)
    assert len(files) > 10 and all(t == 0 for t in before.values()), before
    t2v = latent_only(shipped(editor, "native_text_to_video"))
    t2i = json.loads(json.dumps(editor["text_to_image"]))
    cases = [
        (t2v, "MetaCanvasMLLMLoader", "mllm_folder", outside["mllm_file"]),
        (t2v, "MetaCanvasMLLMLoader", "mllm_folder", outside["mllm_folder"]),
        (t2v, "MetaCanvasConnectorLoader", "checkpoint", outside["checkpoint"]),
        (t2i, "MetaCanvasBackboneLoader", "backbone_folder", outside["backbone"]),
    ]
    for api, kind, name, path in cases:
        for given in (str(path), "../" * 24 + str(path).lstrip("/")):
            bad = json.loads(json.dumps(api))
            node = one(bad, kind)
            bad[node]["inputs"][name] = given
            message = _refusal(server, bad, node)
            assert f"(input {name})" in message and "is not a name inside a model folder" in message, message
            assert given in message, message
    assert _access_times(files) == before, "a file outside the model folders was read"
    _, history = server.http("GET", "/history")
    assert not any("secret" in json.dumps(entry["prompt"]) for entry in history.values()), "a refused prompt ran"


def test_symlinked_model_folders_keep_working(server, editor, places, models_dir, artifacts):
    """Folders inside models/LLM, models/diffusers and models/metacanvas that are symlinks to folders elsewhere (as
    ComfyUI allows): their models are listed and text_to_image (the pack's loaders) loads all three through them
    and saves its image. (The native graphs' random connectors are read through such a folder too.)"""
    elsewhere = places["elsewhere"]
    names = {
        "mllm_folder": f"{LINK}/tiny-qwen2_5-vl",
        "backbone_folder": f"{LINK}/tiny-sana",
        "checkpoint": f"{LINK}/tiny-sana-metacanvas.safetensors",
    }
    if not (elsewhere / "diffusers" / "tiny-sana").exists():
        shutil.copytree(models_dir / "LLM" / "tiny-qwen2_5-vl", elsewhere / "LLM" / "tiny-qwen2_5-vl")
        shutil.copytree(models_dir / "diffusers" / "tiny-sana", elsewhere / "diffusers" / "tiny-sana")
        shutil.copy(models_dir / "metacanvas" / "tiny-sana-metacanvas.safetensors", elsewhere / "metacanvas")
    api = json.loads(json.dumps(editor["text_to_image"]))
    for kind, name in (
        ("MetaCanvasMLLMLoader", "mllm_folder"),
        ("MetaCanvasBackboneLoader", "backbone_folder"),
        ("MetaCanvasConnectorLoader", "checkpoint"),
    ):
        _, info = server.http("GET", f"/object_info/{kind}")
        assert names[name] in info[kind]["input"]["required"][name][0], f"{kind} does not list {names[name]}"
        api[one(api, kind)]["inputs"][name] = names[name]
    api[one(api, "MetaCanvasPlan")]["inputs"].update(width=SIZE, height=SIZE)
    api[one(api, "MetaCanvasSampler")]["inputs"].update(width=SIZE, height=SIZE, steps=STEPS)
    save = one(api, "SaveImage")
    api[save]["inputs"]["filename_prefix"] = "symlinked"
    status, body = server.submit(api)
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", execution_errors(entry)
    (image,) = entry["outputs"][save]["images"]
    saved = load_saved(server.work / "output" / image["subfolder"], [image])
    assert saved.shape == (1, SIZE, SIZE, 3) and saved.std() > 0


def test_damaged_files_are_named(server, editor, places, models_dir):
    """A truncated .safetensors and a pickle renamed .safetensors in models/metacanvas, and a truncated MLLM file in
    models/LLM: refused at validation with the file's name and what to do."""
    folder = places["models"]
    whole = (models_dir / "metacanvas" / "tiny-sana-metacanvas.safetensors").read_bytes()
    (folder / "metacanvas" / "tiny-truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "metacanvas" / "tiny-pickle.safetensors").write_bytes(pickle.dumps({"weight": [0.0] * 8}))
    mllm = (models_dir / "text_encoders" / MLLM_FILE).read_bytes()
    (folder / "LLM" / "tiny-truncated-qwen.safetensors").write_bytes(mllm[: len(mllm) // 3])
    api = latent_only(shipped(editor, "native_text_to_video"))
    for kind, name, file in (
        ("MetaCanvasConnectorLoader", "checkpoint", "tiny-truncated.safetensors"),
        ("MetaCanvasConnectorLoader", "checkpoint", "tiny-pickle.safetensors"),
        ("MetaCanvasMLLMLoader", "mllm_folder", "tiny-truncated-qwen.safetensors"),
    ):
        bad = json.loads(json.dumps(api))
        node = one(bad, kind)
        bad[node]["inputs"][name] = file
        message = _refusal(server, bad, node)
        assert file in message and "is not a readable .safetensors file" in message, message
        assert "truncated" in message and "Download or copy it again" in message, message
