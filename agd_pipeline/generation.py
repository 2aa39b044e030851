"""Stage one: sample the frozen base with full CFG and record every step into the store."""

from __future__ import annotations

import contextlib
import errno
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GenerateConfig, check_interval
from .devices import resolve_device, torch_dtype
from .errors import ConfigError, ModelError, StoreError, command_line
from .models import BaseModel, encode_prompts, load_base_model, read_prompts
from .sampling import CFG, StepRecord, check_num_steps, generators_for, initial_noise, sample, trajectory_seed
from .forward_noised import RealData, load_real_data, record_forward_noised_batch
from .locks import FolderLock
from .store import MANIFEST, StoreWriter, TrajectoryStore
from .store.formats import resolve_compressor, shard_name
from .store.manifest import recover_manifest
from .store.ownership import refuse_foreign_folder


def trajectory_plan(run_seed: int, indices, conditions, w_min: float, w_max: float,
                    key: str = "class_label") -> dict[str, np.ndarray]:
    """Seed, condition and w of each trajectory index: functions of (run seed, index) only.

    Conditions (class ids, or prompt indices with ``key="prompt_index"``) cycle through the list,
    so every one gets the same number of trajectories.
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    uniforms = np.array([np.random.default_rng([run_seed, int(i), 1]).random() for i in indices])
    return {
        "trajectory_index": indices,
        "seed": np.array([trajectory_seed(run_seed, int(i)) for i in indices], dtype=np.int64),
        key: np.asarray(conditions, dtype=np.int64)[indices % len(conditions)],
        "guidance_scale": (w_min + (w_max - w_min) * uniforms).astype(np.float32),
    }


EMPTY_NEGATIVE = -1  # negative_prompt_index of the pipeline's default (empty) negative prompt
# The negative conditions a store keeps per trajectory (SDXL's time ids are the same in both halves).
NEGATIVE_ARRAYS = {"prompt_embeds": "negative_prompt_embeds", "pooled_prompt_embeds": "negative_pooled_prompt_embeds"}


def negative_prompt_plan(run_seed: int, indices, count: int, empty_probability: float) -> np.ndarray:
    """Each trajectory's negative prompt: ``EMPTY_NEGATIVE`` (the pipeline's default) with probability
    ``empty_probability``, else one of the ``count`` negative prompts, uniformly. A function of
    (run seed, index) only, like the rest of the plan (its own random stream, so seeds and w are
    those of a run without negative prompts)."""
    chosen = []
    for i in indices:
        rng = np.random.default_rng([run_seed, int(i), 2])
        empty = rng.random() < empty_probability
        index = int(rng.integers(count))  # drawn either way: one stream layout whatever the probability
        chosen.append(EMPTY_NEGATIVE if empty else index)
    return np.asarray(chosen, dtype=np.int64)


@dataclass
class Conditions:
    """What stage one conditions on: class ids, or prompts with their encoded embeddings, and
    optionally a negative prompt per trajectory."""

    kind: str  # "class" or "text"
    classes: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    per_condition: int = 1
    table: dict = field(default_factory=dict)  # text: name -> tensor with one row per prompt
    uncond: dict | None = None  # text: the negative prompt's condition (one row)
    # text, with generate.negative_prompts_file: the negative prompts, and their conditions with one
    # row per negative prompt plus a last row for the pipeline's default (EMPTY_NEGATIVE = -1 indexes it)
    negative_prompts: list[str] = field(default_factory=list)
    empty_negative_probability: float = 0.0
    negative_table: dict = field(default_factory=dict)

    @property
    def per_trajectory_negatives(self) -> bool:
        return bool(self.negative_prompts)

    @property
    def count(self) -> int:
        return len(self.classes) if self.kind == "class" else len(self.prompts)

    @property
    def key(self) -> str:
        return "class_label" if self.kind == "class" else "prompt_index"

    def plan(self, run_seed: int, indices, w_min: float, w_max: float) -> dict[str, np.ndarray]:
        ids = self.classes if self.kind == "class" else list(range(len(self.prompts)))
        plan = trajectory_plan(run_seed, indices, ids, w_min, w_max, key=self.key)
        if self.per_trajectory_negatives:
            plan["negative_prompt_index"] = negative_prompt_plan(run_seed, indices, len(self.negative_prompts),
                                                                 self.empty_negative_probability)
        return plan

    def for_batch(self, plan: dict) -> tuple[dict, dict, dict | None]:
        """(arrays the store keeps per trajectory, the model's condition tensors, the unconditional
        branch's condition: one row shared, or one row per trajectory) for one batch."""
        if self.kind == "class":
            return {}, {"class_label": torch.from_numpy(plan["class_label"])}, None
        index = torch.from_numpy(plan["prompt_index"])
        cond = {name: table[index] for name, table in self.table.items()}
        stored = {name: value.float().numpy() for name, value in cond.items()}
        if not self.per_trajectory_negatives:
            return stored, cond, self.uncond
        negative = torch.from_numpy(plan["negative_prompt_index"])  # -1: the last row, the default
        uncond = {name: table[negative] for name, table in self.negative_table.items()}
        stored.update({NEGATIVE_ARRAYS[name]: uncond[name].float().numpy() for name in NEGATIVE_ARRAYS
                       if name in uncond})
        return stored, cond, uncond

    def array_specs(self) -> dict[str, dict]:
        """Per-trajectory condition arrays of the store: name -> dtype and shape (without N)."""
        if self.kind == "class":
            return {"class_label": {"dtype": "int64", "shape": []}}
        specs = {"prompt_index": {"dtype": "int64", "shape": []}}
        for name, table in self.table.items():
            dtype = "float32" if name == "add_time_ids" else "float16"  # sizes, exact in float32
            specs[name] = {"dtype": dtype, "shape": list(table.shape[1:])}
        if self.per_trajectory_negatives:
            specs["negative_prompt_index"] = {"dtype": "int64", "shape": []}
            for name, stored in NEGATIVE_ARRAYS.items():
                if name in self.negative_table:
                    specs[stored] = {"dtype": "float16", "shape": list(self.negative_table[name].shape[1:])}
        return specs


def read_class_file(path: str) -> list[int]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"generate.classes_file: {path!r} not found (a text file of class ids)")
    try:
        return [int(v) for v in file.read_text().replace(",", " ").split()]
    except ValueError as err:
        raise ConfigError(f"generate.classes_file: {path!r} holds something that is not a class id ({err})") from None


def resolve_conditions(config: GenerateConfig, base: BaseModel, progress: bool = True) -> Conditions:
    if base.conditioning == "class":
        if config.prompts_file:
            raise ConfigError(f"generate.prompts_file is set, but {base.model_id!r} is a class-conditional "
                              f"{base.family} model: give generate.classes (or classes_file) instead")
        if config.negative_prompts_file:
            raise ConfigError(f"generate.negative_prompts_file is set, but {base.model_id!r} is a class-conditional "
                              f"{base.family} model: its unconditional branch is the null class, it takes no "
                              "negative prompts")
        classes = read_class_file(config.classes_file) if config.classes_file else list(config.classes)
        classes = classes or list(range(base.num_classes))
        base.check_classes(classes, "generate.classes")
        return Conditions("class", classes=classes, per_condition=config.trajectories_per_class)
    if config.classes or config.classes_file:
        raise ConfigError(f"generate.classes is set, but {base.model_id!r} is a text-to-image {base.family} "
                          "model: give generate.prompts_file (one prompt per line) instead")
    if not config.prompts_file:
        raise ConfigError(f"{base.model_id!r} is a text-to-image {base.family} model: set generate.prompts_file "
                          "to a text file with one prompt per line")
    prompts = read_prompts(config.prompts_file)
    if not config.negative_prompts_file:
        table, uncond = encode_prompts(base, prompts, config.negative_prompt, progress=progress)
        return Conditions("text", prompts=prompts, negative_prompt=config.negative_prompt,
                          per_condition=config.trajectories_per_prompt, table=table, uncond=uncond)
    negatives = read_negative_prompts(config.negative_prompts_file)
    # one row per negative prompt, then the pipeline's default (index -1); each distinct one encoded once
    table, negative_table = encode_prompts(base, prompts, [*negatives, ""], progress=progress)
    return Conditions("text", prompts=prompts, per_condition=config.trajectories_per_prompt, table=table,
                      uncond={name: value[-1:] for name, value in negative_table.items()},
                      negative_prompts=negatives, empty_negative_probability=config.empty_negative_probability,
                      negative_table=negative_table)


def read_negative_prompts(path: str) -> list[str]:
    """One negative prompt per line (blank lines skipped), as generate.negative_prompts_file."""
    try:
        return read_prompts(path)
    except ModelError as err:
        raise ConfigError(f"generate.negative_prompts_file: {str(err).replace('prompt file', 'negative prompt file')}"
                          ) from None


def store_header(config: GenerateConfig, base: BaseModel, conditions: Conditions, real: RealData | None = None) -> dict:
    scheduler = base.scheduler
    guidance = {"distribution": "uniform", "min": config.guidance_min, "max": config.guidance_max,
                "formula": "uncond + w * (cond - uncond)"}
    interval = check_interval(config.guidance_interval, "generate.guidance_interval")
    if interval is not None:  # only when set: stores without an interval keep the header they always had
        guidance["interval"] = list(interval)
        guidance["interval_of"] = "t / num_train_timesteps; w = 1 outside"
    if conditions.per_trajectory_negatives:
        # the unconditional branch's prompts (part of the run's settings: a store of other negative
        # prompts is never resumed); negative_prompt_index i >= 0 is negative_prompts[i], -1 the
        # pipeline's default
        guidance["negative_prompts"] = conditions.negative_prompts
        guidance["empty_negative_probability"] = conditions.empty_negative_probability
    # forward-noised stores say so (and which real data they noise); trajectory stores keep the
    # header they always had, so stores written before this key existed still resume
    source = {"source": real.describe()} if real is not None else {}
    return json.loads(json.dumps({
        **source,
        "base_model": base.describe(),
        "sampler": {"scheduler": type(scheduler).__name__, "config": dict(scheduler.config),
                    "num_steps": config.num_steps},
        "guidance": guidance,
        "seed": config.seed,
        "conditioning": conditions.kind,
        "classes": conditions.classes,
        "prompts": conditions.prompts,
        "negative_prompt": conditions.negative_prompt,
        "condition_arrays": conditions.array_specs(),
        "num_trajectories": conditions.count * conditions.per_condition,
        "shard_size": config.shard_size,
        "latent_shape": list(base.latent_shape),
        "output_channels": base.latent_channels,
        "record_branches": config.record_branches,
        "compressor": resolve_compressor(config.compressor, config.format),
        "format": config.format,
        "bitround_keepbits": config.bitround_keepbits,
        "chunk_bytes": config.chunk_bytes,
    }, default=str))


def record_batch(base: BaseModel, plan: dict, num_steps: int, record_branches: bool,
                 conditions: Conditions | None = None, interval: tuple[float, float] | None = None
                 ) -> dict[str, np.ndarray]:
    """Sample one batch with CFG (on ``interval`` only, if given) and return every array the store
    keeps for it."""
    conditions = conditions or Conditions("class")
    n = len(plan["seed"])
    device = base.device
    gens = generators_for(plan["seed"].tolist())
    noise = initial_noise(base, gens)
    stored, cond, uncond = conditions.for_batch(plan)
    w = torch.from_numpy(plan["guidance_scale"]).to(device)
    record = StepRecord(base, n, num_steps, record_branches)
    final = sample(base, cond, noise, num_steps, CFG(base, w, uncond, interval, record_branches), generators=gens,
                   observer=record)
    out = {**record.arrays, "sample": final.to("cpu", torch.float16).numpy()}
    return {**out, **stored, **plan}


def distributed_context():
    """(rank, world size, local rank) under torchrun / accelerate launch, else (0, 1, 0). Starts the
    process group (gloo on CPU, NCCL on GPUs) when there are several processes."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("AGD_FORCE_GLOO") != "1" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _collective(fn) -> None:
    """Run ``fn`` on rank 0; every rank waits for it and raises its error, if any."""
    import torch.distributed as dist

    error = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error[0] = err
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]


def generate(config: GenerateConfig, progress: bool = True, log=print) -> dict:
    """Write (or finish) the trajectory store described by ``config``. Returns a summary.

    Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) each process writes the shards
    whose index is its rank modulo N; trajectory i depends only on (seed, i), so the store is the
    same whatever N is. Killed at any moment, the same command finishes it.
    """
    rank, world, local_rank = distributed_context()
    device = resolve_device(config.device)
    if world > 1 and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{local_rank}"
    base = load_base_model(config.base_model, device=device, dtype=torch_dtype(config.dtype),
                           scheduler=config.scheduler, with_vae=False, revision=config.revision, variant=config.variant)
    check_num_steps(base, config.num_steps, "generate.num_steps")
    conditions = resolve_conditions(config, base, progress and rank == 0)
    real = load_real_data(config.real_data, base) if config.source == "forward_noised" else None
    if real is None:
        interval = check_interval(config.guidance_interval, "generate.guidance_interval")

        def record(plan):
            return record_batch(base, plan, config.num_steps, config.record_branches, conditions, interval)
    else:
        examples = real.examples_for(conditions)  # every condition has real data, before anything is written

        def record(plan):
            return record_forward_noised_batch(base, plan, config.num_steps, config.record_branches, real, examples,
                                               config.seed, conditions)
    header = store_header(config, base, conditions, real)
    with contextlib.ExitStack() as held:
        def open_first() -> StoreWriter:
            """Rank 0: refuse someone else's folder (before a lock file is left in it), take the
            folder's lock, then create, check, recover or restart the store."""
            refuse_foreign_folder(config.out_dir)
            held.enter_context(FolderLock(config.out_dir, "stages.generate"))
            return StoreWriter(config.out_dir, header, 0, world, config.restart_on_mismatch, log=log)

        if world > 1:
            # the others open the store once rank 0 is done (or all stop with rank 0's error)
            opened = {}
            _collective(lambda: opened.update(writer=open_first()))
            writer = opened.get("writer") or StoreWriter(config.out_dir, header, rank, world, log=log)
        else:
            writer = open_first()
        what = "CFG trajectories" if real is None else "forward-noised real data"
        with writer.compacting():  # rank 0 folds the manifest's journal into manifest.json at the end
            return _generate(config, writer, conditions, rank, world, progress, log, record, what)


def _generate(config: GenerateConfig, writer: StoreWriter, conditions: Conditions, rank: int, world: int,
              progress: bool, log, record, what: str) -> dict:
    """Write the pending shards this rank owns, one batch at a time through ``record(plan)``."""
    pending = writer.pending(verify=config.verify)
    total = writer.header["num_trajectories"]
    mine = writer.owned(pending)
    if rank == 0:
        if not pending:
            log(f"{config.out_dir}: all {writer.num_shards} shards ({total} trajectories) already complete; "
                "nothing to do")
        elif len(pending) < writer.num_shards:
            log(f"{config.out_dir}: resuming, {writer.num_shards - len(pending)} of {writer.num_shards} shards "
                "already complete")
    todo = sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in mine)
    started = time.perf_counter()
    desc = f"generate: {what}" + (f" (rank {rank}/{world})" if world > 1 else "")
    with tqdm(total=todo, desc=desc, unit="traj", disable=not progress or not mine, position=rank) as bar:
        for index in mine:
            _write_shard(writer, index, config, conditions, bar, record)
    seconds = time.perf_counter() - started
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's shards are on disk: rank 0 brings the manifest up to date
        if rank == 0:
            left = writer.refresh()
            if left:
                raise StoreError(f"{config.out_dir}: shards {left[:5]} are still missing after every rank finished")
    if todo:
        who = f"rank {rank} wrote " if world > 1 else "wrote "
        log(f"{config.out_dir}: {who}{len(mine)} shard(s), "
            f"{todo} trajectories x {config.num_steps} steps in {seconds:.1f} s ({todo / seconds:.1f} trajectories/s)")
    return {"written_shards": len(mine), "trajectories": total, "seconds": seconds, "rank": rank,
            "world_size": world}


def _write_shard(writer: StoreWriter, index: int, config: GenerateConfig, conditions: Conditions, bar,
                 record) -> None:
    """Sample and write one whole shard. A failing disk (full, read-only) stops the run with a
    message; the shards completed before stay valid, and the same command resumes."""
    name = shard_name(index, writer.format)
    try:
        # an error closes what the shard's writer opened and removes its partial files
        with writer.begin_shard(index) as shard:
            for batch_start in range(shard.start, shard.stop, config.batch_size):
                batch_stop = min(shard.stop, batch_start + config.batch_size)
                plan = conditions.plan(config.seed, range(batch_start, batch_stop),
                                       config.guidance_min, config.guidance_max)
                arrays = record(plan)
                shard.write(batch_start - shard.start, arrays)
                bar.update(batch_stop - batch_start)
            shard.finish()
    except OSError as err:
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                  errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}.get(
            err.errno, err.strerror or str(err))
        raise StoreError(
            f"{writer.root / name}: cannot write ({reason}). The shards completed before this one are "
            "intact; free space or fix permissions, then run the same command again to resume."
        ) from None


def rebuild_manifest(out_dir: str, log=print) -> dict:
    """Rebuild a store's lost or damaged manifest.json from its shards' own metadata (every shard
    carries its run's settings and checksums); each shard is re-read against its checksums first."""
    root = Path(out_dir)
    if not root.is_dir():
        raise StoreError(f"{root}: no such folder")
    with FolderLock(root, "stages.generate --rebuild-manifest"):
        try:
            manifest = TrajectoryStore(root).manifest
            log(f"{root}: {MANIFEST} is readable and consistent; nothing to rebuild "
                f"(`{command_line('inspect')} {root} --verify` checks the shards against it)")
        except StoreError as err:
            if "schema version" in str(err):
                raise
            manifest = recover_manifest(root, log)
    if manifest is None:
        raise StoreError(f"{root}: no shards with readable settings to rebuild a manifest from")
    done = sum(s["status"] == "complete" for s in manifest.shards)
    return {"complete_shards": done, "shards": len(manifest.shards)}
