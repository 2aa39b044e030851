"""Guidance on an interval of noise levels (the guidance interval of Kynkaanniemi et al., 2024).

An interval [lo, hi] applies guidance at the sampling steps whose timestep t, as a fraction of the
schedule's ``num_train_timesteps`` (t / T: 0 is clean, 1 is pure noise; flow-matching models use
sigma * 1000 as t, so the fraction is sigma), lies in [lo, hi]; every other step takes the
conditional output alone, i.e. w = 1 there. Stage one records such trajectories when
``generate.guidance_interval`` is set; the store header and the adapter config keep the interval, and
the adapters then see the per-step w of the schedule (w inside, 1 outside), which their guidance
gate turns into exactly the base's conditional output outside the interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def inside(t, interval: Sequence[float], num_train_timesteps: int) -> torch.Tensor:
    """Whether timestep(s) ``t`` lie in the interval: a bool tensor of t's shape."""
    fraction = torch.as_tensor(t).float() / float(num_train_timesteps)
    return (fraction >= interval[0]) & (fraction <= interval[1])


def effective_scale(guidance_scale: torch.Tensor, t, interval: Sequence[float] | None,
                    num_train_timesteps: int) -> torch.Tensor:
    """The per-sample w a step is guided with: ``guidance_scale`` inside the interval, 1 outside."""
    if interval is None:
        return guidance_scale
    mask = inside(t, interval, num_train_timesteps).to(guidance_scale.device)
    return torch.where(mask, guidance_scale, torch.ones_like(guidance_scale))


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.get("num_train_timesteps", 1000))
