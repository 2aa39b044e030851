"""One sampling loop over a diffusers scheduler, shared by generate and evaluate.

Three ways to get the model output at each step:
  * unguided: one conditional evaluation;
  * CFG: conditional and unconditional halves in one batched call, with a per-sample scale w;
  * AGD: one call of an :class:`~agd_pipeline.adapters.AdaptedModel` that was given w.
An optional observer sees every step's model input and guided output: that is how stage one records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import ConfigError
from .models import BaseModel, copy_scheduler


@dataclass
class Step:
    """What the observer sees at one sampling step (all tensors have the batch first)."""

    index: int
    timestep: torch.Tensor
    model_input: torch.Tensor
    guided_output: torch.Tensor
    cond_output: torch.Tensor | None = None
    uncond_output: torch.Tensor | None = None


def trajectory_seed(run_seed: int, index: int) -> int:
    """Seed of trajectory ``index``: a function of (run seed, index) only, never of batching."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1, np.uint32)[0])


def generators_for(seeds, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, so each sample's noise is independent of its batch mates."""
    gens = []
    for seed in seeds:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        gens.append(gen)
    return gens


def initial_noise(base: BaseModel, generators, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_T for each generator, in the model's dtype unless told otherwise (as the pipelines do)."""
    shape = (len(generators) if isinstance(generators, list) else 1, *base.latent_shape)
    return randn_tensor(shape, generator=generators, device=base.device, dtype=dtype or base.dtype)


def check_num_steps(base: BaseModel, steps: int, key: str) -> None:
    """Refuse more sampling steps than the scheduler has training timesteps (diffusers would fail
    deep inside ``set_timesteps``), before anything is written."""
    limit = base.scheduler.config.get("num_train_timesteps") or 0
    if limit and steps > limit:
        raise ConfigError(f"{key}: at most {limit} sampling steps, the timesteps {base.model_id!r}'s scheduler "
                          f"was trained with (got {steps})")


def set_timesteps(scheduler, num_steps: int, latent_shape, patch_size: int | None, device) -> None:
    """``scheduler.set_timesteps`` as the pipelines call it; flow-matching schedulers with dynamic
    shifting get the resolution-dependent shift ``mu`` that SD3's pipeline computes."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        height, width = latent_shape[-2:]
        patch = patch_size or 1
        kwargs["mu"] = calculate_shift((height // patch) * (width // patch),
                                       scheduler.config.get("base_image_seq_len", 256),
                                       scheduler.config.get("max_image_seq_len", 4096),
                                       scheduler.config.get("base_shift", 0.5),
                                       scheduler.config.get("max_shift", 1.16))
    scheduler.set_timesteps(num_steps, device=device, **kwargs)


@torch.no_grad()
def sample(
    base: BaseModel,
    cond: dict,
    noise: torch.Tensor,
    num_steps: int,
    *,
    guidance_scale: torch.Tensor | float | None = None,
    uncond: dict | None = None,
    adapted: Callable | None = None,
    scheduler=None,
    generators=None,
    observer: Callable[[Step], None] | None = None,
    record_branches: bool = False,
) -> torch.Tensor:
    """Sample a batch and return the final latents.

    ``cond`` holds one condition row per sample (see :mod:`agd_pipeline.models`); ``uncond`` is the
    unconditional branch's (the null class by default; text models pass the negative prompt's).
    guidance_scale None and adapted None: unguided (1 evaluation per step).
    guidance_scale given, adapted None: CFG (2 evaluations per step, batched as one call).
    adapted given: AGD, ``adapted(x, t, cond, w)`` (1 evaluation per step).
    """
    batch = noise.shape[0]
    device = noise.device
    scheduler = copy_scheduler(scheduler if scheduler is not None else base.scheduler)
    set_timesteps(scheduler, num_steps, noise.shape, getattr(base.net.config, "patch_size", None), device)
    cond = {name: torch.as_tensor(value).to(device) for name, value in base.as_condition(cond).items()}
    if guidance_scale is not None:
        guidance_scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device)
        guidance_scale = guidance_scale.expand(batch) if guidance_scale.dim() == 0 else guidance_scale
    if adapted is not None and guidance_scale is None:
        raise ValueError("AGD sampling needs the guidance scale the adapters are conditioned on")

    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from plain noise
    step_kwargs = {"generator": generators} if _accepts_generator(scheduler) else {}
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    for index, t in enumerate(scheduler.timesteps):
        model_input = scale_input(x, t) if scale_input is not None else x
        cond_out = uncond_out = None
        if adapted is not None:
            guided = base.prediction_channels(adapted(model_input, t, cond, guidance_scale))
        elif guidance_scale is None:
            guided = base.prediction_channels(base.predict(model_input, t, cond))
        else:
            guided, cond_out, uncond_out = base.cfg_predict(model_input, t, cond, guidance_scale, uncond)
        if observer is not None:
            observer(Step(index, t, model_input, guided,
                          cond_out if record_branches else None, uncond_out if record_branches else None))
        x = scheduler.step(guided, t, x, **step_kwargs).prev_sample
    return x


def _accepts_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


class ImageSampler:
    """Samples a fixed set of (condition, seed) pairs in batches with one method, decodes, and times it.

    Methods: "unguided" (1 NFE/step), "cfg" (2 NFE/step), "agd" (1 NFE/step, needs ``adapted``).
    Each sample's noise comes from its own seed, so every method sees the same starting points.
    ``conditions`` holds one row per sample; ``uncond`` the unconditional branch's (see ``sample``).
    """

    def __init__(self, base: BaseModel, adapted, conditions: dict, seeds: list[int], steps: int,
                 batch_size: int, uncond: dict | None = None):
        self.base, self.adapted, self.conditions, self.seeds = base, adapted, conditions, seeds
        self.steps, self.batch_size, self.uncond = steps, batch_size, uncond

    def run(self, method: str, w: float | None) -> tuple[torch.Tensor, float]:
        """Images in [-1, 1] on the CPU, and the seconds spent sampling and decoding them."""
        if method not in ("unguided", "cfg", "agd"):
            raise ValueError(f"unknown sampling method {method!r}")
        outputs, seconds = [], 0.0
        for start in range(0, len(self.seeds), self.batch_size):
            stop = min(len(self.seeds), start + self.batch_size)
            gens = generators_for(self.seeds[start:stop])
            noise = initial_noise(self.base, gens)
            cond = {name: value[start:stop] for name, value in self.conditions.items()}
            began = time.perf_counter()
            latents = sample(self.base, cond, noise, self.steps, generators=gens, uncond=self.uncond,
                             guidance_scale=None if method == "unguided" else w,
                             adapted=self.adapted if method == "agd" else None)
            with torch.no_grad():
                images = self.base.decode(latents)
            seconds += time.perf_counter() - began
            outputs.append(images.float().cpu())
        return torch.cat(outputs), seconds
