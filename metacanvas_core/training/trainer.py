"""The MetaCanvas trainer: the loop around `FlowMatchingObjective`, one code path for 1 CPU, 1 GPU and many GPUs.

accelerate runs the processes and DDP; `sharding: fsdp` shards the trained modules with FSDP2 (`sharding.py`)
instead. The loop loads the models and picks what trains, draws micro-batches (`BatchMaker`) from the data mix,
steps the optimizer, saves resumable states (`checkpoints.py`) and exports (`export.py`). Every random draw
of a step is seeded by (seed, step, draw), the data order by (seed, epoch); a state holds the trained weights,
optimizer and scheduler, `trainer_state.json` the step and every process's data cursor, so a resumed run
repeats the loss trace of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..backbones import Backbone, load_backbone
from ..checkpoint import load_metacanvas
from ..errors import MetaCanvasInputError
from ..inputs import ContextSource
from ..metacanvas import default_context_source, new_metacanvas
from ..planner import CanvasLora, Planner
from . import checkpoints
from .batches import BatchMaker, ImageEncoder
from .config import SINGLE_FILE_DTYPES, TrainConfig, accumulation, as_run, resolve_path, source_batches
from .data import BACKBONE_KINDS, DataMix, Source, _seed, read_manifest
from .export import export_backbone, export_metacanvas
from .init import init_modules
from .objective import FlowMatchingObjective, Frozen
from .parts import MC_PARTS, add_dit_lora, select_parameters
from .preview import PixelCodec, write_samples
from .sharding import no_sync, shard
from .shards import ShardSource
from .synthetic import write_synthetic

log = logging.getLogger(__name__)
LORA_NAME = "canvas"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path,
        max_steps: int | None = None,
        resume: str | Path | None = None,
        progress: bool = True,
        encode: ImageEncoder | None = None,
    ) -> None:
        """`encode`: an image encoder for the targets in place of the backbone's VAE (experiments). `notices`: what
        the run does differently from the paper's recipe and why (`config.as_run`), for the caller to show at start."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        config, self.notices = as_run(config)
        self.config = config
        self.out = Path(output_dir)
        self.max_steps = max_steps or config.max_steps
        self.progress = progress
        mp = config.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.mixed_precision = mp
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # also lets several CPU processes (torchrun) form a gloo group
            mixed_precision=mp,
            step_scheduler_with_optimizer=False,  # warm-up counts optimizer steps, whatever the process count
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.sharded = config.sharding == "fsdp" and self.accelerator.num_processes > 1
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._load_models()
        self._select_trainable()
        self.codec = None
        if config.codec == "pixels":
            self.codec = PixelCodec(self.backbone.vae_stride, self.backbone.vae.config.latent_channels)
            encode = encode or self.codec.encode
        self.batches = BatchMaker(self.backbone, config.frames, self._cache_root(), encode)
        self.mix = self._load_data()
        self._build_optimizer()
        self.step = 0
        self.samples: Path | None = None
        self.exported: dict[str, Path] = {}  # what export() wrote, by kind (metacanvas, backbone, diffusion_model)
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
        if what not in writers:
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
        torch.manual_seed(c.seed)  # the global RNG (dropout in LoRAs and connectors) follows the recipe
        mllm_context = "context_connector" in c.trainable or "context_connector" in (c.init_from or {})
        source = c.context_source or (ContextSource.MLLM if mllm_context else None)
        if c.init_checkpoint:
            self.mc = load_metacanvas(resolve_path(c.init_checkpoint), self.device)
            source = self.mc.config.context_source
        # With MLLM context the backbone's own text encoder is never used: not loaded (FLUX still reads CLIP-L for
        # the pooled vector of the empty prompt).
        self.backbone: Backbone = load_backbone(
            self.backbone_folder,
            dtype=torch.float32 if self.trains_dit else frozen,
            device=self.device,
            text_encoder=source != ContextSource.MLLM,
        )
        if not c.init_checkpoint:
            source = source or default_context_source(self.backbone.has_text_encoder)
            pooled = self.backbone.default_pooled()  # FLUX with MLLM context: stored with the checkpoint
            self.mc = new_metacanvas(self.planner.hidden_size, self.backbone.spec, source, seed=c.seed, pooled=pooled)
        if c.init_from:
            init_modules(self.mc, {k: resolve_path(v) for k, v in c.init_from.items()})
        self.mc.check_compatible(
            self.planner.hidden_size,
            str(self.mllm_folder),
            self.backbone.spec,
            str(self.backbone_folder),
            self.backbone.has_text_encoder,
        )
        self.mc.to(self.device).float()

    def _select_trainable(self) -> None:
        c = self.config
        mc, transformer, planner = self.mc, self.backbone.transformer, self.planner
        for m in (mc, transformer, planner.model, *self.backbone.modules()):
            m.requires_grad_(False)
        self.dit_lora_scale: float | None = None
        mllm_module = None
        if "mllm_lora" in c.trainable:  # the canvas LoRA, continued from the init checkpoint's when it has one
            start = mc.lora.state_dict if mc.lora is not None else {}
            mllm_module = planner.add_canvas_lora(mc.with_lora(CanvasLora(LORA_NAME, dict(c.mllm_lora), start)).lora)
        if "dit_lora" in c.trainable:
            self.dit_lora_scale = add_dit_lora(transformer, dict(c.dit_lora))
        params = select_parameters(c, mc, transformer, self.backbone.kind, mllm_module)
        for p in params.values():
            p.requires_grad_(True)
        self.params = params
        # Frozen parts in inference mode; trained ones in training mode.
        for m in self.backbone.modules():
            m.eval()
        transformer.train(self.trains_dit)
        mc.eval()
        for part in MC_PARTS:
            if part in c.trainable:
                getattr(mc, part).train()
        planner.model.eval()
        if mllm_module is not None:
            mllm_module.train()  # LoRA dropout
        canvas_grad = any(p in c.trainable for p in ("canvas", "mllm_lora"))
        if c.gradient_checkpointing:
            if hasattr(transformer, "enable_gradient_checkpointing"):
                transformer.enable_gradient_checkpointing()
            if canvas_grad:
                planner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                planner.model.train()  # HF checkpoints only in training mode; Qwen2.5-VL has no dropout
        self.objective = FlowMatchingObjective(
            c,
            mc,
            Frozen(planner, self.backbone),
            transformer=transformer if self.trains_dit else None,
            mllm=mllm_module,
        )

    # --- data -------------------------------------------------------------------------------
    def _load_data(self) -> DataMix:
        c = self.config
        acc = self.accelerator
        buckets = [tuple(b) for b in c.buckets]
        kinds = BACKBONE_KINDS.get(self.backbone.kind, ("t2i",))
        sources = []
        self.accum: list[int] = []  # micro-batches per process and step, by source
        for i, src in enumerate(c.data):
            batch, _ = source_batches(c, src)
            if "webdataset" in src:
                name = src.get("name") or f"{i}:webdataset"
                self.accum.append(accumulation(c, src, name, acc.num_processes))
                sources.append(
                    ShardSource.from_spec(
                        name,
                        src["webdataset"],
                        float(src.get("weight", 1.0)),
                        buckets,
                        c,
                        acc.process_index,
                        acc.num_processes,
                        kinds,
                        batch,
                    )
                )
                continue
            if "synthetic" in src:
                spec = dict(src["synthetic"])
                folder = self.out / "synthetic" / f"{i}_{spec.get('kind', 't2i')}"
                if self.accelerator.is_main_process:
                    write_synthetic(folder, **spec)
                self.accelerator.wait_for_everyone()
                manifest = folder / f"{spec.get('kind', 't2i')}.jsonl"
            else:
                manifest = resolve_path(src["manifest"])
            name = src.get("name") or f"{i}:{manifest.name}"
            self.accum.append(accumulation(c, src, name, acc.num_processes))
            records = read_manifest(manifest, c.skip_bad_records, kinds)
            sources.append(Source(name, records, float(src.get("weight", 1.0)), buckets, batch, c.seed + i))
        mix = DataMix(sources, c.seed)
        if self.batches.cache is not None:
            if self.accelerator.is_main_process:
                self.batches.build_cache(mix)
            self.accelerator.wait_for_everyone()
        return mix

    def _cache_root(self) -> Path | None:
        if not self.config.latent_cache:
            return None
        root = resolve_path(self.config.latent_cache)
        return root if root.is_absolute() else self.out / root

    # --- optimisation -----------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        c = self.config
        start = c.warmup_start_lr / c.lr

        def factor(step: int) -> float:  # linear warm-up from about warmup_start_lr, then constant
            if c.warmup_steps <= 0:
                return 1.0
            return start + (1 - start) * min(1.0, (step + 1) / c.warmup_steps)

        # FSDP2 replaces the parameters by sharded ones: shard first, then make the optimizer on what trains.
        module = shard(self.objective, self.mixed_precision) if self.sharded else self.objective
        optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=c.lr,
            betas=tuple(c.betas),
            eps=c.eps,
            weight_decay=c.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        if self.sharded:
            self.module = module
            self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        else:
            self.module, self.optimizer, self.scheduler = self.accelerator.prepare(module, optimizer, scheduler)

    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step_*"))

    def save_state(self) -> Path:
        acc = self.accelerator
        folder = self.out / "checkpoints" / f"step_{self.step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        checkpoints.save(folder, self.module, self.optimizer.optimizer, self.scheduler, acc.is_main_process)
        torch.save(self.mix.state(), folder / f"data_{acc.process_index}.pt")  # cursors (+ waiting shard samples)
        if acc.is_main_process:
            state = {"step": self.step, "processes": acc.num_processes, "recipe": self.config.name}
            (folder / "trainer_state.json").write_text(json.dumps(state))
            for old in self._checkpoints()[: -self.config.keep_checkpoints or None]:
                if old != folder:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
        return folder

    def _resume(self, path: Path) -> None:
        if not (path / "trainer_state.json").is_file():
            found = sorted((path / "checkpoints").glob("step_*"))
            if not found:
                raise MetaCanvasInputError(f"--resume '{path}': no saved training state (checkpoints/step_*) there.")
            path = found[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        checkpoints.load(path, self.module, self.optimizer.optimizer, self.scheduler)
        self.step = int(state["step"])
        data = [torch.load(path / f"data_{r}.pt", weights_only=True) for r in range(state["processes"])]
        self.mix.resume(data, self.accelerator.process_index)
        log.info("resumed from %s at step %d", path, self.step)

    # --- the loop ---------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss over the first `eval_samples` samples of the first source with fixed noise and sigma, no dropout."""
        source = self.mix.sources[0]
        chunks = source.fixed(self.config.eval_samples)
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        total, n = 0.0, 0
        for k, draw in enumerate(chunks):
            with self.accelerator.autocast():
                total += float(self.module(self.batches.make(source, draw), 10**9 + k, train=False)) * len(draw)
            n += len(draw)
        for m, mode in modes:
            m.train(mode)
        return total / max(n, 1)

    def accumulate(self, source, micro: list[tuple[int, list]]) -> torch.Tensor:
        """Forward and backward of this process's micro-batches of a step (`Source.draw`: each with its draw number,
        its place among the step's micro-batches), gradients summed as one batch's mean; they are reduced over the
        processes with the last one. Returns the mean loss."""
        acc, c = self.accelerator, self.config
        losses = []
        for i, (draw, items) in enumerate(micro):
            torch.manual_seed(_seed(c.seed, 13, self.step, draw))  # dropout in LoRAs and connectors
            batch = self.batches.make(source, items)
            if i == len(micro) - 1 or acc.num_processes == 1:
                sync = contextlib.nullcontext()
            else:
                sync = no_sync(self.module) if self.sharded else acc.no_sync(self.module)
            with sync:
                with acc.autocast():
                    loss = self.module(batch, self.step, draw * source.batch_size)
                acc.backward(loss / len(micro))
            losses.append(loss.detach())
        return torch.stack(losses).mean()

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
            pick = self.mix.pick(self.step)
            source = self.mix.sources[pick]
            micro = source.draw(acc.num_processes, acc.process_index, self.accum[pick])
            start = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            loss = self.accumulate(source, micro)
            if c.grad_clip:
                acc.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            value = acc.reduce(loss, "mean").item()
            if not math.isfinite(value):
                raise MetaCanvasInputError(f"loss is {value} at step {self.step}: lower the learning rate.")
            losses.append(value)
            samples = sum(len(items) for _, items in micro) * acc.num_processes
            speed = samples / (time.perf_counter() - start)
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
        if c.samples and acc.is_main_process and self._previewable():
            self.samples = write_samples(self, self.out / "samples.png", c.samples)
            publish(self.out)
        return losses

    def _previewable(self) -> bool:
        """Samples are drawn unsharded, for image backbones, with the targets of a manifest beside them."""
        return not self.sharded and not self.backbone.is_video and isinstance(self.mix.sources[0], Source)

    # --- export -----------------------------------------------------------------------------
    def export(self) -> dict[str, Path]:
        """Write the MetaCanvas checkpoint (+ the trained backbone as a pipeline folder and, for Wan2.2 and
        FLUX.1-Kontext, as a ComfyUI single file under `diffusion_models/`) into the output folder."""
        acc = self.accelerator
        state = checkpoints.full_state_dict(self.module)  # full weights on the main process (gathers FSDP shards)
        paths = {"metacanvas": self.out / f"{self.config.name}.safetensors"}
        if self.trains_dit:
            paths["backbone"] = self.out / "backbone"
        self.exported = paths
        if not acc.is_main_process:
            return paths

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        lora = self.mc.lora
        if "mllm_lora" in self.config.trainable:
            name = paths["metacanvas"].stem
            lora = CanvasLora(
                name, dict(self.config.mllm_lora), self.planner.canvas_lora_state(LORA_NAME, part("mllm."))
            )
        export_metacanvas(part("mc."), self.mc.config, lora, paths["metacanvas"])
        if self.trains_dit:
            single_file = export_backbone(
                part("transformer."),
                self.backbone.transformer,
                self.backbone_folder,
                paths["backbone"],
                self.dit_lora_scale,
                self.backbone.kind,
                self.config.name,
                SINGLE_FILE_DTYPES[self.config.single_file_dtype],
            )
            if single_file is not None:
                paths["diffusion_model"] = single_file
        publish(self.out)
        return paths


def publish(folder: Path) -> None:
    """Files readable by everyone (0644, folders 0755), whatever the umask or the library that wrote them."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
