"""MetaCanvas on ComfyUI's native Wan2.2-TI2V-5B and FLUX(.1-Kontext) MODEL: a patch, not a fork.

`MetaCanvasPatch` rides on a cloned ModelPatcher as two keyed wrappers (the pattern of core EasyCache):

- OUTER_SAMPLE (the guider, once per sampling run): reads the canvases attached to the *positive* conditioning
  entries (`CANVAS_KEY`, by the Attach Canvas node; checked against the patch's checkpoint by content and against
  the latent's size) and the Wan reference/source latents (`WAN_KEY`), hands them to the model calls of this run
  through `transformer_options` (keyed by each entry's uuid, so ComfyUI batches positive and negative exactly as
  it would without the canvas), and registers a forward hook on the patch embedding (Wan `patch_embedding`, FLUX
  `img_in`) for the run.
- DIFFUSION_MODEL (every model call): for the batch rows whose conditioning carries a canvas, sets what the hook
  adds with the canvas mechanism the diffusers adapters also use (`metacanvas_core/injection.py`): only noisy target
  tokens (never Kontext reference tokens, Wan reference frames or frames at timestep 0), the connector's clock
  sigma·1000; under a context window, the canvas, its mask and Wan's source video cut to the window's frames. Every
  assumption about ComfyUI's calling convention that decides where the canvas goes is checked here.

Nothing of the model is replaced or object-patched: weights keep their names, so LoRA loaders, fp8 weight dtypes,
GGUF models and other patches before or after work as before. The connector is an additional model of the
patcher: ComfyUI's memory manager loads it with the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.injection import (
    CanvasInjection,
    add_to_image_tokens,
    add_to_patch_embedding,
    canvas_acts,
    mask_on_tokens,
    prepend_references,
    wan_condition,
)
from metacanvas_core.metacanvas import MetaCanvas
from metacanvas_core.sizes import check_size
from metacanvas_core.specs import (
    FLUX_KONTEXT,
    FLUX_VAE_STRIDE,
    WAN,
    WAN_VAE_STRIDE,
    BackboneSpec,
    flux_kontext_spec,
    wan_spec,
)

from .compat import comfyui_version

PATCH_KEY = "metacanvas"  # the wrappers' key on the patcher
CANVAS_KEY = "metacanvas_canvas"  # on a CONDITIONING entry: a NativeCanvas
WAN_KEY = "metacanvas_wan"  # on a CONDITIONING entry: WanConditions
RUN_KEY = "metacanvas_run"  # in transformer_options during a sampling run: a CanvasRun
VAE_STRIDES = {WAN: WAN_VAE_STRIDE, FLUX_KONTEXT: FLUX_VAE_STRIDE}
LATENT_NODES = {WAN: "Wan22ImageToVideoLatent", FLUX_KONTEXT: "the image's VAE Encode"}


def latent_size(kind: str, samples: torch.Tensor) -> tuple[int, int]:
    """(height, width) in pixels of a native latent of the backbone `kind` (what a plan for it must be made for)."""
    if kind not in VAE_STRIDES:
        raise MetaCanvasInputError(
            f"latent: MetaCanvas takes sizes from native Wan2.2 and FLUX-Kontext latents; the checkpoint is for {kind}: "
            "disconnect the latent and set the Plan's width and height."
        )
    return samples.shape[-2] * VAE_STRIDES[kind], samples.shape[-1] * VAE_STRIDES[kind]


@dataclass
class NativeCanvas:
    """A plan's aligned canvas on a CONDITIONING entry, with its dial; applied by the model MetaCanvas Apply patched."""

    aligned: torch.Tensor  # (1, K, Hc, Wc, D)
    checkpoint: str  # the MetaCanvas it was aligned with, by name (for messages)
    identity: str  # and by content (`MetaCanvas.identity`): must be the patch's
    size: tuple[int, int]  # (height, width) of the output the plan was made for
    strength: float = 1.0
    mask: torch.Tensor | None = None  # (1 or frames, height, width) in 0..1

    @property
    def acts(self) -> bool:
        return canvas_acts(self.strength, self.mask)


@dataclass
class WanConditions:
    """Wan's own inputs from a plan's images/video, encoded by the native Wan2.2 VAE (raw latents, not normalised)."""

    reference: torch.Tensor | None  # (1, z, R, h, w): reference images, one latent frame each
    source: torch.Tensor | None  # (1, z, F, h, w): a source video (video editing)


def _comfy_model(model):
    """The BaseModel and its diffusion model of a MODEL, with its class name for messages."""
    base = model.model
    return base, base.diffusion_model, f"{type(base).__name__} ({type(base.model_config).__name__})"


def native_spec(model) -> BackboneSpec:
    """The MetaCanvas backbone spec of a native MODEL; refuses any model MetaCanvas cannot patch, naming it."""
    base, dm, name = _comfy_model(model)
    kind = type(base).__name__
    if kind == "WAN22" and type(dm).__name__ == "WanModel" and dm.in_dim == 48 and dm.out_dim == 48:
        return wan_spec(dm.dim, dm.text_dim, dm.in_dim, tuple(dm.patch_size), WAN_VAE_STRIDE)
    if kind == "Flux" and type(dm).__name__ == "Flux":
        p = dm.params
        if p.guidance_embed and p.in_channels == 16 and p.patch_size == 2:
            heads = (dm.num_heads, dm.hidden_size // dm.num_heads)
            return flux_kontext_spec(dm.hidden_size, heads, p.context_in_dim, p.vec_in_dim, FLUX_VAE_STRIDE)
    raise MetaCanvasInputError(
        f"model: MetaCanvas patches native Wan2.2-TI2V-5B (diffusion_models/wan2.2_ti2v_5B_fp16.safetensors) and "
        f"FLUX.1-Kontext-dev (diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors); this MODEL is {name}. "
        "Load one of those with the core Load Diffusion Model node."
    )


@dataclass
class ModelCall:
    """What the patch-embedding hook adds during one model call (set by the DIFFUSION_MODEL wrapper)."""

    canvas: CanvasInjection | None
    clock: torch.Tensor  # the connector's sigma·1000 per batch row
    n_ref: int = 0  # Wan: reference frames before the video
    noisy: torch.Tensor | None = None  # Wan: (B, F) 1 on the frames being denoised
    condition: torch.Tensor | None = None  # Wan: the condition embedding of the call's frames
    grid: tuple[int, int] = (0, 0)  # FLUX: the target's token rows × columns


@dataclass
class CanvasRun:
    """What one sampling run applies: the acting canvases by conditioning uuid, Wan's inputs (normalised latents),
    the latent frames of the whole video (a context window sees some of them), and the current model call."""

    canvases: dict
    frames: int = 1
    reference: torch.Tensor | None = None
    source: torch.Tensor | None = None
    call: ModelCall | None = None

    @property
    def active(self) -> bool:
        return bool(self.canvases) or self.reference is not None or self.source is not None


class MetaCanvasPatch:
    """The canvas patch on a native model: one MetaCanvas, the wrappers. Shared, never copied, by patcher clones.

    Under core TorchCompileModel the diffusion model (and so the DIFFUSION_MODEL wrapper) is compiled, the sampling
    run (OUTER_SAMPLE) is not: the run registers the patch-embedding hook and decides once what acts, and every model
    call only sets `CanvasRun.call` with tensor operations, so the compiled graph has no break and no host sync.
    """

    def __init__(self, mc: MetaCanvas, spec: BackboneSpec) -> None:
        self.mc = mc
        self.spec = spec

    def __deepcopy__(self, memo) -> MetaCanvasPatch:  # ModelPatcher.clone deep-copies model_options
        return self

    # --- once per sampling run -------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        noise = args[0] if args else kwargs["noise"]
        run = self.run_of(guider.conds, guider.model_patcher.model, noise)
        if not run.active:  # nothing to add: the run is the unpatched model's, without even the hook
            return executor(*args, **kwargs)
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUN_KEY] = run
        try:
            with self.hooked(run, guider.model_patcher.model.diffusion_model):
                return executor(*args, **kwargs)
        finally:
            options.pop(RUN_KEY, None)

    @contextmanager
    def hooked(self, run: CanvasRun, dm) -> Iterator[None]:
        """The patch-embedding hook (Wan `patch_embedding`, FLUX `img_in`) of one sampling run, registered outside the
        compiled model calls: it adds what the current call set (`CanvasRun.call`), nothing between calls."""
        embedding = dm.img_in if self.spec.kind == FLUX_KONTEXT else dm.patch_embedding
        handle = embedding.register_forward_hook(lambda _module, _args, out: self._add(run, out))
        try:
            yield
        finally:
            handle.remove()

    def run_of(self, conds: dict, base, noise: torch.Tensor) -> CanvasRun:
        """The acting canvases of the positive entries (the negative, and an image-guidance middle branch, never get
        one) and their Wan inputs, checked against this patch's MetaCanvas and the latent being sampled."""
        video = self.spec.kind != FLUX_KONTEXT
        if noise.ndim != (5 if video else 4):
            raise MetaCanvasInputError(
                f"the sampler's latent has shape {tuple(noise.shape)}; MetaCanvas on {self.spec.kind} knows latents of "
                f"{5 if video else 4} dimensions (ComfyUI {comfyui_version()}): sample an empty latent of that model."
            )
        positive = conds.get("positive", [])
        if video and any(e.get(CANVAS_KEY) is not None or e.get(WAN_KEY) is not None for e in positive):
            _check_wan_latent_size(noise.shape[-2], noise.shape[-1], self.spec.pixel_stride)
        canvases, wan = {}, []
        for entry in positive:
            canvas = entry.get(CANVAS_KEY)
            if canvas is not None:
                if canvas.identity != self.mc.identity:
                    raise MetaCanvasInputError(
                        f"the positive conditioning's canvas was made with MetaCanvas checkpoint "
                        f"{self.mc.describe(canvas.checkpoint, canvas.identity)}, but MetaCanvas Apply patched the "
                        f"model with {self.mc.describe()}: use one Connector Loader for both."
                    )
                self._check_size(canvas.size, noise)
                if canvas.acts:
                    canvases[entry["uuid"]] = canvas
            if entry.get(WAN_KEY) is not None:
                wan.append(entry[WAN_KEY])
        run = CanvasRun(canvases, noise.shape[2] if video else 1)
        if wan:
            if self.mc.condition_embedding is None:
                raise MetaCanvasInputError(
                    f"MetaCanvas checkpoint '{self.mc.name}' has no condition embedding, which Wan references and "
                    "source videos need."
                )
            first = wan[0]
            run.reference = None if first.reference is None else base.process_latent_in(first.reference)
            run.source = None if first.source is None else base.process_latent_in(first.source)
            if run.source is not None and (
                run.source.shape[2] < run.frames or run.source.shape[-2:] != noise.shape[-2:]
            ):
                raise MetaCanvasInputError(
                    f"video: the source video gives {run.source.shape[2]} latent frames of "
                    f"{tuple(run.source.shape[-2:])}, the sampler makes {run.frames} of {tuple(noise.shape[-2:])}: load "
                    "at least as many frames (length) at the latent's width and height."
                )
        return run

    def _check_size(self, size: tuple[int, int], noise: torch.Tensor) -> None:
        """The plan's canvas must be made for the latent it is applied to (else it would be stretched over it)."""
        latent = latent_size(self.spec.kind, noise)
        if tuple(size) != latent:
            raise MetaCanvasInputError(
                f"the plan was made for {size[1]}×{size[0]} (MetaCanvas Plan's width × height), the sampler's latent "
                f"is {latent[1]}×{latent[0]} ({LATENT_NODES[self.spec.kind]}): connect that latent to the Plan's "
                f"latent input (or set its width and height to {latent[1]} and {latent[0]})."
            )

    # --- every model call (compiled under TorchCompileModel: tensor operations only) ----------------------------
    def diffusion_model(self, executor, *args, **kwargs):
        options = _transformer_options(args, kwargs)
        run: CanvasRun | None = options.get(RUN_KEY)
        if run is None or not run.active:
            return executor(*args, **kwargs)
        x, uuids = args[0], options.get("uuids")
        if uuids is None or "sigmas" not in options or x.shape[0] % len(uuids):
            raise MetaCanvasInputError(
                f"ComfyUI {comfyui_version()} calls the model without the conditioning uuids and sigmas MetaCanvas "
                "places the canvas by (or with a batch they do not divide): MetaCanvas does not support this release."
            )
        chunk = x.shape[0] // len(uuids)
        with_canvas = [(i, run.canvases[u]) for i, u in enumerate(uuids) if u in run.canvases]
        rows = [i * chunk + r for i, _ in with_canvas for r in range(chunk)]
        clock = torch.cat([options["sigmas"].float()] * len(uuids)).to(x.device) * 1000  # the connector's sigma·1000
        if self.spec.kind == FLUX_KONTEXT:
            run.call = self._flux(args, kwargs, x, with_canvas, rows, chunk, clock)
        else:
            args, run.call = self._wan(args, options, x, run, with_canvas, rows, chunk, clock)
        try:
            out = executor(*args, **kwargs)
        finally:
            run.call = None
        return out if self.spec.kind == FLUX_KONTEXT else out[:, :, run_refs(run) :]

    def _add(self, run: CanvasRun, out: torch.Tensor) -> torch.Tensor | None:
        """The patch-embedding hook: the current call's canvas (and Wan condition) on the embedded tokens."""
        call = run.call
        if call is None:
            return None
        if self.spec.kind == FLUX_KONTEXT:
            return add_to_image_tokens(out, call.canvas, call.clock, call.grid)
        return add_to_patch_embedding(out, call.canvas, call.clock, call.n_ref, call.noisy, call.condition)

    def _injection(self, with_canvas, chunk: int, token_grid, rows, device) -> CanvasInjection | None:
        if not rows:
            return None
        aligned = torch.cat([c.aligned.to(device).expand(chunk, -1, -1, -1, -1) for _, c in with_canvas])
        strength = [c.strength for _, c in with_canvas for _ in range(chunk)]
        mask = None
        if any(c.mask is not None for _, c in with_canvas):
            every = torch.ones(1, *token_grid)
            masks = [every if c.mask is None else mask_on_tokens(c.mask[None], token_grid) for _, c in with_canvas]
            mask = torch.cat([m.expand(chunk, -1, -1, -1) for m in masks])
        return CanvasInjection.on_tokens(self.mc.canvas_connector, aligned, token_grid, rows, strength, mask)

    def _flux(self, args, kwargs, x, with_canvas, rows, chunk, clock) -> ModelCall | None:
        ref_latents = args[5] if len(args) > 5 else kwargs.get("ref_latents")
        if rows and not ref_latents:
            raise MetaCanvasInputError(
                "MetaCanvas on FLUX is for FLUX.1-Kontext editing, and this positive conditioning has no reference "
                "image: give it the image to edit with the core ReferenceLatent node (its latent from VAE Encode)."
            )
        if not rows:
            return None
        grid = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)  # FLUX pads odd sizes to its 2×2 patches
        return ModelCall(self._injection(with_canvas, chunk, (1, *grid), rows, x.device), clock, grid=grid)

    def _wan(self, args, options, x, run: CanvasRun, with_canvas, rows, chunk, clock) -> tuple[list, ModelCall]:
        b, _, frames, h, w = x.shape
        timestep = args[1]
        if not (timestep.shape == (b,) or timestep.shape == (b, frames)):
            raise MetaCanvasInputError(
                f"ComfyUI {comfyui_version()} calls Wan2.2 with timesteps of shape {tuple(timestep.shape)} for a "
                f"latent of {frames} frames; MetaCanvas knows one per sample ({b},) or one per latent frame "
                f"({b}, {frames}), where 0 marks a given frame: MetaCanvas does not support this release."
            )
        per_frame = timestep if timestep.ndim == 2 else timestep[:, None].expand(b, frames)
        window = _window_frames(options, frames, run.frames)
        args = list(args)
        n_ref = run_refs(run)
        if n_ref:  # reference frames before the video, clean (timestep 0), as the adapters put them
            args[0], args[1] = prepend_references(x, per_frame, run.reference)
        condition = None
        if run.reference is not None or run.source is not None:
            source = None if run.source is None else run.source[:, :, window]
            layout = wan_condition(n_ref, len(window), (x.shape[1], h, w), source, x.device)
            condition = self.mc.condition_embedding(layout).to(x.device)
        p = self.spec.pixel_stride // WAN_VAE_STRIDE
        canvas = None
        if rows:  # the fuse block in the DiT's compute dtype (x's), not the float32 ComfyUI embeds patches in
            canvas = self._injection(with_canvas, chunk, (run.frames, h // p, w // p), rows, x.device)
            canvas = replace(canvas.on_frames(window), compute_dtype=x.dtype)
        return args, ModelCall(canvas, clock, n_ref, per_frame != 0, condition)


def run_refs(run: CanvasRun) -> int:
    """Reference frames the patch puts before the video."""
    return 0 if run.reference is None else run.reference.shape[2]


def _window_frames(options: dict, frames: int, total: int) -> list[int]:
    """The frames of the whole video a Wan model call sees: a context window's (core WanContextWindowsManual and
    ContextWindowsManual put it in transformer_options, its indices into the video, after a causal anchor frame
    where 0.33+ prepends one), else all. A window whose frames do not match the call's is refused."""
    window = options.get("context_window")
    if window is None or (frames == total and len(window.index_list) != frames):  # none, or one left from before
        return list(range(frames))
    indices = list(window.index_list)
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is not None and anchor >= 0:
        indices = [anchor, *indices]
    if len(indices) != frames or not all(0 <= i < total for i in indices):
        raise MetaCanvasInputError(
            f"ComfyUI {comfyui_version()} calls Wan2.2 on {frames} latent frames in a context window of frames "
            f"{indices[:3]}...{indices[-1:]} of {total} (guide frames?): MetaCanvas knows windows of the video's own "
            "frames only. Use core WanContextWindowsManual / ContextWindowsManual without guide frames."
        )
    return indices


def _check_wan_latent_size(h: int, w: int, stride: int) -> None:
    """The canvas lies on whole DiT patches (`stride` pixels): a latent whose size the patches do not tile (ComfyUI's
    Wan pads it) has no canvas position for the padded tokens; refused naming the input and its valid neighbours."""
    why = "MetaCanvas on Wan2.2 needs whole 2×2 DiT patches for the canvas"
    for name, value in (("width", w * WAN_VAE_STRIDE), ("height", h * WAN_VAE_STRIDE)):
        setting = f"the {name} of Wan22ImageToVideoLatent (or of the latent you sample)"
        check_size(name, value, stride, why, setting)


def _transformer_options(args, kwargs) -> dict:
    """The transformer_options of a diffusion model call (positional in ComfyUI's Wan and FLUX forwards)."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    return next(a for a in reversed(args) if isinstance(a, dict))
