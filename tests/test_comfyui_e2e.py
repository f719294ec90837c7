"""End to end in a real ComfyUI: the pack's own workflow (text_to_image: SANA, which ComfyUI has no loader for) loads in
the editor and runs on the server; graphs saved with the pack's former Wan2.2/FLUX-Kontext workflows are refused.

One editor session loads text_to_image (from disk, and served by ComfyUI's template endpoint), an old-style saved
text_to_image and an old-style FLUX-Kontext graph (the pack's former image_editing: Backbone Loader naming
FLUX.1-Kontext-dev, the deprecated Edit Guidance between Project and Sampler), exports each as an API-format prompt;
the prompts are pointed at the tiny models, shrunk (64x64 images, 2 steps) and run; the saved images are checked.
With "new (untrained)" and native context the saved pixels equal, exactly, what diffusers' own SanaPipeline makes here
for the same inputs. Wan2.2 and FLUX-Kontext run in ComfyUI only as the native patch: tests/test_comfyui_native_e2e.py
runs the native_* workflows. A timing test (-k timing -s) compares the graph in ComfyUI with the same node calls made
in-process (metacanvas_core/bench.py [3]).

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
from support.comfyui import (
    HARNESS,
    SKIP_REASON,
    ComfyServer,
    cached,
    execution_errors,
    ids,
    load_saved,
    one,
    validation_messages,
)
from support.graph import as_saved, run, run_in_process

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "text_to_image.json"
SHIPPED = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
PACK_WORKFLOWS = [name for name in SHIPPED if not name.startswith("native_")]  # native: test_comfyui_native_e2e.py
OLD_STYLE, OLD_FLUX = "old_text_to_image", "old_pack_image_editing"
TINY_BACKBONES = {"Sana": "tiny-sana"}
IMAGE_SIZE = 64
CORE_NODES = ["SaveImage", "PreviewImage"]
PACK_NODES = [
    "MetaCanvasMLLMLoader",
    "MetaCanvasBackboneLoader",
    "MetaCanvasConnectorLoader",
    "MetaCanvasPlan",
    "MetaCanvasProject",
    "MetaCanvasSampler",
    "MetaCanvasDecode",
]
DEPRECATED = "MetaCanvasEditGuidance"  # still registered, so old graphs load; running it stops with its replacement
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
        missing = [n for n in [*PACK_NODES, DEPRECATED] if n not in object_info]
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


def old_pack_image_editing(wf: dict) -> dict:
    """A graph saved with the pack's former image_editing workflow, as far as this test needs it: text_to_image's
    chain with the Backbone Loader naming FLUX.1-Kontext-dev and the now deprecated Edit Guidance (2.5, 1.5) between
    Project and Sampler, wired as that workflow had it."""
    wf = json.loads(json.dumps(wf))
    nodes = {n["type"]: n for n in wf["nodes"]}
    nodes["MetaCanvasBackboneLoader"]["widgets_values"][0] = "FLUX.1-Kontext-dev"
    project, sampler = nodes["MetaCanvasProject"], nodes["MetaCanvasSampler"]
    (cond_link,) = project["outputs"][0]["links"]  # Project -> Sampler.cond becomes Project -> Edit Guidance.cond
    guidance_id, out_link = wf["last_node_id"] + 1, wf["last_link_id"] + 1
    link = next(link for link in wf["links"] if link[0] == cond_link)
    link[3], link[4] = guidance_id, 0
    wf["links"].append([out_link, guidance_id, 0, sampler["id"], 1, "METACANVAS_COND"])
    next(i for i in sampler["inputs"] if i["name"] == "cond")["link"] = out_link
    wf["nodes"].append(
        {
            "id": guidance_id,
            "type": DEPRECATED,
            "pos": [project["pos"][0], project["pos"][1] + 130],
            "size": [250, 82],
            "flags": {},
            "order": project["order"],
            "mode": 0,
            "inputs": [{"name": "cond", "type": "METACANVAS_COND", "link": cond_link}],
            "outputs": [{"name": "cond", "type": "METACANVAS_COND", "links": [out_link], "slot_index": 0}],
            "properties": {**project["properties"], "Node name for S&R": DEPRECATED},
            "widgets_values": [2.5, 1.5],
        }
    )
    wf["last_node_id"], wf["last_link_id"] = guidance_id, out_link
    return wf


@pytest.fixture(scope="module")
def editor(server, artifacts) -> dict[str, dict]:
    """text_to_image and the old graphs loaded in the real editor, exported as API format.

    One browser session: text_to_image.json from disk first, then the old-style text_to_image, the old pack FLUX
    graph, and text_to_image from the template endpoint last (so the screenshot shows it)."""
    pack = server.template_pack(PACK_WORKFLOWS)
    text_to_image = json.loads(WORKFLOW.read_text())
    sources = [[OLD_STYLE, old_style(text_to_image)], [OLD_FLUX, old_pack_image_editing(text_to_image)]]
    sources += [["text_to_image", f"/api/workflow_templates/{pack}/text_to_image.json"]]
    exported = server.load_in_editor(sources, artifacts, [*PACK_NODES, DEPRECATED, *CORE_NODES], WORKFLOW)
    # The editor exports the same prompt whether the workflow comes from disk or from the template endpoint.
    assert json.loads((artifacts / "text_to_image_api.json").read_text()) == exported["text_to_image"]
    return exported


@pytest.fixture(scope="module")
def api_prompt(editor) -> dict:
    """text_to_image.json loaded in the real editor, exported as an API-format prompt."""
    return editor["text_to_image"]


def tiny(api: dict, seed: int | None = None, width: int | None = None, backbone: str | None = None) -> dict:
    """The exported prompt pointed at the tiny models: 64x64 images, 2 steps. `width` overrides the Sampler's width
    only (to test its check); `backbone` names the Backbone Loader's folder (else the tiny SANA)."""
    api = json.loads(json.dumps(api))
    for nid in sorted(api, key=int):
        inputs, kind = api[nid]["inputs"], api[nid]["class_type"]
        if kind == "MetaCanvasMLLMLoader":  # the planner from ComfyUI's single-file layout, as the workflows name it
            inputs["mllm_folder"] = "tiny-qwen2_5-vl.safetensors"
        elif kind == "MetaCanvasBackboneLoader":
            real = inputs["backbone_folder"]
            tiny_name = backbone or next((t for prefix, t in TINY_BACKBONES.items() if real.startswith(prefix)), None)
            assert tiny_name, f"no tiny model stands in for backbone {real!r}"
            inputs["backbone_folder"] = tiny_name
        elif kind == "MetaCanvasPlan":
            inputs.update(width=IMAGE_SIZE, height=IMAGE_SIZE)
        elif kind == "MetaCanvasSampler":
            inputs.update(width=width or IMAGE_SIZE, height=IMAGE_SIZE, steps=2)
            if seed is not None:
                inputs["seed"] = seed
    return api


def test_the_pack_ships_one_own_workflow():
    """Wan2.2 and FLUX-Kontext run in ComfyUI only as the native patch: the pack's own loader and sampler serve
    SANA, in text_to_image alone; the five native_* graphs are the other shipped workflows."""
    assert PACK_WORKFLOWS == ["text_to_image"]
    assert len(SHIPPED) == 6


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
    # Every widget value the file holds reaches the prompt (the seed's control_after_generate is the editor's).
    ui = {n["type"]: n["widgets_values"] for n in json.loads(WORKFLOW.read_text())["nodes"]}
    plan = api_prompt[one(api_prompt, "MetaCanvasPlan")]["inputs"]
    names = ("prompt", "negative_prompt", "width", "height", "image_role", "keyframes", "visual_tokens")
    assert [plan[k] for k in names] == ui["MetaCanvasPlan"]
    names = ("seed", "steps", "cfg", "width", "height", "scheduler", "use_canvas", "length", "frame_rate")
    names += ("canvas_strength",)
    assert [sampler[k] for k in names] == [v for i, v in enumerate(ui["MetaCanvasSampler"]) if i != 1]
    backbone = api_prompt[one(api_prompt, "MetaCanvasBackboneLoader")]["inputs"]
    assert [backbone[k] for k in ("backbone_folder", "dtype", "load_text_encoder")] == ui["MetaCanvasBackboneLoader"]


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


# A Backbone Loader folder of a graph saved with the pack's former Wan2.2/FLUX-Kontext workflows -> (the model the
# message names, the native template it names): the tiny folders are installed here, the real names (as the former
# text_to_video.json and image_editing.json held them) are not.
OLD_BACKBONES = {
    "tiny-wan2_2-ti2v": ("Wan2.2", "native_text_to_video"),
    "Wan2.2-TI2V-5B-Diffusers": ("Wan2.2", "native_text_to_video"),
    "tiny-flux-kontext": ("FLUX.1-Kontext", "native_image_editing"),
    "FLUX.1-Kontext-dev": ("FLUX.1-Kontext", "native_image_editing"),
}


def test_old_wan_and_flux_graphs_are_refused_and_server_survives(server, editor):
    """A graph saved with the pack's former Wan2.2 or FLUX-Kontext workflows: the Backbone Loader's list offers only
    SANA folders, and POST /prompt refuses the saved folder at validation with the loader's one message, naming the
    folder and the native template that replaces it (core Load Diffusion Model + MetaCanvas Apply). The old FLUX
    graph, deprecated Edit Guidance included, loads in the real editor (no unknown node). Nothing is queued and the
    server stays up."""
    status, info = server.http("GET", "/object_info/MetaCanvasBackboneLoader")
    assert status == 200, info
    choices = info["MetaCanvasBackboneLoader"]["input"]["required"]["backbone_folder"][0]
    assert "tiny-sana" in choices and not set(OLD_BACKBONES) & set(choices), choices
    old_flux = editor[OLD_FLUX]
    assert old_flux[one(old_flux, "MetaCanvasBackboneLoader")]["inputs"]["backbone_folder"] == "FLUX.1-Kontext-dev"
    guidance = old_flux[one(old_flux, DEPRECATED)]["inputs"]
    assert (guidance["guidance"], guidance["image_cfg"], guidance["cond"][0]) == (
        2.5,
        1.5,
        one(old_flux, "MetaCanvasProject"),
    )
    for folder, (model, template) in OLD_BACKBONES.items():
        graph = old_flux if model == "FLUX.1-Kontext" else editor["text_to_image"]
        api = tiny(graph, backbone=folder)
        if model == "Wan2.2":  # as the former text_to_video saved its Sampler: 121 frames
            api[one(api, "MetaCanvasSampler")]["inputs"]["length"] = 121
        loader = one(api, "MetaCanvasBackboneLoader")
        status, body = server.submit(api)
        assert status == 400, body
        message = validation_messages(body, loader)
        assert f"Backbone folder '{folder}' is {model}: the MetaCanvas Backbone Loader loads SANA only" in message
        assert "(input backbone_folder)" in message and template in message and "MetaCanvas Apply" in message
        print(f"{folder}: {message}")
    server.healthy()


def test_deprecated_edit_guidance_stops_the_run_naming_its_replacement(server, editor, api_prompt, artifacts):
    """The old FLUX graph on the tiny SANA passes validation (Edit Guidance keeps its inputs), and running it stops at
    the deprecated Edit Guidance with the message naming what replaces it in native_image_editing; the server then
    runs text_to_image as before."""
    api = tiny(editor[OLD_FLUX], backbone="tiny-sana", seed=11)
    status, body = server.submit(api)
    assert status == 200, body
    entry = server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = execution_errors(entry)
    assert error["node_type"] == DEPRECATED, error
    for needle in ("Edit Guidance is deprecated", "native_image_editing", "FluxGuidance", "DualCFGGuider"):
        assert needle in error["exception_message"], error["exception_message"]
    print(f"{DEPRECATED}: {error['exception_type']}: {error['exception_message']}")
    server.healthy()
    rc, report, _ = server.run_prompt(tiny(api_prompt, seed=11), "after_deprecated", artifacts / "after_deprecated")
    assert rc == 0, report


def test_workflows_are_listed_as_templates(server):
    """The template browser lists the shipped workflows (the pack's former Wan/FLUX ones are gone) and serves each
    as it is on disk."""
    pack = server.template_pack(SHIPPED)
    status, templates = server.http("GET", "/api/workflow_templates")
    assert status == 200 and sorted(templates[pack]) == SHIPPED, templates[pack]
    for name in SHIPPED:
        status, served = server.http("GET", f"/api/workflow_templates/{pack}/{name}.json")
        assert status == 200 and served == json.loads((ROOT / "workflows" / f"{name}.json").read_text()), name


def test_old_saved_workflow_loads_and_runs(server, editor, artifacts):
    """Saved-workflow compatibility: a text_to_image saved before the Plan's image_role/keyframes and the Sampler's
    length/frame_rate were appended loads with their defaults and makes the image today's file makes."""
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
# text_to_image with checkpoint "new (untrained)" and context "auto" (native: the Backbone Loader loads the text
# encoder) must save exactly what diffusers' own SanaPipeline makes for the same prompt, negative prompt, seed, steps,
# guidance, scheduler and size. The pipeline runs here, in the pytest process, on the same tiny folder; its decoded
# float image is turned into uint8 the way ComfyUI's SaveImage does it (nodes.py:
# `np.clip(255. * i.cpu().numpy(), 0, 255).astype(np.uint8)`) and compared with the saved PNG, array for array.
# (The native Wan2.2/FLUX-Kontext graphs: tests/test_comfyui_native_e2e.py, against the plain native graph.)


def native_prompt(editor: dict) -> dict:
    """text_to_image as exported, on the tiny models, as shipped: "new (untrained)", context auto, text encoder
    loaded (asserted); a SaveImage prefix of its own (so nothing comes from ComfyUI's cache)."""
    api = tiny(editor["text_to_image"])
    connector = api[one(api, "MetaCanvasConnectorLoader")]["inputs"]
    assert (connector["checkpoint"], connector.get("context", "auto")) == ("new (untrained)", "auto"), connector
    assert api[one(api, "MetaCanvasBackboneLoader")]["inputs"].get("load_text_encoder", True) is True
    for nid in ids(api, {"SaveImage"}):
        api[nid]["inputs"]["filename_prefix"] = "native_text_to_image"
    return api


def pipeline_frames(api: dict, backbone) -> torch.Tensor:
    """What diffusers' own SanaPipeline makes for this prompt: (N, H, W, 3) float in 0..1 (output_type "pt")."""
    from diffusers import SanaPipeline

    plan = api[one(api, "MetaCanvasPlan")]["inputs"]
    s = api[one(api, "MetaCanvasSampler")]["inputs"]
    pipe = SanaPipeline(
        tokenizer=backbone.pipeline.tokenizer,
        text_encoder=backbone.text_encoder,
        vae=backbone.vae,
        transformer=backbone.transformer,
        scheduler=backbone.make_scheduler(s["scheduler"]),  # the one the workflow's Sampler names
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=plan["prompt"],
        negative_prompt=plan["negative_prompt"],
        num_inference_steps=s["steps"],
        height=s["height"],
        width=s["width"],
        generator=torch.Generator("cpu").manual_seed(s["seed"]),
        output_type="pt",
        guidance_scale=s["cfg"],
        use_resolution_binning=False,
    )
    return out.images.permute(0, 2, 3, 1)


def test_untrained_native_is_the_backbone(server, editor, artifacts, models_dir):
    """ "new (untrained)" + context auto in the real ComfyUI saves exactly SanaPipeline's output."""
    from metacanvas_core.backbones import load_backbone

    api = native_prompt(editor)
    t0 = time.time()
    rc, report, entry = server.run_prompt(api, "native_text_to_image", artifacts / "native_text_to_image")
    assert rc == 0, report
    comfy_s = time.time() - t0
    saved = load_saved(artifacts / "native_text_to_image", entry["outputs"][one(api, "SaveImage")]["images"])
    s = api[one(api, "MetaCanvasSampler")]["inputs"]
    assert saved.shape == (1, s["height"], s["width"], 3) and saved.std() > 0, saved.shape

    folder = api[one(api, "MetaCanvasBackboneLoader")]["inputs"]["backbone_folder"]
    backbone = load_backbone(models_dir / "diffusers" / folder)
    t0 = time.time()
    reference = as_saved(pipeline_frames(api, backbone))
    pipe_s = time.time() - t0
    assert reference.shape == saved.shape
    diff = np.abs(saved.astype(int) - reference.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} of {diff.size} values differ, by up to {diff.max()}"
    print(f"text_to_image: == {type(backbone).__name__} pipeline, ComfyUI {comfy_s:.1f}s, pipeline {pipe_s:.1f}s")


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


def test_timing_comfyui_vs_in_process(server, api_prompt, pack):
    """text_to_image on the tiny models, TIMING_RUNS times with only the seed changing (the plan stays cached,
    as when an artist tries seeds): wall time from POST /prompt to the finished /history entry, against the
    MetaCanvas Sampler + Decode node functions called in this process on the same inputs (same torch thread
    count as the server). The two alternate seed by seed, so load from other processes hits both alike. Prints
    the figures (python -m pytest tests/test_comfyui_e2e.py -k timing -s); asserts nothing about speed, only
    that both make the same images."""
    warm = tiny(api_prompt, seed=99)
    server.queue_and_wait(warm)  # loaders and plan now cached in the server
    done = run_in_process(pack, warm, server.work / "input")  # here too: loaders, plan, projection, a warm-up sample
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
