"""The paper's offset adapter: f(condition) added to every token."""

from __future__ import annotations

import torch
from torch import nn

from .layers import zero_init


class OffsetAdapter(nn.Module):
    """An MLP of the condition vector, its output added to every token alike."""

    def __init__(self, dim: int, out_dim: int, config):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(config.embed_dim, config.width), nn.SiLU(),
                                 zero_init(nn.Linear(config.width, out_dim)))

    def forward(self, tokens: torch.Tensor, cond) -> torch.Tensor:
        return self.mlp(cond.vector)[:, None, :].to(tokens.dtype)
