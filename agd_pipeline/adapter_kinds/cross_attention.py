"""Cross-attention from the wrapped layer's tokens to the condition tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import zero_init


class CrossAttentionAdapter(nn.Module):
    """The wrapped layer's input tokens attend to the condition tokens."""

    def __init__(self, dim: int, out_dim: int, config):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.query = nn.Linear(dim, config.width, bias=False)
        self.key = nn.Linear(config.embed_dim, config.width, bias=False)
        self.value = nn.Linear(config.embed_dim, config.width)
        self.out = zero_init(nn.Linear(config.width, out_dim))

    def forward(self, tokens: torch.Tensor, cond) -> torch.Tensor:
        q = self.query(self.norm(tokens.float()))
        k, v = self.key(cond.tokens), self.value(cond.tokens)
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.out(attended).to(tokens.dtype)
