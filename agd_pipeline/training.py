"""Stage two: train guidance adapters from the trajectory store alone (no teacher calls).

Batches come from :class:`~agd_pipeline.loader.StepBatches` (contiguous reads, shuffled in memory,
an order that is a function of (seed, epoch, rank)), so a resumed run sees the same batches as an
uninterrupted one. Under ``torchrun`` / ``accelerate launch`` each process trains on its own share
of every epoch and the adapters' gradients are averaged (DDP).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusers.optimization import get_scheduler

from .adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MEAN_SOURCES, MODEL_CARD, NEGATIVE_SOURCES, TEXT_SOURCES,
                       AdaptedModel, AdapterConfig, default_condition_on, read_adapter_config, resolve_placement,
                       save_adapters)
from .config import TrainConfig, check_interval
from .devices import resolve_device, torch_dtype
from .errors import (AgdError, ConfigError, ModelError, StoreError, WriteError, command_line, os_reason,
                     write_errors, write_reason)
from .loader import StepBatches
from .locks import FolderLock
from .memory import enable_base_checkpointing
from .models import load_base_model, recorded_hub_options
from .outputs import RESOLVED_CONFIG, owned_output, write_resolved
from .store import Manifest, TrajectoryStore, read_manifest
from .store.manifest import differences
from .validation import VALIDATION, Validator, validation_rows, validation_scales

CHECKPOINT = "checkpoint"
LOSS_CSV = "loss.csv"
CHECKPOINT_FORMAT = "agd-train-checkpoint"
# What a checkpoint folder holds: tensors in safetensors, everything else in JSON (never a pickle);
# with train.ema_decay also the EMA of the weights.
CHECKPOINT_FILES = ("state.json", "adapters.safetensors", "optimizer.safetensors")
EMA_FILE = "ema.safetensors"
# Files of checkpoints written by earlier releases (accelerate's save_state): recognised so they can
# be discarded on request, never loaded.
LEGACY_CHECKPOINT_FILES = ("progress.json", "model.safetensors", "optimizer.bin", "scheduler.bin",
                           "random_states_0.pkl", "custom_checkpoint_0.pkl")
# Settings that may change between a checkpoint and a resumed run without changing the result
# (not `steps`: it may grow only where the learning-rate schedule's first steps do not depend on it,
# see _schedule_difference).
RESUMABLE_KEYS = ("checkpoint_every", "verify", "device", "restart_on_mismatch", "loader_workers", "report_to",
                  "validate_every", "gradient_checkpointing", "validation_prompt", "validation_w")
# state.json of the checkpoint a finished run keeps (its outputs all written) says so: that checkpoint
# is the one `--steps` larger continues from, never an unfinished run to resume
FINISHED = "finished"
STATE_TMP = "state.json.tmp"  # the finished mark is written here first, then renamed over state.json
# accelerate's mixed precision as it resolved it -> the dtype autocast runs the frozen base in
MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


FINAL_LOSS_STEPS = 50  # adapter_config.json's final_loss: the mean loss of the run's last this many steps
WRITE_ERRORS = (*write_errors(), WriteError)  # a file or safetensors write that failed (agd_pipeline.errors)


def weighted_mse(output, target, guidance_scale, weighting: str) -> torch.Tensor:
    per_sample = (output - target).pow(2).flatten(1).mean(1)
    if weighting == "uniform":
        return per_sample.mean()
    weights = 1.0 / (guidance_scale.float() - 1.0).clamp(min=0.5)
    if weighting == "guidance_squared":
        weights = weights.square()
    return (weights * per_sample).sum() / weights.sum()


def adapter_config_for(config: TrainConfig, manifest: Manifest) -> AdapterConfig:
    """The adapter architecture for this store's base: family defaults filled in, text widths read
    from the recorded prompt embeddings."""
    recorded = manifest.base_model
    family = recorded.get("family", "dit")
    conditioning = recorded.get("conditioning", "class")
    arrays = manifest.condition_arrays
    # a store written with generate.negative_prompts_file keeps each trajectory's negative prompt
    negatives = conditioning == "text" and "negative_prompt_embeds" in arrays
    pooled = "pooled_prompt_embeds" in arrays
    default = default_condition_on(conditioning, negatives, pooled)
    condition_on = list(config.condition_on) or default
    wrong = {"class"} if conditioning == "text" else set(TEXT_SOURCES)
    if wrong & set(condition_on):
        raise ConfigError(f"train.condition_on: {sorted(wrong & set(condition_on))} do not apply to this "
                          f"{conditioning}-conditional {family} store; use {default}")
    asked = [name for name in NEGATIVE_SOURCES if name in condition_on]
    if asked and not negatives:
        raise ConfigError(f"train.condition_on: {asked[0]} needs a store that records each trajectory's negative "
                          f"prompt, and {config.store} has none (no negative_prompt_embeds): write it with "
                          f"generate.negative_prompts_file, or leave {' and '.join(asked)} out")
    means = [name for name in MEAN_SOURCES if name in condition_on]
    if means and not pooled:
        raise ConfigError(f"train.condition_on: {means[0]} reads the prompt tokens' mean beside a pooled embedding, "
                          f"and this {family} model has none (text already reads that mean); leave it out")
    if negatives and "negative_text" not in condition_on:
        warnings.warn(f"{config.store} records a negative prompt per trajectory, but train.condition_on "
                      f"{condition_on} leaves out negative_text: these adapters will not follow negative prompts "
                      "(add negative_text, or leave train.condition_on empty)", stacklevel=2)
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
        guidance_scale_unit=max(1.0, manifest.guidance_max - 1.0),
        guidance_gate=config.guidance_gate,
    )


def _comparable(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}


def runtime_record(accelerator) -> dict:
    """What changes the bits of the adapters besides train's own settings, as this process runs:
    recorded in resolved_config.json, adapter_config.json and every checkpoint (``runtime``).

    * ``mixed_precision``: accelerate's, as it resolved it (ACCELERATE_MIXED_PRECISION, or
      ``accelerate launch``'s config): no, bf16, fp16. Autocast changes every matmul's result, so it
      is compared like a setting: a checkpoint or finished adapters of another mixed precision are
      refused (or replaced with train.restart_on_mismatch), never continued.
    * ``cuda_matmul_allow_tf32``, ``cudnn_allow_tf32``, ``float32_matmul_precision``: torch's TF32
      switches. They change float32 matmul and convolution results on GPUs with TF32 (Ampere and
      later), not on the CPU. Recorded only, as train.device is (a run may resume on other hardware).
    * ``num_threads``, ``num_interop_threads``: torch's thread counts. On the CPU they can change the
      last bits (a parallel sum is split by thread; tried: a sum of 4 M float32 numbers differs
      between 1 and 2 threads). Recorded only: a resumed run on another machine is allowed.
    * ``num_processes``, ``distributed_type``: how many processes trained and how accelerate joined
      them (NO, MULTI_CPU, MULTI_GPU, ...). Each process draws its own share of every batch and the
      gradients are averaged across them, which sums in another order than one process does.
      Recorded only: a run may resume with another number of processes.
    """
    distributed = accelerator.distributed_type
    return {"mixed_precision": str(accelerator.mixed_precision),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads(),
            "num_processes": int(accelerator.num_processes),
            "distributed_type": str(getattr(distributed, "value", distributed))}


def _check_mixed_precision(config: TrainConfig, manifest: Manifest, mixed_precision: str) -> None:
    """Refuse, before any work, accelerate's mixed precision where it contradicts train.dtype: the
    frozen base runs in train.dtype (empty: the store's recorded dtype) and the adapters in float32;
    autocast bf16 (fp16) runs the base's matmuls in bfloat16 (float16) whatever its dtype, so it is
    accepted only with a base in that dtype. fp8 is never accepted."""
    if mixed_precision == "no":
        return
    source = "accelerate's mixed precision (ACCELERATE_MIXED_PRECISION, or `accelerate launch`'s config)"
    autocast = MIXED_PRECISION_DTYPES.get(mixed_precision)
    if autocast is None:
        raise ConfigError(f"train.dtype: {source} is {mixed_precision!r}, which {command_line('train')} does not "
                          "support (the adapters train in float32 beside a base in train.dtype); nothing was done. "
                          "Use no, bf16 or fp16")
    base_dtype = config.dtype or str(manifest.base_model.get("dtype") or "float32")
    if autocast != base_dtype:
        where = f"train.dtype {config.dtype}" if config.dtype else "the store's dtype, train.dtype being empty"
        raise ConfigError(f"train.dtype: {source} is {mixed_precision!r}, which runs the frozen base in {autocast}, "
                          f"but it runs in {base_dtype} ({where}); nothing was done. Set train.dtype {autocast} "
                          "to train under it, or mixed precision no")


def train(config: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train adapters from ``config.store`` into ``config.out_dir``; resume from its checkpoint."""
    from accelerate import Accelerator

    device = resolve_device(config.device)
    _check_tracker(config.report_to)
    try:
        accelerator = Accelerator(cpu=device == "cpu", **({} if config.report_to == "none" else {
            "log_with": config.report_to, "project_dir": str(Path(config.out_dir) / "tracking")}))
    except ValueError as err:  # e.g. "fp16 mixed precision is not supported on 'cpu'."
        if "precision" not in str(err):
            raise
        raise ConfigError(f"train.device: accelerate refuses its mixed precision (ACCELERATE_MIXED_PRECISION, or "
                          f"`accelerate launch`'s config) on {device}: {str(err).rstrip('.')}; nothing was done. "
                          "Use bf16 or no there") from None
    out, store_root = Path(config.out_dir), Path(config.store)
    if out.resolve() == store_root.resolve() or store_root.resolve() in out.resolve().parents:
        raise ConfigError(f"train.out_dir ({out}) must not be the store ({store_root}) or lie inside it")
    manifest = read_manifest(store_root)  # a missing or broken store is refused before anything is created
    _check_mixed_precision(config, manifest, accelerator.mixed_precision)
    if config.validate_every >= 0:  # prompts a class model cannot take: refused now, not after training
        validation_rows(config, manifest)
    runtime = runtime_record(accelerator)
    inputs = [store_root, config.base_model or manifest.base_model.get("id")]
    with contextlib.ExitStack() as held:
        def claim() -> dict | None:
            # one training run per output folder, which holds nothing else (agd_pipeline.outputs);
            # the store must not be rewritten while it is read
            held.enter_context(owned_output(config, inputs, ours=_holds_training, own_name=_train_output_name,
                                            record=False))
            held.enter_context(FolderLock(store_root, "stages.train (reading the store)", shared=True, create=False))
            finished = _finished_run(config, manifest.fingerprint(), runtime, log)
            if finished is None:
                write_resolved(config, out, runtime=runtime)  # from here on the folder is recognisably this run's
            return finished

        # every process learns rank 0's decision: all stop on nothing to do, or on its error
        finished = _on_main_process(accelerator, claim)
        if finished is not None:
            return finished
        return _train(config, accelerator, progress, log)


def _broadcast(objects: list) -> list:
    """accelerate's broadcast_object_list from rank 0 (a seam: tests simulate ranks through it)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(objects, from_process=0)


def _on_main_process(accelerator, decide: Callable[[], Any]) -> Any:
    """``decide()`` run by the main process only, its result handed to every process. Where it
    raises, it raises there and the other processes stop with an AgdError that points at it: none
    goes on alone to wait at a barrier for a main process that has stopped (or has nothing to do)."""
    if accelerator.num_processes == 1:
        return decide()
    shared: list = [None, None]  # the result, or why rank 0 stopped
    error = None
    if accelerator.is_main_process:
        try:
            shared[0] = decide()
        except BaseException as err:  # Ctrl-C too: the others must not wait for it
            error, shared[1] = err, type(err).__name__
    _broadcast(shared)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise AgdError(f"train: rank 0 stopped before training ({shared[1]}; its message says why); "
                       f"rank {accelerator.process_index} stops with it")
    return shared[0]


# what stages.train writes into its output folder (anything else there is refused, not overwritten)
TRAIN_OUTPUTS = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, MODEL_CARD, LOSS_CSV, CHECKPOINT, VALIDATION, "tracking",
                 RESOLVED_CONFIG}


def _train_output_name(name: str) -> bool:
    return name in TRAIN_OUTPUTS or (name.endswith(".tmp") and name[:-len(".tmp")] in TRAIN_OUTPUTS)


def _holds_training(folder: Path) -> bool:
    """A training output written before the folder record existed: a checkpoint or adapters."""
    return (folder / ADAPTER_CONFIG).is_file() or any(
        (folder / checkpoint / name).is_file() for checkpoint in (CHECKPOINT, CHECKPOINT + ".tmp")
        for name in ("state.json", *LEGACY_CHECKPOINT_FILES))


def _finished_run(config: TrainConfig, fingerprint: str, runtime: dict, log) -> dict | None:
    """For an output folder that holds finished adapters: their result when they were trained with
    these settings on this store (nothing to do); None when a larger train.steps continues them from
    the checkpoint the finished run kept (where the learning-rate schedule allows it, see
    :func:`_schedule_difference`), or after clearing them (train.restart_on_mismatch); else a
    ConfigError naming the difference. A folder whose checkpoint is not marked finished holds an
    unfinished run (killed while it wrote its outputs, or while it continued): None, and
    :func:`_resume` decides."""
    out = Path(config.out_dir)
    if not (out / ADAPTER_CONFIG).exists():
        return None
    kept = _checkpoint_folder(out)
    kept_state = _read_state(kept) if kept is not None else None
    if kept is not None and not (kept_state is not None and kept_state.get(FINISHED) is True):
        return None
    refusal = None
    try:
        recorded = read_adapter_config(out)
        trained = recorded.get("training")
        if not isinstance(trained, dict):
            raise ModelError(f"{out / ADAPTER_CONFIG}: no training record")
        ran = {k: v for k, v in trained.items() if k not in RESUMABLE_KEYS}
        now = _comparable(config)
        # where the store and the folder lie does not matter: the store is compared by its fingerprint;
        # steps are compared below (more steps continue)
        changed = [k for k in now if k not in ("store", "out_dir", "steps") and ran.get(k, now[k]) != now[k]]
        ran_precision = (recorded.get("runtime") or {}).get("mixed_precision", runtime["mixed_precision"])
        if changed:
            difference = "; ".join(f"{config.key(k)} {ran[k]!r} there, {now[k]!r} now" for k in changed[:3])
        elif ran_precision != runtime["mixed_precision"]:
            difference = (f"accelerate's mixed precision {ran_precision!r} there, {runtime['mixed_precision']!r} now "
                          "(ACCELERATE_MIXED_PRECISION, or `accelerate launch`'s config)")
        elif recorded.get("code") != code_fingerprint():
            difference = (f"trained by other code of this tool (source digest {recorded.get('code')} there, "
                          f"{code_fingerprint()} now)")
        elif (recorded.get("store") or {}).get("fingerprint") != fingerprint:
            difference = (f"trained on another store (fingerprint {(recorded.get('store') or {}).get('fingerprint')} "
                          f"there, {fingerprint} of {config.store} now)")
        elif ran.get("steps") == config.steps:
            log(f"train: {out} already holds adapters trained with these settings on this store (final loss "
                f"{recorded.get('final_loss')}); nothing to do")
            return {"parameters": recorded.get("parameters"), "seconds": 0.0,
                    "final_loss": recorded.get("final_loss"), "skipped": True}
        else:
            difference, refusal = _continuation_refusal(config, ran.get("steps"), kept_state)
            if difference is None:
                log(f"train: {out} holds adapters trained for {ran['steps']} steps with these settings on this store; "
                    f"continuing them from {kept} to {config.steps} steps")
                return None
    except ModelError as err:
        difference = f"its adapters cannot be read ({err})"
    if not config.restart_on_mismatch:
        raise ConfigError(refusal or f"train.out_dir: {out} holds finished adapters: {difference}; nothing was "
                          "changed. Choose another out_dir, or pass --restart-on-mismatch true to replace them")
    log(f"train: {out} held finished adapters ({difference}); replacing them (restart_on_mismatch)")
    for name in sorted(TRAIN_OUTPUTS - {RESOLVED_CONFIG}):
        for path in (out / name, out / (name + ".tmp")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return None


def _continuation_refusal(config: TrainConfig, trained_steps, kept_state: dict | None) -> tuple[str | None, str | None]:
    """Whether finished adapters of ``trained_steps`` steps (their kept checkpoint's state:
    ``kept_state``) continue to train.steps: (None, None) if so, else (the difference in short, the
    one-line refusal)."""
    out, steps = Path(config.out_dir), config.steps
    if not isinstance(trained_steps, int):
        difference = f"its adapter_config.json records no step count ({trained_steps!r})"
        return difference, None
    again = f"pass --restart-on-mismatch true to retrain from zero with {steps} steps"
    if steps < trained_steps:
        difference = f"trained for {trained_steps} steps, {steps} now"
        return difference, (f"train.steps: {out} holds adapters trained for {trained_steps} steps, more than the "
                            f"{steps} asked now, and training does not go back; nothing was changed. Choose another "
                            f"out_dir, or {again}")
    if kept_state is None or kept_state.get("step") != trained_steps:
        difference = f"trained for {trained_steps} steps, {steps} now, with no checkpoint of step {trained_steps} kept"
        return difference, (f"train.steps: {out} holds adapters trained for {trained_steps} steps but no checkpoint of "
                            f"their last step to continue them from ({out / CHECKPOINT}: trained before finished runs "
                            f"kept it, or removed); nothing was changed. Choose another out_dir, or {again}")
    first = _schedule_difference(config, trained_steps, steps, trained_steps)
    if first is None:
        return None, None
    difference = f"trained for {trained_steps} steps, {steps} now, and the learning-rate schedule depends on the total"
    return difference, _schedule_refusal(config, out, trained_steps, first, again)


def _lr_schedule(config: TrainConfig, optimizer, steps: int):
    """diffusers' schedule of train.lr_schedule over ``steps`` steps, with the warm-up over
    train.lr_warmup_fraction of them (diffusers' plain "constant" ignores the warm-up; every
    schedule here has one)."""
    name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    return get_scheduler(name, optimizer, num_training_steps=steps,
                         num_warmup_steps=round(config.lr_warmup_fraction * steps))


def _schedule_difference(config: TrainConfig, trained_steps: int, steps: int, upto: int) -> int | None:
    """The first step s in 0 .. ``upto`` whose learning-rate multiplier differs between the schedule
    over ``trained_steps`` steps and the one over ``steps`` (None: they agree). Steps 0 .. upto-1 are
    those a checkpoint at step ``upto`` was trained with; step ``upto`` is the rate its optimizer
    state carries into the next step. Where they all agree, continuing equals a run of ``steps``
    from the start bit for bit; cosine and linear decay over the total, a warm-up spans a share of
    it, so only constant with the same warm-up length agrees."""
    def multipliers(total: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        multiplier = _lr_schedule(config, optimizer, total).lr_lambdas[0]
        return [multiplier(s) for s in range(upto + 1)]

    for step, (old, new) in enumerate(zip(multipliers(trained_steps), multipliers(steps))):
        if old != new:
            return step
    return None


def _schedule_refusal(config: TrainConfig, where: Path, trained_steps: int, first: int, again: str) -> str:
    """One line: why a run of ``trained_steps`` steps in ``where`` cannot continue to train.steps
    (its learning-rate schedule differs from step ``first`` on), and what to do."""
    return (f"train.steps: {where} was trained for {trained_steps} steps, and continuing to {config.steps} would not "
            f"give those of a {config.steps}-step run: the {config.lr_schedule} learning-rate schedule (warm-up "
            f"{config.lr_warmup_fraction:g} of the steps) over {config.steps} steps differs from the one over "
            f"{trained_steps} from step {first + 1} on; nothing was changed. Either {again}, or train runs meant "
            "to be continued with a schedule that does not depend on the total (lr_schedule constant, "
            "lr_warmup_fraction 0)")


def _train(config: TrainConfig, accelerator, progress: bool, log) -> dict:
    main = accelerator.is_main_process
    if not main:
        log = _silent

    # -- the store (verified) and the frozen base it was recorded with ------------------------
    store = TrajectoryStore(config.store)
    # the other processes check presence and shapes; the main one re-reads what train.verify says
    store.check(mode=config.verify if main else "cheap", log=log)
    accelerator.wait_for_everyone()
    base = _recorded_base(config, store.manifest, accelerator.device)

    # -- adapters, optimizer, learning-rate schedule ----------------------------------------
    adapter_config = adapter_config_for(config, store.manifest)
    torch.manual_seed(config.seed)
    model = AdaptedModel(base, adapter_config)
    try:  # trajectories guided on an interval: the adapters learn w there and 1 elsewhere
        model.guidance_interval = check_interval(store.manifest.guidance.get("interval"),
                                                          f"{config.store}: the header's guidance.interval")
    except ValueError as err:
        raise StoreError(str(err)) from None
    report = model.parameter_report()
    log(f"adapters: {config.adapter} at {adapter_config.placement} x{len(model.adapters)}, "
        f"{report['adapter']:,} parameters = {100 * report['share']:.2f} % of the base's {report['base']:,}")
    if config.gradient_checkpointing:
        enable_base_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  **({"fused": True} if config.fused_optimizer else {}))
    lr_schedule = _lr_schedule(config, optimizer, config.steps)
    ema = _ema(model, config.ema_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    # -- resume from a checkpoint of the same settings on the same store ----------------------
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT
    fingerprint = store.fingerprint()
    start_step, recent = _resume(accelerator, checkpoint, config, fingerprint, log, model, optimizer, lr_schedule,
                                 ema)
    if main:
        _truncate_losses(out / LOSS_CSV, start_step)
    if config.report_to != "none":
        accelerator.init_trackers("agd-adapters", config={k: str(v) if isinstance(v, list) else v
                                                          for k, v in config.to_dict().items()})

    # -- the optimisation loop ----------------------------------------------------------------
    loader = StepBatches(store, config.batch_size, config.seed, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=config.loader_workers)
    if accelerator.num_processes > 1:
        log(f"train: {accelerator.num_processes} processes, {loader.batches_per_epoch()} batches each per epoch")
    started = time.perf_counter()
    batches = loader.from_step(start_step * config.gradient_accumulation_steps)
    # the losses of the last FINAL_LOSS_STEPS steps of the whole run: a resumed run takes those before
    # its checkpoint from the checkpoint, so it records the final_loss of an uninterrupted one
    validation = _validation(config, accelerator, store, base)
    running = _optimise(config, accelerator, model, optimizer, lr_schedule, ema, batches, store, base.latent_channels,
                        start_step, fingerprint, progress, recent, validation)
    seconds = time.perf_counter() - started
    final_loss = float(np.mean(running[-FINAL_LOSS_STEPS:])) if running else None
    accelerator.wait_for_everyone()

    # -- the adapters (their EMA, with train.ema_decay), with everything they were trained from -----
    # The checkpoint of the last step stays: until the last output (the validation grid) is written, a
    # run killed before that resumes at the end and writes the outputs again, without training again;
    # then it is marked finished, and a larger train.steps continues from it.
    if main:
        trained = accelerator.unwrap_model(model).eval()
        if ema is not None:
            ema.copy_to(trained.parameters())
        _check_finite_weights(trained, config, config.steps)
        _save_trained(trained, config, store, fingerprint, final_loss, runtime_record(accelerator))
        log(f"{out}: adapters saved after {config.steps} steps ({seconds:.1f} s this run); "
            f"final loss {final_loss if final_loss is not None else float('nan'):.5f}")
        if config.validate_every >= 0:
            try:
                grid = _validation_grid(trained, out, config.steps, validation)
                scales = ", ".join(f"{w:g}" for w in validation_scales(config, store.manifest))
                log(f"{grid}: validation grid (CFG | AGD at w = {scales})")
            except (AgdError, *WRITE_ERRORS) as err:  # a picture that cannot be made must not fail a finished run
                warnings.warn(f"{out}: the adapters are saved, but no validation grid was made ({err}); "
                              "set train.validate_every: -1 to skip it", stacklevel=2)
        shutil.rmtree(checkpoint.with_name(checkpoint.name + ".tmp"), ignore_errors=True)
        _mark_finished(checkpoint)  # the run is complete
    accelerator.end_training()  # after the last grid: its images go to the tracker too
    return {"parameters": report, "seconds": seconds, "final_loss": final_loss}


def _check_tracker(name: str) -> None:
    """A tracker whose package is missing is refused before anything runs, naming the install."""
    if name == "none":
        return
    from accelerate import utils

    available = {"dvclive": utils.is_dvclive_available, "tensorboard": utils.is_tensorboard_available,
                 "wandb": utils.is_wandb_available}[name]
    if not available():
        raise ConfigError(f"train.report_to: {name} is not installed; `pip install {name}` (or report_to: none; "
                          "loss.csv is written either way)")


def _ema(model: AdaptedModel, decay: float):
    """diffusers' EMAModel over the adapter weights (its warm-up: the decay grows from 0 towards
    ``decay``, so a short run is not dominated by the initial weights), or None."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=True)


def _validation(config: TrainConfig, accelerator, store, base):
    """grid(adapted, step) -> the PNG of :class:`~agd_pipeline.validation.Validator`, built at the first
    grid and kept for the run: the training's own base (its VAE loaded once), the prompts encoded
    once, the images also logged to the run's tracker."""
    built: list[Validator] = []

    def grid(adapted, step: int) -> Path:
        if not built:
            built.append(Validator(config, store.manifest, base, accelerator.autocast))
        return built[0].grid(adapted, Path(config.out_dir), step, accelerator.trackers)

    return grid


def _validation_grid(adapted, out: Path, step: int, validation) -> Path:
    """The validation grid of ``adapted`` (the model in training, in eval mode) after ``step``, made by
    ``validation`` (:func:`_validation`); one seam, so tests can watch when grids are made."""
    return validation(adapted, step)


def _recorded_base(config: TrainConfig, manifest, device):
    """The base the store names (or train.base_model), refused unless its weights are the ones the
    targets were recorded with."""
    recorded = manifest.base_model
    recorded_dtype = torch_dtype(recorded.get("dtype", "float32"))
    wanted = torch_dtype(config.dtype) if config.dtype else recorded_dtype
    # the fingerprint is checked in the dtype the targets were recorded in (bfloat16 rounds the
    # weights differently), then the base is cast to train.dtype: on the CPU first when they differ
    base = load_base_model(config.base_model or recorded["id"], device=device if wanted == recorded_dtype else "cpu",
                           with_vae=False, dtype=recorded_dtype,
                           **({} if config.base_model else recorded_hub_options(recorded)))
    if base.weights_fingerprint() != recorded["weights_fingerprint"]:
        raise ModelError(
            f"{config.store} was recorded with weights {recorded['weights_fingerprint']} of {recorded['id']!r}, "
            f"but {base.model_id!r} has weights {base.weights_fingerprint()}: the targets do not belong to this "
            "base. Re-run stage one (generate) for this base, or point train.base_model at the recorded one."
        )
    if wanted != recorded_dtype:
        base.net.to(device=device, dtype=wanted)
    return base


def _optimise(config: TrainConfig, accelerator, model, optimizer, lr_schedule, ema, batches, store, channels: int,
              start_step: int, fingerprint: str, progress: bool, recent: list[float] | None = None,
              validation=None) -> list[float]:
    """Steps start_step .. config.steps, each over gradient_accumulation_steps micro-batches:
    loss.csv rows, the tracker, the progress bar, checkpoints (every train.checkpoint_every steps,
    and always one at the last step), validation grids. Returns the losses of the last FINAL_LOSS_STEPS steps of
    the whole run (the mean over micro-batches and processes): ``recent``, those before start_step
    (from the checkpoint), then this run's. ``validation``: :func:`_validation`'s grid maker."""
    main = accelerator.is_main_process
    manifest = store.manifest
    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT
    accumulate = config.gradient_accumulation_steps
    model.train()
    running = list(recent or [])
    # line-buffered: a row that cannot be written (a full disk) fails where it is written, named below
    with open(out / LOSS_CSV if main else os.devnull, "a", newline="", buffering=1) as loss_file, \
            tqdm(range(start_step, config.steps), desc="train: adapters", unit="step",
                 disable=not progress or not main, initial=start_step, total=config.steps) as bar:
        writer = csv.writer(loss_file)

        def record(row: list) -> None:
            try:
                writer.writerow(row)
            except OSError as err:
                raise AgdError(f"{out / LOSS_CSV}: cannot write the loss of step {row[0]} ({os_reason(err)})"
                               + (f"; the checkpoint in {checkpoint} is intact" if checkpoint.exists() else "")
                               + ". Free space (or fix permissions) and run the same command to resume") from None

        if start_step == 0:
            record(["step", "loss", "lr"])
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(accumulate):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                x = batch["model_input"].float()
                target = batch["guided_output"].float()
                cond = {k: batch[k] for k in manifest.condition_arrays}
                output = model(x, batch["timesteps"], cond, batch["guidance_scale"])
                loss = weighted_mse(output[:, :channels].float(), target, batch["guidance_scale"],
                                    config.loss_weighting)
                if not torch.isfinite(loss):
                    raise AgdError(
                        f"train: the loss became {loss.item()} at step {step + 1}; training stopped before the "
                        "weights took it in, and nothing of this step was saved"
                        + (f" (the checkpoint in {checkpoint} is of an earlier step)" if checkpoint.exists() else "")
                        + f". Lower train.learning_rate (now {config.learning_rate:g}) or check the store for "
                        f"NaN/inf with `{command_line('inspect')} {config.store} --verify`")
                # gradients are averaged over processes once, at the last micro-batch
                with accelerator.no_sync(model) if micro + 1 < accumulate else contextlib.nullcontext():
                    accelerator.backward(loss / accumulate if accumulate > 1 else loss)
                total = total + loss.detach()
            optimizer.step()
            lr_schedule.step()
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
            # the mean over micro-batches and processes
            logged = accelerator.reduce(total / accumulate if accumulate > 1 else total, "mean").item()
            running.append(logged)
            del running[:-FINAL_LOSS_STEPS]  # only these go into final_loss and the checkpoint
            lr = lr_schedule.get_last_lr()[0]
            record([step + 1, f"{logged:.6g}", f"{lr:.6g}"])
            if config.report_to != "none":
                accelerator.log({"loss": logged, "lr": lr}, step=step + 1)
            if (step + 1) % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(running[-25:]):.5f}")
            last = step + 1 >= config.steps
            # the last step's checkpoint lets a run killed while it writes its outputs finish them
            # without training again; it is kept, so that a larger train.steps continues from it
            if last or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
                loss_file.flush()
                _save_checkpoint(accelerator, checkpoint, config, fingerprint, step + 1, model, optimizer,
                                 lr_schedule, ema, losses=running)
            if last:
                continue
            if config.validate_every > 0 and (step + 1) % config.validate_every == 0:
                _validate_now(accelerator, config, validation, model, ema, step + 1)
    return running


def _validate_now(accelerator, config: TrainConfig, validation, model, ema, step: int) -> None:
    """A validation grid of the adapters as they are (their EMA, with train.ema_decay) at ``step``,
    sampled in place with the model in training (no copy of the base, no adapter folder)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(config.out_dir)
        adapted = accelerator.unwrap_model(model)
        context = ema_weights(ema, adapted) if ema is not None else contextlib.nullcontext()
        was_training = adapted.training
        try:
            with context:
                _validation_grid(adapted.eval(), out, step, validation)
        except WRITE_ERRORS as err:
            checkpoint = out / CHECKPOINT
            raise AgdError(f"{out / VALIDATION}: cannot write the validation grid of step {step} ({write_reason(err)})"
                           + (f"; the checkpoint in {checkpoint} is intact" if checkpoint.exists() else "")
                           + ". Free space (or fix permissions) and run the same command to resume, or set "
                           "train.validate_every: -1") from None
        finally:
            adapted.train(was_training)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def ema_weights(ema, model):
    """The model's parameters replaced by their EMA inside the block, restored after."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def _save_trained(model: AdaptedModel, config: TrainConfig, store: TrajectoryStore, fingerprint: str,
                  final_loss: float | None, runtime: dict) -> None:
    """adapters.safetensors and adapter_config.json (with the store they were trained on and the
    runtime they were trained under). The checkpoint stays (the caller marks it finished once the
    run's last output is written); a failed write leaves no temporary behind."""
    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT
    try:
        save_adapters(model, out, extra=_adapter_record(config, store, fingerprint, final_loss, runtime))
    except WRITE_ERRORS as err:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (out / (name + ".tmp")).unlink(missing_ok=True)
        raise AgdError(f"{out}: cannot write the adapters ({write_reason(err)})"
                       + (f"; the checkpoint in {checkpoint} is intact: free space (or fix permissions) and run "
                          "the same command to finish" if checkpoint.exists() else "")) from None


def _check_finite_weights(model, config: TrainConfig, step: int, ema=None) -> None:
    """Refuse to save adapters (or their EMA) holding NaN or inf: the optimiser took in a gradient
    that overflowed."""
    tensors = [*model.parameters(), *(ema.shadow_params if ema is not None else [])]
    if all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return
    raise AgdError(f"train: the adapter weights became NaN or inf by step {step}; nothing of it was saved. Lower "
                   f"train.learning_rate (now {config.learning_rate:g}) or check the store for NaN/inf with "
                   f"`{command_line('inspect')} {config.store} --verify`")


def _adapter_record(config: TrainConfig, store: TrajectoryStore, fingerprint: str, final_loss: float | None,
                    runtime: dict) -> dict:
    """What adapter_config.json records besides the architecture: how and from what they were trained
    (``runtime``: :func:`runtime_record`, what changes bits besides the settings)."""
    manifest = store.manifest
    return {
        "training": config.to_dict(),
        "runtime": runtime,
        "store": {"path": str(config.store), "trajectories": store.num_trajectories, "fingerprint": fingerprint,
                  "shard_checksums": [s.get("checksum") for s in store.shards]},
        "sampler": manifest.sampler,
        "guidance": manifest.guidance,
        "negative_prompt": manifest.negative_prompt,
        "final_loss": final_loss,
        "code": code_fingerprint(),
    }


def code_fingerprint() -> str:
    """sha256 (16 hex digits) of this package's Python source: adapters trained by other code are not
    "the same run" (under `dvc repro` a code change must retrain, although the output folder persists)."""
    import hashlib

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _silent(*args, **kwargs) -> None:
    pass


def _save_checkpoint(accelerator, folder: Path, config: TrainConfig, fingerprint: str, step: int, model,
                     optimizer, lr_schedule, ema=None, losses: list[float] | None = None) -> None:
    """Adapters and optimizer state as safetensors, the rest as JSON (nothing that unpickles; with
    ``losses``, those of the last FINAL_LOSS_STEPS steps, for final_loss), in a temporary folder
    renamed over the previous checkpoint once complete (by the main process). Weights that are not
    finite are refused; a failed write (a full disk) removes the temporary and leaves the previous
    checkpoint as it was."""
    _check_finite_weights(accelerator.unwrap_model(model), config, step, ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            adapters = {k: v.detach().cpu().contiguous()
                        for k, v in accelerator.unwrap_model(model).state_dict().items()}
            save_file(adapters, tmp / "adapters.safetensors")
            tensors, optimizer_meta = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            state = {"format": CHECKPOINT_FORMAT, "step": step, "config": _comparable(config),
                     "runtime": runtime_record(accelerator),
                     "store_fingerprint": fingerprint, "store_path": str(config.store),
                     "optimizer": optimizer_meta, "lr_schedule": lr_schedule.state_dict(),
                     "recent_losses": list(losses or [])[-FINAL_LOSS_STEPS:]}
            if ema is not None:
                ema_state = ema.state_dict()
                save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
                          tmp / EMA_FILE)
                state["ema"] = ema_state
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            for name in CHECKPOINT_FILES + ((EMA_FILE,) if ema is not None else ()):
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
            _remove_checkpoint(folder)
            tmp.replace(folder)
        except WRITE_ERRORS as err:
            if folder.exists() or not (tmp / "state.json").exists():
                # else the previous one is gone and this complete one is the only one: resume takes it
                shutil.rmtree(tmp, ignore_errors=True)
            raise AgdError(f"{tmp}: cannot write the training checkpoint at step {step} ({write_reason(err)}). "
                           + (f"The previous checkpoint in {folder} is intact; " if folder.exists() else "")
                           + "free space (or fix permissions) and run the same command to resume") from None
    accelerator.wait_for_everyone()


def _split_optimizer_state(state: dict) -> tuple[dict, dict]:
    """An optimizer state dict as (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, meta: dict, device) -> dict:
    state = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value.to(device) if torch.is_tensor(value) else value
    return {"state": state, "param_groups": meta["param_groups"]}


def _remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder, which holds only our files (refuse anything else)."""
    if not folder.exists():
        return
    ours = (*CHECKPOINT_FILES, EMA_FILE, STATE_TMP, *LEGACY_CHECKPOINT_FILES)
    foreign = [p.name for p in folder.iterdir() if p.name not in ours]
    if foreign or not folder.is_dir():
        raise AgdError(f"{folder} holds files that are not part of a training checkpoint ({', '.join(foreign[:5])}); "
                       "refusing to delete it: move them away or choose another train.out_dir")
    shutil.rmtree(folder)


def _checkpoint_folder(out: Path) -> Path | None:
    """The checkpoint in ``out``: ``checkpoint``, or a complete ``checkpoint.tmp`` where a run was
    killed between removing the previous one and renaming the new one into place; None: none."""
    folder = out / CHECKPOINT
    if folder.exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    return tmp if (tmp / "state.json").exists() else None


def _read_state(folder: Path) -> dict | None:
    """A checkpoint's state.json, None where it is missing or not one (:func:`_resume` names why)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (ValueError, OSError):
        return None
    return state if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT else None


def _mark_finished(folder: Path) -> None:
    """Mark the last step's checkpoint as that of a finished run (every output written): a larger
    train.steps continues from it, the same command has nothing to do. state.json is replaced
    whole (written beside it, then renamed), so a kill leaves the old or the new one."""
    tmp = folder / STATE_TMP
    try:
        state = json.loads((folder / "state.json").read_text())
        state[FINISHED] = True
        with open(tmp, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / "state.json")
    except WRITE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise AgdError(f"{folder}: cannot mark the checkpoint as that of a finished run ({write_reason(err)}); the "
                       "adapters are saved. Free space (or fix permissions) and run the same command to finish") \
            from None


def _resume(accelerator, folder: Path, config: TrainConfig, fingerprint: str, log, model, optimizer,
            lr_schedule, ema=None) -> tuple[int, list[float]]:
    """The step to start from, and the losses of the last FINAL_LOSS_STEPS steps before it: a
    checkpoint of the same settings (and mixed precision) on the same store is loaded (one of the
    last step: training is over, its outputs are written again). Of a smaller train.steps it is
    loaded too where the learning-rate schedule over train.steps agrees with its own up to its step
    (:func:`_schedule_difference`): the run continues to the adapters of an uninterrupted run of
    train.steps. One of other settings, of another store, of a step beyond train.steps, of a
    schedule that differs or of an older release starts over (with restart_on_mismatch) or is
    refused."""
    state_file = folder / "state.json"
    tmp = folder.with_name(folder.name + ".tmp")
    if not folder.exists() and (tmp / "state.json").exists():
        # killed between removing the previous checkpoint and renaming the new, complete one
        # (state.json is written last) into place
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tmp.replace(folder)
        accelerator.wait_for_everyone()
    if not folder.exists():
        return 0, []
    reason = None
    if not state_file.exists():
        reason = ("was written by an earlier release (it is never loaded: it holds pickles)"
                  if (folder / "progress.json").exists() else "is incomplete (no state.json)")
        saved = None
    else:
        try:
            saved = json.loads(state_file.read_text())
            if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT or \
                    not isinstance(saved.get("step"), int) or not isinstance(saved.get("config"), dict):
                raise ValueError("not a checkpoint state")
        except (ValueError, OSError) as err:
            saved, reason = None, f"has an unreadable state.json ({err})"
    refusal = None  # a whole message, where the reason needs its own advice
    if saved is not None:
        now = _comparable(config)
        # steps are compared below: a larger count continues where the schedule allows it
        ran_steps = saved["config"].get("steps")
        changed = differences({**saved["config"], "steps": now["steps"]}, now)
        # a checkpoint written before the runtime was recorded is taken as of this run's mixed precision
        precision = (saved.get("runtime") or {}).get("mixed_precision", accelerator.mixed_precision)
        if changed:
            reason = f"was written with other settings ({'; '.join('train.' + c for c in changed)}; checkpoint -> now)"
        elif precision != accelerator.mixed_precision:
            reason = (f"was written with other settings (accelerate's mixed precision: {precision} -> "
                      f"{accelerator.mixed_precision}; ACCELERATE_MIXED_PRECISION, or `accelerate launch`'s config)")
        elif saved.get("store_fingerprint") != fingerprint:
            reason = (f"was trained on another store (fingerprint {saved.get('store_fingerprint')} of "
                      f"{saved.get('store_path')!r}; {config.store} now has {fingerprint}: it was rewritten or "
                      "replaced since); resuming would mix two datasets")
        elif not isinstance(ran_steps, int) or not 0 < saved["step"] <= ran_steps or \
                not _losses(saved.setdefault("recent_losses", [])):
            reason = f"is damaged (step {saved['step']} of {ran_steps}, or its recent_losses are not finite numbers)"
        elif saved["step"] > config.steps:
            reason = (f"is of step {saved['step']}, beyond train.steps {config.steps} now, and training does not go "
                      "back")
        elif ran_steps != config.steps:
            first = _schedule_difference(config, ran_steps, config.steps, saved["step"])
            if first is not None:
                reason = (f"was trained for {ran_steps} steps, and the learning-rate schedule over {config.steps} "
                          f"differs from step {first + 1} on")
                refusal = _schedule_refusal(config, folder, ran_steps, first, "pass --restart-on-mismatch true to "
                                            f"retrain from zero with {config.steps} steps")
    if reason is not None:
        if config.restart_on_mismatch:
            log(f"train: {folder} {reason}; discarding it and starting over (restart_on_mismatch)")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _remove_checkpoint(folder)
            accelerator.wait_for_everyone()
            return 0, []
        raise AgdError(refusal or f"{folder} {reason}. Delete {folder} to start over (or pass --restart-on-mismatch "
                       "true)" + (", or restore those settings to resume it" if "settings" in reason else ""))
    recent = saved["recent_losses"]
    try:
        device = accelerator.device
        # read on the CPU (safetensors refuses a device named like "cpu:0", which accelerate gives each
        # rank of a multi-process CPU run); load_state_dict copies into the parameters' own device
        accelerator.unwrap_model(model).load_state_dict(load_file(folder / "adapters.safetensors"))
        optimizer.load_state_dict(_join_optimizer_state(load_file(folder / "optimizer.safetensors"),
                                                        saved["optimizer"], device))
        lr_schedule.load_state_dict(saved["lr_schedule"])
        if ema is not None:
            shadow = load_file(folder / EMA_FILE)
            ema.load_state_dict({**saved["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
            ema.to(device)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and KeyError: all mean a damaged checkpoint
        raise AgdError(f"{folder}: the checkpoint is damaged ({type(err).__name__}: {str(err)[:200]}); delete it "
                       "to start over (or pass --restart-on-mismatch true)") from None
    log(f"train: resuming from {folder} at step {saved['step']}"
        + (f" (trained for {saved['config']['steps']} steps: continuing to {config.steps})"
           if saved["config"]["steps"] != config.steps else "")
        + (" (training is over: writing its outputs)" if saved["step"] == config.steps else ""))
    return int(saved["step"]), [float(v) for v in recent]


def _losses(values) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _truncate_losses(path: Path, step: int) -> None:
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    rows = path.read_text().splitlines()
    kept = [rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= step]
    path.write_text("\n".join(kept) + "\n")
