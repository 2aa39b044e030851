"""The default adapter: a token-wise low-rank MLP modulated by the condition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import zero_init


class BottleneckAdapter(nn.Module):
    """Token-wise low-rank MLP, its hidden units modulated by the condition (FiLM)."""

    def __init__(self, dim: int, out_dim: int, config):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.down = nn.Linear(dim, config.width)
        self.film = nn.Linear(config.embed_dim, 2 * config.width)
        self.up = zero_init(nn.Linear(config.width, out_dim))

    def forward(self, tokens: torch.Tensor, cond) -> torch.Tensor:
        scale, shift = self.film(cond.vector)[:, None, :].chunk(2, dim=-1)
        hidden = torch.addcmul(shift, self.down(self.norm(tokens.float())), 1 + scale)  # one pass: x * (1 + s) + b
        return self.up(F.silu(hidden)).to(tokens.dtype)
