"""The learning-rate schedule both trainers use (the embedded base and the adapters)."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup`` steps, then
    a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
