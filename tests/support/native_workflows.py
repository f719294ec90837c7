"""The shipped native workflows (workflows/native_*.json), written from one description so they stay alike:
core loaders with Comfy-Org's file names (and download hints), MetaCanvas Apply on the native MODEL, the plan's text
and canvas as native CONDITIONING, core samplers, core VAE Decode and Save nodes, and the plan shown over the result
(MetaCanvas Plan Preview into a core Preview Image).

    cd tests && python -m support.native_workflows     (rewrites workflows/native_*.json)
"""

from __future__ import annotations

import json
from pathlib import Path

from .builder import Graph, Node

HF = "https://huggingface.co"
FILES = {
    "qwen": (
        "qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "text_encoders",
        f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    ),
    "wan": (
        "wan2.2_ti2v_5B_fp16.safetensors",
        "diffusion_models",
        f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
    ),
    "wan_vae": (
        "wan2.2_vae.safetensors",
        "vae",
        f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/wan2.2_vae.safetensors",
    ),
    "kontext": (
        "flux1-dev-kontext_fp8_scaled.safetensors",
        "diffusion_models",
        f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors",
    ),
    "ae": (
        "ae.safetensors",
        "vae",
        f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
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


def hint(key: str) -> dict:
    """A loader's download hint as the native templates carry it (the editor offers missing files)."""
    name, directory, url = FILES[key]
    return {"models": [{"name": name, "url": url, "directory": directory}]}


NOTE_COMMON = """Files (the editor offers any that are missing; the first choice is what a Wan/FLUX/Qwen-Image user already has):
- {model} -> ComfyUI/models/{model_dir}/
- {vae} -> ComfyUI/models/vae/
- qwen_2.5_vl_7b_fp8_scaled.safetensors (Qwen-Image's text encoder: the planner) -> ComfyUI/models/text_encoders/
- MetaCanvas checkpoints (*.safetensors, what `python -m metacanvas_core.train` writes) -> ComfyUI/models/metacanvas/

How it works: MetaCanvas Apply patches the native model (after any LoRA loader or fp8 choice) and the core sampler runs it; MetaCanvas Plan lets the MLLM write its plan into the canvas; Text Conditioning turns the plan's prompt into the text slot (the paper's path: the MLLM replaces {text_encoder}, so no {text_encoder} file is needed); Attach Canvas puts the canvas on the positive conditioning (strength 0-2, optional mask). The negative never gets the canvas.

What you get today: no MetaCanvas weights are public. With 'new (untrained)' the canvas starts at zero (the model's own prediction, unchanged) and the context connector is untrained, so the text it gives is noise: train a checkpoint first (docs/TRAINING.md), or for the plain model's output with canvas hooks in place, replace Text Conditioning by core Load CLIP ({text_encoder}) + CLIP Text Encode and set the Connector Loader's context to 'native'. For SANA, and for the diffusers-folder graphs, use the other MetaCanvas templates (the pack's own sampler)."""
WAN_NOTE = {
    "model": FILES["wan"][0],
    "model_dir": "diffusion_models",
    "vae": FILES["wan_vae"][0],
    "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
}
FLUX_NOTE = {
    "model": FILES["kontext"][0],
    "model_dir": "diffusion_models",
    "vae": FILES["ae"][0],
    "text_encoder": "t5xxl_fp8_e4m3fn_scaled.safetensors + clip_l.safetensors",
}
TASK_NOTES = {
    "text_to_video": "MetaCanvas text-to-video on native Wan2.2-TI2V-5B. 704x1280 (or 1280x704), 121 frames at 24 fps; the canvas is 3 keyframes of 11x20, spread over the 31 latent frames.",
    "image_to_video": "MetaCanvas image-to-video on native Wan2.2-TI2V-5B. The image goes to the core Wan22ImageToVideoLatent (kept exactly as the first frame: the canvas never touches it) and to the Plan (image_role 'first frame') so the MLLM plans from it.",
    "video_editing": "MetaCanvas video editing on native Wan2.2-TI2V-5B. Write the prompt as an edit instruction. ImageFromBatch keeps the first frames the latent's length needs (keep its length equal to Wan22ImageToVideoLatent's); MetaCanvas Wan Inputs encodes them with the Wan2.2 VAE for the DiT (through the checkpoint's condition embedding: zero until trained), the MLLM sees 8 of them. The video keeps the source's frame rate.",
    "in_context_video": "MetaCanvas reference-images-to-video on native Wan2.2-TI2V-5B. 1 to 3 reference images (the Plan's images, image_2 and image_3; each of any size): the MLLM reads them, and MetaCanvas Wan Inputs puts them before the video as clean frames (timestep 0) through the checkpoint's condition embedding.",
    "image_editing": "MetaCanvas image editing on native FLUX.1-Kontext-dev (gated, non-commercial licence: accept it on Hugging Face). The image goes to the Plan (the MLLM reads it) and, scaled by FluxKontextImageScale and VAE-encoded, to ReferenceLatent (the DiT's reference tokens: the canvas never touches them). DualCFGGuider: cfg_conds = text guidance, cfg_cond2_negative = image guidance against a branch without the image (MetaQuery's 1.5); FluxGuidance 2.5 is Kontext's embedded guidance.",
}


def _planning(g: Graph, unet_file: str, width: int, height: int, task: str, images=None, video=None, role="references"):
    """MLLM + checkpoint + Plan + Text Conditioning + Attach Canvas + Apply; returns the nodes later parts link to.
    `images`: (node, output) of each picture, into the Plan's images, image_2, image_3."""
    mllm = g.add("MetaCanvasMLLMLoader", (20, 60), (380, 110), hint("qwen"), mllm_folder=FILES["qwen"][0])
    unet_key = "wan" if "wan" in unet_file else "kontext"
    unet = g.add("UNETLoader", (20, 220), (380, 90), hint(unet_key), unet_name=unet_file)
    loader = g.add("MetaCanvasConnectorLoader", (440, 60), (330, 130))
    g.link(mllm, "mllm", loader, "mllm")
    g.link(unet, "MODEL", loader, "model")
    plan = g.add(
        "MetaCanvasPlan",
        (820, 60),
        (400, 420),
        prompt=PROMPTS[task],
        negative_prompt=NEGATIVE,
        width=width,
        height=height,
        image_role=role,
    )
    g.link(mllm, "mllm", plan, "mllm")
    g.link(loader, "metacanvas", plan, "metacanvas")
    for name, (node, output) in zip(("images", "image_2", "image_3"), images or (), strict=False):
        g.link(node, output, plan, name)
    if video is not None:
        g.link(video[0], video[1], plan, "video")
    text = g.add("MetaCanvasTextConditioning", (1260, 60), (300, 80))
    g.link(plan, "plan", text, "plan")
    g.link(loader, "metacanvas", text, "metacanvas")
    attach = g.add("MetaCanvasAttachCanvas", (1260, 190), (300, 130))
    g.link(text, "positive", attach, "conditioning")
    g.link(plan, "plan", attach, "plan")
    g.link(loader, "metacanvas", attach, "metacanvas")
    apply = g.add("MetaCanvasApply", (440, 240), (330, 70))
    g.link(unet, "MODEL", apply, "model")
    g.link(loader, "metacanvas", apply, "metacanvas")
    return {"mllm": mllm, "unet": unet, "loader": loader, "plan": plan, "text": text, "attach": attach, "apply": apply}


def _plan_preview(g: Graph, p: dict, decode: Node, pos: tuple[int, int]) -> None:
    """MetaCanvas Plan Preview (the plan over the decoded result) into a core Preview Image, below the result.
    Added last, so the nodes and links before it keep their ids."""
    preview = g.add("MetaCanvasPlanPreview", pos, (330, 110))
    g.link(p["plan"], "plan", preview, "plan")
    g.link(p["loader"], "metacanvas", preview, "metacanvas")
    g.link(decode, "IMAGE", preview, "image")
    show = g.add("PreviewImage", (pos[0] + 370, pos[1]), (330, 330))
    g.link(preview, "preview", show, "images")


def _wan(task: str, specs) -> dict:
    g = Graph(specs)
    images = video = None
    start = None
    if task == "image_to_video":
        start = g.add("LoadImage", (20, 360), (380, 330), image="example.png")
        images = [(start, "IMAGE")]
    elif task == "in_context_video":
        first = g.add("LoadImage", (20, 360), (380, 330), image="reference_1.png")
        second = g.add("LoadImage", (20, 720), (380, 330), image="reference_2.png")
        images = [(first, "IMAGE"), (second, "IMAGE")]
    elif task == "video_editing":
        load = g.add("LoadVideo", (20, 360), (380, 330), file="source_video.mp4")
        parts = g.add("GetVideoComponents", (440, 380), (330, 90))
        g.link(load, "VIDEO", parts, "video")
        frames = g.add("ImageFromBatch", (440, 500), (330, 100), batch_index=0, length=81)
        g.link(parts, "images", frames, "image")
        video = (frames, "IMAGE")
    role = "first frame" if task == "image_to_video" else "references"
    length = 81 if task == "video_editing" else 121
    p = _planning(g, FILES["wan"][0], 1280, 704, task, images, video, role)
    shift = g.add("ModelSamplingSD3", (440, 360), (330, 60), shift=8.0)
    g.link(p["apply"], "model", shift, "model")
    vae = g.add(
        "VAELoader",
        (20, 1080 if task == "in_context_video" else 720),
        (380, 60),
        hint("wan_vae"),
        vae_name=FILES["wan_vae"][0],
    )
    latent = g.add(
        "Wan22ImageToVideoLatent", (1260, 360), (300, 200), width=1280, height=704, length=length, batch_size=1
    )
    g.link(vae, "VAE", latent, "vae")
    if start is not None:
        g.link(start, "IMAGE", latent, "start_image")
    positive: tuple[Node, str] = (p["attach"], "positive")
    if task in ("video_editing", "in_context_video"):
        inputs = g.add("MetaCanvasWanInputs", (1260, 610), (300, 90))
        g.link(p["attach"], "positive", inputs, "positive")
        g.link(vae, "VAE", inputs, "vae")
        g.link(p["plan"], "plan", inputs, "plan")
        positive = (inputs, "positive")
    sampler = g.add(
        "KSampler",
        (1600, 60),
        (320, 270),
        seed=42,
        steps=30,
        cfg=5.0,
        sampler_name="uni_pc",
        scheduler="simple",
        denoise=1.0,
    )
    g.link(shift, "MODEL", sampler, "model")
    g.link(positive[0], positive[1], sampler, "positive")
    g.link(p["text"], "negative", sampler, "negative")
    g.link(latent, "LATENT", sampler, "latent_image")
    decode = g.add("VAEDecode", (1960, 60), (220, 50))
    g.link(sampler, "LATENT", decode, "samples")
    g.link(vae, "VAE", decode, "vae")
    create = g.add("CreateVideo", (1960, 150), (220, 80), fps=24.0)
    g.link(decode, "IMAGE", create, "images")
    if task == "video_editing":
        g.link(parts, "fps", create, "fps")  # the edit keeps the source's timing
    save = g.add("SaveVideo", (2220, 60), (330, 420), filename_prefix="video/MetaCanvas", format="auto", codec="auto")
    g.link(create, "VIDEO", save, "video")
    g.note((820, 760), (1100, 300), TASK_NOTES[task] + "\n\n" + NOTE_COMMON.format(**WAN_NOTE))
    _plan_preview(g, p, decode, (1960, 520))
    return g.workflow()


def _kontext(specs) -> dict:
    g = Graph(specs)
    image = g.add("LoadImage", (20, 360), (380, 330), image="example.png")
    p = _planning(g, FILES["kontext"][0], 1024, 1024, "image_editing", [(image, "IMAGE")])
    vae = g.add("VAELoader", (20, 720), (380, 60), hint("ae"), vae_name=FILES["ae"][0])
    scale = g.add("FluxKontextImageScale", (440, 380), (330, 50))
    g.link(image, "IMAGE", scale, "image")
    encode = g.add("VAEEncode", (440, 470), (330, 50))
    g.link(scale, "IMAGE", encode, "pixels")
    g.link(vae, "VAE", encode, "vae")
    guidance = g.add("FluxGuidance", (1260, 360), (300, 60), guidance=2.5)
    g.link(p["attach"], "positive", guidance, "conditioning")
    negative_guidance = g.add("FluxGuidance", (1260, 460), (300, 60), guidance=2.5)
    g.link(p["text"], "negative", negative_guidance, "conditioning")
    positive = g.add("ReferenceLatent", (1260, 560), (300, 50))
    g.link(guidance, "CONDITIONING", positive, "conditioning")
    g.link(encode, "LATENT", positive, "latent")
    middle = g.add("ReferenceLatent", (1260, 650), (300, 50))
    g.link(negative_guidance, "CONDITIONING", middle, "conditioning")
    g.link(encode, "LATENT", middle, "latent")
    guider = g.add("DualCFGGuider", (1600, 60), (320, 170), cfg_conds=1.0, cfg_cond2_negative=1.5, style="regular")
    g.link(p["apply"], "model", guider, "model")
    g.link(positive, "CONDITIONING", guider, "cond1")
    g.link(middle, "CONDITIONING", guider, "cond2")
    g.link(negative_guidance, "CONDITIONING", guider, "negative")
    noise = g.add("RandomNoise", (1600, 270), (320, 80), noise_seed=42)
    select = g.add("KSamplerSelect", (1600, 390), (320, 60), sampler_name="euler")
    sigmas = g.add("BasicScheduler", (1600, 490), (320, 110), scheduler="simple", steps=28, denoise=1.0)
    g.link(p["apply"], "model", sigmas, "model")
    latent = g.add("EmptySD3LatentImage", (1600, 640), (320, 110), width=1024, height=1024, batch_size=1)
    sampler = g.add("SamplerCustomAdvanced", (1960, 60), (260, 110))
    for src, out, name in (
        (noise, "NOISE", "noise"),
        (guider, "GUIDER", "guider"),
        (select, "SAMPLER", "sampler"),
        (sigmas, "SIGMAS", "sigmas"),
        (latent, "LATENT", "latent_image"),
    ):
        g.link(src, out, sampler, name)
    decode = g.add("VAEDecode", (2260, 60), (220, 50))
    g.link(sampler, "output", decode, "samples")
    g.link(vae, "VAE", decode, "vae")
    save = g.add("SaveImage", (2260, 160), (330, 400), filename_prefix="MetaCanvas")
    g.link(decode, "IMAGE", save, "images")
    g.note((820, 760), (1100, 320), TASK_NOTES["image_editing"] + "\n\n" + NOTE_COMMON.format(**FLUX_NOTE))
    _plan_preview(g, p, decode, (2260, 600))
    return g.workflow()


def native_workflows(specs) -> dict[str, dict]:
    """Workflow stem → UI-format workflow, for the five Wan/FLUX tasks."""
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
