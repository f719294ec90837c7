"""The MetaCanvas trainer: rectified-flow velocity loss through MLLM → canvas connector → backbone.

One code path for 1 CPU, 1 GPU and many GPUs (accelerate: DDP, or FSDP from an accelerate config).
Per step: x_t = (1 − σ)·x0 + σ·noise, target = noise − x0, the backbone is called at t = σ·T (T =
the scheduler's num_train_timesteps, 1000: the timesteps the sampler passes). Condition dropout
(p = 0.1): a dropped sample gets the empty prompt's context and no canvas, exactly the sampler's
unconditional branch, so classifier-free guidance has a learned null branch (paper §2.6 [D]).

Everything random in a step (dropout draws, σ, noise) comes from a generator seeded by (seed, step,
rank), the data order from (seed, epoch), so a run resumed from a saved state repeats the loss
trace of an uninterrupted one; accelerate's `save_state` carries model, optimizer, scheduler and
the global RNG states, `trainer_state.json` the step and the data cursor.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..backbones import Backbone, CanvasInjection, load_backbone
from ..canvas import interpolate_canvas
from ..checkpoint import MetaCanvas, load_metacanvas, new_metacanvas, save_metacanvas
from ..errors import MetaCanvasInputError
from ..planner import CanvasLora, Plan, Planner, video_frames_for_mllm
from .config import DIT_PATTERNS, TrainConfig, resolve_path
from .data import (
    BACKBONE_KINDS,
    RECORD_KINDS,
    DataMix,
    ManifestError,
    Record,
    Source,
    _seed,
    load_frames,
    load_image,
    load_input_image,
    read_manifest,
)
from .synthetic import write_synthetic

log = logging.getLogger(__name__)
LORA_NAME = "canvas"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Batch:
    source: str
    records: list[Record]
    latents: torch.Tensor  # (B, C, h, w) float32
    texts: list[str]
    inputs: list[list[Image.Image]]  # what the MLLM sees per sample (input images, then frames of a source video)
    height: int
    width: int
    conditions: list[dict] = field(default_factory=list)  # per sample: backbone inputs (images, video, image_role)


class _Trained(nn.Module):
    """The modules that hold trainable weights, wrapped once by accelerate (DDP / FSDP).

    Frozen models are not registered here, so saved states hold only what can change.
    """

    def __init__(self, mc: MetaCanvas, transformer: nn.Module | None, mllm: nn.Module | None) -> None:
        super().__init__()
        self.mc = mc
        if transformer is not None:
            self.transformer = transformer
        if mllm is not None:
            self.mllm = mllm
        self._loss = None  # set by the trainer; a plain attribute, not a module

    def forward(self, step: int, train: bool = True) -> torch.Tensor:
        return self._loss(step, train)


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (embeds (b, L, D), mask (b, L)) pairs on the batch, zero-padding L."""
    length = max(e.shape[1] for e, _ in parts)
    embeds = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in parts])
    masks = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in parts])
    return embeds, masks


def lora_merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-wrapped model's state with its LoRA merged into the base weights (plain module names)."""
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key, a in state.items():
        m = re.match(r"(.*)\.lora_A\.([^.]+)\.weight$", key)
        if m:
            b = state[f"{m.group(1)}.lora_B.{m.group(2)}.weight"]
            w = out[f"{m.group(1)}.weight"]
            out[f"{m.group(1)}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path,
        max_steps: int | None = None,
        resume: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config
        self.out = Path(output_dir)
        self.max_steps = max_steps or config.max_steps
        self.progress = progress
        mp = config.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # also lets several CPU processes (torchrun) form a gloo group
            mixed_precision=mp,
            step_scheduler_with_optimizer=False,  # warm-up counts optimizer steps, whatever the process count
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._load_models()
        self._select_trainable()
        self.mix = self._load_data()
        self._build_optimizer()
        self.step = 0
        self._text_cache: dict = {}
        if resume is not None:
            self._resume(Path(resume))

    # --- models -----------------------------------------------------------------------------
    def _model_folder(self, value: str) -> Path:
        if not value.startswith("tiny:"):
            path = resolve_path(value)
            if not path.exists():
                raise MetaCanvasInputError(f"recipe '{self.config.name}': model folder '{path}' does not exist.")
            return path
        from .. import tiny

        what = value[len("tiny:") :]
        writers = {
            "mllm": "write_tiny_qwen",
            "sana": "write_tiny_sana",
            "flux_kontext": "write_tiny_flux_kontext",
            "wan": "write_tiny_wan",
        }
        if what not in writers or not hasattr(tiny, writers[what]):
            raise MetaCanvasInputError(f"'{value}': no such tiny model ({', '.join('tiny:' + k for k in writers)}).")
        folder = self.out / "tiny-models" / what
        if self.accelerator.is_main_process and not folder.is_dir():
            getattr(tiny, writers[what])(folder)
        self.accelerator.wait_for_everyone()
        return folder

    def _load_models(self) -> None:
        c = self.config
        dit_parts = [p for p in c.trainable if p.startswith("dit")]
        self.trains_dit = bool(dit_parts)
        frozen = DTYPES[c.frozen_dtype]
        self.mllm_folder = self._model_folder(c.mllm)
        self.backbone_folder = self._model_folder(c.backbone)
        self.planner = Planner.from_folder(self.mllm_folder, dtype=frozen, device=self.device)
        self.backbone: Backbone = load_backbone(
            self.backbone_folder, dtype=torch.float32 if self.trains_dit else frozen, device=self.device
        )
        torch.manual_seed(c.seed)  # new canvas embeddings and connectors are seeded by the recipe
        if c.init_checkpoint:
            self.mc = load_metacanvas(resolve_path(c.init_checkpoint), self.device)
            self.mc.check_compatible(self.planner, self.backbone)
        else:
            kw = {}
            if "context_source" in inspect.signature(new_metacanvas).parameters:  # backbones with both paths
                kw["context_source"] = c.context_source or ("mllm" if "context_connector" in c.trainable else None)
            self.mc = new_metacanvas(self.planner, self.backbone, **kw)
        self.mc.float()
        self.kinds = BACKBONE_KINDS.get(self.backbone.kind, ("t2i",))
        self.is_video = bool(getattr(self.backbone, "is_video", False))
        self.num_train_timesteps = int(self.backbone.scheduler_config.get("num_train_timesteps", 1000))

    def _select_trainable(self) -> None:
        c = self.config
        mc, transformer, planner = self.mc, self.backbone.transformer, self.planner
        for m in (mc, transformer, planner.model, *self.backbone.modules()):
            m.requires_grad_(False)
        params: dict[str, nn.Parameter] = {}
        self.lora: CanvasLora | None = mc.lora  # used by the planner (trained or as loaded)
        mllm_module = None
        for part in c.trainable:
            if part in ("canvas", "canvas_connector", "context_connector", "condition_embedding"):
                module = getattr(mc, part)
                if module is None:
                    raise MetaCanvasInputError(
                        f"recipe '{c.name}': this MetaCanvas for the {self.backbone.kind} backbone has no {part} to "
                        "train (context_connector: only with context_source mllm; condition_embedding: Wan only)."
                    )
                params.update({f"mc.{part}.{n}": p for n, p in module.named_parameters()})
            elif part == "mllm_lora":
                mllm_module = self._make_mllm_lora()
                params.update({f"mllm.{n}": p for n, p in mllm_module.named_parameters() if "lora_" in n})
            elif part == "dit_lora":
                from peft import LoraConfig

                settings = dict(c.dit_lora)
                transformer.add_adapter(LoraConfig(**settings), adapter_name="dit")
                self.dit_lora_scale = settings.get("lora_alpha", settings["r"]) / settings["r"]
                params.update({f"transformer.{n}": p for n, p in transformer.named_parameters() if ".lora_" in n})
            else:
                pattern = DIT_PATTERNS.get(part) or part[len("dit:") :]
                found = {
                    f"transformer.{n}": p
                    for n, p in transformer.named_parameters()
                    if re.search(pattern, n) and ".lora_" not in n
                }
                if not found:
                    raise MetaCanvasInputError(
                        f"recipe '{c.name}': trainable part '{part}' matches no parameter of the "
                        f"{self.backbone.kind} transformer."
                    )
                params.update(found)
        for p in params.values():
            p.requires_grad_(True)
        self.params = params
        self.canvas_grad = any(p in c.trainable for p in ("canvas", "mllm_lora"))
        # Frozen parts in inference mode; trained ones in training mode.
        for m in self.backbone.modules():
            m.eval()
        transformer.train(self.trains_dit)
        mc.eval()
        for part in ("canvas", "canvas_connector", "context_connector", "condition_embedding"):
            if part in c.trainable:
                getattr(mc, part).train()
        planner.model.eval()
        if mllm_module is not None:
            mllm_module.train()  # LoRA dropout
        if c.gradient_checkpointing:
            if hasattr(transformer, "enable_gradient_checkpointing"):
                transformer.enable_gradient_checkpointing()
            if self.canvas_grad:
                planner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                planner.model.train()  # HF checkpoints only in training mode; Qwen2.5-VL has no dropout
        self.module = _Trained(mc, transformer if self.trains_dit else None, mllm_module)
        self.module._loss = self._loss

    def _make_mllm_lora(self) -> nn.Module:
        """The canvas LoRA as a peft Activated LoRA (invoked by the canvas start marker) on the planner."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        planner, settings = self.planner, dict(self.config.mllm_lora)
        config = LoraConfig(**settings, alora_invocation_tokens=[planner.canvas_start_id], task_type="CAUSAL_LM")
        planner._peft = get_peft_model(planner.model, config, adapter_name=LORA_NAME)
        if self.mc.lora is not None:  # continue from the init checkpoint's LoRA
            set_peft_model_state_dict(planner._peft, self.mc.lora.state_dict, adapter_name=LORA_NAME)
        self.lora = CanvasLora(LORA_NAME, settings, {})
        return planner._peft

    # --- data -------------------------------------------------------------------------------
    def _load_data(self) -> DataMix:
        c = self.config
        buckets = [tuple(b) for b in c.buckets]
        sources = []
        for i, src in enumerate(c.data):
            if "synthetic" in src:
                spec = dict(src["synthetic"])
                folder = self.out / "synthetic" / f"{i}_{spec.get('kind', 't2i')}"
                if self.accelerator.is_main_process:
                    write_synthetic(folder, **spec)
                self.accelerator.wait_for_everyone()
                manifest = folder / f"{spec.get('kind', 't2i')}.jsonl"
            else:
                manifest = resolve_path(src["manifest"])
            records = read_manifest(manifest, c.skip_bad_records, self.kinds)
            name = src.get("name") or f"{i}:{manifest.name}"
            sources.append(Source(name, records, float(src.get("weight", 1.0)), buckets, c.batch_size, c.seed + i))
        mix = DataMix(sources, c.seed)
        if c.latent_cache:
            self._build_latent_cache(mix)
        return mix

    def _cache_root(self) -> Path:
        root = resolve_path(self.config.latent_cache)
        return root if root.is_absolute() else self.out / root

    def _cache_path(self, source: Source, index: int, height: int, width: int) -> Path:
        return self._cache_root() / re.sub(r"\W", "_", source.name) / f"{index:08d}_{height}x{width}.pt"

    def _build_latent_cache(self, mix: DataMix) -> None:
        """Encode every record's target at its bucket size once (main process), so steps skip the VAE."""
        root = self._cache_root()
        fingerprint = {"backbone": self.backbone.kind, "vae": self.backbone.vae.config.get("_class_name", "")}
        fingerprint["vae_config"] = json.dumps(dict(self.backbone.vae.config), sort_keys=True, default=str)
        meta = root / "cache.json"
        if self.accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if meta.is_file() and json.loads(meta.read_text()) != fingerprint:
                raise MetaCanvasInputError(f"latent cache '{root}' was made with another VAE: use a new folder.")
            meta.write_text(json.dumps(fingerprint))
            for source in mix.sources:
                for index, (record, b) in enumerate(zip(source.records, source.bucket_of, strict=True)):
                    h, w = source.buckets[b]
                    path = self._cache_path(source, index, h, w)
                    if not path.is_file():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(self._encode([record], h, w)[0].cpu(), path)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def _encode(self, records: list[Record], height: int, width: int) -> torch.Tensor:
        """Target latents: (B, C, h, w) for image backbones, (B, C, F, h, w) for video ones (an image: F = 1)."""
        pixels = []
        for r in records:
            field_name = RECORD_KINDS[r.kind].target
            try:
                if RECORD_KINDS[r.kind].media == "video":
                    if not self.is_video:
                        raise ManifestError(f"{r.where('kind')}: {r.kind} records need a video backbone")
                    pixels.append(load_frames(r.target, self.config.frames, height, width))
                else:
                    pixels.append(load_image(r.target, height, width))
            except OSError as e:
                raise ManifestError(f"{r.where(field_name)}: cannot read '{r.target}' ({e})") from None
        if not self.is_video:
            return self.backbone.encode(torch.stack(pixels)).float()
        out = []
        for p in pixels:
            frames = p if isinstance(p, list) else [Image.fromarray((p.numpy() * 255).round().astype("uint8"))]
            out.append(self.backbone.encode_video(frames, height, width).float())
        return torch.cat(out)

    def _batch(self, source: Source, indices: list[int]) -> Batch:
        records = [source.records[i] for i in indices]
        h, w = source.buckets[source.bucket_of[indices[0]]]
        if self.config.latent_cache:
            latents = torch.stack([torch.load(self._cache_path(source, i, h, w)) for i in indices])
        else:
            latents = self._encode(records, h, w)
        inputs, conditions = [], []
        for r in records:
            cond = self._conditions(r, h, w)
            conditions.append(cond)
            inputs.append(cond["images"] + video_frames_for_mllm(cond["video"]))
        return Batch(source.name, records, latents.float(), [r.text for r in records], inputs, h, w, conditions)

    def _conditions(self, r: Record, height: int, width: int) -> dict:
        """A record's inputs as a plan carries them: images (+ their role) and a source video."""
        kind = RECORD_KINDS[r.kind]
        cond = {"images": [], "video": [], "image_role": "references", "to_backbone": kind.backbone_inputs}
        try:
            if kind.input_media == "video":  # video_edit: the source clip, as long as the target
                cond["video"] = load_frames(r.inputs[0], self.config.frames, height, width)
            elif r.kind == "edit" and self.is_video:  # an image edit on a video backbone: a one-frame source video
                cond["video"] = [load_input_image(r.inputs[0])]
            else:
                cond["images"] = [load_input_image(p) for p in r.inputs]
        except OSError as e:
            raise ManifestError(f"{r.where(kind.inputs[0])}: cannot read its input ({e})") from None
        if r.kind == "i2v":
            cond["image_role"] = "first frame"
        return cond

    def _references(self, batch: Batch, i: int, grid) -> dict | None:
        """The backbone's own inputs for sample i (FLUX-Kontext reference tokens, Wan first frame/references/source)."""
        cond = batch.conditions[i] if batch.conditions else None
        if cond is None or not cond["to_backbone"] or not (cond["images"] or cond["video"]):
            return None
        if type(self.backbone).prepare_references is Backbone.prepare_references:
            return None
        empty = torch.zeros(1, 0, 1)
        plan = Plan(batch.texts[i], "", empty, empty[..., 0], empty, grid, images=cond["images"])
        if "video" in Plan.__dataclass_fields__:
            plan.video, plan.image_role = cond["video"], cond["image_role"]
        refs = self.backbone.prepare_references(plan, self.mc, batch.height, batch.width)
        fit = getattr(self.backbone, "fit_references", None)  # Wan: encode the source frames the clip needs
        if fit is not None and self.is_video:
            refs = fit(refs, (batch.latents.shape[2] - 1) * self.backbone.temporal_stride + 1)
        return refs

    # --- the loss ---------------------------------------------------------------------------
    def _sigmas(self, n: int, g: torch.Generator) -> torch.Tensor:
        c = self.config
        if c.timestep_sampling == "uniform":
            s = torch.rand(n, generator=g)
        else:
            s = torch.sigmoid(torch.randn(n, generator=g) * c.logit_std + c.logit_mean)
        return c.flow_shift * s / (1 + (c.flow_shift - 1) * s)

    def _native_context(self, text: str, negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen text encoder's (embeds, mask) of one prompt, from a bounded cache (exact: no grad, no dropout)."""
        key = (text, negative)
        hit = self._text_cache.pop(key, None)
        if hit is None:
            encode = self.backbone.encode_negative if negative else self.backbone.encode_prompt
            embeds, mask = encode([text])
            hit = (embeds.detach(), mask.detach())
        self._text_cache[key] = hit  # most recent last
        while len(self._text_cache) > self.config.text_cache_size:
            self._text_cache.pop(next(iter(self._text_cache)))
        return hit

    def _loss(self, step: int, train: bool = True) -> torch.Tensor:
        c, batch, dev = self.config, self._current, self.device
        planner, backbone, mc = self.planner, self.backbone, self.mc
        b = len(batch.texts)
        g = torch.Generator().manual_seed(_seed(c.seed, 11, step, self.accelerator.process_index if train else 0))
        drop = (torch.rand(b, generator=g) < c.cond_dropout) if train else torch.zeros(b, dtype=torch.bool)
        noise = torch.randn(batch.latents.shape, generator=g)
        sigma = self._sigmas(b, g)
        order = sorted(range(b), key=lambda i: bool(drop[i]))  # kept samples first: the canvas rows are 0..k
        kept = [i for i in order if not drop[i]]
        dropped = [i for i in order if drop[i]]
        x0 = batch.latents[order].to(dev)
        noise, sigma = noise[order].to(dev), sigma[order].to(dev)
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        t = sigma * self.num_train_timesteps

        use_canvas = c.canvas_on and bool(kept)
        grid = mc.canvas_grid(batch.height, batch.width) if c.canvas_on else None
        canvas_states, mllm_context = [], []
        if use_canvas:
            embeds = mc.canvas(grid)
            with torch.set_grad_enabled(self.canvas_grad and train):
                for i in kept:
                    hidden, n = planner.forward(batch.texts[i], batch.inputs[i], embeds, grid, self.lora)
                    canvas_states.append(hidden[:, n + 1 :])
                    mllm_context.append(hidden[:, :n])
        # Context: the backbone's own text encoder, or the MLLM's prompt states through the context connector.
        if mc.info.context_source == "native":
            parts = [self._native_context(batch.texts[i], False) for i in kept]
            parts += [self._native_context("", True) for _ in dropped]
        else:
            states = []
            with torch.no_grad():
                for j, i in enumerate(order):
                    if j < len(mllm_context):
                        states.append(mllm_context[j].detach())
                    else:
                        text = batch.texts[i] if i in kept else ""
                        states.append(
                            planner.forward(
                                text, batch.inputs[i], None, grid or mc.canvas_grid(batch.height, batch.width)
                            )[0]
                        )
            connector = mc.context_connector
            dtype = next(connector.parameters()).dtype
            parts = [
                (connector(st.to(dev, dtype)), torch.ones(1, st.shape[1], dtype=torch.long, device=dev))
                for st in states
            ]
        context, mask = _pad_cat([(e.to(dev), m.to(dev)) for e, m in parts])

        injection = None
        if use_canvas:
            states = torch.cat(canvas_states).to(dev, torch.float32)
            aligned = mc.canvas_connector.align(states).reshape(len(kept), grid.frames, grid.height, grid.width, -1)
            size = (batch.height, batch.width) + ((x0.shape[2] * 4 - 3,) if self.is_video else ())
            tokens = interpolate_canvas(aligned, backbone.token_grid(*size))
            injection = CanvasInjection(mc.canvas_connector, tokens, rows=slice(0, len(kept)))
        g_ = grid or mc.canvas_grid(batch.height, batch.width)
        refs = [self._references(batch, i, g_) for i in order]
        if not self.is_video:
            extra = {}
            if any(r is not None for r in refs):
                if b != 1:
                    raise MetaCanvasInputError(
                        f"recipe '{c.name}': the {backbone.kind} backbone takes one set of input images per call, "
                        "so batch_size must be 1 (scale the batch with more processes)."
                    )
                extra["references"] = refs[0]
            v = backbone.predict(x_t, t, context, mask, injection, **extra)
            return F.mse_loss(v.float(), target.float())
        # Video backbones take one scalar timestep per call (their per-token timesteps): one call per sample.
        losses = []
        for i in range(b):
            inj = None
            if injection is not None and i < len(kept):
                inj = CanvasInjection(injection.connector, injection.canvas[i : i + 1], slice(0, 1))
            keep = mask[i].bool()
            extra = {"references": refs[i]} if refs[i] is not None else {}
            v = backbone.predict(x_t[i : i + 1], t[i], context[i : i + 1, keep], mask[i : i + 1, keep], inj, **extra)
            first = 1 if refs[i] and "first_frame" in refs[i] else 0  # image-to-video: frame 0 is given, not learned
            losses.append(F.mse_loss(v[:, :, first:].float(), target[i : i + 1, :, first:].float()))
        return torch.stack(losses).mean()

    # --- optimisation -----------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        c = self.config
        optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay
        )
        start = c.warmup_start_lr / c.lr

        def factor(step: int) -> float:  # linear warm-up from about warmup_start_lr, then constant
            if c.warmup_steps <= 0:
                return 1.0
            return start + (1 - start) * min(1.0, (step + 1) / c.warmup_steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(self.module, optimizer, scheduler)

    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step_*"))

    def save_state(self) -> Path:
        folder = self.out / "checkpoints" / f"step_{self.step:07d}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            state = {"step": self.step, "data": self.mix.state(), "recipe": self.config.name}
            (folder / "trainer_state.json").write_text(json.dumps(state))
            for old in self._checkpoints()[: -self.config.keep_checkpoints or None]:
                if old != folder:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return folder

    def _resume(self, path: Path) -> None:
        if not (path / "trainer_state.json").is_file():
            found = sorted((path / "checkpoints").glob("step_*"))
            if not found:
                raise MetaCanvasInputError(f"--resume '{path}': no saved training state (checkpoints/step_*) there.")
            path = found[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        self.accelerator.load_state(str(path))
        self.step = int(state["step"])
        self.mix.load_state(state["data"])
        log.info("resumed from %s at step %d", path, self.step)

    # --- the loop ---------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss over the first `eval_samples` records of the first source with fixed noise and σ, no dropout."""
        source = self.mix.sources[0]
        n = min(self.config.eval_samples, len(source.records))
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(source.bucket_of[i], []).append(i)
        modes = [(m, m.training) for m in self.accelerator.unwrap_model(self.module).modules()]
        self.accelerator.unwrap_model(self.module).eval()
        total = 0.0
        chunks = [
            g[i : i + self.config.batch_size] for g in groups.values() for i in range(0, len(g), self.config.batch_size)
        ]
        for k, indices in enumerate(chunks):
            self._current = self._batch(source, indices)
            with self.accelerator.autocast():
                total += float(self._loss(10**9 + k, train=False)) * len(indices)
        for m, mode in modes:
            m.train(mode)
        return total / max(n, 1)

    def train(self) -> list[float]:
        """Run to `max_steps`; returns this run's losses (one per step)."""
        from tqdm.auto import tqdm

        acc, c = self.accelerator, self.config
        metrics = self.out / "metrics.jsonl"
        if acc.is_main_process and metrics.is_file():  # a resumed run rewrites what came after its state
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        if acc.is_main_process:
            (self.out / "recipe.json").write_text(json.dumps(asdict(c), indent=1))
        if self.step == 0 and c.eval_samples:
            self._log({"step": 0, "eval_loss": self.evaluate()})
        losses = []
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (self.progress and acc.is_main_process))
        saved_at = None
        while self.step < self.max_steps:
            source, indices = self.mix.next(self.step, acc.num_processes, acc.process_index)
            self._current = self._batch(source, indices)
            start = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            with acc.autocast():
                loss = self.module(self.step)
            acc.backward(loss)
            if c.grad_clip:
                acc.clip_grad_norm_(list(self.params.values()), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            value = acc.reduce(loss.detach(), "mean").item()
            if not math.isfinite(value):
                raise RuntimeError(f"loss is {value} at step {self.step}: lower the learning rate.")
            losses.append(value)
            speed = len(indices) * acc.num_processes / (time.perf_counter() - start)
            if self.step % c.log_every == 0 or self.step == self.max_steps:
                self._log(
                    {
                        "step": self.step,
                        "loss": value,
                        "lr": lr,
                        "samples_per_s": round(speed, 3),
                        "source": source.name,
                    }
                )
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if c.save_every and self.step % c.save_every == 0:
                self.save_state()
                saved_at = self.step
        bar.close()
        if saved_at != self.step:
            self.save_state()
        if c.eval_samples:
            self._log({"step": self.step, "eval_loss": self.evaluate()})
        self.export()
        return losses

    # --- export -----------------------------------------------------------------------------
    def export(self) -> dict[str, Path]:
        """Write the MetaCanvas checkpoint (+ the trained backbone as a pipeline folder) into the output folder."""
        acc = self.accelerator
        state = acc.get_state_dict(self.module)  # full weights on the main process (gathers FSDP shards)
        paths = {"metacanvas": self.out / f"{self.config.name}.safetensors"}
        if self.trains_dit:
            paths["backbone"] = self.out / "backbone"
        if not acc.is_main_process:
            return paths
        unwrapped = acc.unwrap_model(self.module)
        mc = MetaCanvas(self.mc.info, name=paths["metacanvas"].name)
        mc.load_state_dict({k[len("mc.") :]: v for k, v in state.items() if k.startswith("mc.")})
        mc.lora = self.mc.lora
        if hasattr(unwrapped, "mllm"):
            from peft import get_peft_model_state_dict

            sub = {k[len("mllm.") :]: v for k, v in state.items() if k.startswith("mllm.")}
            lora_state = get_peft_model_state_dict(unwrapped.mllm, state_dict=sub, adapter_name=LORA_NAME)
            mc.lora = CanvasLora(paths["metacanvas"].stem, dict(self.config.mllm_lora), lora_state)
        mc.info = replace(mc.info, lora=dict(mc.lora.config) if mc.lora is not None else None)
        save_metacanvas(mc, paths["metacanvas"])
        if self.trains_dit:
            self._export_backbone(
                {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")},
                paths["backbone"],
            )
        return paths

    def _export_backbone(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        """A diffusers pipeline folder: the trained transformer, the other parts linked to the source."""
        if any(".lora_" in k for k in state):
            state = lora_merged_state(state, self.dit_lora_scale)
        transformer = self.backbone.transformer
        fresh = type(transformer).from_config(transformer.config)
        fresh.load_state_dict(state)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        fresh.save_pretrained(folder / "transformer", safe_serialization=True)
        for entry in Path(self.backbone_folder).iterdir():
            if entry.name != "transformer":
                target = folder / entry.name
                if entry.is_file():
                    shutil.copy2(entry, target)  # model_index.json and other small files
                else:
                    target.symlink_to(entry.resolve(), target_is_directory=True)
