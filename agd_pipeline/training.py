"""Stage two: train guidance adapters from the trajectory store alone (no teacher calls).

Batches come from :class:`~agd_pipeline.loader.StepBatches` (contiguous reads, shuffled in memory,
an order that is a function of (seed, epoch, rank)), so a resumed run sees the same batches as an
uninterrupted one. Under ``torchrun`` / ``accelerate launch`` each process trains on its own share
of every epoch and the adapters' gradients are averaged (DDP).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import AdaptedModel, AdapterConfig, default_condition_on, resolve_placement, save_adapters
from .config import TrainConfig, resolve_device, torch_dtype
from .errors import AgdError, ConfigError, ModelError
from .loader import StepBatches
from .models import load_base_model
from .store import TrajectoryStore, condition_arrays

CHECKPOINT = "checkpoint"
LOSS_CSV = "loss.csv"
# Settings that may change between a checkpoint and a resumed run without changing the result
# (not `steps`: the learning-rate schedule depends on it).
RESUMABLE_KEYS = ("checkpoint_every", "verify", "device", "restart_on_mismatch", "loader_workers")


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

    device = resolve_device(config.device)
    accelerator = Accelerator(cpu=device == "cpu")
    main = accelerator.is_main_process
    store = TrajectoryStore(config.store)
    store.check(full=config.verify == "full" and main)  # the other processes check presence and shapes
    accelerator.wait_for_everyone()
    manifest = store.manifest
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
    if not main:
        log = _silent
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
    if main:
        _truncate_losses(losses_path, start_step)

    loader = StepBatches(store, config.batch_size, config.seed, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=config.loader_workers)
    batches = loader.from_step(start_step)  # the same batches as an uninterrupted run
    if accelerator.num_processes > 1:
        log(f"train: {accelerator.num_processes} processes, {loader.batches_per_epoch()} batches each per epoch")
    channels = base.latent_channels
    started = time.perf_counter()
    model.train()
    with open(losses_path if main else os.devnull, "a", newline="") as loss_file, \
            tqdm(range(start_step, config.steps), desc="train: adapters", unit="step",
                 disable=not progress or not main, initial=start_step, total=config.steps) as bar:
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
            logged = accelerator.reduce(loss.detach(), "mean").item()  # the mean over processes
            running.append(logged)
            writer.writerow([step + 1, f"{logged:.6g}", f"{lr_schedule.get_last_lr()[0]:.6g}"])
            if (step + 1) % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(running[-25:]):.5f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                loss_file.flush()
                _save_checkpoint(accelerator, checkpoint, config, step + 1)
    seconds = time.perf_counter() - started
    final_loss = float(np.mean(running[-50:])) if running else None
    accelerator.wait_for_everyone()
    if not main:
        return {"parameters": report, "seconds": seconds, "final_loss": final_loss}
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


def _silent(*args, **kwargs) -> None:
    pass


def _save_checkpoint(accelerator, folder: Path, config: TrainConfig, step: int) -> None:
    """Written to a temporary folder, then renamed over the previous checkpoint (by the main process)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process takes part; the main one writes
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "config": _comparable(config)}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    accelerator.wait_for_everyone()


def _resume(accelerator, folder: Path, config: TrainConfig, log) -> int:
    progress_file = folder / "progress.json"
    if not progress_file.exists():
        return 0
    saved = json.loads(progress_file.read_text())
    if saved["config"] != _comparable(config):
        differing = sorted(k for k in saved["config"] if saved["config"][k] != _comparable(config).get(k))
        if config.restart_on_mismatch:
            log(f"train: {folder} holds a checkpoint of other settings (train.{', train.'.join(differing)}); "
                "starting over (restart_on_mismatch)")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(folder)
            return 0
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
