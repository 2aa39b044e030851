"""Stage one: sample the frozen base with full CFG and record every step into the store."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GenerateConfig, resolve_device
from .errors import ConfigError
from .models import BaseModel, load_base_model
from .sampling import Step, generators_for, initial_noise, sample, trajectory_seed
from .store import StoreWriter


def trajectory_plan(run_seed: int, indices, classes, w_min: float, w_max: float) -> dict[str, np.ndarray]:
    """Seed, class and w of each trajectory index: functions of (run seed, index) only.

    Classes cycle through the list, so every class gets the same number of trajectories.
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    uniforms = np.array([np.random.default_rng([run_seed, int(i), 1]).random() for i in indices])
    return {
        "trajectory_index": indices,
        "seed": np.array([trajectory_seed(run_seed, int(i)) for i in indices], dtype=np.int64),
        "class_label": np.asarray(classes, dtype=np.int64)[indices % len(classes)],
        "guidance_scale": (w_min + (w_max - w_min) * uniforms).astype(np.float32),
    }


def store_header(config: GenerateConfig, base: BaseModel, classes: list[int]) -> dict:
    scheduler = base.scheduler
    return json.loads(json.dumps({
        "base_model": base.describe(),
        "sampler": {"scheduler": type(scheduler).__name__, "config": dict(scheduler.config),
                    "num_steps": config.num_steps},
        "guidance": {"distribution": "uniform", "min": config.guidance_min, "max": config.guidance_max,
                     "formula": "uncond + w * (cond - uncond)"},
        "seed": config.seed,
        "classes": classes,
        "num_trajectories": len(classes) * config.trajectories_per_class,
        "shard_size": config.shard_size,
        "latent_shape": list(base.latent_shape),
        "output_channels": base.latent_channels,
        "record_branches": config.record_branches,
        "compressor": config.compressor,
        "chunk_trajectories": min(config.chunk_trajectories, config.shard_size),
    }, default=str))


def resolve_classes(config: GenerateConfig, base: BaseModel) -> list[int]:
    classes = list(config.classes) or list(range(base.num_classes))
    bad = [c for c in classes if c >= base.num_classes]
    if bad:
        raise ConfigError(f"generate.classes: {bad[:5]} not below the model's {base.num_classes} classes")
    return classes


def record_batch(base: BaseModel, plan: dict, num_steps: int, record_branches: bool) -> dict[str, np.ndarray]:
    """Sample one batch with CFG and return every array the store keeps for it."""
    n = len(plan["seed"])
    device = base.device
    gens = generators_for(plan["seed"].tolist())
    noise = initial_noise(base, gens)
    labels = torch.from_numpy(plan["class_label"]).to(device)
    w = torch.from_numpy(plan["guidance_scale"]).to(device)
    c, h, wd = base.latent_shape
    out = {"model_input": np.empty((n, num_steps, c, h, wd), np.float16),
           "guided_output": np.empty((n, num_steps, base.latent_channels, h, wd), np.float16),
           "timesteps": np.empty((n, num_steps), np.float32)}
    if record_branches:
        out["cond_output"] = np.empty_like(out["guided_output"])
        out["uncond_output"] = np.empty_like(out["guided_output"])

    def observe(step: Step) -> None:
        out["model_input"][:, step.index] = step.model_input.to("cpu", torch.float16).numpy()
        out["guided_output"][:, step.index] = step.guided_output.to("cpu", torch.float16).numpy()
        out["timesteps"][:, step.index] = float(step.timestep)
        if record_branches:
            out["cond_output"][:, step.index] = step.cond_output.to("cpu", torch.float16).numpy()
            out["uncond_output"][:, step.index] = step.uncond_output.to("cpu", torch.float16).numpy()

    final = sample(base, labels, noise, num_steps, guidance_scale=w, generators=gens,
                   observer=observe, record_branches=record_branches)
    out["sample"] = final.to("cpu", torch.float16).numpy()
    return {**out, **plan}


def generate(config: GenerateConfig, progress: bool = True, log=print) -> dict:
    """Write (or finish) the trajectory store described by ``config``. Returns a summary."""
    device = resolve_device(config.device)
    base = load_base_model(config.base_model, device=device, scheduler=config.scheduler)
    classes = resolve_classes(config, base)
    writer = StoreWriter(config.out_dir, store_header(config, base, classes))
    pending = writer.pending()
    total = writer.header["num_trajectories"]
    if not pending:
        log(f"{config.out_dir}: all {writer.num_shards} shards ({total} trajectories) already complete; "
            "nothing to do")
        return {"written_shards": 0, "trajectories": total, "seconds": 0.0}
    done_before = writer.num_shards - len(pending)
    if done_before:
        log(f"{config.out_dir}: resuming, {done_before} of {writer.num_shards} shards already complete")
    todo = sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in pending)
    started = time.perf_counter()
    with tqdm(total=todo, desc="generate: CFG trajectories", unit="traj", disable=not progress) as bar:
        for index in pending:
            shard = writer.begin_shard(index)
            for batch_start in range(shard.start, shard.stop, config.batch_size):
                batch_stop = min(shard.stop, batch_start + config.batch_size)
                plan = trajectory_plan(config.seed, range(batch_start, batch_stop), classes,
                                       config.guidance_min, config.guidance_max)
                arrays = record_batch(base, plan, config.num_steps, config.record_branches)
                shard.write(batch_start - shard.start, arrays)
                bar.update(batch_stop - batch_start)
            shard.finish()
    seconds = time.perf_counter() - started
    log(f"{config.out_dir}: wrote {len(pending)} shard(s), {todo} trajectories x {config.num_steps} steps "
        f"in {seconds:.1f} s ({todo / seconds:.1f} trajectories/s)")
    return {"written_shards": len(pending), "trajectories": total, "seconds": seconds}
