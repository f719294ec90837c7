"""What fills a DiT's text slot: the backbone's own text encoder's states or the MLLM's through the context
connector (`conditioning.mllm_context`), in one shape every backbone adapter takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextContext:
    """What fills a DiT's text slot for a batch: embeddings, their mask and (FLUX) a pooled vector."""

    embeds: torch.Tensor  # (B, L, text_dim)
    mask: torch.Tensor  # (B, L)
    pooled: torch.Tensor | None = None  # (B, pooled_dim); None: the backbone's default

    @classmethod
    def cat(cls, parts: list[TextContext]) -> TextContext:
        """The parts stacked on the batch, embeddings and masks zero-padded to the longest."""
        length = max(p.embeds.shape[1] for p in parts)
        embeds = torch.cat([F.pad(p.embeds, (0, 0, 0, length - p.embeds.shape[1])) for p in parts])
        mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
        pooled = None if any(p.pooled is None for p in parts) else torch.cat([p.pooled for p in parts])
        return cls(embeds, mask, pooled)

    def sample(self, i: int) -> TextContext:
        """Row i alone, without its padding."""
        keep = self.mask[i].bool()
        pooled = None if self.pooled is None else self.pooled[i : i + 1]
        return TextContext(self.embeds[i : i + 1, keep], self.mask[i : i + 1, keep], pooled)

    def to(self, device: torch.device | str) -> TextContext:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextContext(self.embeds.to(device), self.mask.to(device), pooled)
