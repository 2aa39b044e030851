"""Standard guidance distillation's training data, for the paper's central ablation: (x_t, t, w)
points drawn by noising *real* latents with the forward process, labelled with the teacher's CFG
output at those points, instead of points on the teacher's own CFG sampling trajectories.

``generate.source: forward_noised`` writes such a store in the trajectory store's layout, so stage
two trains on it unchanged: "trajectory" i is one real latent x0 (of the class the plan gives
trajectory i; on a text model, one captioned with trajectory i's prompt), noised independently at
each of the sampler's timesteps t_k,

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps      (DDPM-family schedulers)
    x_t = (1 - sigma_t) x0 + sigma_t eps                        (flow matching)

(the model's input at step t) with eps ~ N(0, I) drawn from the trajectory's own seed, and the
recorded target is CFG's guided output at (x_t, t) for the trajectory's w and condition (class, or
prompt and negative prompt). The same number of (x, t, w) pairs as a trajectory store of the same
settings; "sample" holds x0.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .models import BaseModel, copy_scheduler
from .sampling import CFG, Step, StepRecord, generators_for, set_timesteps

# what the .npz holds beside the latents: a class per example, or a caption (text models)
REAL_DATA_KEYS = {"class": ("latents", "labels"), "text": ("latents", "captions")}


@dataclass
class RealData:
    """Real latents, as the base model sees them (its latent shape), with their class labels (class
    models) or their captions (text models)."""

    path: str
    latents: np.ndarray  # [N, C, H, W] float32
    labels: np.ndarray | None  # [N] int64
    captions: list[str] | None
    sha256: str

    def examples_for(self, conditions) -> dict[int, np.ndarray]:
        """Indices of the real examples each condition of stage one noises, by the value the plan
        gives a trajectory: its class id, or its prompt's index (text models: the examples whose
        caption is that prompt). Every condition must have at least one."""
        if self.captions is None:
            table = {int(c): np.flatnonzero(self.labels == c) for c in conditions.classes}
            empty = [c for c, rows in table.items() if len(rows) == 0]
            if empty:
                raise ConfigError(f"generate.real_data: {self.path} has no example of class {empty[0]} (classes "
                                  f"present: {sorted(set(self.labels.tolist()))}); give data for every class "
                                  "sampled, or narrow generate.classes")
            return table
        captioned: dict[str, list[int]] = {}
        for i, text in enumerate(self.captions):  # stripped, as prompt files are read
            captioned.setdefault(text.strip(), []).append(i)
        missing = [prompt for prompt in conditions.prompts if prompt not in captioned]
        if missing:
            raise ConfigError(f"generate.real_data: {self.path} has no example captioned {missing[0]!r} "
                              f"({len(missing)} of the {len(conditions.prompts)} prompts have none); forward-noised "
                              "data noises, for each prompt, a real image with that caption: give "
                              "generate.prompts_file prompts taken from the data's captions")
        return {i: np.asarray(captioned[prompt], dtype=np.int64) for i, prompt in enumerate(conditions.prompts)}

    def describe(self) -> dict:
        return {"kind": "forward_noised", "real_data": self.path, "real_data_sha256": self.sha256,
                "real_examples": int(len(self.latents))}


def is_flow_matching(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def load_real_data(path: str, base: BaseModel) -> RealData:
    """The ``.npz`` of ``generate.real_data``: ``latents`` [N, C, H, W] in the base's latent shape
    (for a latent model, already VAE-encoded and scaled as its pipeline does) and, per latent, an
    integer class in ``labels`` [N] (class models) or a caption in ``captions`` [N] (text models; a
    numpy string array). Refuses anything else with a message that says what is wrong."""
    key = "generate.real_data"
    if not (hasattr(base.scheduler, "alphas_cumprod") or is_flow_matching(base.scheduler)):
        raise ConfigError(f"generate.source forward_noised: {type(base.scheduler).__name__} has neither alphas_cumprod "
                          "nor flow matching's sigmas; forward-noised data is built for DDPM-family schedulers "
                          "(DDPM, DDIM, Euler, ...) and flow matching only")
    text = base.conditioning == "text"
    needed = REAL_DATA_KEYS[base.conditioning]
    what = "latents [N, C, H, W] and " + ("captions [N] (strings)" if text else "labels [N]")
    if not path:
        raise ConfigError(f"{key} is empty: generate.source forward_noised noises real latents; give an .npz with "
                          f"{what} (the embedded defaults' base stages write train.npz)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {path} is not a file; give an .npz with {what}")
    raw = file.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:  # the bytes hashed above, read once
            arrays = {name: data[name] for name in data.files}
    except Exception as err:  # noqa: BLE001 - zip, pickle and format errors alike
        raise ConfigError(f"{key}: {path} is not a readable .npz ({type(err).__name__}: {err})") from None
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise ConfigError(f"{key}: {path} lacks the array {missing[0]!r} (it has {sorted(arrays)}); "
                          f"{base.model_id!r} is a {base.conditioning} model, so it needs {what}")
    latents = arrays["latents"]
    if latents.ndim != 4 or tuple(latents.shape[1:]) != tuple(base.latent_shape):
        raise ConfigError(f"{key}: {path} latents have shape {list(latents.shape)}; {base.model_id!r} takes "
                          f"[N, {', '.join(map(str, base.latent_shape))}]")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ConfigError(f"{key}: {path} latents must be finite floating-point numbers")
    labels = captions = None
    if text:
        captions = arrays["captions"]
        if captions.shape != (len(latents),) or captions.dtype.kind != "U":
            raise ConfigError(f"{key}: {path} captions must be strings, one per latent (shape "
                              f"{list(captions.shape)}, dtype {captions.dtype} against {len(latents)} latents)")
        captions = [str(c) for c in captions]
    else:
        labels = arrays["labels"]
        if labels.shape != (len(latents),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"{key}: {path} labels must be integers, one per latent (shape {list(labels.shape)} "
                              f"against {len(latents)} latents)")
        labels = labels.astype(np.int64)
    return RealData(str(path), latents.astype(np.float32), labels, captions, hashlib.sha256(raw).hexdigest())


def forward_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """x_t from q(x_t | x0) at the ``step``-th timestep of ``scheduler`` (its timesteps set), as the
    model sees it (its input at that step): sqrt(a) x0 + sqrt(1 - a) eps for DDPM-family schedulers
    (Euler's scaled input included), (1 - sigma) x0 + sigma eps for flow matching."""
    if is_flow_matching(scheduler):
        sigma = scheduler.sigmas[step].to(x0.device, torch.float32)
        return (1.0 - sigma) * x0 + sigma * noise
    t = scheduler.timesteps[step]
    alpha_bar = scheduler.alphas_cumprod.to(x0.device, torch.float32)[int(round(float(t)))]
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def choose_examples(run_seed: int, indices, conditions, examples: dict[int, np.ndarray]) -> np.ndarray:
    """The real example each trajectory index noises: uniform among its condition's examples, a
    function of (run seed, index) only (its own random stream, apart from the plan's)."""
    return np.asarray([int(np.random.default_rng([run_seed, int(i), 3]).choice(examples[int(c)]))
                       for i, c in zip(indices, conditions)], dtype=np.int64)


def record_forward_noised_batch(base: BaseModel, plan: dict, num_steps: int, record_branches: bool,
                                real: RealData, examples: dict[int, np.ndarray], run_seed: int, conditions) -> dict:
    """The arrays of one batch: for each trajectory of ``plan`` one real x0 of its condition
    (``examples``: :meth:`RealData.examples_for`), noised independently at every sampler timestep,
    with CFG's output there as the target (for its w, class or prompt, and negative prompt)."""
    device = base.device
    scheduler = copy_scheduler(base.scheduler)
    set_timesteps(scheduler, num_steps, (len(plan["seed"]), *base.latent_shape),
                  getattr(base.net.config, "patch_size", None), device)
    chosen = choose_examples(run_seed, plan["trajectory_index"], plan[conditions.key], examples)
    x0 = torch.from_numpy(real.latents[chosen]).to(device)
    # eps for every step from the trajectory's own seed: [n, steps, C, H, W]
    noise = torch.stack([torch.randn((num_steps, *base.latent_shape), generator=g)
                         for g in generators_for(plan["seed"].tolist())]).to(device)
    stored, cond, uncond = conditions.for_batch(plan)
    cond = {name: value.to(device) for name, value in cond.items()}
    cfg = CFG(base, torch.from_numpy(plan["guidance_scale"]).to(device), uncond)
    record = StepRecord(base, len(chosen), num_steps, record_branches)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            x_t = forward_noise(scheduler, x0, noise[:, k], k).to(base.dtype)
            prediction = cfg(x_t, t, cond)
            record(Step(k, t, x_t, prediction.guided, prediction.cond, prediction.uncond))
    return {**record.arrays, "sample": x0.to("cpu", torch.float16).numpy(), **stored, **plan}
