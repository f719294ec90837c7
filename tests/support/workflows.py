"""A validator of UI-format workflows: what the editor makes of each node type, and every problem that would stop
the editor loading a workflow or ComfyUI running it.

ComfyUI is not importable in CI, so the core node types the workflows use are written out here with their inputs
as ComfyUI 0.3.64 declares them; the pack's own nodes are read from NODE_CLASS_MAPPINGS. The widget rules follow
the editor (ComfyUI frontend 1.27): an input is a widget when its type is INT/FLOAT/STRING/BOOLEAN, a list of
choices or COMBO (V3 nodes: choices in "options"), unless `forceInput`; an INT with `control_after_generate` (or
named seed/noise_seed) stores one extra value after it; `image_upload` and `video_upload` add an "upload" widget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
TOP_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "properties"}

# comfy/samplers.py KSampler.SAMPLERS and SCHEDULER_NAMES in 0.3.64, shared by KSampler, KSamplerSelect and
# BasicScheduler.
SAMPLER_NAMES = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULER_NAMES = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]

# Core ComfyUI node types the workflows may use: INPUT_TYPES, RETURN_TYPES (and RETURN_NAMES where the editor shows
# names other than the types) copied from ComfyUI 0.3.64 (nodes.py; comfy_extras/nodes_video.py, V3 nodes, as their
# INPUT_TYPES() gives them; tooltips left out). Note and MarkdownNote are the editor's own virtual nodes: one text
# widget, never sent to the server.
CORE_NODES = {
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, ()),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, ()),
    "LoadImage": ({"required": {"image": ([], {"image_upload": True})}}, ("IMAGE", "MASK")),
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
    # The native graphs' core nodes (ComfyUI 0.3.64's /object_info, tooltips left out).
    "UNETLoader": (
        {"required": {"unet_name": ([],), "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}},
        ("MODEL",),
    ),
    "VAELoader": ({"required": {"vae_name": (["pixel_space"],)}}, ("VAE",)),
    "KSampler": (
        {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (SAMPLER_NAMES,),
                "scheduler": (SCHEDULER_NAMES,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        },
        ("LATENT",),
    ),
    "VAEDecode": ({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
    "VAEEncode": ({"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}, ("LATENT",)),
    "CreateVideo": (
        {
            "required": {
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            "optional": {"audio": ("AUDIO",)},
        },
        ("VIDEO",),
    ),
    "Wan22ImageToVideoLatent": (
        {
            "required": {
                "vae": ("VAE",),
                "width": ("INT", {"default": 1280, "min": 32, "max": 16384, "step": 32}),
                "height": ("INT", {"default": 704, "min": 32, "max": 16384, "step": 32}),
                "length": ("INT", {"default": 49, "min": 1, "max": 16384, "step": 4}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            },
            "optional": {"start_image": ("IMAGE",)},
        },
        ("LATENT",),
    ),
    "ModelSamplingSD3": (
        {
            "required": {
                "model": ("MODEL",),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}),
            }
        },
        ("MODEL",),
    ),
    "FluxKontextImageScale": ({"required": {"image": ("IMAGE",)}}, ("IMAGE",)),
    "ReferenceLatent": (
        {"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}},
        ("CONDITIONING",),
    ),
    "FluxGuidance": (
        {
            "required": {
                "conditioning": ("CONDITIONING",),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
            }
        },
        ("CONDITIONING",),
    ),
    "DualCFGGuider": (
        {
            "required": {
                "model": ("MODEL",),
                "cond1": ("CONDITIONING",),
                "cond2": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "cfg_conds": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "cfg_cond2_negative": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "style": (["regular", "nested"],),
            }
        },
        ("GUIDER",),
    ),
    "SamplerCustomAdvanced": (
        {
            "required": {
                "noise": ("NOISE",),
                "guider": ("GUIDER",),
                "sampler": ("SAMPLER",),
                "sigmas": ("SIGMAS",),
                "latent_image": ("LATENT",),
            }
        },
        ("LATENT", "LATENT"),
        ("output", "denoised_output"),
    ),
    "KSamplerSelect": (
        {"required": {"sampler_name": (SAMPLER_NAMES,)}},
        ("SAMPLER",),
    ),
    "BasicScheduler": (
        {
            "required": {
                "model": ("MODEL",),
                "scheduler": (SCHEDULER_NAMES,),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        },
        ("SIGMAS",),
    ),
    "RandomNoise": (
        {
            "required": {
                "noise_seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True},
                )
            }
        },
        ("NOISE",),
    ),
    "EmptySD3LatentImage": (
        {
            "required": {
                "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        },
        ("LATENT",),
    ),
    "LoadImageMask": (
        {
            "required": {
                "image": (["example.png"], {"image_upload": True}),
                "channel": (["alpha", "red", "green", "blue"],),
            }
        },
        ("MASK",),
    ),
    "CLIPLoader": (
        {
            "required": {
                "clip_name": ([],),
                "type": (
                    [
                        "stable_diffusion",
                        "stable_cascade",
                        "sd3",
                        "stable_audio",
                        "mochi",
                        "ltxv",
                        "pixart",
                        "cosmos",
                        "lumina2",
                        "wan",
                        "hidream",
                        "chroma",
                        "ace",
                        "omnigen2",
                        "qwen_image",
                        "hunyuan_image",
                    ],
                ),
            },
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        },
        ("CLIP",),
    ),
    "DualCLIPLoader": (
        {
            "required": {
                "clip_name1": ([],),
                "clip_name2": ([],),
                "type": (["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"],),
            },
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        },
        ("CLIP",),
    ),
    "CLIPTextEncode": (
        {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}},
        ("CONDITIONING",),
    ),
    "PrimitiveStringMultiline": ({"required": {"value": ("STRING", {"multiline": True})}}, ("STRING",)),
    "Note": ({"required": {"text": ("STRING", {"multiline": True})}}, ()),
    "MarkdownNote": ({"required": {"text": ("STRING", {"multiline": True})}}, ()),
}
VIRTUAL_NODES = {"Note", "MarkdownNote"}
# Combos listing model files: a shared workflow names the real model, which need not be installed here.
MODEL_CHOICES = {
    ("UNETLoader", "unet_name"),
    ("VAELoader", "vae_name"),
    ("CLIPLoader", "clip_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("LoadImageMask", "image"),
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
