"""Using trained adapters: turn an adapter folder plus its base into images.

One network evaluation per step with the adapters; the same call with ``use_adapters=False`` runs
plain CFG (two per step) from the same seeds, for comparison.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from .adapters import load_adapted_model, read_adapter_config
from .config import MAX_GUIDANCE, MAX_SEED, check_interval
from .devices import resolve_device, torch_dtype
from .errors import ConfigError, MissingExtra, command_line
from .models import encode_prompts, load_base_model, recorded_hub_options
from .sampling import AGD, CFG, ImageSampler, check_num_steps, scheduler_for, trajectory_seed

DTYPES = ("float32", "float16", "bfloat16")
MAX_IMAGES = 1_000_000  # per call: the labels, seeds and images are all held in memory


def sample_images(adapters: str, guidance_scale: float, classes: list[int] | None = None, per_class: int = 4,
                  steps: int = 0, seed: int = 0, use_adapters: bool = True, base_model: str = "",
                  device: str = "auto", batch_size: int = 64, prompts: list[str] | None = None,
                  negative_prompt: str = "", dtype: str = "float32", scheduler: str = "") -> dict:
    """Sample ``per_class`` images of each class (class models) or of each prompt (text models);
    returns images in [-1, 1] decoded with the pipeline's VAE, their labels and timing. The
    scheduler is the one the adapters' trajectories were recorded with, unless ``scheduler`` names
    another diffusers scheduler class (which warns)."""
    _check_arguments(adapters, guidance_scale, per_class, steps, seed, batch_size, dtype)
    if not isinstance(negative_prompt, str):
        raise ConfigError(f"negative_prompt must be a string (got {type(negative_prompt).__name__})")
    adapter_config, base, adapted = load_for_sampling(adapters, base_model, device, dtype, use_adapters)
    return sample_loaded(adapter_config, base, adapted, guidance_scale, classes, per_class, steps, seed,
                         use_adapters, batch_size, prompts, negative_prompt, scheduler, adapters=str(adapters))


def load_for_sampling(adapters: str, base_model: str = "", device: str = "auto", dtype: str = "float32",
                      use_adapters: bool = True):
    """(adapter config, base with its VAE and text encoders, adapted model or None): what
    :func:`sample_loaded` samples with, loaded once for any number of calls."""
    adapter_config = read_adapter_config(adapters)
    recorded = {} if base_model else recorded_hub_options(adapter_config["base_model"])
    base = load_base_model(base_model or adapter_config["base_model"]["id"], device=resolve_device(device), **recorded,
                           dtype=torch_dtype(dtype))
    return adapter_config, base, load_adapted_model(adapters, base) if use_adapters else None


def sample_loaded(adapter_config: dict, base, adapted, guidance_scale: float, classes=None, per_class: int = 4,
                  steps: int = 0, seed: int = 0, use_adapters: bool = True, batch_size: int = 64, prompts=None,
                  negative_prompt: str = "", scheduler: str = "", adapters: str = "the adapters",
                  prepared: tuple | None = None) -> dict:
    """:func:`sample_images` with the base and adapters already loaded (:func:`load_for_sampling`);
    ``adapters`` names them in errors. ``prepared``: :func:`prepare_conditions` of these classes or
    prompts, so that calls at several w encode the prompts (load the text encoders) once."""
    steps = steps or adapter_config.get("sampler", {}).get("num_steps", 0)
    if not steps:
        raise ConfigError(f"{adapters}: the adapter config records no sampling steps: give steps (--steps)")
    check_num_steps(base, steps, "steps")
    if use_adapters and adapted is None:
        raise ConfigError(f"{adapters}: AGD sampling needs the adapters loaded (load_for_sampling(use_adapters=True))")
    # CFG's unconditional branch: by default the negative prompt the adapters were distilled with
    negative_prompt = negative_prompt or adapter_config.get("negative_prompt", "")
    labels, conditions, uncond = prepared or prepare_conditions(base, classes, prompts, per_class, negative_prompt)
    if "negative_text" in adapter_config["adapter"]["condition_on"]:
        # adapters distilled with negative prompts see the negative prompt's embeddings, one row per image
        conditions = {**conditions, **negative_conditions(uncond, len(labels))}
    elif use_adapters and negative_prompt and negative_prompt != adapter_config.get("negative_prompt", ""):
        warnings.warn(f"{adapters}: these adapters were not distilled with negative prompts (their condition_on "
                      "has no negative_text), so the negative prompt changes nothing in AGD samples; use --cfg, "
                      "or train on a store written with generate.negative_prompts_file", stacklevel=2)
    seeds = [trajectory_seed(seed, i) for i in range(len(labels))]
    # CFG on the guidance interval the adapters were distilled with, if any (AGD's adapters know theirs)
    interval = check_interval((adapter_config.get("guidance") or {}).get("interval"), "guidance.interval")
    denoiser = AGD(adapted, guidance_scale) if use_adapters else CFG(base, guidance_scale, uncond, interval)
    # the sampler the adapters learned, unless another is asked for (then with a warning)
    sampling_scheduler = scheduler_for(base, adapter_config.get("sampler"), scheduler, "scheduler")
    images, seconds = ImageSampler(base, conditions, seeds, steps, batch_size, sampling_scheduler).run(denoiser)
    guidance = adapter_config.get("guidance")
    return {"images": images, "labels": labels, "seeds": seeds, "method": denoiser.name, "steps": steps,
            "guidance_scale": guidance_scale, "nfe_per_image": steps * denoiser.evaluations_per_step,
            "seconds": seconds, "prompts": list(prompts or []), "negative_prompt": negative_prompt,
            "training_range": [guidance["min"], guidance["max"]] if guidance else None}


def _check_arguments(adapters, guidance_scale, per_class, steps, seed, batch_size, dtype) -> None:
    """Every argument checked before anything loads; ConfigError naming the argument."""
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0 (got {guidance_scale})")
    if guidance_scale > MAX_GUIDANCE:
        raise ConfigError(f"guidance_scale {guidance_scale:g} is far beyond any useful guidance scale (at most "
                          f"{MAX_GUIDANCE:g}; paper: 6 for DiT, 12 for SD)")
    for name, value in (("per_class", per_class), ("batch_size", batch_size)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive (got {value})")
    if per_class > MAX_IMAGES:
        raise ConfigError(f"per_class must be at most {MAX_IMAGES:,} (got {per_class})")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0; 0 takes the steps of the training data (got {steps})")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must lie in [0, {MAX_SEED}] (got {seed})")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown value {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not str(adapters).strip():
        raise ConfigError(f"adapters must name an adapter folder written by `{command_line('train')}`")


def prepare_conditions(base, classes, prompts, per_class: int, negative_prompt: str):
    """(label per image, the model's conditions per image, CFG's unconditional condition): classes
    for class models, prompts (encoded once each) for text models."""
    if base.conditioning == "class":
        if prompts:
            raise ConfigError(f"{base.model_id!r} is class-conditional: give classes, not prompts")
        classes = list(classes) if classes else list(range(base.num_classes))
        base.check_classes(classes, "classes")
        _check_total(len(classes), per_class, "classes")
        labels = torch.tensor([c for c in classes for _ in range(per_class)])
        return labels, base.class_condition(labels), None
    if classes:
        raise ConfigError(f"{base.model_id!r} is a text-to-image {base.family} model: give prompts, not classes")
    if not prompts:
        raise ConfigError(f"{base.model_id!r} is a text-to-image {base.family} model: give at least one prompt")
    _check_total(len(prompts), per_class, "prompts")
    table, uncond = encode_prompts(base, prompts, negative_prompt)
    labels = torch.tensor([i for i in range(len(prompts)) for _ in range(per_class)])
    return labels, {name: value[labels] for name, value in table.items()}, uncond


def negative_conditions(uncond: dict, count: int) -> dict:
    """The adapters' view of the negative prompt: ``negative_prompt_embeds`` (and, where the family
    has one, ``negative_pooled_prompt_embeds``) with ``count`` rows, from CFG's unconditional
    condition (one row, or one per image). The same keys a store written with
    generate.negative_prompts_file holds per trajectory."""
    return {f"negative_{name}": value.expand(count, *value.shape[1:]) if value.shape[0] == 1 else value
            for name, value in uncond.items() if name in ("prompt_embeds", "pooled_prompt_embeds")}


def _check_total(conditions: int, per_class: int, what: str) -> None:
    if conditions * per_class > MAX_IMAGES:
        raise ConfigError(f"{conditions} {what} x per_class {per_class} = {conditions * per_class:,} images; "
                          f"at most {MAX_IMAGES:,} per call")


def save_images(result: dict, out_dir: str | Path, columns: int = 8) -> Path:
    """PNG per image (``00003_class1.png``), a grid, and a JSON record of how they were made. The
    grid needs matplotlib (the ``[eval]`` extra): without it the images are written all the same and a
    warning says how to get the grid, since sampling itself needs nothing optional."""
    from .figures import grid_figure, to_uint8
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(result["images"])
    labels = result["labels"].numpy()
    kind = "prompt" if result.get("prompts") else "class"
    for i, (img, label) in enumerate(zip(pixels, labels)):
        Image.fromarray(img).save(out / f"{i:05d}_{kind}{label}.png")
    name = "AGD (1 NFE/step)" if result["method"] == "agd" else "CFG (2 NFE/step)"
    try:
        grid_figure({f"{name}, w={result['guidance_scale']:g}": pixels}, labels, columns,
                    f"{len(labels)} samples, {result['steps']} steps", out / "grid.png")
    except MissingExtra as err:
        warnings.warn(f"{out}: no grid.png, the images are written: {err}", stacklevel=2)
    record = {k: v for k, v in result.items() if k not in ("images", "labels")}
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    return out

