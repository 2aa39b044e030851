"""The learning-rate schedule both trainers use (the embedded bases and the adapters), and the
optimiser step of the embedded bases' trainers."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup`` steps, then
    a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def descent_step(loss, parameters: list, optimizer, lr_schedule, ema=None, max_grad_norm: float = 1.0) -> float:
    """One step of the embedded bases' trainers: backward, gradients clipped to ``max_grad_norm``,
    optimiser and schedule stepped, the EMA of the weights updated. Returns the loss value."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    if ema is not None:
        ema.step(parameters)
    return loss.item()
