"""End to end in a real ComfyUI: every shipped workflow loads in the editor and runs on the server.

One editor session loads each workflow (served by ComfyUI's template endpoint) and an old-style saved
text_to_image, exports each as an API-format prompt; the prompts are pointed at the tiny models, shrunk (64×64 images,
128×128 × 5-frame videos, 2 steps), given small generated inputs (PNG images, a 9-frame mp4) and run; the saved
images and videos are checked (video frames counted with PyAV in the harness's Python). With "new (untrained)"
and native context each workflow's saved pixels equal, exactly, what diffusers' own pipeline (SanaPipeline,
WanPipeline, WanImageToVideoPipeline, FluxKontextPipeline) makes here for the same inputs. A timing test (-k timing
-s) compares the graph in ComfyUI with the same node calls made in-process (metacanvas_core/bench.py [3]).

Needs a prepared harness (../shared/comfyui-harness/setup.sh): set COMFYUI_HARNESS to its HARNESS_ROOT, with
this pack linked into ComfyUI/custom_nodes. The harness scripts are found in COMFYUI_HARNESS_SCRIPTS, else in
../shared/comfyui-harness beside this checkout. Tiny models go to a temporary folder that ComfyUI reads
through --extra-model-paths-config; output, input, temp and user folders are temporary too, so nothing is
left in the harness. Set COMFYUI_E2E_OUT to keep the editor screenshot and images somewhere.

    COMFYUI_HARNESS=/path/to/harness python -m pytest tests/test_comfyui_e2e.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.comfyui import HARNESS, SKIP_REASON, ComfyServer, cached, ids, load_saved, one
from support.graph import as_saved, run, run_in_process

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "text_to_image.json"
SHIPPED = sorted(
    p.stem for p in (ROOT / "workflows").glob("*.json") if not p.stem.startswith("native_")
)  # native: test_comfyui_native_e2e.py
OLD_STYLE = "old_text_to_image"
TINY_BACKBONES = {"Sana": "tiny-sana", "FLUX.1-Kontext": "tiny-flux-kontext", "Wan2.2": "tiny-wan2_2-ti2v"}
IMAGE_SIZE, VIDEO_SIZE, VIDEO_LENGTH = 64, 128, 5
INPUT_IMAGES = {"e2e_landscape.png": (80, 48), "e2e_square.png": (64, 64)}  # different sizes: Image Batch resizes
SAME_SIZE_PAIR = ("e2e_landscape.png", "e2e_landscape_b.png")  # Image Batch passes these through unchanged
INPUT_VIDEO, INPUT_VIDEO_FRAMES, INPUT_VIDEO_FPS = "e2e_source.mp4", 9, 16  # not 24: video editing keeps its rate
CORE_NODES = ["SaveImage", "SaveVideo", "LoadImage", "LoadVideo", "GetVideoComponents", "ImageFromBatch"]
PACK_NODES = [
    "MetaCanvasMLLMLoader",
    "MetaCanvasBackboneLoader",
    "MetaCanvasConnectorLoader",
    "MetaCanvasPlan",
    "MetaCanvasProject",
    "MetaCanvasSampler",
    "MetaCanvasDecode",
]
PLANNING = {"MetaCanvasMLLMLoader", "MetaCanvasBackboneLoader", "MetaCanvasConnectorLoader", "MetaCanvasPlan"}

pytestmark = pytest.mark.skipif(not HARNESS, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = os.environ.get("COMFYUI_E2E_OUT")
    path = Path(out) if out else tmp_path_factory.mktemp("comfyui_e2e_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """A real ComfyUI (start.sh) on a free port, reading the tiny models; killed at the end."""
    folders = {kind: models_dir / kind for kind in ("LLM", "text_encoders", "diffusers", "metacanvas")}
    server = ComfyServer.start(tmp_path_factory.mktemp("comfyui"), folders)
    try:
        _, object_info = server.http("GET", "/object_info")
        missing = [n for n in PACK_NODES if n not in object_info]
        assert not missing, f"the pack's nodes {missing} are not registered:\n{server.log_tail()}"
        yield server
    finally:
        server.stop()


def old_style(wf: dict) -> dict:
    """text_to_image as saved before the Backbone Loader's load_text_encoder, the Connector Loader's context, the
    Plan's image_role/keyframes and video socket, the Sampler's length and frame_rate, and the Decode's VIDEO output
    were appended (2, 1, 4 and 8 widget values)."""
    wf = json.loads(json.dumps(wf))
    for node in wf["nodes"]:
        if node["type"] == "MetaCanvasBackboneLoader":
            node["widgets_values"] = node["widgets_values"][:2]
        elif node["type"] == "MetaCanvasConnectorLoader":
            node["widgets_values"] = node["widgets_values"][:1]
        elif node["type"] == "MetaCanvasPlan":
            node["widgets_values"] = node["widgets_values"][:4]
            node["inputs"] = [i for i in node["inputs"] if i["name"] != "video"]
        elif node["type"] == "MetaCanvasSampler":
            node["widgets_values"] = node["widgets_values"][:8]
        elif node["type"] == "MetaCanvasDecode":
            node["outputs"] = node["outputs"][:1]
    return wf


@pytest.fixture(scope="module")
def editor(server, artifacts) -> dict[str, dict]:
    """Every shipped workflow (and the old-style text_to_image) loaded in the real editor, exported as API format.

    One browser session: text_to_image.json from disk first, then each workflow from the template endpoint, the
    old-style one, and text_to_image last (so the screenshot shows it)."""
    pack = server.template_pack(SHIPPED)
    sources = [[name, f"/api/workflow_templates/{pack}/{name}.json"] for name in SHIPPED if name != "text_to_image"]
    sources += [[OLD_STYLE, old_style(json.loads(WORKFLOW.read_text()))]]
    sources += [["text_to_image", f"/api/workflow_templates/{pack}/text_to_image.json"]]
    exported = server.load_in_editor(sources, artifacts, PACK_NODES + ["MetaCanvasEditGuidance"] + CORE_NODES, WORKFLOW)
    # The editor exports the same prompt whether the workflow comes from disk or from the template endpoint.
    assert json.loads((artifacts / "text_to_image_api.json").read_text()) == exported["text_to_image"]
    return exported


@pytest.fixture(scope="module")
def api_prompt(editor) -> dict:
    """text_to_image.json loaded in the real editor, exported as an API-format prompt."""
    return editor["text_to_image"]


@pytest.fixture(scope="module")
def inputs(server) -> Path:
    """Small input files in ComfyUI's (temporary) input folder: PNGs (two of different sizes, a third of the
    first's size), a 9-frame 16 fps mp4."""
    from PIL import Image

    folder = server.work / "input"
    for k, (name, (w, h)) in enumerate({**INPUT_IMAGES, SAME_SIZE_PAIR[1]: INPUT_IMAGES[SAME_SIZE_PAIR[0]]}.items()):
        pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    server.write_video(folder / INPUT_VIDEO, INPUT_VIDEO_FRAMES, VIDEO_SIZE, INPUT_VIDEO_FPS)
    video = server.probe_video(folder / INPUT_VIDEO)
    assert (video["frames"], video["fps"]) == (INPUT_VIDEO_FRAMES, INPUT_VIDEO_FPS), video
    return folder


def _is_video(api: dict) -> bool:
    return any(node["class_type"] == "SaveVideo" for node in api.values())


def tiny(api: dict, seed: int | None = None, width: int | None = None) -> dict:
    """The exported prompt pointed at the tiny models and the e2e inputs: images 64×64, videos 128×128 × 5 frames,
    2 steps. `width` overrides the Sampler's width only (to test its check)."""
    api = json.loads(json.dumps(api))
    size = VIDEO_SIZE if _is_video(api) else IMAGE_SIZE
    images = iter(INPUT_IMAGES)
    for nid in sorted(api, key=int):
        inputs, kind = api[nid]["inputs"], api[nid]["class_type"]
        if kind == "MetaCanvasMLLMLoader":  # the planner from ComfyUI's single-file layout, as the workflows name it
            inputs["mllm_folder"] = "tiny-qwen2_5-vl.safetensors"
        elif kind == "MetaCanvasBackboneLoader":
            real = inputs["backbone_folder"]
            tiny_name = next((t for prefix, t in TINY_BACKBONES.items() if real.startswith(prefix)), None)
            assert tiny_name, f"no tiny model stands in for backbone {real!r}"
            inputs["backbone_folder"] = tiny_name
        elif kind == "MetaCanvasPlan":
            inputs.update(width=size, height=size)
        elif kind == "MetaCanvasSampler":
            inputs.update(width=width or size, height=size, steps=2)
            if inputs.get("length", 1) > 1:
                inputs["length"] = VIDEO_LENGTH
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "LoadImage":
            inputs["image"] = next(images)
        elif kind == "LoadVideo":
            inputs["file"] = INPUT_VIDEO
        elif kind == "ImageFromBatch":  # the source frames the Sampler's length needs
            inputs["length"] = VIDEO_LENGTH
    return api


def test_editor_loads_the_workflow(api_prompt):
    kinds = sorted(node["class_type"] for node in api_prompt.values())
    assert kinds == sorted(
        PACK_NODES + ["SaveImage", "MetaCanvasPlanPreview", "PreviewImage"]
    )  # the Note is the editor's own, never sent
    sampler = api_prompt[next(iter(ids(api_prompt, {"MetaCanvasSampler"})))]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["scheduler"], sampler["use_canvas"]) == (
        20,
        4.5,
        "dpm_solver_flow",
        True,
    )


def test_workflow_makes_an_image(server, api_prompt, artifacts):
    from PIL import Image

    t0 = time.time()
    rc, report, entry = server.run_prompt(tiny(api_prompt), "first", artifacts / "first")
    assert rc == 0, report
    pngs = sorted((artifacts / "first").glob("*.png"))
    assert pngs, report
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    print(f"first run {time.time() - t0:.1f}s (server start {server.startup_s:.1f}s)")


def test_seed_change_reruns_only_the_sampler(server, api_prompt, artifacts):
    base = tiny(api_prompt, seed=1)
    rc, report, _ = server.run_prompt(base, "seed1", artifacts / "seed1")
    assert rc == 0, report
    rc, report, entry = server.run_prompt(tiny(api_prompt, seed=2), "seed2", artifacts / "seed2")
    assert rc == 0, report
    from_cache = cached(entry)
    print(f"seed change: cached {sorted(from_cache, key=int)} of {sorted(base, key=int)}")
    assert ids(base, PLANNING | {"MetaCanvasProject"}) <= from_cache, f"cached: {from_cache}\n{report}"
    assert not ids(base, {"MetaCanvasSampler", "MetaCanvasDecode", "SaveImage"}) & from_cache, f"cached: {from_cache}"
    (first,), (second,) = (list((artifacts / d).glob("MetaCanvas*.png")) for d in ("seed1", "seed2"))
    assert first.read_bytes() != second.read_bytes(), "a new seed gave the same image"


def test_bad_width_is_rejected_and_server_survives(server, api_prompt):
    status, body = server.http("POST", "/prompt", {"prompt": tiny(api_prompt, width=50), "client_id": "e2e"})
    assert status == 400, body
    sampler = next(iter(ids(api_prompt, {"MetaCanvasSampler"})))
    assert sampler in body["node_errors"], body
    messages = " ".join(f"{e.get('message')} {e.get('details')}" for e in body["node_errors"][sampler]["errors"])
    assert "width 50" in messages and "multiple of" in messages, messages
    print(f"width 50 rejected: {messages}")
    # A strength of NaN through the API passes ComfyUI's own min/max check (every comparison with NaN is false).
    bad = tiny(api_prompt)
    bad[sampler]["inputs"]["canvas_strength"] = "NaN"
    status, body = server.http("POST", "/prompt", {"prompt": bad, "client_id": "e2e"})
    assert status == 400 and sampler in body["node_errors"], body
    messages = " ".join(f"{e.get('message')} {e.get('details')}" for e in body["node_errors"][sampler]["errors"])
    assert "canvas_strength is nan, not a finite number" in messages, messages
    status, stats = server.http("GET", "/system_stats")
    assert status == 200 and stats["system"]["comfyui_version"]
    status, queue = server.http("GET", "/queue")
    assert status == 200 and queue["queue_running"] == [] and queue["queue_pending"] == []


def test_workflows_are_listed_as_templates(server):
    pack = server.template_pack(SHIPPED)
    for name in SHIPPED:
        status, served = server.http("GET", f"/api/workflow_templates/{pack}/{name}.json")
        assert status == 200 and served == json.loads((ROOT / "workflows" / f"{name}.json").read_text()), name


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "text_to_image"])
def test_workflow_runs(name, server, editor, inputs, artifacts):
    """The workflow as the editor exports it, on the tiny models: the saved image, or video with 5 frames."""
    wf = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = editor[name]
    sent = sorted(n["type"] for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote"))
    assert sorted(node["class_type"] for node in api.values()) == sent
    ui = {n["type"]: n["widgets_values"] for n in wf["nodes"]}
    plan, sampler = (api[one(api, k)]["inputs"] for k in ("MetaCanvasPlan", "MetaCanvasSampler"))
    assert [
        plan[k] for k in ("prompt", "negative_prompt", "width", "height", "image_role", "keyframes", "visual_tokens")
    ] == ui["MetaCanvasPlan"]
    names = (
        "seed",
        "steps",
        "cfg",
        "width",
        "height",
        "scheduler",
        "use_canvas",
        "length",
        "frame_rate",
        "canvas_strength",
    )
    values = [v for i, v in enumerate(ui["MetaCanvasSampler"]) if i != 1]
    linked = {k for k in names if isinstance(sampler[k], list)}  # a widget with a link: the link's value is sent
    assert [sampler[k] for k in names if k not in linked] == [
        v for k, v in zip(names, values, strict=True) if k not in linked
    ]
    frame_rate = INPUT_VIDEO_FPS if "frame_rate" in linked else sampler["frame_rate"]  # video_editing: the source's

    t0 = time.time()
    rc, report, entry = server.run_prompt(tiny(api), name, artifacts / name)
    assert rc == 0, report
    if _is_video(api):
        outputs = entry["outputs"][one(api, "SaveVideo")]
        (saved,) = outputs["images"]
        assert saved["filename"].endswith(".mp4") and outputs.get("animated") == [True], outputs
        video = server.probe_video(artifacts / name / saved["filename"])
        assert video["frames"] == VIDEO_LENGTH, video
        assert video["size"] == [VIDEO_SIZE, VIDEO_SIZE] and video["fps"] == frame_rate, video
        result = video
    else:
        from PIL import Image

        (saved,) = entry["outputs"][one(api, "SaveImage")]["images"]
        with Image.open(artifacts / name / saved["filename"]) as im:
            assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
            result = {"size": im.size}
    print(f"{name}: {time.time() - t0:.1f}s, {saved['filename']} {result}")


def test_old_saved_workflow_loads_and_runs(server, editor, artifacts):
    """Saved-workflow compatibility: a text_to_image saved before the Plan's image_role/keyframes and the Sampler's
    length/frame_rate were appended loads with their defaults and makes the image today's file makes."""
    import numpy as np
    from PIL import Image

    old, new = editor[OLD_STYLE], editor["text_to_image"]
    plan, sampler = (old[one(old, k)]["inputs"] for k in ("MetaCanvasPlan", "MetaCanvasSampler"))
    assert (plan["image_role"], plan["keyframes"], sampler["length"], sampler["frame_rate"]) == ("references", 0, 1, 24)
    backbone, connector = (
        old[one(old, k)]["inputs"] for k in ("MetaCanvasBackboneLoader", "MetaCanvasConnectorLoader")
    )
    assert (backbone.get("load_text_encoder", True), connector.get("context", "auto")) == (True, "auto")
    assert old == new
    rc, report, _ = server.run_prompt(tiny(new), "new_style", artifacts / "new_style")
    assert rc == 0, report
    # Empty ComfyUI's output cache (the worker does it once idle), so the old-style prompt really runs.
    status, body = server.http("POST", "/free", {"free_memory": True})
    assert status == 200, body
    time.sleep(1.0)
    rc, report, entry = server.run_prompt(tiny(old), OLD_STYLE, artifacts / OLD_STYLE)
    assert rc == 0, report
    assert cached(entry) == set(), f"the old-style prompt came from the cache:\n{report}"
    (new_png,), (old_png,) = (list((artifacts / d).glob("MetaCanvas*.png")) for d in ("new_style", OLD_STYLE))
    with Image.open(new_png) as a, Image.open(old_png) as b:
        assert a.size == b.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert np.array_equal(np.asarray(a), np.asarray(b)), "the old-style workflow made a different image"


# --- Untrained + native context = the backbone itself, in a real ComfyUI ------------------------------------------
#
# Each workflow with checkpoint "new (untrained)" and context "auto" (native: the Backbone Loader loads the text
# encoder) must save exactly what diffusers' own pipeline makes for the same prompt, negative prompt, seed, steps,
# guidance, scheduler, size and input image. The pipeline runs here, in the pytest process, on the same tiny folders;
# its decoded float image is turned into uint8 the way ComfyUI's SaveImage does it (nodes.py:
# `np.clip(255. * i.cpu().numpy(), 0, 255).astype(np.uint8)`) and compared with the saved PNG, array for array.
# SaveVideo is lossy (h264), so video workflows get an extra core SaveImage on MetaCanvas Decode's IMAGE output
# (the frames) and those PNGs are compared.


FRAMES_NODE = "9001"  # the extra SaveImage on Decode's IMAGE output of video workflows


def native_prompt(name: str, editor: dict) -> dict:
    """The workflow as exported, on the tiny models, as shipped: "new (untrained)", context auto, text encoder
    loaded (asserted); Edit Guidance's image_cfg 1 (the pipelines have no image guidance); in_context_video's
    two references of one size; SaveImage prefixes of its own (so nothing comes from ComfyUI's cache); video
    workflows also save Decode's frames as PNGs."""
    api = tiny(editor[name])
    connector = api[one(api, "MetaCanvasConnectorLoader")]["inputs"]
    assert (connector["checkpoint"], connector.get("context", "auto")) == ("new (untrained)", "auto"), connector
    assert api[one(api, "MetaCanvasBackboneLoader")]["inputs"].get("load_text_encoder", True) is True
    for nid in ids(api, {"MetaCanvasEditGuidance"}):
        api[nid]["inputs"]["image_cfg"] = 1.0
    if name == "in_context_video":
        for nid, image in zip(sorted(ids(api, {"LoadImage"}), key=int), SAME_SIZE_PAIR, strict=True):
            api[nid]["inputs"]["image"] = image
    for nid in ids(api, {"SaveImage", "SaveVideo"}):
        api[nid]["inputs"]["filename_prefix"] = f"native_{name}"
    if _is_video(api):
        api[FRAMES_NODE] = {
            "class_type": "SaveImage",
            "inputs": {"images": [one(api, "MetaCanvasDecode"), 0], "filename_prefix": f"native_{name}_frames"},
        }
    return api


@pytest.fixture(scope="module")
def native_backbones(models_dir) -> dict:
    from metacanvas_core.backbones import load_backbone

    cache = {}

    def get(folder: str):
        if folder not in cache:
            cache[folder] = load_backbone(models_dir / "diffusers" / folder)
        return cache[folder]

    return get


def pipeline_frames(api: dict, backbone, input_dir: Path, task: str) -> torch.Tensor:
    """What diffusers' own pipeline makes for this prompt: (N, H, W, 3) float in 0..1 (output_type "pt").
    task: t2i (SanaPipeline), t2v (WanPipeline), i2v (WanImageToVideoPipeline), edit (FluxKontextPipeline)."""
    from diffusers import FluxKontextPipeline, SanaPipeline, WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    plan = api[one(api, "MetaCanvasPlan")]["inputs"]
    s = api[one(api, "MetaCanvasSampler")]["inputs"]
    scheduler = backbone.make_scheduler(s["scheduler"])  # the one the workflow's Sampler names
    call = dict(
        prompt=plan["prompt"],
        negative_prompt=plan["negative_prompt"],
        num_inference_steps=s["steps"],
        height=s["height"],
        width=s["width"],
        generator=torch.Generator("cpu").manual_seed(s["seed"]),
        output_type="pt",
    )
    images = [input_dir / api[nid]["inputs"]["image"] for nid in sorted(ids(api, {"LoadImage"}), key=int)]
    if task == "t2i":
        pipe = SanaPipeline(
            tokenizer=backbone.pipeline.tokenizer,
            text_encoder=backbone.text_encoder,
            vae=backbone.vae,
            transformer=backbone.transformer,
            scheduler=scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(**call, guidance_scale=s["cfg"], use_resolution_binning=False).images.permute(0, 2, 3, 1)
    if task in ("t2v", "i2v"):
        parts = dict(
            tokenizer=backbone.pipeline.tokenizer,
            text_encoder=backbone.text_encoder,
            vae=backbone.vae,
            transformer=backbone.transformer,
            scheduler=scheduler,
            expand_timesteps=True,
        )
        call.update(num_frames=s["length"], guidance_scale=s["cfg"])
        if task == "t2v":
            pipe = WanPipeline(**parts)
        else:  # the same PIL image: both the pipeline and our Wan adapter resize it with VideoProcessor.preprocess
            pipe = WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts)
            (path,) = images
            call["image"] = Image.open(path).convert("RGB")
        pipe.set_progress_bar_config(disable=True)
        (frames,) = pipe(**call).frames  # (F, 3, H, W)
        return frames.permute(0, 2, 3, 1)
    assert task == "edit", task
    from metacanvas_core.backbones.flux import reference_size

    guidance = api[one(api, "MetaCanvasEditGuidance")]["inputs"]
    assert guidance["image_cfg"] == 1.0
    (path,) = images
    image = Image.open(path).convert("RGB")
    # With _auto_resize=False the pipeline encodes the image at its own size floored to multiples of 16; our
    # REFERENCE_RULE picks that same size for these inputs (asserted), so both see the same reference pixels.
    stride = backbone.pixel_stride
    rule = reference_size(image.width, image.height, s["height"], s["width"], stride)
    assert rule == (image.height // stride * stride, image.width // stride * stride), (rule, image.size)
    p = backbone.pipeline
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=backbone.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        text_encoder_2=p.text_encoder_2,
        tokenizer_2=p.tokenizer_2,
        transformer=backbone.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        **call,
        image=image,
        true_cfg_scale=s["cfg"],  # <= 1: no true CFG, as our Sampler's cfg <= 1 drops the text term's null branch
        guidance_scale=guidance["guidance"],
        max_area=s["height"] * s["width"],
        _auto_resize=False,
    )
    return out.images.permute(0, 2, 3, 1)


NATIVE_TASKS = {
    "text_to_image": "t2i",
    "text_to_video": "t2v",
    "video_editing": "t2v",  # untrained: the source reaches the DiT only through the zero condition embedding
    "image_to_video": "i2v",
    "image_editing": "edit",
    "in_context_video": "t2v",  # compared below: NOT equal (the references are frames in the DiT's sequence)
}


@pytest.mark.parametrize("name", SHIPPED)
def test_untrained_native_is_the_backbone(name, server, editor, inputs, artifacts, native_backbones, pack):
    """ "new (untrained)" + context auto in the real ComfyUI saves exactly the diffusers pipeline's output.

    video_editing: an untrained checkpoint's condition embedding is exactly zero, so the source video changes
    nothing and the output is plain WanPipeline text-to-video of the instruction. in_context_video: its reference
    images are clean latent frames placed before the video in the DiT's sequence (timestep 0), which the Wan
    self-attention sees even untrained; no diffusers pipeline does that, so the saved frames are compared exactly
    with the same node functions called in this process, and shown to differ from plain text-to-video."""
    assert set(NATIVE_TASKS) == set(SHIPPED)
    api = native_prompt(name, editor)
    t0 = time.time()
    rc, report, entry = server.run_prompt(api, f"native_{name}", artifacts / f"native_{name}")
    assert rc == 0, report
    comfy_s = time.time() - t0
    save = FRAMES_NODE if _is_video(api) else one(api, "SaveImage")
    saved = load_saved(artifacts / f"native_{name}", entry["outputs"][save]["images"])
    s = api[one(api, "MetaCanvasSampler")]["inputs"]
    assert saved.shape == (s["length"], s["height"], s["width"], 3) and saved.std() > 0, saved.shape

    backbone = native_backbones(api[one(api, "MetaCanvasBackboneLoader")]["inputs"]["backbone_folder"])
    t0 = time.time()
    reference = as_saved(pipeline_frames(api, backbone, inputs, NATIVE_TASKS[name]))
    pipe_s = time.time() - t0
    assert reference.shape == saved.shape
    if name == "in_context_video":
        ours = run_in_process(pack, api, inputs)[one(api, "MetaCanvasDecode")][0]
        assert np.array_equal(saved, as_saved(ours)), "ComfyUI and the in-process node chain differ"
        assert not np.array_equal(saved, reference), "the reference frames changed nothing"
        print(f"{name}: ComfyUI == in-process nodes ({comfy_s:.1f}s); != plain WanPipeline T2V (references)")
        return
    diff = np.abs(saved.astype(int) - reference.astype(int))
    assert diff.max() == 0, f"{name}: {int((diff > 0).sum())} of {diff.size} values differ, by up to {diff.max()}"
    print(
        f"{name}: == {type(backbone).__name__} pipeline ({NATIVE_TASKS[name]}), ComfyUI {comfy_s:.1f}s, pipeline {pipe_s:.1f}s"
    )


# --- A checkpoint trained from the CLI, used by a workflow in the real ComfyUI (issue 5) --------------------------

TRAINED_NAME = "tiny-sana-t2i.safetensors"  # the recipe's name + .safetensors (docs/TRAINING.md)


def test_trained_checkpoint_changes_the_image(server, api_prompt, models_dir, artifacts, tmp_path):
    """python -m metacanvas_core.train tiny_sana_t2i for 3 steps, as a user runs it, against the e2e models' tiny
    Qwen and SANA (--set mllm/backbone); its checkpoint copied to models/metacanvas/ appears in the Connector
    Loader's list (object_info is computed again on each request), and text_to_image with it saves an image that
    is not the "new (untrained)" one (same seed, prompt, sizes, 2 steps). The Sampler's dial as an artist sets it:
    canvas_strength 0, and an all-zero mask from a core Solid Mask, give the untrained image exactly; an all-one
    mask gives the trained one exactly."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "metacanvas_core.train", "tiny_sana_t2i", "--output-dir", str(out)]
    cmd += ["--max-steps", "3"]
    cmd += ["--set", f"mllm={json.dumps(str(models_dir / 'LLM' / 'tiny-qwen2_5-vl'))}"]
    cmd += ["--set", f"backbone={json.dumps(str(models_dir / 'diffusers' / 'tiny-sana'))}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    train_s = time.time() - t0
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    trained = out / TRAINED_NAME
    assert trained.is_file(), sorted(p.name for p in out.iterdir())
    assert "trained 3 steps" in res.stdout + res.stderr
    assert not (out / "tiny-models").exists(), "the recipe wrote its own tiny models instead of the e2e ones"

    target = models_dir / "metacanvas" / TRAINED_NAME
    assert not target.exists()
    shutil.copy(trained, target)
    try:
        status, info = server.http("GET", "/object_info/MetaCanvasConnectorLoader")
        assert status == 200, info
        choices = info["MetaCanvasConnectorLoader"]["input"]["required"]["checkpoint"][0]
        assert TRAINED_NAME in choices and "new (untrained)" in choices, choices

        images = {}
        runs = {
            "untrained": ("new (untrained)", 1.0, None),
            "trained": (TRAINED_NAME, 1.0, None),
            "strength_0": (TRAINED_NAME, 0.0, None),
            "zero_mask": (TRAINED_NAME, 1.0, 0.0),
            "one_mask": (TRAINED_NAME, 1.0, 1.0),
        }
        for label, (checkpoint, strength, mask) in runs.items():
            api = tiny(api_prompt, seed=7)
            api[one(api, "MetaCanvasConnectorLoader")]["inputs"]["checkpoint"] = checkpoint
            sampler = api[one(api, "MetaCanvasSampler")]["inputs"]
            assert sampler["use_canvas"] is True
            sampler["canvas_strength"] = strength
            if mask is not None:
                solid = {"value": mask, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
                api["9003"] = {"class_type": "SolidMask", "inputs": solid}  # a core node's MASK
                sampler["canvas_mask"] = ["9003", 0]
            save = one(api, "SaveImage")
            api[save]["inputs"]["filename_prefix"] = f"ckpt_{label}"
            rc, report, entry = server.run_prompt(api, f"ckpt_{label}", artifacts / f"ckpt_{label}")
            assert rc == 0, report
            images[label] = load_saved(artifacts / f"ckpt_{label}", entry["outputs"][save]["images"])
            assert images[label].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3), images[label].shape
    finally:
        target.unlink()
    assert images["trained"].std() > 0, "the trained checkpoint's image is one constant colour"
    diff = np.abs(images["trained"].astype(int) - images["untrained"].astype(int))
    assert diff.max() > 0, "the trained checkpoint made the same image as the untrained connector"
    assert np.array_equal(images["strength_0"], images["untrained"]), "strength 0 is not the plain image"
    assert np.array_equal(images["zero_mask"], images["untrained"]), "an all-zero mask is not the plain image"
    assert np.array_equal(images["one_mask"], images["trained"]), "an all-one mask changed the canvas"
    print(
        f"trained 3 steps in {train_s:.1f}s; trained vs untrained image: {int((diff > 0).sum())} of {diff.size} "
        f"values differ, mean |diff| {diff.mean():.2f}, max {diff.max()}"
    )


# --- Timing: the whole graph in ComfyUI vs the same core calls in-process (metacanvas_core/bench.py [3]) -----------

TIMING_RUNS = 5


def test_timing_comfyui_vs_in_process(server, api_prompt, inputs, pack):
    """text_to_image on the tiny models, TIMING_RUNS times with only the seed changing (the plan stays cached,
    as when an artist tries seeds): wall time from POST /prompt to the finished /history entry, against the
    MetaCanvas Sampler + Decode node functions called in this process on the same inputs (same torch thread
    count as the server). The two alternate seed by seed, so load from other processes hits both alike. Prints
    the figures (python -m pytest tests/test_comfyui_e2e.py -k timing -s); asserts nothing about speed, only
    that both make the same images."""
    warm = tiny(api_prompt, seed=99)
    server.queue_and_wait(warm)  # loaders and plan now cached in the server
    done = run_in_process(pack, warm, inputs)  # and here: loaders, plan, projection (and a warm-up sample)
    nodes = pack.NODE_CLASS_MAPPINGS
    sampler_id, decode_id = one(warm, "MetaCanvasSampler"), one(warm, "MetaCanvasDecode")
    resolve = {k: (done[v[0]][v[1]] if isinstance(v, list) else v) for k, v in warm[sampler_id]["inputs"].items()}
    backbone = done[warm[decode_id]["inputs"]["backbone"][0]][0]
    comfy, direct = [], []
    for seed in [100 + k for k in range(TIMING_RUNS)]:
        api = tiny(api_prompt, seed=seed)
        elapsed, entry = server.queue_and_wait(api)
        assert ids(api, PLANNING | {"MetaCanvasProject"}) <= cached(entry), "the plan was not cached"
        comfy.append(elapsed)
        (image,) = entry["outputs"][one(api, "SaveImage")]["images"]
        saved = load_saved(server.work / "output" / image.get("subfolder", ""), [image])

        t0 = time.perf_counter()
        (latent,) = run(nodes["MetaCanvasSampler"], **{**resolve, "seed": seed})
        frames, _ = run(nodes["MetaCanvasDecode"], backbone=backbone, latent=latent)
        direct.append(time.perf_counter() - t0)
        assert np.array_equal(as_saved(frames), saved), f"seed {seed}: ComfyUI and in-process differ"

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    s = warm[sampler_id]["inputs"]
    print(
        f"\ntiming, text_to_image on the tiny models ({s['width']}x{s['height']}, {s['steps']} steps, "
        f"{s['scheduler']}, cfg {s['cfg']}), {TIMING_RUNS} seeds, plan cached, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:"
    )
    print("  ComfyUI, POST /prompt -> /history done (s): " + " ".join(f"{t:.3f}" for t in comfy))
    print("  in-process Sampler + Decode nodes (s):      " + " ".join(f"{t:.3f}" for t in direct))
    print(
        f"  median ComfyUI {med(comfy):.3f} s, in-process {med(direct):.3f} s, ratio {med(comfy) / med(direct):.2f} "
        "(ComfyUI adds queueing, validation, cache lookup, SaveImage's PNG write and /history polling)"
    )
