"""MetaCanvas on ComfyUI's native Wan2.2-TI2V-5B and FLUX(.1-Kontext) MODEL: a patch, not a fork.

`MetaCanvasPatch` rides on a cloned ModelPatcher as two keyed wrappers (the pattern of core EasyCache):

- OUTER_SAMPLE (the guider, once per sampling run): reads the canvases attached to the *positive* conditioning
  entries (`CANVAS_KEY`, by the Attach Canvas node) and the Wan reference/source latents (`WAN_KEY`), and hands
  them to the model calls of this run through `transformer_options` (keyed by each entry's uuid, so ComfyUI
  batches positive and negative exactly as it would without the canvas).
- DIFFUSION_MODEL (every model call): for the batch rows whose conditioning carries a canvas, a temporary forward
  hook on the patch embedding (Wan `patch_embedding`, FLUX `img_in`) adds the canvas residual with the pack's own
  functions (`wan.add_to_patch_embedding`, `flux.add_to_image_tokens`): only noisy target tokens (never Kontext
  reference tokens, Wan reference frames or frames at timestep 0), the connector's clock σ·1000.

Nothing of the model is replaced or object-patched: weights keep their names, so LoRA loaders, fp8 weight dtypes,
GGUF models and other patches before or after work as before. The connector is an additional model of the
patcher: ComfyUI's memory manager loads it with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metacanvas_core.backbones import BackboneSpec, CanvasInjection
from metacanvas_core.backbones.base import mask_on_tokens
from metacanvas_core.backbones.flux import FluxKontextBackbone, add_to_image_tokens
from metacanvas_core.backbones.wan import WanBackbone, add_to_patch_embedding
from metacanvas_core.errors import MetaCanvasInputError
from metacanvas_core.metacanvas import MetaCanvas

PATCH_KEY = "metacanvas"  # the wrappers' key on the patcher
CANVAS_KEY = "metacanvas_canvas"  # on a CONDITIONING entry: a NativeCanvas
WAN_KEY = "metacanvas_wan"  # on a CONDITIONING entry: WanConditions
RUN_KEY = "metacanvas_run"  # in transformer_options during a sampling run: a CanvasRun
WAN22_VAE_STRIDE, FLUX_VAE_STRIDE = 16, 8


@dataclass
class NativeCanvas:
    """A plan's aligned canvas on a CONDITIONING entry, with its dial; applied by the model MetaCanvas Apply patched."""

    aligned: torch.Tensor  # (1, K, Hc, Wc, D)
    checkpoint: str  # the MetaCanvas it was aligned with (must be the patch's)
    strength: float = 1.0
    mask: torch.Tensor | None = None  # (1 or frames, height, width) in 0..1

    @property
    def acts(self) -> bool:
        """Whether it changes anything: strength 0 or an all-zero mask is exactly no canvas."""
        return self.strength != 0 and (self.mask is None or bool(self.mask.any()))


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
        return WanBackbone.spec_for(dm.dim, dm.text_dim, dm.in_dim, tuple(dm.patch_size), WAN22_VAE_STRIDE)
    if kind == "Flux" and type(dm).__name__ == "Flux":
        p = dm.params
        if p.guidance_embed and p.in_channels == 16 and p.patch_size == 2:
            heads = (dm.num_heads, dm.hidden_size // dm.num_heads)
            return FluxKontextBackbone.spec_for(dm.hidden_size, heads, p.context_in_dim, p.vec_in_dim, FLUX_VAE_STRIDE)
    raise MetaCanvasInputError(
        f"model: MetaCanvas patches native Wan2.2-TI2V-5B (diffusion_models/wan2.2_ti2v_5B_fp16.safetensors) and "
        f"FLUX.1-Kontext-dev (diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors); this MODEL is {name}. "
        "Load one of those with the core Load Diffusion Model node."
    )


@dataclass
class CanvasRun:
    """What one sampling run applies: canvases by conditioning uuid, and Wan's inputs (normalised latents)."""

    canvases: dict
    reference: torch.Tensor | None = None
    source: torch.Tensor | None = None
    condition: torch.Tensor | None = None  # Wan's condition embedding of those inputs: made once, at the first call


class MetaCanvasPatch:
    """The canvas patch on a native model: one MetaCanvas, the wrappers. Shared, never copied, by patcher clones."""

    def __init__(self, mc: MetaCanvas, spec: BackboneSpec) -> None:
        self.mc = mc
        self.spec = spec

    def __deepcopy__(self, memo) -> MetaCanvasPatch:  # ModelPatcher.clone deep-copies model_options
        return self

    # --- once per sampling run -------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        run = self.run_of(guider.conds, guider.model_patcher.model)
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(RUN_KEY, None)

    def run_of(self, conds: dict, base) -> CanvasRun:
        """The canvases of the positive entries (the negative, and an image-guidance middle branch, never get one)
        and their Wan inputs, checked against this patch's MetaCanvas."""
        canvases, wan = {}, []
        for entry in conds.get("positive", []):
            canvas = entry.get(CANVAS_KEY)
            if canvas is not None:
                if canvas.checkpoint != self.mc.name:
                    raise MetaCanvasInputError(
                        f"the positive conditioning's canvas was made with MetaCanvas checkpoint '{canvas.checkpoint}', "
                        f"but MetaCanvas Apply patched the model with '{self.mc.name}': use one Connector Loader for "
                        "both."
                    )
                canvases[entry["uuid"]] = canvas
            if entry.get(WAN_KEY) is not None:
                wan.append(entry[WAN_KEY])
        run = CanvasRun(canvases)
        if wan:
            if self.mc.condition_embedding is None:
                raise MetaCanvasInputError(
                    f"MetaCanvas checkpoint '{self.mc.name}' has no condition embedding, which Wan references and "
                    "source videos need."
                )
            first = wan[0]
            run.reference = None if first.reference is None else base.process_latent_in(first.reference)
            run.source = None if first.source is None else base.process_latent_in(first.source)
        return run

    # --- every model call --------------------------------------------------------------------------
    def diffusion_model(self, executor, *args, **kwargs):
        options = _transformer_options(args, kwargs)
        run: CanvasRun | None = options.get(RUN_KEY)
        if run is None or not (run.canvases or run.reference is not None or run.source is not None):
            return executor(*args, **kwargs)
        x = args[0]
        uuids = options["uuids"]
        chunk = x.shape[0] // len(uuids)
        with_canvas = [(i, run.canvases[u]) for i, u in enumerate(uuids) if u in run.canvases and run.canvases[u].acts]
        rows = [i * chunk + r for i, _ in with_canvas for r in range(chunk)]
        clock = torch.cat([options["sigmas"].float()] * len(uuids)).to(x.device) * 1000  # the connector's σ·1000
        if self.spec.kind == FluxKontextBackbone.kind:
            return self._flux(executor, args, kwargs, x, with_canvas, rows, chunk, clock)
        return self._wan(executor, args, kwargs, x, run, with_canvas, rows, chunk, clock)

    def _injection(self, with_canvas, chunk: int, token_grid, rows, device) -> CanvasInjection | None:
        if not rows:
            return None
        aligned = torch.cat([c.aligned.to(device).expand(chunk, -1, -1, -1, -1) for _, c in with_canvas])
        strength = torch.tensor([c.strength for _, c in with_canvas for _ in range(chunk)])
        mask = None
        if any(c.mask is not None for _, c in with_canvas):
            every = torch.ones(1, *token_grid)
            masks = [every if c.mask is None else mask_on_tokens(c.mask[None], token_grid) for _, c in with_canvas]
            mask = torch.cat([m.expand(chunk, -1, -1, -1) for m in masks])
        return CanvasInjection.on_tokens(self.mc.canvas_connector, aligned, token_grid, rows, strength, mask)

    def _flux(self, executor, args, kwargs, x, with_canvas, rows, chunk, clock):
        ref_latents = args[5] if len(args) > 5 else kwargs.get("ref_latents")
        if rows and not ref_latents:
            raise MetaCanvasInputError(
                "MetaCanvas on FLUX is for FLUX.1-Kontext editing, and this positive conditioning has no reference "
                "image: give it the image to edit with the core ReferenceLatent node (its latent from VAE Encode)."
            )
        if not rows:
            return executor(*args, **kwargs)
        grid = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)  # FLUX pads odd sizes to its 2×2 patches
        canvas = self._injection(with_canvas, chunk, (1, *grid), rows, x.device)
        dm = executor.class_obj
        handle = dm.img_in.register_forward_hook(lambda _m, _a, out: add_to_image_tokens(out, canvas, clock, grid))
        try:
            return executor(*args, **kwargs)
        finally:
            handle.remove()

    def _wan(self, executor, args, kwargs, x, run: CanvasRun, with_canvas, rows, chunk, clock):
        dm = executor.class_obj
        b, _, frames, h, w = x.shape
        timestep = args[1]
        per_frame = timestep if timestep.ndim == 2 else timestep[:, None].expand(b, frames)
        clean = [bool((per_frame[:, f] == 0).all()) for f in range(frames)]  # given frames (image-to-video)
        n_ref = 0 if run.reference is None else run.reference.shape[2]
        args = list(args)
        if n_ref:  # reference frames before the video, clean (timestep 0), as the pack's Wan takes them
            args[0] = torch.cat([run.reference.to(x.device, x.dtype).expand(b, -1, -1, -1, -1), x], 2)
            args[1] = torch.cat([per_frame.new_zeros(b, n_ref), per_frame], 1)
        if run.condition is None and (run.reference is not None or run.source is not None):
            run.condition = self.mc.condition_embedding(self._condition(run, frames, x)).to(x.device)
        condition = run.condition
        p = self.spec.pixel_stride // WAN22_VAE_STRIDE
        if rows:
            _check_wan_latent_size(h, w, p)
        canvas = self._injection(with_canvas, chunk, (frames, h // p, w // p), rows, x.device)

        def add(_module, _args, out):
            return add_to_patch_embedding(out, canvas, clock, n_ref, clean, condition)

        handle = dm.patch_embedding.register_forward_hook(add)
        try:
            out = executor(*args, **kwargs)
        finally:
            handle.remove()
        return out[:, :, n_ref:]

    def _condition(self, run: CanvasRun, frames: int, x: torch.Tensor) -> torch.Tensor:
        """[source latent | is-reference | has-source] per latent frame, references first (the pack's Wan layout)."""
        z, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        n_ref = 0 if run.reference is None else run.reference.shape[2]
        c = torch.zeros(1, z + 2, n_ref + frames, h, w, device=x.device)
        c[:, z, :n_ref] = 1
        if run.source is not None:
            if run.source.shape[2] < frames or run.source.shape[-2:] != (h, w):
                raise MetaCanvasInputError(
                    f"video: the source video gives {run.source.shape[2]} latent frames of "
                    f"{tuple(run.source.shape[-2:])}, the sampler makes {frames} of {(h, w)}: load at least as many "
                    "frames (length) at the latent's width and height."
                )
            c[:, :z, n_ref:] = run.source[:, :, :frames].to(x.device)
            c[:, z + 1, n_ref:] = 1
        return c


def _check_wan_latent_size(h: int, w: int, patch: int) -> None:
    """The canvas lies on whole DiT patches: a latent whose size the patches do not tile (ComfyUI's Wan pads it)
    has no canvas position for the padded tokens; refused naming the input and its valid neighbours."""
    stride = patch * WAN22_VAE_STRIDE
    for name, value in (("width", w * WAN22_VAE_STRIDE), ("height", h * WAN22_VAE_STRIDE)):
        if value % stride:
            raise MetaCanvasInputError(
                f"{name} {value}: MetaCanvas on Wan2.2 needs a latent {name} that is a multiple of {stride} pixels "
                f"(whole 2×2 DiT patches for the canvas): set the {name} of Wan22ImageToVideoLatent (or of the latent "
                f"you sample) to {max(stride, value // stride * stride)} or {(value // stride + 1) * stride}."
            )


def _transformer_options(args, kwargs) -> dict:
    """The transformer_options of a diffusion model call (positional in ComfyUI's Wan and FLUX forwards)."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    return next(a for a in reversed(args) if isinstance(a, dict))
