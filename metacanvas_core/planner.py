"""The MLLM planner: Qwen2.5-VL reads prompt (+ images) and writes a plan into canvas tokens.

One forward pass, no generation (the paper's Fig. 1): the chat-formatted prompt, then a start marker and the
canvas tokens. Under causal attention the prompt never sees the canvas, so the same pass yields the
context states (for a context connector) and the canvas states (for the canvas connector). Canvas
tokens take the mRoPE positions of a visual input of grid (K, Hc, Wc) that follows the prompt, computed by the
pack itself (`canvas.CANVAS_POSITIONS`), not by the installed transformers release.

Visual-token budget: every picture the MLLM reads (input images, video frames) costs at most a checkpoint's
`visual_tokens` MLLM tokens (`MetaCanvasConfig.visual_tokens`): larger pictures are scaled down, aspect kept, by the
image processor's own resize (its `longest_edge` pixel limit set to tokens × 28² for Qwen2.5-VL).

Canvas LoRA: trained as peft's Activated LoRA (aLoRA) invoked by the start marker; applied at inference in plain torch
(`activated_lora`, the same arithmetic), so peft is a training dependency only and the node pack does not install it
(peft pulls accelerate, which pulls torch, and a resolver may then replace the user's CUDA build).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import realconfigs
from .canvas import CanvasGrid, canvas_rope_positions, sequence_positions
from .casting import fp8_dtype, keep_linears_in_fp8
from .errors import MetaCanvasInputError
from .files import SafetensorsFile
from .inputs import NO_INPUTS, VisualInputs, WeightDtype
from .qwen_file import is_qwen25_vl, load_qwen25_vl

QWEN25_VL_MODEL_TYPE = "qwen2_5_vl"
VIDEO_FRAMES = 8  # frames of a video shown to the MLLM: this project's choice (the paper gives no count)
VIDEO_FRAME_TOKENS = 144  # MLLM tokens per image: the paper's, in its video setup
QWEN_PIXELS_PER_TOKEN = 28  # Qwen2.5-VL: 14-pixel patches merged 2×2


def video_frames_for_mllm(frames: list[Image.Image], tokens: int = VIDEO_FRAME_TOKENS) -> list[Image.Image]:
    """Evenly spaced frames resized to at most (and about) `tokens` MLLM tokens each, keeping the aspect.

    The frames go in as a sequence of images (this project's choice): transformers' Qwen video processor needs
    torchvision, which this pack does not depend on.
    """
    if not frames:
        return []
    n = min(VIDEO_FRAMES, len(frames))
    picked = [frames[round(i * (len(frames) - 1) / max(1, n - 1))] for i in range(n)]
    w, h = picked[0].size
    rows = max(1, min(tokens, round((tokens * h / w) ** 0.5)))
    cols = max(1, tokens // rows)
    size = (cols * QWEN_PIXELS_PER_TOKEN, rows * QWEN_PIXELS_PER_TOKEN)
    return [f.convert("RGB").resize(size, Image.BICUBIC) for f in picked]


# The LoraConfig settings a canvas LoRA may have: those `activated_lora` applies as peft does (training refuses a
# recipe with others, so no checkpoint has one). Defaults as in peft's LoraConfig.
CANVAS_LORA_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules")
PEFT_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8}
TEXT_MODEL_PREFIX = "model.language_model."  # Qwen2.5-VL's text layers: where the canvas positions are
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


@dataclass
class CanvasLora:
    """A canvas-only LoRA for the MLLM (peft Activated LoRA invoked by the canvas start marker): trained with peft,
    applied without it at inference (`activated_lora`)."""

    name: str
    config: dict  # r, lora_alpha, lora_dropout, target_modules
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # peft's key names (get_peft_model_state_dict)

    @property
    def scaling(self) -> float:
        """What peft multiplies B(A(x)) by: lora_alpha / r."""
        settings = {**PEFT_LORA_DEFAULTS, **self.config}
        return settings["lora_alpha"] / settings["r"]

    def weights(self, model: nn.Module, mllm: str) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """Each Linear layer of `model` the LoRA adapts, with its A (r, in) and B (out, r), checked against it.

        A layer peft targets but the state leaves out has B = 0 in peft (its initial value) and is skipped here."""
        unknown = sorted(set(self.config) - set(CANVAS_LORA_SETTINGS))
        if unknown:
            raise MetaCanvasInputError(
                f"canvas LoRA '{self.name}' sets {unknown}; MetaCanvas applies {', '.join(CANVAS_LORA_SETTINGS)} only."
            )
        r = {**PEFT_LORA_DEFAULTS, **self.config}["r"]
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.state_dict.items():
            m = _PEFT_KEY.fullmatch(key)
            if m is None:
                raise MetaCanvasInputError(
                    f"canvas LoRA '{self.name}' holds '{key}', which is not a LoRA A or B weight."
                )
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        modules = dict(model.named_modules())
        out = {}
        for name, ab in pairs.items():
            layer = modules.get(name)
            fits = (
                isinstance(layer, nn.Linear)
                and name.startswith(TEXT_MODEL_PREFIX)
                and ab.keys() == {"A", "B"}
                and ab["A"].shape == (r, layer.in_features)
                and ab["B"].shape == (layer.out_features, r)
            )
            if not fits:
                raise MetaCanvasInputError(
                    f"canvas LoRA '{self.name}' does not fit MLLM '{mllm}': its weights for '{name}' are not those "
                    f"of a rank-{r} LoRA on a Linear layer of the language model."
                )
            out[name] = (layer, ab["A"], ab["B"])
        return out


@contextmanager
def activated_lora(model: nn.Module, lora: CanvasLora, start: int, device: torch.device, mllm: str) -> Iterator[None]:
    """`lora` on `model`'s calls inside the block, on sequence positions `start` on (the canvas start marker and the
    canvas), as peft's aLoRA computes it at inference (peft/tuners/lora/variants.py, ALoraLinearVariant.forward):
    each adapted layer's output gains B(A(x)) · lora_alpha / r on those positions, in float32 (peft keeps adapter
    weights of fp16/bf16/fp8 models in float32), cast back to the layer's dtype; no dropout (eval). A forward hook per
    layer, removed on exit; the model's own weights are untouched."""
    handles = []
    scaling = lora.scaling

    def hook(a: torch.Tensor, b: torch.Tensor) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        def add(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0][:, start:]
            tail = out[:, start:].reshape(-1, out.shape[-1])
            delta = F.linear(F.linear(x.reshape(-1, x.shape[-1]).to(a.dtype), a), b) * scaling
            return torch.cat([out[:, :start], (tail + delta).to(out.dtype).view(out.shape[0], -1, out.shape[-1])], 1)

        return add

    try:
        for layer, a, b in lora.weights(model, mllm).values():
            a, b = (w.to(device, torch.float32) for w in (a, b))
            handles.append(layer.register_forward_hook(hook(a, b)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Plan:
    """What the MLLM wrote for one request with one MetaCanvas checkpoint (`MetaCanvas.plan` makes it): prompt
    states and canvas states, on the MLLM's device and dtype, and what they were made for."""

    prompt: str
    negative_prompt: str
    context: torch.Tensor  # (1, L, D) last hidden states of the prompt tokens
    canvas: torch.Tensor  # (1, K·Hc·Wc, D) frame-major
    grid: CanvasGrid
    # What the MLLM saw besides the prompt; backbones that take images or video themselves get it too.
    inputs: VisualInputs
    size: tuple[int, int]  # (height, width) of the output the canvas was sized for
    checkpoint: str  # the MetaCanvas checkpoint whose canvas tokens the MLLM read (its name, for messages)
    identity: str  # and what it is (`MetaCanvas.identity`: its content hash)
    negative_context: torch.Tensor | None = None  # (1, L', D), only for MLLM-context backbones

    def to(self, device: torch.device | str) -> Plan:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Plan(**moved)


def _single_file_tokenizer(header: SafetensorsFile, folder: str | Path | None):
    """The tokenizer of a single file: embedded in its metadata (`tokenizer`: file name -> text), or `folder`'s."""
    import tempfile

    from transformers import AutoTokenizer

    if "tokenizer" in header.metadata:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in json.loads(header.metadata["tokenizer"]).items():
                (Path(tmp) / name).write_text(text)
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    elif folder is not None and Path(folder).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        raise MetaCanvasInputError(
            f"'{header.path.name}' holds weights only and no tokenizer folder was given (got {folder!r}): use "
            "ComfyUI's bundled Qwen2.5 tokenizer (comfy/text_encoders/qwen25_tokenizer)."
        )
    tokenizer.chat_template = realconfigs.chat_template()
    return tokenizer


def read_model_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MetaCanvasInputError(f"'{folder}' has no config.json: it is not a Hugging Face model folder.")
    return json.loads(config_file.read_text())


class Planner:
    """A loaded Qwen2.5-VL with its tokenizer and image processor."""

    def __init__(self, model, tokenizer, image_processor, folder: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.folder = folder
        self._peft = None  # a PeftModel around `model`, made when a canvas LoRA first runs through peft (`_lm`)
        # Where inputs go and the computation runs. Where the weights are loaded to at first; a memory manager that
        # streams weights (ComfyUI's partial loading) sets it to the compute device.
        self.device: torch.device = model.get_input_embeddings().weight.device
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) + 2 > vocab:
            raise MetaCanvasInputError(
                f"MLLM '{folder}': its embedding table ({vocab} rows) has no unused rows after the tokenizer's "
                f"{len(tokenizer)} tokens, which MetaCanvas needs as canvas placeholders."
            )
        # Two rows no tokenizer id reaches: their embeddings are always overwritten with learned ones.
        self.canvas_start_id = vocab - 2
        self.canvas_token_id = vocab - 1

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tokenizer: str | Path | None = None,
        weight_dtype: WeightDtype | str = WeightDtype.DEFAULT,
    ) -> Planner:
        """Qwen2.5-VL from a Hugging Face folder or a ComfyUI single file (see `from_single_file`)."""
        if Path(path).is_dir():
            return cls.from_folder(path, dtype, device, weight_dtype)
        return cls.from_single_file(path, tokenizer, dtype, device, weight_dtype)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weight_dtype: WeightDtype | str = WeightDtype.DEFAULT,
    ) -> Planner:
        """Qwen2.5-VL from a Hugging Face folder; `weight_dtype` fp8 keeps its Linear weights (but the never-used
        `lm_head`) in fp8 after loading, computed in `dtype`."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder, fp8 = Path(folder), fp8_dtype(weight_dtype)
        if not folder.is_dir():
            raise MetaCanvasInputError(f"MLLM folder '{folder}' does not exist.")
        model_type = read_model_config(folder).get("model_type")
        if model_type != QWEN25_VL_MODEL_TYPE:
            raise MetaCanvasInputError(
                f"'{folder}' holds a '{model_type}' model; the MLLM Loader needs Qwen2.5-VL "
                f"(model_type '{QWEN25_VL_MODEL_TYPE}'), e.g. the Qwen2.5-VL-7B-Instruct folder."
            )
        for shard in sorted(folder.glob("*.safetensors")):
            SafetensorsFile.open(shard, "MLLM weights")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        if fp8 is not None:
            keep_linears_in_fp8(model, fp8, skip=("lm_head",))
        model.to(device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tokenizer.chat_template is None and (folder / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, image_processor, str(folder))

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weight_dtype: WeightDtype | str = WeightDtype.DEFAULT,
    ) -> Planner:
        """Qwen2.5-VL from ComfyUI's single file (bf16, fp16 or scaled fp8; `qwen_file.py`).

        The file holds weights only: the tokenizer comes from `tokenizer` (a folder with vocab.json and
        merges.txt, e.g. ComfyUI's comfy/text_encoders/qwen25_tokenizer) unless the file's metadata carries one;
        the chat template and image-processor settings are the shipped Qwen2.5-VL-Instruct ones.
        `weight_dtype` "fp8_e4m3fn"/"fp8_e5m2" keeps a bf16 file's Linear weights in fp8 (computed in `dtype`).
        """
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        header = SafetensorsFile.open(path, "MLLM file")
        if not is_qwen25_vl(header):
            raise MetaCanvasInputError(
                f"'{header.path.name}' holds {header.describe()}; the MLLM Loader needs Qwen2.5-VL: ComfyUI's single "
                "file (text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors or the bf16 one, vision tower included) "
                "or a Hugging Face Qwen2.5-VL-*-Instruct folder."
            )
        tokenizer = _single_file_tokenizer(header, tokenizer)
        model = load_qwen25_vl(header, dtype, weight_dtype).to(device)
        processor = json.loads(header.metadata.get("preprocessor_config", "null")) or realconfigs.load(
            "qwen2_5_vl_preprocessor"
        )
        image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in processor.items() if not k.endswith("_class")})
        return cls(model, tokenizer, image_processor, str(header.path))

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def image_size_limits(self, visual_tokens: int | None) -> dict[str, int]:
        """The image processor's pixel limits (`shortest_edge`, `longest_edge`) under a budget of `visual_tokens` MLLM
        tokens per picture (None: the processor's own); never above the processor's own maximum."""
        own = self.image_processor.size
        if visual_tokens is None:
            return {"shortest_edge": own["shortest_edge"], "longest_edge": own["longest_edge"]}
        side = self.image_processor.patch_size * self.image_processor.merge_size
        longest = min(own["longest_edge"], visual_tokens * side * side)
        return {"shortest_edge": min(own["shortest_edge"], longest), "longest_edge": longest}

    def _prompt_inputs(
        self, prompt: str, images: list[Image.Image], visual_tokens: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids of the chat-formatted prompt with image placeholders expanded, plus pixel inputs."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        inputs: dict[str, torch.Tensor] = {}
        if images:
            size = self.image_size_limits(visual_tokens)
            vision = self.image_processor(images=images, return_tensors="pt", size=size)
            merge = self.image_processor.merge_size**2
            pad = "<|image_pad|>"
            parts = text.split(pad)
            if len(parts) != len(images) + 1:
                raise MetaCanvasInputError(
                    f"MLLM '{self.folder}': its chat template did not place {len(images)} images."
                )
            counts = (vision["image_grid_thw"].prod(-1) // merge).tolist()
            text = parts[0] + "".join(pad * n + rest for n, rest in zip(counts, parts[1:], strict=False))
            inputs = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        inputs["input_ids"] = self.tokenizer(text, return_tensors="pt").input_ids
        return inputs

    def seen(self, inputs: VisualInputs, visual_tokens: int | None = None) -> list[Image.Image]:
        """The pictures the MLLM reads for `inputs`: the images, then up to VIDEO_FRAMES frames of the video (each
        frame sized to `visual_tokens` tokens; VIDEO_FRAME_TOKENS without a budget)."""
        return list(inputs.images) + video_frames_for_mllm(list(inputs.video), visual_tokens or VIDEO_FRAME_TOKENS)

    def write(
        self,
        prompt: str,
        canvas_embeddings: torch.Tensor,
        grid: CanvasGrid,
        inputs: VisualInputs = NO_INPUTS,
        lora: CanvasLora | None = None,
        visual_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the planner: the prompt states (1, L, D) and the canvas states (1, K·Hc·Wc, D) it writes.
        `canvas_embeddings` is `CanvasEmbedding(grid)`: start marker, then the canvas.

        A video reaches the MLLM as up to VIDEO_FRAMES evenly spaced frames, after the images; every picture costs at
        most `visual_tokens` MLLM tokens (None: the image processor's own limit; video frames VIDEO_FRAME_TOKENS).
        Differentiable in `canvas_embeddings` (and the LoRA) under the caller's grad mode: inference callers run it
        under `torch.no_grad()`.
        """
        seen = self.seen(inputs, visual_tokens)
        hidden, n_prompt = self.forward(prompt, seen, canvas_embeddings, grid, lora, visual_tokens)
        return hidden[:, :n_prompt], hidden[:, n_prompt + 1 :]

    def prompt_states(
        self, prompt: str, inputs: VisualInputs = NO_INPUTS, visual_tokens: int | None = None
    ) -> torch.Tensor:
        """The last hidden states (1, L, D) of a prompt (with its inputs) alone: no canvas, no LoRA."""
        return self.forward(prompt, self.seen(inputs, visual_tokens), visual_tokens=visual_tokens)[0]

    def sequence(
        self, prompt: str, images: list[Image.Image], grid: CanvasGrid | None, visual_tokens: int | None = None
    ) -> dict:
        """The token sequence: ids, mRoPE position ids (3, 1, L), prompt length and vision inputs.

        With a `grid`, a start marker and the canvas placeholders follow the prompt. Positions are the pack's own
        (`canvas.CANVAS_POSITIONS`): the input images are visual grids, the canvas one of (K, Hc, Wc) after the marker.
        """
        inputs = self._prompt_inputs(prompt, images, visual_tokens)
        ids = inputs.pop("input_ids")
        n_prompt = ids.shape[1]
        merge = self.model.config.vision_config.spatial_merge_size
        grids = [(t, h // merge, w // merge) for t, h, w in inputs.get("image_grid_thw", torch.empty(0, 3)).tolist()]
        positions = sequence_positions((ids[0] == self.model.config.image_token_id).long(), grids)
        if grid is not None:
            ids = torch.cat([ids, torch.tensor([[self.canvas_start_id] + [self.canvas_token_id] * grid.numel])], 1)
            positions = torch.cat([positions, canvas_rope_positions(positions.max(), grid)], 1)
        device = self.device
        vision = {k: v.to(device) for k, v in inputs.items()}
        return {
            "ids": ids.to(device),
            "position_ids": positions[:, None].to(device),
            "n_prompt": n_prompt,
            "vision": vision,
        }

    def forward(
        self,
        prompt: str,
        images: list[Image.Image],
        canvas_embeddings: torch.Tensor | None = None,
        grid: CanvasGrid | None = None,
        lora: CanvasLora | None = None,
        visual_tokens: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Last hidden states (1, L, D) of prompt [+ start marker + canvas of `grid`], and the prompt length.

        Differentiable in `canvas_embeddings`. The states are the text model's `last_hidden_state`, read from its
        output as the call passes (the call itself goes through the top model, where the canvas LoRA is active from
        the start marker on); the other layers' states are not kept.
        """
        seq = self.sequence(prompt, images, grid if canvas_embeddings is not None else None, visual_tokens)
        ids, n_prompt = seq["ids"], seq["n_prompt"]
        embeds = self.model.get_input_embeddings()(ids[:, :n_prompt])
        if canvas_embeddings is not None:
            if canvas_embeddings.shape[0] != grid.numel + 1:
                raise ValueError(f"canvas embeddings have {canvas_embeddings.shape[0]} rows, expected {grid.numel + 1}")
            embeds = torch.cat([embeds, canvas_embeddings.to(embeds.device, embeds.dtype)[None]], 1)
        self.model.model.rope_deltas = None  # never let a stale multimodal call leak positions
        last: list[torch.Tensor] = []
        text_model = self.model.model.language_model
        handle = text_model.register_forward_hook(lambda _m, _a, out: last.append(out.last_hidden_state))
        try:
            with self._lm(lora, n_prompt if canvas_embeddings is not None else None) as lm:
                lm(
                    input_ids=ids,
                    inputs_embeds=embeds,
                    position_ids=seq["position_ids"],
                    attention_mask=torch.ones_like(ids),
                    logits_to_keep=1,
                    **seq["vision"],
                )
        finally:
            handle.remove()
        return last[0], n_prompt

    def add_canvas_lora(self, lora: CanvasLora) -> torch.nn.Module:
        """Wrap the model with `lora` as a peft Activated LoRA invoked by the canvas start marker.

        Returns the peft model (whose LoRA weights a trainer may train); `forward(..., lora)` then runs with it.
        """
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        config = LoraConfig(**lora.config, alora_invocation_tokens=[self.canvas_start_id], task_type="CAUSAL_LM")
        if self._peft is None:
            self._peft = get_peft_model(self.model, config, adapter_name=lora.name)
        else:
            self._peft.add_adapter(lora.name, config)
        if lora.state_dict:
            result = set_peft_model_state_dict(self._peft, lora.state_dict, adapter_name=lora.name)
            if result.unexpected_keys:
                raise MetaCanvasInputError(f"canvas LoRA '{lora.name}' does not fit MLLM '{self.folder}'.")
        return self._peft

    def canvas_lora_state(self, name: str, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA weights of adapter `name` under peft's key names (from `state`, a full state dict, if given)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self._peft, state_dict=state, adapter_name=name)

    @contextmanager
    def _lm(self, lora: CanvasLora | None, start: int | None) -> Iterator[nn.Module]:
        """The module to call, with `lora` (if any) active from position `start` (the start marker; None: no canvas).

        Inference (no grad, no peft wrapper: the nodes, generate) applies the checkpoint's LoRA in plain torch
        (`activated_lora`) and never imports peft. Training runs it through peft: a trainer's LoRA lives in the
        wrapper (`add_canvas_lora`, its weights training), and under grad mode peft re-applies the LoRA when gradient
        checkpointing recomputes a layer in the backward pass, which hooks removed after the call would miss.
        """
        if lora is not None and (self._peft is not None or torch.is_grad_enabled()):
            if self._peft is None or lora.name not in self._peft.peft_config:
                # Frozen here: no dropout (peft makes its dropout modules in training mode), as at inference.
                frozen = CanvasLora(lora.name, {**lora.config, "lora_dropout": 0.0}, lora.state_dict)
                self.add_canvas_lora(frozen).requires_grad_(False)
            self._peft.set_adapter(lora.name)
            yield self._peft
        elif self._peft is not None:
            with self._peft.disable_adapter():
                yield self._peft
        elif lora is None or start is None:
            yield self.model
        else:
            with activated_lora(self.model, lora, start, self.device, self.folder):
                yield self.model
