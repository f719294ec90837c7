"""The shipped UI-format workflows (workflows/*.json) load in the editor and wire up as the nodes declare.

ComfyUI is not importable here, so the few core node types the workflows use are written out below with
their inputs as ComfyUI 0.3.64 declares them; the pack's own nodes are read from NODE_CLASS_MAPPINGS.
The widget rules follow the editor (ComfyUI frontend 1.27): an input is a widget when its type is
INT/FLOAT/STRING/BOOLEAN, a list of choices or COMBO (V3 nodes: choices in "options"), unless `forceInput`; an INT
with `control_after_generate` (or named seed/noise_seed) stores one extra value after it; `image_upload` and
`video_upload` add an "upload" widget.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
TOP_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "properties"}

# Core ComfyUI node types the workflows may use: INPUT_TYPES, RETURN_TYPES (and RETURN_NAMES where the editor shows
# names other than the types) copied from ComfyUI 0.3.64 (nodes.py; comfy_extras/nodes_video.py, V3 nodes, as their
# INPUT_TYPES() gives them; tooltips left out). Note and MarkdownNote are the editor's own virtual nodes: one text
# widget, never sent to the server.
CORE_NODES = {
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, ()),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, ()),
    "LoadImage": ({"required": {"image": ([], {"image_upload": True})}}, ("IMAGE", "MASK")),
    "ImageBatch": ({"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}, ("IMAGE",)),
    "ImageFromBatch": (  # comfy_extras/nodes_images.py
        {
            "required": {
                "image": ("IMAGE",),
                "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
                "length": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        },
        ("IMAGE",),
    ),
    "LoadVideo": (
        {"required": {"file": ("COMBO", {"multiselect": False, "options": [], "video_upload": True})}},
        ("VIDEO",),
    ),
    "GetVideoComponents": (
        {"required": {"video": ("VIDEO",)}},
        ("IMAGE", "AUDIO", "FLOAT"),
        ("images", "audio", "fps"),
    ),
    "SaveVideo": (
        {
            "required": {
                "video": ("VIDEO",),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI", "multiline": False}),
                "format": ("COMBO", {"default": "auto", "multiselect": False, "options": ["auto", "mp4"]}),
                "codec": ("COMBO", {"default": "auto", "multiselect": False, "options": ["auto", "h264"]}),
            }
        },
        (),
    ),
    "Note": ({"required": {"text": ("STRING", {"multiline": True})}}, ()),
    "MarkdownNote": ({"required": {"text": ("STRING", {"multiline": True})}}, ()),
}
VIRTUAL_NODES = {"Note", "MarkdownNote"}
# Combos listing model files: a shared workflow names the real model, which need not be installed here.
MODEL_CHOICES = {
    ("MetaCanvasMLLMLoader", "mllm_folder"),
    ("MetaCanvasBackboneLoader", "backbone_folder"),
    ("MetaCanvasConnectorLoader", "checkpoint"),
    ("LoadImage", "image"),
    ("LoadVideo", "file"),
}
UPLOAD_OPTIONS = ("image_upload", "video_upload")


@dataclass
class Spec:
    """What the editor makes of a node type: socket inputs, widgets (in widgets_values order), outputs."""

    name: str
    sockets: list[tuple[str, str, bool]] = field(default_factory=list)  # (name, type, required)
    widgets: list[tuple[str, str, dict]] = field(default_factory=list)  # (name, type, options)
    outputs: list[str] = field(default_factory=list)
    output_names: list[str] | None = None

    @classmethod
    def from_input_types(cls, name, input_types, return_types, return_names=None):
        spec = cls(name, outputs=list(return_types), output_names=list(return_names) if return_names else None)
        for section in ("required", "optional"):
            for input_name, decl in input_types.get(section, {}).items():
                kind, options = decl[0], (decl[1] if len(decl) > 1 else {})
                if isinstance(kind, list):
                    kind, options = "COMBO", {**options, "choices": kind}
                elif kind == "COMBO":  # V3 nodes: the choices are in "options"
                    options = {**options, "choices": options.get("options", [])}
                if kind in WIDGET_TYPES | {"COMBO"} and not options.get("forceInput"):
                    spec.widgets.append((input_name, kind, options))
                    if options.get("control_after_generate") or (
                        kind == "INT" and input_name in ("seed", "noise_seed")
                    ):
                        spec.widgets.append(("control_after_generate", "CONTROL", {}))
                    if any(options.get(o) for o in UPLOAD_OPTIONS):
                        spec.widgets.append(("upload", "UPLOAD", {}))
                else:
                    spec.sockets.append((input_name, kind, section == "required"))
        return spec

    def input_type(self, name):
        for n, t, _ in self.sockets:
            if n == name:
                return t
        for n, t, _ in self.widgets:
            if n == name and t not in ("CONTROL", "UPLOAD"):
                return t
        return None


def node_specs(pack) -> dict[str, Spec]:
    specs = {
        name: Spec.from_input_types(name, cls.INPUT_TYPES(), cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", None))
        for name, cls in pack.NODE_CLASS_MAPPINGS.items()
    }
    for name, (input_types, outputs, *names) in CORE_NODES.items():
        specs[name] = Spec.from_input_types(name, input_types, outputs, *names)
    return specs


def _check_widget(where, node_type, name, kind, options, value) -> list[str]:
    bad = f"{where}: widget {name}={value!r}"
    if kind == "CONTROL":
        return [] if value in CONTROL_VALUES else [f"{bad} is not one of {sorted(CONTROL_VALUES)}"]
    if kind == "UPLOAD":
        return []
    if kind == "COMBO":
        if (node_type, name) in MODEL_CHOICES:
            return [] if isinstance(value, str) and value else [f"{bad} must name a model"]
        return [] if value in options["choices"] else [f"{bad} is not one of {options['choices']}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{bad} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{bad} is not a string"]
    if isinstance(value, bool) or not isinstance(value, int if kind == "INT" else (int, float)):
        return [f"{bad} is not {kind}"]
    lo, hi = options.get("min"), options.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return [f"{bad} is outside [{lo}, {hi}]"]
    step = options.get("step")
    if kind == "INT" and step and (value - (lo or 0)) % step:
        return [f"{bad} is not on the widget's step {step}"]
    return []


def validate(wf: dict, specs: dict[str, Spec]) -> list[str]:
    """Every problem that would stop the editor loading the workflow or ComfyUI running it."""
    errors: list[str] = []
    missing = TOP_KEYS - set(wf)
    if missing:
        return [f"workflow lacks top-level keys {sorted(missing)}"]
    if wf["version"] != 0.4:
        errors.append(f"version {wf['version']!r} is not 0.4")
    if not isinstance(wf["groups"], list) or not isinstance(wf["config"], dict) or not isinstance(wf["extra"], dict):
        errors.append("groups must be a list, config and extra objects")

    nodes: dict[int, dict] = {}
    for node in wf["nodes"]:
        if NODE_KEYS - set(node):
            errors.append(f"node {node.get('id')} lacks keys {sorted(NODE_KEYS - set(node))}")
            continue
        if node["id"] in nodes:
            errors.append(f"node id {node['id']} is used twice")
        nodes[node["id"]] = node
        for key in ("pos", "size"):
            value = node[key]
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
                errors.append(f"node {node['id']}: {key} {value!r} is not [x, y]")
    if nodes and wf["last_node_id"] < max(nodes):
        errors.append(f"last_node_id {wf['last_node_id']} < largest node id {max(nodes)}")

    links: dict[int, list] = {}
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            errors.append(f"link {link!r} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if link[0] in links:
            errors.append(f"link id {link[0]} is used twice")
        links[link[0]] = link
    if links and wf["last_link_id"] < max(links):
        errors.append(f"last_link_id {wf['last_link_id']} < largest link id {max(links)}")

    for nid, node in nodes.items():
        where = f"node {nid} ({node['type']})"
        spec = specs.get(node["type"])
        if spec is None:
            errors.append(f"{where}: unknown node type {node['type']!r}")
            continue
        inputs, outputs = node.get("inputs", []), node.get("outputs", [])
        # Widgets: positional, in INPUT_TYPES order.
        values = node.get("widgets_values", [])
        if len(values) != len(spec.widgets):
            errors.append(
                f"{where}: {len(values)} widget values, expected {len(spec.widgets)} {[w[0] for w in spec.widgets]}"
            )
        else:
            for (name, kind, options), value in zip(spec.widgets, values, strict=True):
                errors += _check_widget(where, node["type"], name, kind, options, value)
        # Inputs: the sockets in declaration order; widget inputs (editor >= 1.16 lists them too) carry "widget".
        sockets = [i for i in inputs if "widget" not in i]
        if [i.get("name") for i in sockets] != [s[0] for s in spec.sockets]:
            errors.append(
                f"{where}: input sockets {[i.get('name') for i in sockets]}, expected {[s[0] for s in spec.sockets]}"
            )
        for slot in inputs:
            expected = spec.input_type(slot.get("name"))
            if expected is None:
                errors.append(f"{where}: no input named {slot.get('name')!r}")
            elif slot.get("type") != expected:
                errors.append(f"{where}: input {slot['name']} has type {slot.get('type')!r}, declared {expected!r}")
        for name, _, required in spec.sockets:
            slot = next((i for i in sockets if i.get("name") == name), None)
            if required and slot is not None and slot.get("link") is None:
                errors.append(f"{where}: required input {name} is not connected")
        # Outputs: RETURN_TYPES in order.
        if [o.get("type") for o in outputs] != spec.outputs:
            errors.append(f"{where}: outputs {[o.get('type') for o in outputs]}, declared {spec.outputs}")
        elif spec.output_names and [o.get("name") for o in outputs] != spec.output_names:
            errors.append(f"{where}: output names {[o.get('name') for o in outputs]}, declared {spec.output_names}")
        # The node's own link lists agree with the links table.
        for k, slot in enumerate(inputs):
            lid = slot.get("link")
            if lid is not None and (lid not in links or links[lid][3:5] != [nid, k]):
                errors.append(f"{where}: input {slot.get('name')} names link {lid}, which does not end at slot {k}")
        for k, out in enumerate(outputs):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1:3] != [nid, k]:
                    errors.append(
                        f"{where}: output {out.get('name')} names link {lid}, which does not start at slot {k}"
                    )

    for lid, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        where = f"link {lid} ({src}:{src_slot} -> {dst}:{dst_slot}, {kind})"
        if src not in nodes or dst not in nodes:
            errors.append(f"{where}: a node it joins does not exist")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if not 0 <= src_slot < len(outs) or not 0 <= dst_slot < len(ins):
            errors.append(f"{where}: slot out of range")
            continue
        src_spec, dst_spec = specs.get(nodes[src]["type"]), specs.get(nodes[dst]["type"])
        src_type = (
            src_spec.outputs[src_slot] if src_spec and src_slot < len(src_spec.outputs) else outs[src_slot].get("type")
        )
        dst_type = dst_spec.input_type(ins[dst_slot].get("name")) if dst_spec else ins[dst_slot].get("type")
        if not (kind == src_type == dst_type):
            errors.append(f"{where}: source gives {src_type!r}, target takes {dst_type!r}")
        if lid not in (outs[src_slot].get("links") or []):
            errors.append(f"{where}: missing from node {src} output {src_slot}'s links")
        if ins[dst_slot].get("link") != lid:
            errors.append(f"{where}: node {dst} input {dst_slot} names link {ins[dst_slot].get('link')}")
    return errors


def to_api(wf: dict, specs: dict[str, Spec]) -> dict:
    """The API-format prompt the editor would send (graphToPrompt), for the checks below."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        spec = specs[node["type"]]
        inputs = {
            name: value
            for (name, kind, _), value in zip(spec.widgets, node["widgets_values"], strict=True)
            if kind not in ("CONTROL", "UPLOAD")
        }
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


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
        "Note",
    }
    assert by_type["MetaCanvasMLLMLoader"]["widgets_values"] == ["Qwen2.5-VL-7B-Instruct", "auto"]
    assert by_type["MetaCanvasBackboneLoader"]["widgets_values"] == ["Sana_1600M_512px_diffusers", "auto", True]
    assert by_type["MetaCanvasConnectorLoader"]["widgets_values"] == ["new (untrained)", "auto"]
    prompt, negative, width, height, image_role, keyframes = by_type["MetaCanvasPlan"]["widgets_values"]
    assert len(prompt) > 80 and negative == "" and (width, height) == (512, 512)
    assert (image_role, keyframes) == ("references", 0)
    sampler = by_type["MetaCanvasSampler"]["widgets_values"][1:]
    assert sampler == ["fixed", 20, 4.5, 512, 512, "dpm_solver_flow", True, 1, 24.0]
    assert by_type["SaveImage"]["widgets_values"] == ["MetaCanvas"]
    note = by_type["Note"]["widgets_values"][0]
    for needle in ("models/LLM/", "models/diffusers/", "models/metacanvas/", "new (untrained)", "SANA"):
        assert needle in note
    # Read left to right along the chain.
    chain = ["MetaCanvasConnectorLoader", "MetaCanvasPlan", "MetaCanvasProject", "MetaCanvasSampler"]
    chain += ["MetaCanvasDecode", "SaveImage"]
    xs = [by_type[t]["pos"][0] for t in chain]
    assert xs == sorted(xs) and by_type["MetaCanvasMLLMLoader"]["pos"][0] < xs[0]


QWEN, WAN, KONTEXT, UNTRAINED = (
    "Qwen2.5-VL-7B-Instruct",
    "Wan2.2-TI2V-5B-Diffusers",
    "FLUX.1-Kontext-dev",
    "new (untrained)",
)
VIDEO_SAMPLER = ["fixed", 50, 5.0, 1280, 704, "unipc_flow", True]
# What each shipped workflow (other than text_to_image, above) must be: backbone folder, Plan size and image role,
# Sampler widgets after the seed, the save node (fed from Decode), the core nodes that feed the Plan, and whether
# an Edit Guidance sits between Project and Sampler.
CONTENT = {
    "text_to_video.json": (WAN, (1280, 704), "references", VIDEO_SAMPLER + [121, 24.0], "SaveVideo", {}, False),
    "image_to_video.json": (
        WAN,
        (1280, 704),
        "first frame",
        VIDEO_SAMPLER + [121, 24.0],
        "SaveVideo",
        {"images": ("LoadImage", "IMAGE")},
        False,
    ),
    "video_editing.json": (
        WAN,
        (1280, 704),
        "references",
        VIDEO_SAMPLER + [81, 24.0],
        "SaveVideo",
        {"video": ("ImageFromBatch", "IMAGE")},
        False,
    ),
    "in_context_video.json": (
        WAN,
        (1280, 704),
        "references",
        VIDEO_SAMPLER + [121, 24.0],
        "SaveVideo",
        {"images": ("ImageBatch", "IMAGE")},
        False,
    ),
    "image_editing.json": (
        KONTEXT,
        (1024, 1024),
        "references",
        ["fixed", 28, 1.0, 1024, 1024, "flow_euler", True, 1, 24.0],
        "SaveImage",
        {"images": ("LoadImage", "IMAGE")},
        True,
    ),
}


def _source(wf, node, input_name):
    """(node, output name) that feeds `input_name` of `node`, or None."""
    slot = next((i for i in node["inputs"] if i["name"] == input_name), {})  # a widget is listed only when linked
    if slot.get("link") is None:
        return None
    _, src, src_slot, *_ = _link(wf, slot["link"])
    src_node = next(n for n in wf["nodes"] if n["id"] == src)
    return src_node, src_node["outputs"][src_slot]["name"]


def test_every_workflow_has_its_content_checked():
    assert {p.name for p in WORKFLOWS} == set(CONTENT) | {"text_to_image.json"}


@pytest.mark.parametrize("name", CONTENT)
def test_workflow_content(name, specs, pack):
    backbone, (width, height), role, sampler_values, save, feeds, edit_guidance = CONTENT[name]
    wf = load(ROOT / "workflows" / name)
    assert validate(wf, specs) == []
    nodes = {n["type"]: n for n in wf["nodes"]}  # one of each, except LoadImage in in_context_video
    assert nodes["MetaCanvasMLLMLoader"]["widgets_values"] == [QWEN, "auto"]
    assert nodes["MetaCanvasBackboneLoader"]["widgets_values"] == [backbone, "auto", True]
    assert nodes["MetaCanvasConnectorLoader"]["widgets_values"] == [UNTRAINED, "auto"]
    prompt, _negative, plan_w, plan_h, image_role, keyframes = nodes["MetaCanvasPlan"]["widgets_values"]
    assert len(prompt) > 80 and (plan_w, plan_h) == (width, height) and (image_role, keyframes) == (role, 0)
    seed, *values = nodes["MetaCanvasSampler"]["widgets_values"]
    assert isinstance(seed, int) and values == sampler_values
    # The node's own checks (what the server runs before anything is queued) accept the shipped values.
    classes = pack.NODE_CLASS_MAPPINGS
    assert classes["MetaCanvasPlan"].VALIDATE_INPUTS(width=plan_w, height=plan_h) is True
    assert classes["MetaCanvasSampler"].VALIDATE_INPUTS(width=values[3], height=values[4], length=values[7]) is True

    # Wiring: media into the Plan, Project (-> Edit Guidance) -> Sampler -> Decode -> the core save node.
    plan, sampler, decode = nodes["MetaCanvasPlan"], nodes["MetaCanvasSampler"], nodes["MetaCanvasDecode"]
    for input_name in ("images", "video"):
        fed = _source(wf, plan, input_name)
        expected = feeds.get(input_name)
        assert (fed and (fed[0]["type"], fed[1])) == expected, f"Plan.{input_name} fed by {fed and fed[0]['type']}"
    cond_src = _source(wf, sampler, "cond")[0]
    if edit_guidance:
        assert cond_src["type"] == "MetaCanvasEditGuidance"
        assert _source(wf, cond_src, "cond")[0]["type"] == "MetaCanvasProject"
        assert cond_src["widgets_values"] == [2.5, 1.5]
    else:
        assert cond_src["type"] == "MetaCanvasProject" and "MetaCanvasEditGuidance" not in nodes
    assert _source(wf, decode, "latent")[0] is sampler
    save_node = nodes[save]
    if save == "SaveVideo":
        assert _source(wf, save_node, "video") == (decode, "video")
        assert save_node["widgets_values"] == ["video/MetaCanvas", "auto", "auto"]
    else:
        assert _source(wf, save_node, "images") == (decode, "image")
    if "video" in feeds:  # LoadVideo -> GetVideoComponents -> ImageFromBatch (the Sampler's length) -> Plan
        components, first = nodes["GetVideoComponents"], nodes["ImageFromBatch"]
        assert _source(wf, components, "video")[0]["type"] == "LoadVideo"
        assert _source(wf, first, "image") == (components, "images")
        assert first["widgets_values"] == [0, values[7]]
        # the source's frame rate into the Sampler's frame_rate widget, so the edit keeps the source's timing
        assert _source(wf, sampler, "frame_rate") == (components, "fps")
    else:
        assert _source(wf, sampler, "frame_rate") is None
    if feeds.get("images", ("",))[0] == "ImageBatch":
        batch = nodes["ImageBatch"]
        assert [_source(wf, batch, i)[0]["type"] for i in ("image1", "image2")] == ["LoadImage", "LoadImage"]

    # The Note says where every file goes and what 'new (untrained)' gives.
    note = nodes["Note"]["widgets_values"][0]
    for needle in ("models/LLM/", "models/diffusers/", "models/metacanvas/", UNTRAINED, QWEN, backbone):
        assert needle in note, needle
    assert "context 'auto'" in note and "plain" in note and "context 'mllm'" in note

    # Read left to right: sources left of the Plan, then the chain.
    chain = ["MetaCanvasConnectorLoader", "MetaCanvasPlan", "MetaCanvasProject", "MetaCanvasSampler"]
    chain += ["MetaCanvasDecode", save]
    xs = [nodes[t]["pos"][0] for t in chain]
    assert xs == sorted(xs) and nodes["MetaCanvasMLLMLoader"]["pos"][0] < xs[0]
    for n in wf["nodes"]:
        if n["type"] in ("LoadImage", "LoadVideo", "GetVideoComponents", "ImageFromBatch", "ImageBatch"):
            assert n["pos"][0] + n["size"][0] < plan["pos"][0], f"{n['type']} is not left of the Plan"
    if edit_guidance:
        assert xs[2] <= nodes["MetaCanvasEditGuidance"]["pos"][0] < xs[3]


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
    wf = load(ROOT / "workflows" / "video_editing.json")
    assert validate(wf, specs) == []
    broken = copy.deepcopy(wf)
    mutate, expected = VIDEO_BREAKAGES[breakage]
    mutate(broken)
    errors = validate(broken, specs)
    assert any(expected in e for e in errors), errors
