"""The two small modules that carry the MLLM's output into a DiT (paper §3.4, Fig. 2, Algorithm 1).

CanvasConnector: align (Linear -> pre-norm Transformer block -> zero Linear) maps canvas states to DiT
width; fuse (one SANA linear-attention block with AdaLN-single timestep modulation and no
cross-attention, then a zero `out_proj`) turns "patch embeddings + canvas" into a residual on the
patch embeddings. Both projections start at zero, so an untrained connector leaves the backbone
exactly as it was.

ContextConnector: the 2-layer MLP that maps MLLM prompt states into a backbone's text slot.

ConditionEmbedding: extra input channels of a video DiT's patch embedding, zero-initialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
from torch import nn
from torch.func import functional_call

# Patch tokens per fuse-block call, this project's choice: frames are processed a chunk at a time, so the block's
# activations stay bounded whatever the video length. At Wan2.2-5B's 704×1280 (22×40 = 880 tokens a frame, width 3072) a
# chunk is 4 frames. Peak memory of one fuse call over 121 frames (31 latent frames), measured with `measure_fuse` (in
# bench.py, its [6]) on the meta device (live tensor bytes: activations, the residual itself, the weights' bf16 copy):
# bf16 676 MiB, fp32 900 MiB; all frames at once 2626 / 4800 MiB.
FUSE_CHUNK_TOKENS = 4096


class SanaSelfAttentionBlock(SanaTransformerBlock):
    """diffusers' SANA block without cross-attention.

    The stock block built with `cross_attention_dim=None` has no `attn2`/`norm2` but its forward
    still uses them; setting `attn2 = None` and adding the FFN's `norm2` lets the stock forward run.
    `attention_bias`: biases on the self-attention's q/k/v projections (diffusers' default True; the paper's
    Algorithm 1 builds the block without them; its output projection keeps its bias either way).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        mlp_ratio: float = 2.5,
        norm_eps: float = 1e-6,
        attention_bias: bool = False,
    ):
        super().__init__(
            dim,
            heads,
            head_dim,
            num_cross_attention_heads=None,
            cross_attention_head_dim=None,
            cross_attention_dim=None,
            attention_bias=attention_bias,
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
        )
        self.attn2 = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class CanvasConnector(ModelMixin, ConfigMixin):
    """MLLM canvas states -> a residual on the DiT's patch embeddings of the noisy target."""

    FUSE_MODES = ("block", "none")
    INJECT_MODES = ("patch_embed", "latent")

    @register_to_config
    def __init__(
        self,
        mllm_dim: int,
        dit_dim: int,
        num_heads: int,
        head_dim: int,
        mlp_ratio: float = 2.5,
        fuse: str = "block",
        timestep_cond: bool = True,
        inject: str = "patch_embed",
        latent_channels: int | None = None,
        attention_bias: bool = False,
    ):
        """The defaults are the paper's connector (§3.4, Fig. 2, Algorithm 1); the other values are the Table 3
        ablations (T2I study):

        `timestep_cond=False`: the fuse block without AdaLN-single timestep input (its learned constant
        modulation `scale_shift_table` stays). `fuse="none"`: no fuse block, the aligned canvas is the residual
        on the patch embeddings. `inject="latent"`: added before patchify, in latent space: the align output has
        `latent_channels` × patch² channels (zero-initialised) and is added to the noisy latent (needs
        `fuse="none"`; SANA backbones only). Checkpoints with the defaults do not store these keys.

        `attention_bias`: q/k/v biases in the fuse block's self-attention. False as Algorithm 1 builds it; True only
        for checkpoints written before issue 25, which built diffusers' default (`checkpoint.py` reads them so).
        """
        super().__init__()
        if fuse not in self.FUSE_MODES or inject not in self.INJECT_MODES:
            raise ValueError(f"fuse is one of {self.FUSE_MODES}, inject one of {self.INJECT_MODES}")
        if inject == "latent" and (fuse != "none" or not latent_channels):
            raise ValueError('inject="latent" needs fuse="none" and latent_channels')
        self.align_in = nn.Linear(mllm_dim, dit_dim)
        self.align_block = nn.TransformerEncoderLayer(
            dit_dim, num_heads, 4 * dit_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.align_out = _zero_linear(dit_dim, latent_channels if inject == "latent" else dit_dim)
        if fuse == "block":
            self.time_embed = AdaLayerNormSingle(dit_dim) if timestep_cond else None
            self.fuse_block = SanaSelfAttentionBlock(
                dit_dim, num_heads, head_dim, mlp_ratio, attention_bias=attention_bias
            )
            self.out_proj = _zero_linear(dit_dim, dit_dim)

    def align(self, canvas_states: torch.Tensor) -> torch.Tensor:
        """(B, N, mllm_dim) canvas hidden states -> (B, N, dit_dim) (latent injection: latent channels × patch²)."""
        return self.align_out(self.align_block(self.align_in(canvas_states)))

    @property
    def adds_nothing(self) -> bool:
        """Whether the residual is exactly zero for every input: its last projection (the zero-initialised `out_proj`,
        or `align_out` without a fuse block) is still all zeros, as in an untrained connector."""
        last = self.out_proj if self.config.fuse == "block" else self.align_out
        return not (bool(last.weight.any()) or bool(last.bias.any()))

    def fuse(
        self,
        patch_tokens: torch.Tensor,
        canvas: torch.Tensor,
        timestep: torch.Tensor,
        height: int,
        width: int,
        chunk_tokens: int | None = FUSE_CHUNK_TOKENS,
    ) -> torch.Tensor:
        """Residual (N, H·W, D) for patch tokens (N, H·W, D) given the aligned canvas on the same grid.

        N folds batch and frames (the block attends within a frame); `timestep` (N,) is the connector's clock,
        sigma·1000. The block runs `chunk_tokens // (H·W)` frames at a time (at least one; None: all at once), so its
        activations are bounded by the chunk, not the video, and computes in the patch tokens' dtype (the
        backbone's compute dtype), its weights cast to it once per call. fp32 stays where bf16/fp16 is not
        numerically safe: the clock and its embedding (a timestep near 1000 has only 8 significant bits in bf16, and
        the sinusoids multiply it by frequencies up to 1, so rounding would shift every phase), computed once per
        call in the connector's own precision; and the linear attention's key-value sums and their normaliser over a
        frame's tokens (diffusers' SANA processor upcasts them itself).
        """
        dtype = patch_tokens.dtype
        if self.config.fuse == "none":
            return canvas.to(dtype)
        n, tokens, d = patch_tokens.shape
        if self.time_embed is not None:
            own = next(self.time_embed.parameters()).dtype
            modulation, _ = self.time_embed(timestep.float(), batch_size=n, hidden_dtype=own)
            modulation = modulation.to(dtype)
        else:
            modulation = patch_tokens.new_zeros(n, 6 * d)
        block = {k: v.to(dtype) for k, v in self.fuse_block.named_parameters()}
        out_weight, out_bias = self.out_proj.weight.to(dtype), self.out_proj.bias.to(dtype)
        rows = n if chunk_tokens is None else max(1, chunk_tokens // tokens)
        out = patch_tokens.new_empty(n, tokens, out_weight.shape[0])
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            x = patch_tokens[part] + canvas[part].to(dtype)
            kwargs = {"timestep": modulation[part], "height": height, "width": width}
            out[part] = F.linear(functional_call(self.fuse_block, block, (x,), kwargs), out_weight, out_bias)
        return out


class ContextConnector(ModelMixin, ConfigMixin):
    """MLLM prompt states -> a backbone's text slot: the paper's 2-layer MLP, Linear -> SiLU -> Linear, with dropout."""

    @register_to_config
    def __init__(self, mllm_dim: int, hidden_dim: int, text_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(mllm_dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, text_dim)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states)


class ConditionEmbedding(ModelMixin, ConfigMixin):
    """Condition latents + masks -> patch embeddings, added to the backbone's own (Wan-Animate style inputs).

    Equal to widening the backbone's patch-embedding conv by `in_channels` zero-initialised input
    channels (a conv is linear in its inputs), without touching the pretrained weights: no bias,
    zero weights, so an untrained one adds exact zeros.
    """

    @register_to_config
    def __init__(self, in_channels: int, width: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, width, kernel_size=tuple(patch_size), stride=tuple(patch_size), bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, T, h, w) -> (B, width, T, h/p, w/p), the patch embedding's layout."""
        return self.proj(condition.to(self.proj.weight.dtype))
