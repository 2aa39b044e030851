"""The learning-rate schedule both trainers use (the embedded bases and the adapters), the
optimiser step of the embedded bases' trainers, and the guard every training loop has against a
loss (or gradient) that is no longer finite."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup`` steps, then
    a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def check_finite(value, what: str, step: int, learning_rate: float | None = None, quantity: str = "loss") -> None:
    """Stop training at a loss (or gradient norm) that is NaN or inf, before the weights take it
    in: ``what`` names the trainer (e.g. "base: train DiT"), ``step`` counts from 0. One line
    naming the step and what to check."""
    import torch

    if bool(torch.isfinite(torch.as_tensor(value).detach()).all()):
        return
    from .errors import AgdError

    number = float(torch.as_tensor(value).detach().float().flatten()[0])
    rate = f" (now {learning_rate:g})" if learning_rate is not None else ""
    raise AgdError(f"{what}: the {quantity} became {number} at step {step + 1}; training stopped before the weights "
                   f"took it in, and nothing was saved. Lower the learning rate{rate}, or check the training data "
                   "for NaN/inf")


def descent_step(loss, parameters: list, optimizer, lr_schedule, ema=None, max_grad_norm: float = 1.0, *,
                 what: str = "training", step: int = 0) -> float:
    """One step of the embedded bases' trainers: backward, gradients clipped to ``max_grad_norm``,
    optimiser and schedule stepped, the EMA of the weights updated. Returns the loss value. A loss
    or gradient that is not finite stops training (:func:`check_finite`) before any weight changes."""
    import torch

    learning_rate = optimizer.param_groups[0]["lr"]
    check_finite(loss, what, step, learning_rate)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    check_finite(norm, what, step, learning_rate, quantity="gradient norm")
    optimizer.step()
    lr_schedule.step()
    if ema is not None:
        ema.step(parameters)
    return loss.item()
