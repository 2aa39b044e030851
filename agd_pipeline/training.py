"""Stage two: train guidance adapters from the trajectory store alone (no teacher calls).

The loader reads whole chunk rows (a block of trajectories with all their steps), holds a few in
memory and shuffles (trajectory, step) samples there: contiguous reads, random batches. The order
is a function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import AdaptedModel, AdapterConfig, default_condition_on, resolve_placement, save_adapters
from .config import TrainConfig, resolve_device, torch_dtype
from .errors import AgdError, ConfigError, ModelError
from .models import load_base_model
from .store import StoreError, TrajectoryStore, condition_arrays

CHECKPOINT = "checkpoint"
LOSS_CSV = "loss.csv"
# Settings that may change between a checkpoint and a resumed run without changing the result
# (not `steps`: the learning-rate schedule depends on it).
RESUMABLE_KEYS = ("checkpoint_every", "verify", "device")


class StepBatches:
    """Endless shuffled batches of (trajectory, step) samples: model input, timestep, w, the
    condition arrays and the guided output (the target).

    Whole chunk rows are read (contiguous reads), ``buffer_rows`` at a time; samples are drawn from
    the buffer in a random order. Per-trajectory arrays (prompt embeddings) are not repeated per
    step in memory: a sample is gathered from its (trajectory, step) index when its batch is built.
    """

    def __init__(self, store: TrajectoryStore, batch_size: int, seed: int, buffer_rows: int = 16):
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_rows = buffer_rows
        self.ranges = store.chunk_ranges()
        self.per_step = ("model_input", "guided_output", "timesteps")
        self.per_trajectory = ("guidance_scale", *condition_arrays(store.manifest))
        self._groups = {}

    def _group(self, name):
        if name not in self._groups:
            self._groups[name] = self.store.open_shard(name)
        return self._groups[name]

    def _load(self, ranges) -> dict[str, np.ndarray]:
        parts = {k: [] for k in (*self.per_step, *self.per_trajectory)}
        for name, start, stop in ranges:
            group = self._group(name)
            for key in parts:
                try:
                    parts[key].append(group[key][start:stop])
                except Exception as err:  # noqa: BLE001 - a damaged chunk fails inside the codec
                    raise StoreError(
                        f"{self.store.root / name}/{key}: cannot read trajectories {start}-{stop} "
                        f"({type(err).__name__}: {err}); run `python -m stages.inspect {self.store.root} "
                        "--verify` and re-run generate for the damaged shards") from None
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _gather(self, data: dict, flat: np.ndarray) -> dict[str, np.ndarray]:
        steps = data["timesteps"].shape[1]
        traj, step = np.divmod(flat, steps)
        out = {k: data[k][traj, step] for k in self.per_step}
        out.update({k: data[k][traj] for k in self.per_trajectory})
        return out

    def epoch(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.ranges))
        carry = None  # samples left over from the previous buffer (fewer than a batch)
        for first in range(0, len(order), self.buffer_rows):
            data = self._load([self.ranges[i] for i in order[first:first + self.buffer_rows]])
            perm = rng.permutation(data["timesteps"].size)
            start = 0
            if carry is not None:
                need = self.batch_size - len(carry["timesteps"])
                fill = self._gather(data, perm[:need])
                batch = {k: np.concatenate([carry[k], fill[k]]) for k in carry}
                start, carry = len(perm[:need]), None
                if len(batch["timesteps"]) < self.batch_size:
                    carry = batch
                    continue
                yield {k: torch.from_numpy(v) for k, v in batch.items()}
            for begin in range(start, len(perm), self.batch_size):
                idx = perm[begin:begin + self.batch_size]
                samples = self._gather(data, idx)
                if len(idx) < self.batch_size:
                    carry = samples
                    break
                yield {k: torch.from_numpy(v) for k, v in samples.items()}
        if carry is not None and len(carry["timesteps"]):
            yield {k: torch.from_numpy(v) for k, v in carry.items()}  # the epoch's last, smaller batch

    def __iter__(self):
        for epoch in itertools.count():
            yield from self.epoch(epoch)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def weighted_mse(output, target, guidance_scale, weighting: str) -> torch.Tensor:
    per_sample = (output - target).pow(2).flatten(1).mean(1)
    if weighting == "uniform":
        return per_sample.mean()
    weights = 1.0 / (guidance_scale.float() - 1.0).clamp(min=0.5)
    return (weights * per_sample).sum() / weights.sum()


def adapter_config_for(config: TrainConfig, manifest: dict) -> AdapterConfig:
    """The adapter architecture for this store's base: family defaults filled in, text widths read
    from the recorded prompt embeddings."""
    recorded = manifest["base_model"]
    family = recorded.get("family", "dit")
    conditioning = recorded.get("conditioning", "class")
    condition_on = list(config.condition_on) or default_condition_on(conditioning)
    wrong = {"class"} if conditioning == "text" else {"text", "text_tokens"}
    if wrong & set(condition_on):
        raise ConfigError(f"train.condition_on: {sorted(wrong & set(condition_on))} do not apply to this "
                          f"{conditioning}-conditional {family} store; use {default_condition_on(conditioning)}")
    arrays = condition_arrays(manifest)
    try:
        placement = resolve_placement(family, config.placement)
    except ModelError as err:
        raise ConfigError(f"train.placement: {err}") from None
    return AdapterConfig(
        kind=config.adapter, placement=placement, width=config.width, embed_dim=config.embed_dim,
        fourier_frequencies=config.fourier_frequencies, condition_on=condition_on,
        num_classes=recorded["num_classes"],
        text_dim=arrays["prompt_embeds"]["shape"][-1] if "prompt_embeds" in arrays else 0,
        pooled_dim=arrays["pooled_prompt_embeds"]["shape"][-1] if "pooled_prompt_embeds" in arrays else 0,
        guidance_scale_unit=max(1.0, manifest["guidance"]["max"] - 1.0),
        guidance_gate=config.guidance_gate,
    )


def _comparable(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}


def train(config: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train adapters from ``config.store`` into ``config.out_dir``; resume from its checkpoint."""
    from accelerate import Accelerator

    store = TrajectoryStore(config.store)
    store.check(full=config.verify == "full")
    manifest = store.manifest
    device = resolve_device(config.device)
    accelerator = Accelerator(cpu=device == "cpu")
    recorded = manifest["base_model"]
    base = load_base_model(config.base_model or recorded["id"], device=accelerator.device, with_vae=False,
                           dtype=torch_dtype(config.dtype or recorded.get("dtype", "float32")))
    if base.weights_fingerprint() != recorded["weights_fingerprint"]:
        raise ModelError(
            f"{config.store} was recorded with weights {recorded['weights_fingerprint']} of {recorded['id']!r}, "
            f"but {base.model_id!r} has weights {base.weights_fingerprint()}: the targets do not belong to this "
            "base. Re-run stage one (generate) for this base, or point train.base_model at the recorded one."
        )
    adapter_config = adapter_config_for(config, manifest)
    torch.manual_seed(config.seed)
    model = AdaptedModel(base, adapter_config)
    report = model.parameter_report()
    log(f"adapters: {config.adapter} at {adapter_config.placement} x{len(model.adapters)}, "
        f"{report['adapter']:,} parameters = {100 * report['share']:.2f} % of the base's {report['base']:,}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.steps, warmup))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    start_step = _resume(accelerator, checkpoint, config, log)
    losses_path = out / LOSS_CSV
    _truncate_losses(losses_path, start_step)

    batches = iter(StepBatches(store, config.batch_size, config.seed))
    for _ in range(start_step):  # the same batch order as an uninterrupted run
        next(batches)
    channels = base.latent_channels
    started = time.perf_counter()
    model.train()
    with open(losses_path, "a", newline="") as loss_file, \
            tqdm(range(start_step, config.steps), desc="train: adapters", unit="step",
                 disable=not progress, initial=start_step, total=config.steps) as bar:
        writer = csv.writer(loss_file)
        if start_step == 0:
            writer.writerow(["step", "loss", "lr"])
        running = []
        for step in bar:
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            x = batch["model_input"].float()
            target = batch["guided_output"].float()
            cond = {k: batch[k] for k in condition_arrays(manifest)}
            output = model(x, batch["timesteps"], cond, batch["guidance_scale"])
            loss = weighted_mse(output[:, :channels].float(), target, batch["guidance_scale"],
                                config.loss_weighting)
            if not torch.isfinite(loss):
                raise AgdError(f"train: loss became {loss.item()} at step {step}; lower train.learning_rate "
                               f"(now {config.learning_rate}) or check the store with `python -m stages.inspect --verify`")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            lr_schedule.step()
            running.append(loss.item())
            writer.writerow([step + 1, f"{loss.item():.6g}", f"{lr_schedule.get_last_lr()[0]:.6g}"])
            if (step + 1) % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(running[-25:]):.5f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                loss_file.flush()
                _save_checkpoint(accelerator, checkpoint, config, step + 1)
    seconds = time.perf_counter() - started
    final_loss = float(np.mean(running[-50:])) if running else None
    unwrapped = accelerator.unwrap_model(model).eval()
    save_adapters(unwrapped, out, extra={
        "training": config.to_dict(),
        "store": {"path": str(config.store), "trajectories": store.num_trajectories,
                  "shard_checksums": [s.get("checksum") for s in store.shards]},
        "sampler": manifest["sampler"],
        "guidance": manifest["guidance"],
        "negative_prompt": manifest.get("negative_prompt", ""),
        "final_loss": final_loss,
    })
    shutil.rmtree(checkpoint, ignore_errors=True)
    log(f"{out}: adapters saved after {config.steps} steps ({seconds:.1f} s this run); "
        f"final loss {final_loss if final_loss is not None else float('nan'):.5f}")
    return {"parameters": report, "seconds": seconds, "final_loss": final_loss}


def _save_checkpoint(accelerator, folder: Path, config: TrainConfig, step: int) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "config": _comparable(config)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def _resume(accelerator, folder: Path, config: TrainConfig, log) -> int:
    progress_file = folder / "progress.json"
    if not progress_file.exists():
        return 0
    saved = json.loads(progress_file.read_text())
    if saved["config"] != _comparable(config):
        differing = sorted(k for k in saved["config"] if saved["config"][k] != _comparable(config).get(k))
        raise AgdError(
            f"{folder} holds a checkpoint of a run with other settings (train.{', train.'.join(differing)}); "
            f"delete {folder} to start over, or restore those settings to resume it"
        )
    if saved["step"] >= config.steps:
        return 0
    accelerator.load_state(str(folder))
    log(f"train: resuming from {folder} at step {saved['step']}")
    return int(saved["step"])


def _truncate_losses(path: Path, step: int) -> None:
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    rows = path.read_text().splitlines()
    kept = [rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= step]
    path.write_text("\n".join(kept) + "\n")
