"""The shipped UI-format workflows (workflows/*.json) load in the editor and wire up as the nodes declare
(the validator is tests/support/workflows.py), and each holds what its task needs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from support.workflows import ROOT, WORKFLOWS, node_specs, to_api, validate


@pytest.fixture(scope="module")
def specs(pack):
    return node_specs(pack)


def load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no .json workflow"
    assert (ROOT / "workflows" / "text_to_image.json") in WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(path, specs):
    wf = load(path)
    assert validate(wf, specs) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_as_api_prompt(path, specs):
    """Every required input of every executed node has a value or a link once converted to API format."""
    api = to_api(load(path), specs)
    assert api
    for nid, node in api.items():
        spec = specs[node["class_type"]]
        required = [n for n, _, req in spec.sockets if req] + [w[0] for w in spec.widgets if w[1] != "CONTROL"]
        absent = [n for n in required if n not in node["inputs"] and n != "upload"]
        assert not absent, f"node {nid} ({node['class_type']}) lacks {absent}"


def test_text_to_image_content(specs):
    wf = load(ROOT / "workflows" / "text_to_image.json")
    by_type = {n["type"]: n for n in wf["nodes"]}
    assert set(by_type) == {
        "MetaCanvasMLLMLoader",
        "MetaCanvasBackboneLoader",
        "MetaCanvasConnectorLoader",
        "MetaCanvasPlan",
        "MetaCanvasProject",
        "MetaCanvasSampler",
        "MetaCanvasDecode",
        "SaveImage",
        "MetaCanvasPlanPreview",
        "PreviewImage",
        "Note",
    }
    assert by_type["MetaCanvasMLLMLoader"]["widgets_values"] == [QWEN_FILE, "auto", "default"]
    assert by_type["MetaCanvasBackboneLoader"]["widgets_values"] == ["Sana_1600M_512px_diffusers", "auto", True]
    assert by_type["MetaCanvasConnectorLoader"]["widgets_values"] == ["new (untrained)", "auto"]
    prompt, negative, width, height, image_role, keyframes, visual_tokens = by_type["MetaCanvasPlan"]["widgets_values"]
    assert len(prompt) > 80 and negative == "" and (width, height) == (512, 512)
    assert (image_role, keyframes, visual_tokens) == ("references", 0, 0)
    sampler = by_type["MetaCanvasSampler"]["widgets_values"][1:]
    assert sampler == ["fixed", 20, 4.5, 512, 512, "dpm_solver_flow", True, 1, 24.0, 1.0]
    assert by_type["SaveImage"]["widgets_values"] == ["MetaCanvas"]
    note = by_type["Note"]["widgets_values"][0]
    for needle in ("models/LLM/", "models/diffusers/", "models/metacanvas/", "new (untrained)", "SANA"):
        assert needle in note
    # Read left to right along the chain.
    chain = ["MetaCanvasConnectorLoader", "MetaCanvasPlan", "MetaCanvasProject", "MetaCanvasSampler"]
    chain += ["MetaCanvasDecode", "SaveImage"]
    xs = [by_type[t]["pos"][0] for t in chain]
    assert xs == sorted(xs) and by_type["MetaCanvasMLLMLoader"]["pos"][0] < xs[0]


QWEN_FILE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"  # the planner as ComfyUI's single file (Qwen-Image's)
UNTRAINED = "new (untrained)"


def _source(wf, node, input_name):
    """(node, output name) that feeds `input_name` of `node`, or None."""
    slot = next((i for i in node["inputs"] if i["name"] == input_name), {})  # a widget is listed only when linked
    if slot.get("link") is None:
        return None
    _, src, src_slot, *_ = _link(wf, slot["link"])
    src_node = next(n for n in wf["nodes"] if n["id"] == src)
    return src_node, src_node["outputs"][src_slot]["name"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_shows_the_plan(path, specs):
    """Every shipped workflow shows the plan next to the result: MetaCanvas Plan Preview (the Plan's canvas, aligned by
    the Connector Loader's checkpoint, over the decoded image or frames) into a core Preview Image."""
    wf = load(path)
    nodes = {n["type"]: n for n in wf["nodes"]}
    preview, shown = nodes["MetaCanvasPlanPreview"], nodes["PreviewImage"]
    assert _source(wf, preview, "plan") == (nodes["MetaCanvasPlan"], "plan")
    assert _source(wf, preview, "metacanvas") == (nodes["MetaCanvasConnectorLoader"], "metacanvas")
    decoded = _source(wf, preview, "image")
    assert (decoded[0]["type"], decoded[1]) in {("MetaCanvasDecode", "image"), ("VAEDecode", "IMAGE")}
    assert preview["widgets_values"] == [0.5] and _source(wf, shown, "images") == (preview, "preview")
    assert max(link[0] for link in wf["links"]) == wf["last_link_id"]
    assert max(n["id"] for n in wf["nodes"]) == wf["last_node_id"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_node_names_its_pack(path):
    """As Comfy-Org's templates: every node carries the pack it comes from (`cnr_id` and version), so the editor can
    offer to install MetaCanvas when a shared workflow lacks it; core nodes are comfy-core's. Notes are the
    editor's own."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for node in load(path)["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        props = node["properties"]
        expected = ("metacanvas", version) if node["type"].startswith("MetaCanvas") else ("comfy-core", "0.3.64")
        assert (props.get("cnr_id"), props.get("ver")) == expected, (path.name, node["type"], props)


FILE_LOADERS = {"MetaCanvasMLLMLoader", "UNETLoader", "VAELoader", "CLIPLoader", "DualCLIPLoader"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_file_loader_carries_its_download_hint(path):
    """As ComfyUI's own templates: the editor offers a missing file from `properties.models` (name, url, folder). The
    pack's diffusers folders cannot be fetched as one file: their Notes link them, and name the native template."""
    wf = load(path)
    loaders = [n for n in wf["nodes"] if n["type"] in FILE_LOADERS]
    assert {n["type"] for n in loaders} >= {"MetaCanvasMLLMLoader"}
    for node in loaders:
        models = node["properties"]["models"]
        files = node["widgets_values"][: len(models)]
        assert [m["name"] for m in models] == files, node["type"]
        for model in models:
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
            assert model["directory"] in ("text_encoders", "diffusion_models", "vae")
    note = next(n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))["widgets_values"][0]
    assert QWEN_FILE in note
    backbone = next((n for n in wf["nodes"] if n["type"] == "MetaCanvasBackboneLoader"), None)
    if backbone is not None:
        assert "https://huggingface.co/" in note


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_the_pack_path_is_sana_only(path, pack):
    """Wan2.2 and FLUX-Kontext run in ComfyUI only as the native patch: the pack's Backbone Loader (and its Project,
    Sampler, Decode) appears in text_to_image alone, naming a SANA folder, and no shipped workflow holds a
    deprecated node."""
    nodes = load(path)["nodes"]
    pack_path = {"MetaCanvasBackboneLoader", "MetaCanvasProject", "MetaCanvasSampler", "MetaCanvasDecode"}
    used = {n["type"] for n in nodes}
    if path.stem == "text_to_image":
        assert pack_path <= used
        (backbone,) = [n for n in nodes if n["type"] == "MetaCanvasBackboneLoader"]
        assert backbone["widgets_values"][0].startswith("Sana_")
    else:
        assert path.stem.startswith("native_") and not pack_path & used, path.name
    classes = pack.NODE_CLASS_MAPPINGS
    deprecated = {t for t in used if getattr(classes.get(t), "DEPRECATED", False)}
    assert not deprecated, (path.name, deprecated)


def test_every_workflow_has_its_content_checked():
    native = {f"{name}.json" for name in NATIVE}
    assert {p.name for p in WORKFLOWS} == {"text_to_image.json"} | native


def _link(wf, lid):
    return next(link for link in wf["links"] if link[0] == lid)


def _node(wf, node_type):
    return next(n for n in wf["nodes"] if n["type"] == node_type)


def _break_link_type(wf):
    _link(wf, 1)[5] = "IMAGE"


def _drop_control_value(wf):
    del _node(wf, "MetaCanvasSampler")["widgets_values"][1]


def _swap_link_target(wf):
    # plan -> Sampler's cond socket: METACANVAS_PLAN into METACANVAS_COND
    link = next(link for link in wf["links"] if link[5] == "METACANVAS_PLAN")
    sampler = _node(wf, "MetaCanvasSampler")
    link[3], link[4], link[5] = sampler["id"], 1, "METACANVAS_PLAN"


def _dangling_input(wf):
    _node(wf, "MetaCanvasDecode")["inputs"][1]["link"] = 999


def _unknown_type(wf):
    _node(wf, "SaveImage")["type"] = "SaveImageDeluxe"


def _bad_choice(wf):
    _node(wf, "MetaCanvasSampler")["widgets_values"][6] = "euler_ancestral"


def _disconnect_required(wf):
    decode = _node(wf, "MetaCanvasDecode")
    lid = decode["inputs"][0]["link"]
    decode["inputs"][0]["link"] = None
    wf["links"] = [link for link in wf["links"] if link[0] != lid]
    for node in wf["nodes"]:
        for out in node.get("outputs", []):
            out["links"] = [x for x in out.get("links") or [] if x != lid]


BREAKAGES = {
    "link type": (_break_link_type, "link 1"),
    "control_after_generate value missing": (_drop_control_value, "widget values, expected"),
    "link into the wrong socket": (_swap_link_target, "target takes 'METACANVAS_COND'"),
    "input names a missing link": (_dangling_input, "names link 999"),
    "unknown node type": (_unknown_type, "unknown node type 'SaveImageDeluxe'"),
    "combo value not offered": (_bad_choice, "euler_ancestral"),
    "required input unconnected": (_disconnect_required, "required input backbone is not connected"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_validator_reports_a_broken_copy(breakage, specs):
    wf = load(ROOT / "workflows" / "text_to_image.json")
    assert validate(wf, specs) == []
    broken = copy.deepcopy(wf)
    mutate, expected = BREAKAGES[breakage]
    mutate(broken)
    errors = validate(broken, specs)
    assert any(expected in e for e in errors), errors


def _bad_video_format(wf):
    _node(wf, "SaveVideo")["widgets_values"][1] = "webm"


def _drop_upload_value(wf):
    del _node(wf, "LoadVideo")["widgets_values"][1]


def _video_into_image_socket(wf):
    # LoadVideo's VIDEO straight into the Plan's video socket (IMAGE frames), skipping Get Video Components
    load_video, plan = _node(wf, "LoadVideo"), _node(wf, "MetaCanvasPlan")
    link = _link(wf, next(i for i in plan["inputs"] if i["name"] == "video")["link"])
    source = next(n for n in wf["nodes"] if n["id"] == link[1])
    source["outputs"][link[2]]["links"].remove(link[0])
    load_video["outputs"][0]["links"].append(link[0])
    link[1], link[2], link[5] = load_video["id"], 0, "VIDEO"


VIDEO_BREAKAGES = {
    "V3 combo value not offered": (_bad_video_format, "format='webm' is not one of ['auto', 'mp4']"),
    "video upload widget value missing": (_drop_upload_value, "1 widget values, expected 2 ['file', 'upload']"),
    "VIDEO into an IMAGE socket": (_video_into_image_socket, "source gives 'VIDEO', target takes 'IMAGE'"),
}


@pytest.mark.parametrize("breakage", VIDEO_BREAKAGES)
def test_validator_reports_a_broken_video_workflow(breakage, specs):
    wf = load(ROOT / "workflows" / "native_video_editing.json")
    assert validate(wf, specs) == []
    broken = copy.deepcopy(wf)
    mutate, expected = VIDEO_BREAKAGES[breakage]
    mutate(broken)
    errors = validate(broken, specs)
    assert any(expected in e for e in errors), errors


# --- the native graphs (core loaders + MetaCanvas Apply), written by tests/support/native_workflows.py -------------
NATIVE = {
    "native_text_to_video": ("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", "KSampler"),
    "native_image_to_video": ("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", "KSampler"),
    "native_video_editing": ("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", "KSampler"),
    "native_in_context_video": ("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors", "KSampler"),
    "native_image_editing": ("flux1-dev-kontext_fp8_scaled.safetensors", "ae.safetensors", "SamplerCustomAdvanced"),
}


def test_native_workflows_are_the_generated_ones(specs):
    """Edit tests/support/native_workflows.py, then `cd tests && python -m support.native_workflows`."""
    from support.native_workflows import native_workflows

    for name, wf in native_workflows(specs).items():
        assert load(ROOT / "workflows" / f"{name}.json") == json.loads(json.dumps(wf)), name


TEXT_ENCODERS = {  # the model's own text encoder in each native template (core loader widgets)
    "KSampler": ("CLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]),
    "SamplerCustomAdvanced": (
        "DualCLIPLoader",
        ["clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "flux", "default"],
    ),
}
STEPS = ("Step 1 - Load models", "Step 2 - Prompt", "Step 3 - Plan, text and canvas", "Step 4 - Sample", "Step 5")


def _inside(node: dict, box: list) -> bool:
    (nx, ny), (nw, nh), (x, y, w, h) = node["pos"], node["size"], box
    return x <= nx and nx + nw <= x + w and y <= ny and ny + nh <= y + h


@pytest.mark.parametrize("name", NATIVE)
def test_native_workflow_content(name, specs):
    """Read as Comfy-Org's templates: the model's own text encoder gives the text of 'new (untrained)' (Text
    Conditioning passes CLIP Text Encode through for native context), the prompt typed once, the plan sized by the
    latent the sampler fills, the official defaults, groups by step, a MarkdownNote with every file."""
    unet_file, vae_file, sampler_type = NATIVE[name]
    wf = load(ROOT / "workflows" / f"{name}.json")
    assert validate(wf, specs) == []
    nodes = {n["type"]: n for n in wf["nodes"]}
    assert nodes["UNETLoader"]["widgets_values"] == [unet_file, "default"]
    assert nodes["VAELoader"]["widgets_values"] == [vae_file]
    assert nodes["MetaCanvasMLLMLoader"]["widgets_values"] == [QWEN_FILE, "auto", "default"]
    assert nodes["MetaCanvasConnectorLoader"]["widgets_values"] == [UNTRAINED, "auto"]
    clip_type, clip_widgets = TEXT_ENCODERS[sampler_type]
    assert nodes[clip_type]["widgets_values"] == clip_widgets
    # The text: CLIP Text Encode of the prompt and of the negative into Text Conditioning, each typed once and
    # shared with the Plan through a core String node.
    text, plan = nodes["MetaCanvasTextConditioning"], nodes["MetaCanvasPlan"]
    for clip_input, plan_input in (("clip_positive", "prompt"), ("clip_negative", "negative_prompt")):
        encode, _ = _source(wf, text, clip_input)
        assert encode["type"] == "CLIPTextEncode" and _source(wf, encode, "clip")[0]["type"] == clip_type
        string = _source(wf, encode, "text")
        assert string[0]["type"] == "PrimitiveStringMultiline" and _source(wf, plan, plan_input) == string
    # The canvas: Plan -> Attach Canvas on Text Conditioning's positive; Apply on the loaded model.
    apply, attach = nodes["MetaCanvasApply"], nodes["MetaCanvasAttachCanvas"]
    assert _source(wf, apply, "model")[0]["type"] == "UNETLoader"
    assert _source(wf, nodes["MetaCanvasConnectorLoader"], "model")[0]["type"] == "UNETLoader"
    assert _source(wf, attach, "conditioning") == (text, "positive") and attach["widgets_values"] == [1.0]
    # The plan's size is the latent's: the one the sampler fills.
    sampler = nodes[sampler_type]
    assert _source(wf, plan, "latent") == _source(wf, sampler, "latent_image")
    if sampler_type == "KSampler":  # Comfy-Org's Wan2.2-5B template: 20 steps, cfg 5, uni_pc, simple, shift 8
        assert sampler["widgets_values"][2:6] == [20, 5.0, "uni_pc", "simple"]
        assert nodes["ModelSamplingSD3"]["widgets_values"] == [8.0]
        assert _source(wf, plan, "latent")[0]["type"] == "Wan22ImageToVideoLatent"
    else:  # Kontext: the scaled input image, VAE-encoded, is the latent (the output keeps the photo's aspect)
        encode = _source(wf, plan, "latent")[0]
        assert encode["type"] == "VAEEncode" and _source(wf, encode, "pixels")[0]["type"] == "FluxKontextImageScale"
        assert "EmptySD3LatentImage" not in nodes
        assert nodes["BasicScheduler"]["widgets_values"] == ["simple", 20, 1.0]
        assert nodes["FluxGuidance"]["widgets_values"] == [2.5]
    # Groups by step: every node but the note in exactly one, no two overlapping.
    titles, boxes = [g["title"] for g in wf["groups"]], [g["bounding"] for g in wf["groups"]]
    assert len(titles) == len(STEPS) and all(t.startswith(s) for t, s in zip(titles, STEPS, strict=True)), titles
    for i, (x, y, w, h) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, titles
    for n in wf["nodes"]:
        if n["type"] != "MarkdownNote":
            assert [_inside(n, box) for box in boxes].count(True) == 1, n["type"]
    # The MarkdownNote: every file linked, with its folder and size; what untrained gives.
    note = nodes["MarkdownNote"]["widgets_values"][0]
    models = [m for n in wf["nodes"] if n["type"] in FILE_LOADERS for m in n["properties"]["models"]]
    for model in models:
        assert f"[{model['name']}]({model['url']})" in note and f"`ComfyUI/models/{model['directory']}/`" in note
    assert note.count(" GiB |") == len(models) + 1  # and the MetaCanvas checkpoint's
    for needle in ("models/metacanvas/", UNTRAINED, "plain native graph", "Load CLIP"):
        assert needle in note, needle
    api = to_api(wf, specs)
    assert not {"Note", "MarkdownNote"} & {n["class_type"] for n in api.values()}
    for nid, node in api.items():
        spec = specs[node["class_type"]]
        required = [n for n, _, req in spec.sockets if req] + [w[0] for w in spec.widgets if w[1] != "CONTROL"]
        absent = [n for n in required if n not in node["inputs"] and n != "upload"]
        assert not absent, f"node {nid} ({node['class_type']}) lacks {absent}"
