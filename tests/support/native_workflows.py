"""The shipped native workflows (workflows/native_*.json), written from one description so they stay alike and read
like Comfy-Org's own templates: a MarkdownNote with the files (links, sizes, folders), groups by step, core loaders
with Comfy-Org's file names (and download hints), the model's own text encoder (core Load CLIP + CLIP Text Encode)
for the text with "new (untrained)", MetaCanvas Apply on the native MODEL, the plan's canvas as native
CONDITIONING, the plan's size taken from the latent, core samplers, core VAE Decode and Save nodes, and the plan
shown over the result (MetaCanvas Plan Preview into a core Preview Image). Defaults are the official templates'
where the task is the same (Wan2.2-5B: 20 steps, cfg 5, uni_pc, shift 8; FLUX-Kontext: 20 steps, euler,
guidance 2.5); the Kontext graph keeps MetaQuery's image guidance 1.5 (DualCFGGuider), which the note says.

    cd tests && python -m support.native_workflows     (rewrites workflows/native_*.json)
"""

from __future__ import annotations

import json
from pathlib import Path

from metacanvas_core import footprint

from .builder import Graph, Node

HF = "https://huggingface.co"
WAN_REPO = f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
# key: (file, models folder, download URL, footprint model label, stored precision)
FILES = {
    "qwen": (
        "qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "text_encoders",
        f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "Qwen2.5-VL-7B",
        "fp8",
    ),
    "wan": (
        "wan2.2_ti2v_5B_fp16.safetensors",
        "diffusion_models",
        f"{WAN_REPO}/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
        "Wan2.2-5B DiT",
        "bf16",
    ),
    "wan_vae": ("wan2.2_vae.safetensors", "vae", f"{WAN_REPO}/vae/wan2.2_vae.safetensors", "Wan2.2 VAE", "bf16"),
    "umt5": (
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "text_encoders",
        f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "umT5-XXL",
        "fp8",
    ),
    "kontext": (
        "flux1-dev-kontext_fp8_scaled.safetensors",
        "diffusion_models",
        f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors",
        "FLUX.1-Kontext DiT",
        "fp8",
    ),
    "ae": (
        "ae.safetensors",
        "vae",
        f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
        "FLUX AE",
        "fp32",
    ),
    "clip_l": (
        "clip_l.safetensors",
        "text_encoders",
        f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "CLIP-L",
        "bf16",
    ),
    "t5xxl": (
        "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "text_encoders",
        f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors",
        "T5-XXL",
        "fp8",
    ),
}
PROMPTS = {
    "text_to_video": "A red ball rolls from the left edge to the right edge of a wooden table while a blue cube stays in the center; the camera slowly pushes in.",
    "image_to_video": "The scene comes alive: the subject on the left turns toward the camera while leaves drift from the top right to the bottom left.",
    "video_editing": "Turn the daytime street into a snowy night scene, keep every car and person where they are, add warm lights in the windows on the right.",
    "in_context_video": "The person from the first image walks into the room from the left and sits on the chair from the second image, placed at the right.",
    "image_editing": "Replace the sky with a purple sunset, put a small yellow sailboat on the water at the bottom left, keep everything else unchanged.",
}
NEGATIVE = "blurry, low quality, distorted, watermark, text"
TITLES = {
    "text_to_video": "text-to-video (native Wan2.2-TI2V-5B)",
    "image_to_video": "image-to-video (native Wan2.2-TI2V-5B)",
    "video_editing": "video editing (native Wan2.2-TI2V-5B)",
    "in_context_video": "reference-images-to-video (native Wan2.2-TI2V-5B)",
    "image_editing": "image editing (native FLUX.1-Kontext-dev)",
}
TASK_NOTES = {
    "text_to_video": "1280x704, 121 frames at 24 fps; the canvas is 3 keyframes of 11x20, spread over the 31 latent frames.",
    "image_to_video": "The image goes to the core Wan22ImageToVideoLatent (kept exactly as the first frame: the canvas never touches it) and to the Plan (image_role 'first frame'), so the planner plans from it.",
    "video_editing": "Write the prompt as an edit instruction. ImageFromBatch keeps the first frames the latent's length needs (keep its length equal to Wan22ImageToVideoLatent's); MetaCanvas Wan Inputs encodes them with the Wan2.2 VAE for the DiT (through the checkpoint's condition embedding: zero until trained), the planner sees 8 of them. The video keeps the source's frame rate.",
    "in_context_video": "1 to 3 reference images (the Plan's images, image_2 and image_3; each of any size): the planner reads them, and MetaCanvas Wan Inputs puts them before the video as clean frames (timestep 0) through the checkpoint's condition embedding (zero until trained).",
    "image_editing": "FLUX.1-Kontext-dev is gated (non-commercial licence: accept it on Hugging Face). The image is scaled by FluxKontextImageScale and VAE-encoded: that latent is the DiT's reference (ReferenceLatent: the canvas never touches it) and sets the output's size, so the edit keeps the photo's aspect; the planner reads the same image. Defaults as Comfy-Org's Kontext template (20 steps, euler, FluxGuidance 2.5), except the guider: DualCFGGuider adds MetaQuery's image guidance (cfg_cond2_negative 1.5, against a branch without the image).",
}


def hint(key: str) -> dict:
    """A loader's download hint as the native templates carry it (the editor offers missing files)."""
    name, directory, url, *_ = FILES[key]
    return {"models": [{"name": name, "url": url, "directory": directory}]}


def _file_row(key: str, role: str) -> str:
    name, directory, url, label, precision = FILES[key]
    size = footprint.weights(label).gib(precision)
    return f"| [{name}]({url}) | {role} | `ComfyUI/models/{directory}/` | {size:.1f} GiB |"


def note(task: str, files: list[tuple[str, str]]) -> str:
    """The template's MarkdownNote: what it does, every file (link, folder, size), what untrained gives."""
    rows = "\n".join(_file_row(key, role) for key, role in files)
    return f"""## MetaCanvas {TITLES[task]}

{TASK_NOTES[task]}

### Model files
The editor offers the missing ones; they are the files a Wan/FLUX/Qwen-Image user already has (sizes computed from the models' configs).

| file | what | folder | size |
|---|---|---|---|
{rows}
| a MetaCanvas checkpoint (optional, `python -m metacanvas_core.train`) | canvas and connectors | `ComfyUI/models/metacanvas/` | 1.2-1.6 GiB |

### Before and after training
No MetaCanvas weights are public yet. With **new (untrained)** the Connector Loader's context 'auto' takes the text from the model's own text encoder (Load CLIP + CLIP Text Encode) and the canvas starts at zero: the output is exactly the plain native graph's. A checkpoint trained with MLLM context (the paper's path) takes the text from the planner instead, and Load CLIP is then not run. Train one: docs/TRAINING.md.

### How it works
MetaCanvas Apply patches the native model (after any LoRA loader or fp8 choice) and the core sampler runs it. MetaCanvas Plan lets the planner (Qwen2.5-VL) write its layout plan into the canvas, for the latent's size. Text Conditioning gives the text; Attach Canvas puts the canvas on the positive conditioning (strength 0-2, optional mask); the negative never gets it. Plan Preview shows the plan over the result."""


def _loaders(g: Graph, unet: str, vae: str, text_encoders: tuple[str, ...]) -> dict[str, Node]:
    """Step 1: the native model, its text encoder, its VAE, the planner and the MetaCanvas checkpoint."""
    x, w = 20, 400
    nodes = {"unet": g.add("UNETLoader", (x, 80), (w, 90), hint(unet), unet_name=FILES[unet][0])}
    if len(text_encoders) == 1:
        (key,) = text_encoders
        nodes["clip"] = g.add("CLIPLoader", (x, 210), (w, 110), hint(key), clip_name=FILES[key][0], type="wan")
    else:
        first, second = text_encoders
        models = {"models": hint(first)["models"] + hint(second)["models"]}
        nodes["clip"] = g.add(
            "DualCLIPLoader",
            (x, 210),
            (w, 130),
            models,
            clip_name1=FILES[first][0],
            clip_name2=FILES[second][0],
            type="flux",
        )
    nodes["vae"] = g.add("VAELoader", (x, 380), (w, 60), hint(vae), vae_name=FILES[vae][0])
    nodes["mllm"] = g.add("MetaCanvasMLLMLoader", (x, 480), (w, 110), hint("qwen"), mllm_folder=FILES["qwen"][0])
    nodes["loader"] = g.add("MetaCanvasConnectorLoader", (x, 630), (w, 130))
    g.link(nodes["mllm"], "mllm", nodes["loader"], "mllm")
    g.link(nodes["unet"], "MODEL", nodes["loader"], "model")
    g.group("Step 1 - Load models", list(nodes.values()))
    return nodes


def _prompts(g: Graph, task: str) -> dict[str, Node]:
    """Step 2 (first part): the prompt and negative prompt, typed once, for the planner and the text encoder."""
    x, w = 480, 420
    return {
        "prompt": g.add("PrimitiveStringMultiline", (x, 80), (w, 180), value=PROMPTS[task]),
        "negative": g.add("PrimitiveStringMultiline", (x, 300), (w, 110), value=NEGATIVE),
    }


def _conditioning(
    g: Graph, task: str, m: dict[str, Node], p: dict[str, Node], latent: Node, images, video, role
) -> dict:
    """Step 3: the plan (sized by the latent), the text, the canvas on the positive, and Apply on the model."""
    x, w = 960, 400
    plan = g.add(
        "MetaCanvasPlan",
        (x, 80),
        (w, 400),
        prompt=PROMPTS[task],
        negative_prompt=NEGATIVE,
        width=1024 if task == "image_editing" else 1280,  # the latent's size wins; these stand if it is disconnected
        height=1024 if task == "image_editing" else 704,
        image_role=role,
    )
    g.link(m["mllm"], "mllm", plan, "mllm")
    g.link(m["loader"], "metacanvas", plan, "metacanvas")
    g.link(p["prompt"], "STRING", plan, "prompt")
    g.link(p["negative"], "STRING", plan, "negative_prompt")
    for name, (node, output) in zip(("images", "image_2", "image_3"), images or (), strict=False):
        g.link(node, output, plan, name)
    if video is not None:
        g.link(video[0], video[1], plan, "video")
    g.link(latent, "LATENT", plan, "latent")
    encodes = {}
    for i, (key, text) in enumerate((("prompt", PROMPTS[task]), ("negative", NEGATIVE))):
        encodes[key] = g.add("CLIPTextEncode", (x, 520 + 120 * i), (w, 90), text=text)
        g.link(m["clip"], "CLIP", encodes[key], "clip")
        g.link(p[key], "STRING", encodes[key], "text")
    text = g.add("MetaCanvasTextConditioning", (x, 780), (w, 120))
    g.link(plan, "plan", text, "plan")
    g.link(m["loader"], "metacanvas", text, "metacanvas")
    g.link(encodes["prompt"], "CONDITIONING", text, "clip_positive")
    g.link(encodes["negative"], "CONDITIONING", text, "clip_negative")
    attach = g.add("MetaCanvasAttachCanvas", (x, 940), (w, 130))
    g.link(text, "positive", attach, "conditioning")
    g.link(plan, "plan", attach, "plan")
    g.link(m["loader"], "metacanvas", attach, "metacanvas")
    apply = g.add("MetaCanvasApply", (x, 1110), (w, 70))
    g.link(m["unet"], "MODEL", apply, "model")
    g.link(m["loader"], "metacanvas", apply, "metacanvas")
    g.group("Step 3 - Plan, text and canvas", [plan, *encodes.values(), text, attach, apply])
    return {"plan": plan, "text": text, "attach": attach, "apply": apply}


def _save(g: Graph, c: dict, m: dict, samples: tuple[Node, str], video: bool, fps_from: Node | None) -> None:
    """Step 5: decode, save, and the plan shown over the result."""
    x = 1900
    decode = g.add("VAEDecode", (x, 80), (380, 50))
    g.link(samples[0], samples[1], decode, "samples")
    g.link(m["vae"], "VAE", decode, "vae")
    saved = [decode]
    if video:
        create = g.add("CreateVideo", (x, 170), (380, 80), fps=24.0)
        g.link(decode, "IMAGE", create, "images")
        if fps_from is not None:
            g.link(fps_from, "fps", create, "fps")  # the edit keeps the source's timing
        save = g.add("SaveVideo", (x, 290), (380, 420), filename_prefix="video/MetaCanvas", format="auto", codec="auto")
        g.link(create, "VIDEO", save, "video")
        saved += [create, save]
    else:
        save = g.add("SaveImage", (x, 170), (380, 420), filename_prefix="MetaCanvas")
        g.link(decode, "IMAGE", save, "images")
        saved.append(save)
    preview = g.add("MetaCanvasPlanPreview", (x, 750), (380, 110))
    g.link(c["plan"], "plan", preview, "plan")
    g.link(m["loader"], "metacanvas", preview, "metacanvas")
    g.link(decode, "IMAGE", preview, "image")
    show = g.add("PreviewImage", (x, 900), (380, 330))
    g.link(preview, "preview", show, "images")
    g.group("Step 5 - Decode and save", [*saved, preview, show])


def _wan(task: str, specs) -> dict:
    g = Graph(specs)
    m = _loaders(g, "wan", "wan_vae", ("umt5",))
    p = _prompts(g, task)
    x, inputs, images, video, parts = 480, [], None, None, None
    if task == "image_to_video":
        start = g.add("LoadImage", (x, 450), (420, 330), image="example.png")
        images, inputs = [(start, "IMAGE")], [start]
    elif task == "in_context_video":
        first = g.add("LoadImage", (x, 450), (420, 330), image="reference_1.png")
        second = g.add("LoadImage", (x, 820), (420, 330), image="reference_2.png")
        images, inputs = [(first, "IMAGE"), (second, "IMAGE")], [first, second]
    elif task == "video_editing":
        load = g.add("LoadVideo", (x, 450), (420, 330), file="source_video.mp4")
        parts = g.add("GetVideoComponents", (x, 820), (420, 90))
        g.link(load, "VIDEO", parts, "video")
        frames = g.add("ImageFromBatch", (x, 950), (420, 100), batch_index=0, length=81)
        g.link(parts, "images", frames, "image")
        video, inputs = (frames, "IMAGE"), [load, parts, frames]
    length = 81 if task == "video_editing" else 121
    latent = g.add(
        "Wan22ImageToVideoLatent",
        (x, 1190 if inputs else 450),
        (420, 200),
        width=1280,
        height=704,
        length=length,
        batch_size=1,
    )
    g.link(m["vae"], "VAE", latent, "vae")
    if task == "image_to_video":
        g.link(inputs[0], "IMAGE", latent, "start_image")
    g.group("Step 2 - Prompt, inputs and latent", [*p.values(), *inputs, latent])
    role = "first frame" if task == "image_to_video" else "references"
    c = _conditioning(g, task, m, p, latent, images, video, role)
    positive: tuple[Node, str] = (c["attach"], "positive")
    sample = []
    if task in ("video_editing", "in_context_video"):
        wan_inputs = g.add("MetaCanvasWanInputs", (1440, 80), (400, 90))
        g.link(c["attach"], "positive", wan_inputs, "positive")
        g.link(m["vae"], "VAE", wan_inputs, "vae")
        g.link(c["plan"], "plan", wan_inputs, "plan")
        positive, sample = (wan_inputs, "positive"), [wan_inputs]
    shift = g.add("ModelSamplingSD3", (1440, 210), (400, 60), shift=8.0)
    g.link(c["apply"], "model", shift, "model")
    sampler = g.add(
        "KSampler",
        (1440, 310),
        (400, 270),
        seed=42,
        steps=20,
        cfg=5.0,
        sampler_name="uni_pc",
        scheduler="simple",
        denoise=1.0,
    )
    g.link(shift, "MODEL", sampler, "model")
    g.link(positive[0], positive[1], sampler, "positive")
    g.link(c["text"], "negative", sampler, "negative")
    g.link(latent, "LATENT", sampler, "latent_image")
    g.group("Step 4 - Sample", [*sample, shift, sampler])
    _save(g, c, m, (sampler, "LATENT"), True, parts)
    g.markdown(
        (-700, 80),
        (680, 1100),
        note(task, [("wan", "the DiT"), ("umt5", "its text encoder"), ("wan_vae", "its VAE"), ("qwen", "the planner")]),
    )
    return g.workflow()


def _kontext(specs) -> dict:
    g = Graph(specs)
    m = _loaders(g, "kontext", "ae", ("clip_l", "t5xxl"))
    p = _prompts(g, "image_editing")
    image = g.add("LoadImage", (480, 450), (420, 330), image="example.png")
    scale = g.add("FluxKontextImageScale", (480, 820), (420, 50))
    g.link(image, "IMAGE", scale, "image")
    encode = g.add("VAEEncode", (480, 910), (420, 50))
    g.link(scale, "IMAGE", encode, "pixels")
    g.link(m["vae"], "VAE", encode, "vae")
    g.group("Step 2 - Prompt, image and latent", [*p.values(), image, scale, encode])
    c = _conditioning(g, "image_editing", m, p, encode, [(scale, "IMAGE")], None, "references")
    x = 1440
    guidance = g.add("FluxGuidance", (x, 80), (400, 60), guidance=2.5)
    g.link(c["attach"], "positive", guidance, "conditioning")
    negative_guidance = g.add("FluxGuidance", (x, 180), (400, 60), guidance=2.5)
    g.link(c["text"], "negative", negative_guidance, "conditioning")
    positive = g.add("ReferenceLatent", (x, 280), (400, 50))
    g.link(guidance, "CONDITIONING", positive, "conditioning")
    g.link(encode, "LATENT", positive, "latent")
    middle = g.add("ReferenceLatent", (x, 370), (400, 50))
    g.link(negative_guidance, "CONDITIONING", middle, "conditioning")
    g.link(encode, "LATENT", middle, "latent")
    guider = g.add("DualCFGGuider", (x, 460), (400, 170), cfg_conds=1.0, cfg_cond2_negative=1.5, style="regular")
    g.link(c["apply"], "model", guider, "model")
    g.link(positive, "CONDITIONING", guider, "cond1")
    g.link(middle, "CONDITIONING", guider, "cond2")
    g.link(negative_guidance, "CONDITIONING", guider, "negative")
    noise = g.add("RandomNoise", (x, 670), (400, 80), noise_seed=42)
    select = g.add("KSamplerSelect", (x, 790), (400, 60), sampler_name="euler")
    sigmas = g.add("BasicScheduler", (x, 890), (400, 110), scheduler="simple", steps=20, denoise=1.0)
    g.link(c["apply"], "model", sigmas, "model")
    sampler = g.add("SamplerCustomAdvanced", (x, 1040), (400, 110))
    for src, out, name in (
        (noise, "NOISE", "noise"),
        (guider, "GUIDER", "guider"),
        (select, "SAMPLER", "sampler"),
        (sigmas, "SIGMAS", "sigmas"),
        (encode, "LATENT", "latent_image"),
    ):
        g.link(src, out, sampler, name)
    g.group("Step 4 - Sample", [guidance, negative_guidance, positive, middle, guider, noise, select, sigmas, sampler])
    _save(g, c, m, (sampler, "output"), False, None)
    files = [
        ("kontext", "the DiT"),
        ("clip_l", "its text encoders"),
        ("t5xxl", ""),
        ("ae", "its VAE"),
        ("qwen", "the planner"),
    ]
    g.markdown((-700, 80), (680, 1100), note("image_editing", files))
    return g.workflow()


def native_workflows(specs) -> dict[str, dict]:
    """Workflow stem -> UI-format workflow, for the five Wan/FLUX tasks."""
    out = {
        f"native_{task}": _wan(task, specs)
        for task in ("text_to_video", "image_to_video", "video_editing", "in_context_video")
    }
    out["native_image_editing"] = _kontext(specs)
    return out


if __name__ == "__main__":
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.append(str(root))
    spec = importlib.util.spec_from_file_location(
        "metacanvas_pack", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["metacanvas_pack"] = pack
    spec.loader.exec_module(pack)
    from .workflows import node_specs

    for name, wf in native_workflows(node_specs(pack)).items():
        (root / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        print(f"workflows/{name}.json")
