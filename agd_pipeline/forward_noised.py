"""Standard guidance distillation's training data, for the paper's central ablation: (x_t, t, w)
points drawn by noising *real* latents with the forward process, labelled with the teacher's CFG
output at those points, instead of points on the teacher's own CFG sampling trajectories.

``generate.source: forward_noised`` writes such a store in the trajectory store's layout, so stage
two trains on it unchanged: "trajectory" i is one real latent x0 (of the class the plan gives
trajectory i), noised independently at each of the sampler's timesteps t_k,

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps      (the model's input at step t)

with eps ~ N(0, I) drawn from the trajectory's own seed, and the recorded target is CFG's guided
output at (x_t, t) for the trajectory's w and class. The same number of (x, t, w) pairs as a
trajectory store of the same settings; "sample" holds x0.
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

REAL_DATA_KEYS = ("latents", "labels")


@dataclass
class RealData:
    """Real latents with their class labels, as the base model sees them (its latent shape)."""

    path: str
    latents: np.ndarray  # [N, C, H, W] float32
    labels: np.ndarray  # [N] int64
    sha256: str

    def by_class(self, classes) -> dict[int, np.ndarray]:
        """Indices of the examples of each class; every class asked for must have one."""
        table = {int(c): np.flatnonzero(self.labels == c) for c in classes}
        empty = [c for c, rows in table.items() if len(rows) == 0]
        if empty:
            raise ConfigError(f"generate.real_data: {self.path} has no example of class {empty[0]} (classes "
                              f"present: {sorted(set(self.labels.tolist()))}); give data for every class "
                              "sampled, or narrow generate.classes")
        return table

    def describe(self) -> dict:
        return {"kind": "forward_noised", "real_data": self.path, "real_data_sha256": self.sha256,
                "real_examples": int(len(self.labels))}


def load_real_data(path: str, base: BaseModel) -> RealData:
    """The ``.npz`` of ``generate.real_data``: ``latents`` [N, C, H, W] in the base's latent shape
    (for a latent model, already VAE-encoded and scaled as its pipeline does) and integer ``labels``
    [N]. Refuses anything else with a message that says what is wrong."""
    key = "generate.real_data"
    if base.conditioning != "class":
        raise ConfigError(f"{key}: forward-noised data is built for class-conditional models only; "
                          f"{base.model_id!r} is a {base.conditioning} model (use generate.source: trajectories)")
    if not hasattr(base.scheduler, "alphas_cumprod"):
        raise ConfigError(f"generate.source forward_noised: {type(base.scheduler).__name__} has no alphas_cumprod; "
                          "forward-noised data is built for DDPM-family schedulers (DDPM, DDIM, Euler, ...) only")
    if not path:
        raise ConfigError(f"{key} is empty: generate.source forward_noised noises real latents; give an .npz with "
                          "latents [N, C, H, W] and labels [N] (the embedded default writes data/base/train.npz)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {path} is not a file; give an .npz with latents [N, C, H, W] and labels [N]")
    raw = file.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:  # the bytes hashed above, read once
            arrays = {name: data[name] for name in data.files}
    except Exception as err:  # noqa: BLE001 - zip, pickle and format errors alike
        raise ConfigError(f"{key}: {path} is not a readable .npz ({type(err).__name__}: {err})") from None
    missing = [name for name in REAL_DATA_KEYS if name not in arrays]
    if missing:
        raise ConfigError(f"{key}: {path} lacks the array {missing[0]!r} (it has {sorted(arrays)}); it needs "
                          "latents [N, C, H, W] and labels [N]")
    latents, labels = arrays["latents"], arrays["labels"]
    if latents.ndim != 4 or tuple(latents.shape[1:]) != tuple(base.latent_shape):
        raise ConfigError(f"{key}: {path} latents have shape {list(latents.shape)}; {base.model_id!r} takes "
                          f"[N, {', '.join(map(str, base.latent_shape))}]")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ConfigError(f"{key}: {path} latents must be finite floating-point numbers")
    if labels.shape != (len(latents),) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{key}: {path} labels must be integers, one per latent (shape {list(labels.shape)} "
                          f"against {len(latents)} latents)")
    return RealData(str(path), latents.astype(np.float32), labels.astype(np.int64), hashlib.sha256(raw).hexdigest())


def forward_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x_t from q(x_t | x0) at timestep ``t``, as the model sees it (its input at that step)."""
    alpha_bar = scheduler.alphas_cumprod.to(x0.device, torch.float32)[int(round(float(t)))]
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def choose_examples(run_seed: int, indices, labels: np.ndarray, by_class: dict[int, np.ndarray]) -> np.ndarray:
    """The real example each trajectory index noises: uniform among its class's examples, a function
    of (run seed, index) only (its own random stream, apart from the plan's)."""
    return np.asarray([int(np.random.default_rng([run_seed, int(i), 3]).choice(by_class[int(c)]))
                       for i, c in zip(indices, labels)], dtype=np.int64)


def record_forward_noised_batch(base: BaseModel, plan: dict, num_steps: int, record_branches: bool,
                                real: RealData, by_class: dict[int, np.ndarray], run_seed: int) -> dict:
    """The arrays of one batch: for each trajectory of ``plan`` one real x0 of its class, noised
    independently at every sampler timestep, with CFG's output there as the target."""
    device = base.device
    scheduler = copy_scheduler(base.scheduler)
    set_timesteps(scheduler, num_steps, (len(plan["seed"]), *base.latent_shape),
                  getattr(base.net.config, "patch_size", None), device)
    chosen = choose_examples(run_seed, plan["trajectory_index"], plan["class_label"], by_class)
    x0 = torch.from_numpy(real.latents[chosen]).to(device)
    # eps for every step from the trajectory's own seed: [n, steps, C, H, W]
    noise = torch.stack([torch.randn((num_steps, *base.latent_shape), generator=g)
                         for g in generators_for(plan["seed"].tolist())]).to(device)
    cfg = CFG(base, torch.from_numpy(plan["guidance_scale"]).to(device))
    cond = {"class_label": torch.from_numpy(plan["class_label"]).to(device)}
    record = StepRecord(base, len(chosen), num_steps, record_branches)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            x_t = forward_noise(scheduler, x0, noise[:, k], t).to(base.dtype)
            prediction = cfg(x_t, t, cond)
            record(Step(k, t, x_t, prediction.guided, prediction.cond, prediction.uncond))
    return {**record.arrays, "sample": x0.to("cpu", torch.float16).numpy(), **plan}
