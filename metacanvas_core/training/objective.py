"""The training objective: rectified-flow velocity loss through MLLM -> connectors -> backbone.

Per sample: x_t = (1 - sigma)·x0 + sigma·noise, target = noise - x0, the backbone and the canvas connector called at
t = sigma·T in float32 (T = the scheduler's num_train_timesteps, 1000: the connector's clock on every path). Condition
dropout, this project's decision (the paper trains with a velocity loss only and does not say how its guidance's
null branch is learned; BLIP3o, whose code it builds on, drops conditions with p = 0.1): a dropped sample gets the
empty prompt's context and no canvas, exactly the sampler's unconditional branch. Everything random about a sample
(its dropout draw, sigma, noise) comes from a generator seeded by (seed, step, place), `place` being the sample's place
in the step's global batch, so a resumed run repeats the loss trace of an uninterrupted one, and a step is the same
whether its samples run as one batch, as micro-batches one after another (gradient accumulation) or on several
processes, up to the rounding of the sums (dropout inside trained modules, such as a LoRA's, draws from the global
generator, seeded per micro-batch by the trainer).

The projection is the inference path's (`metacanvas.align_canvas`, `mllm_context`,
`CanvasInjection.on_tokens`, `Backbone.prepare_references`), with gradients on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, Branch
from ..conditioning import mllm_context, mllm_pooled
from ..errors import MetaCanvasInputError
from ..injection import CanvasInjection
from ..inputs import ContextSource
from ..metacanvas import MetaCanvas, align_canvas
from ..planner import Planner
from ..text import TextContext
from .batches import Batch
from .config import CANVAS_PARTS, TrainConfig
from .data import _seed


@dataclass
class Frozen:
    """The models the objective calls but does not own (never registered as submodules)."""

    planner: Planner
    backbone: Backbone


class FlowMatchingObjective(nn.Module):
    """The loss of one batch. Submodules are exactly what trains (wrapped once by accelerate: DDP / FSDP).

    `transformer` and `mllm` (the canvas-LoRA-wrapped planner model) are registered only when they train.
    """

    def __init__(
        self,
        config: TrainConfig,
        mc: MetaCanvas,
        frozen: Frozen,
        transformer: nn.Module | None = None,
        mllm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.mc = mc
        if transformer is not None:
            self.transformer = transformer
        if mllm is not None:
            self.mllm = mllm
        self.frozen = frozen
        self.config = config
        self.canvas_grad = any(p in config.trainable for p in ("canvas", "mllm_lora"))
        # A canvas that adds exact zeros and trains nothing (stage S2: the connector is still zero-initialised and
        # frozen) changes no loss and no gradient: its plan, projection and fuse block are skipped.
        canvas_trains = any(p in config.trainable for p in CANVAS_PARTS)
        self.canvas_inert = not canvas_trains and mc.canvas_connector.adds_nothing
        self.num_train_timesteps = int(frozen.backbone.scheduler_config.get("num_train_timesteps", 1000))
        self._text_cache: dict[tuple[str, bool], TextContext] = {}

    def sigmas(self, n: int, g: torch.Generator) -> torch.Tensor:
        c = self.config
        if c.timestep_sampling == "uniform":
            s = torch.rand(n, generator=g)
        else:
            s = torch.sigmoid(torch.randn(n, generator=g) * c.logit_std + c.logit_mean)
        return c.flow_shift * s / (1 + (c.flow_shift - 1) * s)

    def native_context(self, text: str, negative: bool) -> TextContext:
        """The frozen text encoder's output for one prompt, from a bounded cache (exact: no grad, no dropout)."""
        key = (text, negative)
        hit = self._text_cache.pop(key, None)
        if hit is None:
            backbone = self.frozen.backbone
            hit = (backbone.encode_negative if negative else backbone.encode_prompt)([text])
        self._text_cache[key] = hit  # most recent last
        while len(self._text_cache) > self.config.text_cache_size:
            self._text_cache.pop(next(iter(self._text_cache)))
        return hit

    def draws(self, n: int, step: int, first: int, shape: torch.Size, train: bool) -> tuple[torch.Tensor, ...]:
        """Dropout flags (n,), noise (n, *shape) and sigma (n,) of samples first .. first + n - 1 of a step's global batch,
        each from its own generator: a sample's draws do not depend on how the batch is cut into micro-batches."""
        drops, noises, sigmas = [], [], []
        for place in range(first, first + n):
            g = torch.Generator().manual_seed(_seed(self.config.seed, 11, step, place))
            drops.append(bool(torch.rand(1, generator=g) < self.config.cond_dropout) if train else False)
            noises.append(torch.randn(shape, generator=g))
            sigmas.append(self.sigmas(1, g))
        return torch.tensor(drops, dtype=torch.bool), torch.stack(noises), torch.cat(sigmas)

    def forward(self, batch: Batch, step: int, first: int = 0, train: bool = True) -> torch.Tensor:
        """The loss of a micro-batch whose first sample is sample `first` of the step's global batch."""
        c, mc = self.config, self.mc
        planner, backbone = self.frozen.planner, self.frozen.backbone
        dev = backbone.device
        b = len(batch.texts)
        drop, noise, sigma = self.draws(b, step, first, batch.latents.shape[1:], train)
        order = sorted(range(b), key=lambda i: bool(drop[i]))  # kept samples first: the canvas rows are 0..k
        kept = [i for i in order if not drop[i]]
        x0 = batch.latents[order].to(dev)
        noise, sigma = noise[order].to(dev), sigma[order].to(dev)
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        t = sigma * self.num_train_timesteps

        use_canvas = c.canvas_on and bool(kept) and not self.canvas_inert
        plans = []
        if use_canvas:
            with torch.set_grad_enabled(self.canvas_grad and train):
                for i in kept:
                    plans.append(
                        mc.plan(planner, batch.texts[i], batch.height, batch.width, batch.inputs[i], negative=False)
                    )
        text = self.text(batch, order, kept, [p.context for p in plans])

        canvas = None
        if use_canvas:
            grid = plans[0].grid
            aligned = align_canvas(mc.canvas_connector, torch.cat([p.canvas for p in plans]).to(dev), grid)
            tokens = backbone.latent_token_grid(x0)
            canvas = CanvasInjection.on_tokens(mc.canvas_connector, aligned, tokens, slice(0, len(kept)))
        refs = [self.references(batch, i) for i in order]
        if not backbone.is_video:
            if any(r is not None for r in refs) and b != 1:
                raise MetaCanvasInputError(
                    f"recipe '{c.name}': the {backbone.kind} backbone takes one set of input images per call, "
                    "so batch_size must be 1 (scale the batch with more processes)."
                )
            v = backbone.predict(x_t, t, Branch(text, canvas, refs[0]), t)
            return F.mse_loss(v.float(), target.float())
        # Video backbones take one scalar timestep per call (their per-token timesteps): one call per sample.
        losses = []
        for i in range(b):
            row = None
            if canvas is not None and i < len(kept):
                row = CanvasInjection(canvas.connector, canvas.canvas[i : i + 1], slice(0, 1))
            v = backbone.predict(x_t[i : i + 1], t[i], Branch(text.sample(i), row, refs[i]), t[i])
            frames = backbone.loss_frames(refs[i])
            losses.append(F.mse_loss(v[:, :, frames].float(), target[i : i + 1, :, frames].float()))
        return torch.stack(losses).mean()

    def text(self, batch: Batch, order: list[int], kept: list[int], prompt_states: list) -> TextContext:
        """The text slot of the batch in `order`: the prompt for kept samples, the empty prompt for dropped ones.

        `prompt_states`: the MLLM's prompt states of the first kept samples, from their plans (causal attention:
        the same as without the canvas)."""
        mc, planner, backbone = self.mc, self.frozen.planner, self.frozen.backbone
        if mc.config.context_source == ContextSource.TEXT_ENCODER:
            parts = [
                self.native_context(batch.texts[i], False) if i in kept else self.native_context("", True)
                for i in order
            ]  # noqa: E501
            return TextContext.cat([p.to(backbone.device) for p in parts])
        states = []
        with torch.no_grad():
            for j, i in enumerate(order):
                if j < len(prompt_states):
                    states.append(prompt_states[j].detach())
                else:
                    text = batch.texts[i] if i in kept else ""
                    states.append(planner.prompt_states(text, batch.inputs[i], mc.config.visual_tokens))
        return mllm_context(mc.context_connector, [s.to(backbone.device) for s in states], mllm_pooled(mc))

    def references(self, batch: Batch, i: int):
        """The backbone's own inputs for sample i (FLUX-Kontext reference tokens, Wan first frame/references/source)."""
        if not batch.to_backbone[i]:
            return None
        backbone = self.frozen.backbone
        refs = backbone.prepare_references(batch.inputs[i], batch.height, batch.width, self.mc.condition_embedding)
        return backbone.fit_references(refs, backbone.pixel_frames(batch.latents))
