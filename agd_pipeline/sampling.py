"""One sampling loop over a diffusers scheduler, shared by generate, evaluate and sample.

The loop takes a *denoiser*: a callable ``denoiser(x_t, t, cond) -> Prediction`` that gives the
output the scheduler steps with. Guidance lives in the denoisers, not in the loop (k-diffusion's
way): :class:`Unguided` (1 evaluation per step), :class:`CFG` (conditional and unconditional halves
in one batched call, with a per-sample scale w; 2 per step) and :class:`AGD` (one call of an
:class:`~agd_pipeline.adapters.AdaptedModel` given w; 1 per step). An optional observer sees every
step's model input and prediction: that is how stage one records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from . import guidance
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


class StepRecord:
    """What stage one keeps of each step of ``n`` trajectories, filled one :class:`Step` at a time:
    model input, guided output (and with ``branches`` both CFG halves) as float16, and the timestep."""

    def __init__(self, base: BaseModel, n: int, num_steps: int, branches: bool):
        c, h, w = base.latent_shape
        self.arrays = {"model_input": np.empty((n, num_steps, c, h, w), np.float16),
                       "guided_output": np.empty((n, num_steps, base.latent_channels, h, w), np.float16),
                       "timesteps": np.empty((n, num_steps), np.float32)}
        if branches:
            self.arrays["cond_output"] = np.empty_like(self.arrays["guided_output"])
            self.arrays["uncond_output"] = np.empty_like(self.arrays["guided_output"])

    def __call__(self, step: Step) -> None:
        arrays = self.arrays
        arrays["model_input"][:, step.index] = step.model_input.to("cpu", torch.float16).numpy()
        arrays["guided_output"][:, step.index] = step.guided_output.to("cpu", torch.float16).numpy()
        arrays["timesteps"][:, step.index] = float(step.timestep)
        if "cond_output" in arrays:
            arrays["cond_output"][:, step.index] = step.cond_output.to("cpu", torch.float16).numpy()
            arrays["uncond_output"][:, step.index] = step.uncond_output.to("cpu", torch.float16).numpy()


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


def scheduler_for(base: BaseModel, recorded: dict | None, override: str = "", key: str = "scheduler"):
    """The scheduler to sample with. By default the one the adapters' trajectories were recorded
    with (its class and config, from the store via the adapter config): the adapters learned that
    sampler's states. ``override`` names another diffusers scheduler class, built from the same
    config, with a warning when it is not the recorded one."""
    import warnings

    import diffusers

    if not (recorded and recorded.get("scheduler") and isinstance(recorded.get("config"), dict)):
        recorded = None  # adapters saved without a recorded sampler: the base's own
    if not recorded and not override:
        return base.scheduler
    config = dict(recorded["config"]) if recorded else dict(base.scheduler.config)
    name = override or recorded["scheduler"]
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_config") or "Scheduler" not in name:
        raise ConfigError(f"{key}: {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler, "
                          "EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    if recorded and override and override != recorded["scheduler"]:
        warnings.warn(f"{key}: sampling with {override}, but the adapters were distilled from "
                      f"{recorded['scheduler']} trajectories; they may reproduce CFG less closely with another "
                      "sampler (leave the setting empty to use the recorded one)", stacklevel=2)
    return cls.from_config(config)


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


@dataclass
class Prediction:
    """A denoiser's output at one step: the prediction channels the scheduler steps with, and for
    CFG its two branches."""

    guided: torch.Tensor
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


def _per_sample(guidance_scale, x: torch.Tensor) -> torch.Tensor:
    """w as one float32 value per sample of the batch ``x`` (a scalar is shared)."""
    w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device)
    return w.expand(x.shape[0]) if w.dim() == 0 else w


class Unguided:
    """The conditional model alone."""

    name, evaluations_per_step = "unguided", 1

    def __init__(self, base: BaseModel):
        self.base = base

    def __call__(self, x, t, cond: dict) -> Prediction:
        return Prediction(self.base.prediction_channels(self.base.predict(x, t, cond)))


class CFG:
    """Classifier-free guidance: uncond + w * (cond - uncond), both halves in one batched call.
    ``uncond`` is the unconditional branch's condition: the null class by default, the negative
    prompt's embeddings for text models (one row, shared, or one per sample).

    With a guidance ``interval`` (:mod:`agd_pipeline.guidance`), steps outside it give the conditional
    output exactly, from one evaluation (two when ``branches``: an observer recording both halves)."""

    name, evaluations_per_step = "cfg", 2

    def __init__(self, base: BaseModel, guidance_scale, uncond: dict | None = None,
                 interval: tuple[float, float] | None = None, branches: bool = False):
        self.base, self.guidance_scale, self.uncond = base, guidance_scale, uncond
        self.interval, self.branches = interval, branches
        self.evaluations = 0  # network evaluations per sample so far (outside an interval: one a step)

    def __call__(self, x, t, cond: dict) -> Prediction:
        w = _per_sample(self.guidance_scale, x)
        if self.interval is None:
            self.evaluations += 2
            return Prediction(*self.base.cfg_predict(x, t, cond, w, self.uncond))
        mask = guidance.inside(t, self.interval, guidance.num_train_timesteps(self.base.scheduler)).to(x.device)
        if not mask.any() and not self.branches:
            self.evaluations += 1
            out = self.base.prediction_channels(self.base.predict(x, t, cond))
            return Prediction(out, out)
        self.evaluations += 2
        guided, cond_out, uncond_out = self.base.cfg_predict(x, t, cond, torch.where(mask, w, torch.ones_like(w)),
                                                             self.uncond)
        mask = mask.view(-1, *[1] * (guided.dim() - 1)) if mask.dim() else mask
        return Prediction(torch.where(mask, guided, cond_out), cond_out, uncond_out)


class AGD:
    """Adapter guidance distillation: one call of the adapted model, told w."""

    name, evaluations_per_step = "agd", 1

    def __init__(self, adapted, guidance_scale):
        if guidance_scale is None:
            raise ValueError("AGD sampling needs the guidance scale the adapters are conditioned on")
        self.adapted, self.guidance_scale = adapted, guidance_scale

    def __call__(self, x, t, cond: dict) -> Prediction:
        output = self.adapted(x, t, cond, _per_sample(self.guidance_scale, x))
        return Prediction(self.adapted.base.prediction_channels(output))


@torch.no_grad()
def sample(base: BaseModel, cond: dict, noise: torch.Tensor, num_steps: int, denoiser: Callable, *,
           scheduler=None, generators=None, observer: Callable[[Step], None] | None = None) -> torch.Tensor:
    """Sample a batch with ``denoiser`` (:class:`Unguided`, :class:`CFG` or :class:`AGD`) and return
    the final latents. ``cond`` holds one condition row per sample (see :mod:`agd_pipeline.models`)."""
    device = noise.device
    scheduler = copy_scheduler(scheduler if scheduler is not None else base.scheduler)
    set_timesteps(scheduler, num_steps, noise.shape, getattr(base.net.config, "patch_size", None), device)
    cond = {name: torch.as_tensor(value).to(device) for name, value in base.as_condition(cond).items()}
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from plain noise
    step_kwargs = {"generator": generators} if _accepts_generator(scheduler) else {}
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    for index, t in enumerate(scheduler.timesteps):
        model_input = scale_input(x, t) if scale_input is not None else x
        prediction = denoiser(model_input, t, cond)
        if observer is not None:
            observer(Step(index, t, model_input, prediction.guided, prediction.cond, prediction.uncond))
        x = scheduler.step(prediction.guided, t, x, **step_kwargs).prev_sample
    return x


def _accepts_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


class ImageSampler:
    """Samples a fixed set of (condition, seed) pairs in batches with a denoiser, decodes, and times it.
    Each sample's noise comes from its own seed, so every denoiser sees the same starting points.
    ``conditions`` holds one row per sample; ``scheduler`` defaults to the base's own."""

    def __init__(self, base: BaseModel, conditions: dict, seeds: list[int], steps: int, batch_size: int,
                 scheduler=None):
        self.base, self.conditions, self.seeds = base, conditions, seeds
        self.steps, self.batch_size, self.scheduler = steps, batch_size, scheduler

    def run(self, denoiser: Callable) -> tuple[torch.Tensor, float]:
        """Images in [-1, 1] on the CPU, and the seconds spent sampling and decoding them."""
        return self.run_interleaved([denoiser])[0]

    def run_interleaved(self, denoisers: list[Callable]) -> list[tuple[torch.Tensor, float]]:
        """:meth:`run` for several denoisers at once, batch by batch: every batch is sampled by each
        denoiser in turn, the order rotating from one batch to the next (A B, then B A), so that a
        shared machine's changing speed falls on all of them alike and their times compare. The
        images are the same as from separate runs (each batch starts from its seeds' noise)."""
        outputs = [[] for _ in denoisers]
        seconds = [0.0 for _ in denoisers]
        for number, start in enumerate(range(0, len(self.seeds), self.batch_size)):
            stop = min(len(self.seeds), start + self.batch_size)
            cond = {name: value[start:stop] for name, value in self.conditions.items()}
            shift = number % len(denoisers)
            for which in [*range(shift, len(denoisers)), *range(shift)]:
                gens = generators_for(self.seeds[start:stop])
                noise = initial_noise(self.base, gens)
                began = time.perf_counter()
                latents = sample(self.base, cond, noise, self.steps, denoisers[which], scheduler=self.scheduler,
                                 generators=gens)
                with torch.no_grad():
                    images = self.base.decode(latents)
                seconds[which] += time.perf_counter() - began
                outputs[which].append(images.float().cpu())
        return [(torch.cat(images), spent) for images, spent in zip(outputs, seconds)]
