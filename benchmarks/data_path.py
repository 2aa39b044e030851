"""Benchmarks of the data path: loader throughput against the reference layout, stage one's
recording overhead, bytes on disk per format and codec, and what lossy storage does to the
distilled adapters. Numbers are printed and written to a file; nothing here is a test."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agd_pipeline.store import StoreWriter, TrajectoryStore, convert_store
from agd_pipeline.store.files import folder_bytes
from agd_pipeline.store.schema import CLASS_CONDITION
from agd_pipeline.store.schema import CHUNK_BYTES, read_rows, unit_rows

LOADER_LATENTS = {"8x8x1": (1, 8, 8), "4x32x32": (4, 32, 32)}


# ------------------------------------------------------------------------------ synthetic data


def synthetic_header(latent_shape, trajectories: int, steps: int, shard_size: int, chunk_bytes: int = CHUNK_BYTES,
                     fmt: str = "zarr", compressor: str = "auto", conditions: dict | None = None) -> dict:
    conditions = conditions or CLASS_CONDITION
    text = "prompt_index" in conditions
    return {
        "base_model": {"id": "synthetic", "family": "sd" if text else "dit", "num_classes": 0 if text else 10,
                       "conditioning": "text" if text else "class"},
        "sampler": {"scheduler": "none", "config": {}, "num_steps": steps},
        "guidance": {"distribution": "uniform", "min": 1.0, "max": 6.0},
        "seed": 0, "conditioning": "text" if text else "class", "classes": [] if text else list(range(10)),
        "prompts": [f"prompt {i}" for i in range(10)] if text else [], "negative_prompt": "",
        "condition_arrays": conditions, "num_trajectories": trajectories, "shard_size": shard_size,
        "latent_shape": list(latent_shape), "output_channels": latent_shape[0], "record_branches": False,
        "compressor": compressor, "chunk_bytes": chunk_bytes, "format": fmt, "bitround_keepbits": 0,
    }


def synthetic_arrays(latent_shape, first: int, n: int, steps: int, conditions: dict | None = None
                     ) -> dict[str, np.ndarray]:
    """Noise-like latents (as real x_t are) and outputs, a function of the trajectory indices; the
    condition arrays of ``conditions`` (default: a class label): integers cycle through 10 values,
    floats are noise."""
    rng = np.random.default_rng(first)
    arrays = {
        "model_input": rng.standard_normal((n, steps, *latent_shape), dtype=np.float32).astype(np.float16),
        "guided_output": rng.standard_normal((n, steps, *latent_shape), dtype=np.float32).astype(np.float16),
        "timesteps": np.tile(np.linspace(999, 0, steps, dtype=np.float32), (n, 1)),
        "guidance_scale": rng.uniform(1, 6, n).astype(np.float32),
        "seed": np.arange(first, first + n, dtype=np.int64),
        "trajectory_index": np.arange(first, first + n, dtype=np.int64),
        "sample": rng.standard_normal((n, *latent_shape), dtype=np.float32).astype(np.float16),
    }
    for name, spec in (conditions or CLASS_CONDITION).items():
        arrays[name] = (np.arange(first, first + n, dtype=np.int64) % 10 if spec["dtype"] == "int64" else
                        rng.standard_normal((n, *spec["shape"]), dtype=np.float32).astype(spec["dtype"]))
    return arrays


def write_synthetic_store(root: Path, header: dict) -> TrajectoryStore:
    writer = StoreWriter(root, header)
    steps, shape = header["sampler"]["num_steps"], header["latent_shape"]
    conditions = header["condition_arrays"]
    for index in writer.pending():
        shard = writer.begin_shard(index)
        shard.write(0, synthetic_arrays(shape, shard.start, shard.stop - shard.start, steps, conditions))
        shard.finish()
    return TrajectoryStore(root)


def write_reference_layout(root: Path, store: TrajectoryStore) -> None:
    """The reference implementation's layout: a folder per trajectory holding a raw fp16 memmap of
    [steps, 2, C, H, W] (model input and guided output) and a pickle of its conditioning."""
    import dask

    arrays = store.dask_arrays(["model_input", "guided_output", "guidance_scale", "class_label", "timesteps"])
    inputs, outputs, scales, labels, timesteps = dask.compute(
        arrays["model_input"], arrays["guided_output"], arrays["guidance_scale"], arrays["class_label"],
        arrays["timesteps"])
    for i in range(inputs.shape[0]):
        folder = root / f"traj_{i:06d}"
        folder.mkdir(parents=True)
        both = np.memmap(folder / "latents.fp16", dtype=np.float16, mode="w+",
                         shape=(inputs.shape[1], 2, *inputs.shape[2:]))
        both[:, 0], both[:, 1] = inputs[i], outputs[i]
        both.flush()
        with open(folder / "cond.pkl", "wb") as f:
            pickle.dump({"guidance_scale": float(scales[i]), "class_label": int(labels[i]),
                         "timesteps": timesteps[i]}, f)


class ReferenceDataset(torch.utils.data.Dataset):
    """Per-item reads of the reference layout: open the memmap and unpickle for every sample."""

    def __init__(self, root: Path, trajectories: int, steps: int, latent_shape):
        self.root, self.trajectories, self.steps, self.shape = root, trajectories, steps, tuple(latent_shape)

    def __len__(self):
        return self.trajectories * self.steps

    def __getitem__(self, index):
        traj, step = divmod(index, self.steps)
        folder = self.root / f"traj_{traj:06d}"
        both = np.memmap(folder / "latents.fp16", dtype=np.float16, mode="r", shape=(self.steps, 2, *self.shape))
        with open(folder / "cond.pkl", "rb") as f:
            cond = pickle.load(f)
        return {"model_input": torch.from_numpy(np.array(both[step, 0])),
                "guided_output": torch.from_numpy(np.array(both[step, 1])),
                "timesteps": torch.tensor(float(cond["timesteps"][step])),
                "guidance_scale": torch.tensor(cond["guidance_scale"]),
                "class_label": torch.tensor(cond["class_label"])}


def _rate(batches, limit_samples: int) -> float:
    """Samples per second over the batches (up to ``limit_samples``), after the first batch."""
    iterator = iter(batches)
    next(iterator)  # opening files, spawning: not steady state
    began, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch["timesteps"])
        if seen >= limit_samples:
            break
    return seen / (time.perf_counter() - began)


def training_consumption(batch_size: int = 256, steps: int = 20) -> float:
    """(trajectory, step) samples per second that one adapter training step of the default consumes
    (the embedded default's architecture and adapters, forward and backward on this machine)."""
    from agd_pipeline.adapters import AdaptedModel, AdapterConfig
    from benchmarks.models import build_base

    base = build_base("toy-dit-8x8")
    model = AdaptedModel(base, AdapterConfig(num_classes=base.num_classes)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, *base.latent_shape)
    t = torch.randint(0, 1000, (batch_size,))
    labels = torch.randint(0, 10, (batch_size,))
    w = torch.rand(batch_size) * 5 + 1
    target = torch.randn_like(x)

    def step():
        loss = (model(x, t, labels, w) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - began)


def loader_table(trajectories: int = 400, steps: int = 32, batch_size: int = 256, workdir: str | None = None,
                 reference_samples: int = 20_000) -> list[dict]:
    """Samples per second: our Zarr loader, our WebDataset loader, and the reference layout."""
    from agd_pipeline.loader import StepBatches

    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for label, shape in LOADER_LATENTS.items():
            root = Path(tmp) / label
            zarr_store = write_synthetic_store(root / "zarr", synthetic_header(shape, trajectories, steps, 100))
            tar_store = write_synthetic_store(root / "tar", synthetic_header(shape, trajectories, steps, 100,
                                                                              fmt="webdataset"))
            write_reference_layout(root / "reference", zarr_store)
            total = trajectories * steps
            reference = torch.utils.data.DataLoader(ReferenceDataset(root / "reference", trajectories, steps, shape),
                                                    batch_size=batch_size, shuffle=True)
            rates = {
                "zarr": _rate(StepBatches(zarr_store, batch_size, seed=0), 3 * total),
                "webdataset": _rate(StepBatches(tar_store, batch_size, seed=0), 3 * total),
                "reference": _rate(reference, reference_samples),
            }
            raw = 2 * total * int(np.prod(shape)) * 2
            size = {name: sum(s["bytes"] for s in store.shards) / 2**20
                    for name, store in (("zarr", zarr_store), ("webdataset", tar_store))}
            rows.append({"latent": label, "trajectories": trajectories, "steps": steps, "batch_size": batch_size,
                         "raw_mib": raw / 2**20, "zarr_mib": size["zarr"], "webdataset_mib": size["webdataset"],
                         **{f"{k}_samples_per_s": v for k, v in rates.items()},
                         "zarr_over_reference": rates["zarr"] / rates["reference"],
                         "webdataset_over_reference": rates["webdataset"] / rates["reference"]})
    return rows


# --------------------------------------------------------------- the shipped configs' layouts


# config -> (its base's latent shape, the per-trajectory condition arrays its store holds)
SHIPPED_LAYOUTS = {
    "configs/dit-xl-2-256.yaml": ((4, 32, 32), CLASS_CONDITION),
    "configs/sd-2.1.yaml": ((4, 96, 96), {"prompt_index": {"dtype": "int64", "shape": []},
                                          "prompt_embeds": {"dtype": "float16", "shape": [77, 1024]}}),
}
PAPER_WORKERS = 4  # the paper loader's DataLoader workers


def shipped_header(config: str, trajectories: int = 0, fmt: str = "zarr") -> tuple[dict, dict]:
    """(the synthetic store header of a shipped config's layout: its base's latent shape and
    condition arrays, its shard size, chunk size, codec and steps, ``trajectories`` of them, by
    default one full shard; the config's train section)."""
    import yaml

    shape, conditions = SHIPPED_LAYOUTS[config]
    settings = yaml.safe_load(Path(config).read_text())
    generate = settings["generate"]
    header = synthetic_header(shape, trajectories or generate["shard_size"], generate["num_steps"],
                              generate["shard_size"], chunk_bytes=generate.get("chunk_bytes", CHUNK_BYTES),
                              fmt=fmt, compressor=generate.get("compressor", "auto") if fmt == "zarr" else "auto",
                              conditions=conditions)
    return header, settings["train"]


def write_paper_layout(root: Path, store: TrajectoryStore) -> None:
    """The reference implementation's layout, as its training scripts read it: ``timesteps.pt`` and
    ``latent_shape.pt`` at the root, and a folder per trajectory holding ``trajectory.npy`` (raw
    float16, [steps, 2, *latent]: each step's model input and guided output, read with np.memmap)
    and ``conditioning.pt`` (w and the condition tensors, torch.save): 2 files per trajectory plus 2.
    (Its DiT files hold a third array per step, the learned variance; our stores record the
    prediction channels only, so this layout reads 2/3 of the bytes its DiT reader would.)"""
    import dask

    root.mkdir(parents=True)
    conditions = list(store.manifest.condition_arrays)
    names = ["model_input", "guided_output", "guidance_scale", *conditions]
    arrays = store.dask_arrays([*names, "timesteps"])
    torch.save(torch.from_numpy(np.asarray(arrays["timesteps"][0].compute())), root / "timesteps.pt")
    torch.save(tuple(arrays["model_input"].shape[2:]), root / "latent_shape.pt")
    for first in range(0, store.num_trajectories, 50):  # 50 trajectories in memory at a time
        block = dict(zip(names, dask.compute(*(arrays[n][first:first + 50] for n in names))))
        for i in range(block["model_input"].shape[0]):
            folder = root / f"{first + i:06d}"
            folder.mkdir()
            steps = np.stack([block["model_input"][i], block["guided_output"][i]], axis=1).astype(np.float16)
            raw = np.memmap(folder / "trajectory.npy", dtype=np.float16, mode="w+", shape=steps.shape)
            raw[:] = steps
            raw.flush()
            del raw
            torch.save({"cfg_scale": torch.tensor(float(block["guidance_scale"][i])),
                        **{n: torch.from_numpy(np.ascontiguousarray(block[n][i])) for n in conditions}},
                       folder / "conditioning.pt")


class PaperDataset(torch.utils.data.Dataset):
    """One (trajectory, step) sample per item, read the way the reference implementation reads its
    layout: np.memmap of the trajectory's raw file and a copy of that step, then torch.load of its
    ``conditioning.pt``."""

    def __init__(self, root: Path, trajectories: int, steps: int):
        self.root, self.trajectories, self.steps = root, trajectories, steps
        self.timesteps = torch.load(root / "timesteps.pt", weights_only=True)
        self.latent_shape = tuple(torch.load(root / "latent_shape.pt", weights_only=True))

    def __len__(self):
        return self.trajectories * self.steps

    def __getitem__(self, index):
        traj, step = divmod(index, self.steps)
        folder = self.root / f"{traj:06d}"
        raw = np.memmap(folder / "trajectory.npy", dtype=np.float16, mode="r",
                        shape=(self.steps, 2, *self.latent_shape))
        model_input, guided_output = torch.from_numpy(raw[step].copy())
        conditioning = torch.load(folder / "conditioning.pt", weights_only=True)
        return {"model_input": model_input, "guided_output": guided_output, "timesteps": self.timesteps[step],
                "guidance_scale": conditioning.pop("cfg_scale"), **conditioning}


def _epoch_rate(batches, samples: int) -> tuple[float, float]:
    """(samples per second over ``samples`` samples, the first batch included; seconds to the first batch)."""
    began = time.perf_counter()
    iterator, seen, first = iter(batches), 0, None
    while seen < samples:
        batch = next(iterator)
        first = first if first is not None else time.perf_counter() - began
        seen += len(batch["timesteps"])
    return seen / (time.perf_counter() - began), first


def shipped_loader_table(configs=tuple(SHIPPED_LAYOUTS), trajectories: int = 0, repeats: int = 3,
                         workdir: str | None = None) -> list[dict]:
    """Our Zarr and WebDataset loaders against the paper's layout at each shipped config's store
    layout (its shard_size, chunk_bytes, steps and train.batch_size; random latents of its
    base's shape): one epoch each, the first batch included, ``repeats`` paired runs in turn. Also
    the files per 1,000 trajectories of each layout."""
    from agd_pipeline.loader import StepBatches

    rows = []
    for config in configs:
        header, train = shipped_header(config, trajectories)
        shape, n, steps = header["latent_shape"], header["num_trajectories"], header["sampler"]["num_steps"]
        batch = train["batch_size"]
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            root = Path(tmp)
            stores = {"zarr": write_synthetic_store(root / "zarr", header),
                      "webdataset": write_synthetic_store(root / "tar", shipped_header(
                          config, trajectories, fmt="webdataset")[0])}
            write_paper_layout(root / "paper", stores["zarr"])
            total = n * steps
            rates = {name: [] for name in (*stores, "paper")}
            firsts = {name: [] for name in rates}
            for repeat in range(repeats):
                loaders = {name: StepBatches(store, batch, seed=repeat) for name, store in stores.items()}
                loaders["paper"] = torch.utils.data.DataLoader(
                    PaperDataset(root / "paper", n, steps), batch_size=batch, shuffle=True,
                    num_workers=PAPER_WORKERS, generator=torch.Generator().manual_seed(repeat))
                for name in (list(loaders) if repeat % 2 == 0 else list(loaders)[::-1]):
                    rate, first = _epoch_rate(loaders[name], total)
                    rates[name].append(rate)
                    firsts[name].append(first)
            ratios = {name: [a / b for a, b in zip(rates[name], rates["paper"])] for name in stores}
            files = {"zarr": _files(root / "zarr"), "webdataset": _files(root / "tar"), "paper": _files(root / "paper")}
        rows.append({
            "config": config, "latent": "x".join(map(str, shape)), "trajectories": n, "steps": steps,
            "batch_size": batch, "shard_size": header["shard_size"],
            "chunk_bytes": header["chunk_bytes"], "compressor": header["compressor"],
            "unit_trajectories": unit_rows(stores["zarr"].manifest),
            "read_trajectories": read_rows(stores["zarr"].manifest),
            "repeats": repeats,
            **{f"{name}_samples_per_s": rates[name] for name in rates},
            **{f"{name}_first_batch_s": firsts[name] for name in firsts},
            **{f"{name}_over_paper": ratios[name] for name in ratios},
            **{f"{name}_files_per_1000": 1000 * files[name] / n for name in files},
        })
    return rows


# -------------------------------------------------------------------------------- recording


def recording_overhead(batch: int = 200, steps: int = 32, batches: int = 3, repeats: int = 3,
                       architecture: str = "toy-dit-8x8") -> dict:
    """Stage one with recording (every step copied out, shards compressed and written) against
    the same sampling loop with recording switched off. Median over repeats, alternating order."""
    from benchmarks.models import build_base
    from agd_pipeline.config import GenerateConfig, load_config
    from agd_pipeline.generation import Conditions, record_batch, store_header
    from agd_pipeline.sampling import CFG, generators_for, initial_noise, sample

    torch.manual_seed(0)
    base = build_base(architecture)
    total = batch * batches
    classes = list(range(max(d for d in range(1, 11) if total % d == 0)))  # classes cycled evenly
    conditions = Conditions("class", classes=classes, per_condition=total // len(classes))
    config = load_config(GenerateConfig, {"num_steps": steps, "batch_size": batch, "shard_size": batch,
                                          "trajectories_per_class": total // len(classes)})
    plain, recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            def without():
                for b in range(batches):
                    plan = conditions.plan(0, range(b * batch, (b + 1) * batch), 1.0, 6.0)
                    gens = generators_for(plan["seed"].tolist())
                    sample(base, torch.from_numpy(plan["class_label"]), initial_noise(base, gens), steps,
                           CFG(base, torch.from_numpy(plan["guidance_scale"])), generators=gens)

            def with_recording(root=Path(tmp) / f"store{repeat}"):
                writer = StoreWriter(root, store_header(config, base, conditions))
                for b in range(batches):
                    shard = writer.begin_shard(b)
                    plan = conditions.plan(0, range(b * batch, (b + 1) * batch), 1.0, 6.0)
                    shard.write(0, record_batch(base, plan, steps, False, conditions))
                    shard.finish()
                shutil.rmtree(root)

            for fn, times in ((without, plain), (with_recording, recorded))[:: 1 if repeat % 2 == 0 else -1]:
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
    t_plain, t_recorded = float(np.median(plain)), float(np.median(recorded))
    return {"architecture": architecture, "trajectories": batch * batches, "steps": steps,
            "seconds_without_recording": t_plain, "seconds_with_recording": t_recorded,
            "overhead_percent": 100 * (t_recorded / t_plain - 1)}


# ---------------------------------------------------------------------------------- storage


def _files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def storage_table(store: str | Path, variants=None, workdir: str | None = None) -> list[dict]:
    """Bytes per (trajectory, step) on disk against raw fp16, and files per 1,000 trajectories, for
    each format and codec: the store converted shard for shard."""
    source = TrajectoryStore(store)
    n, steps = source.num_trajectories, source.num_steps
    latent = int(np.prod(source.manifest.latent_shape))
    raw_per_step = 2 * latent * 2  # model input and guided output, fp16
    # tar members are standard .npz files: stored or deflate only
    variants = variants or [("zarr", codec, bits) for codec, bits in (
        ("none", 0), ("deflate", 0), ("zstd", 0), ("blosc-zstd", 0), ("blosc-zstd", 6), ("blosc-zstd", 3))] + [
        ("webdataset", codec, bits) for codec, bits in (("none", 0), ("deflate", 0), ("deflate", 6), ("deflate", 3))]
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for fmt, codec, bits in variants:
            target = Path(tmp) / f"{fmt}-{codec}-{bits}"
            convert_store(store, target, fmt, codec, bits, progress=False, log=lambda *a: None)
            on_disk = folder_bytes(target)
            rows.append({"format": fmt, "compressor": codec, "bitround_keepbits": bits,
                         "bytes_per_trajectory_step": on_disk / (n * steps),
                         "raw_fp16_bytes_per_trajectory_step": raw_per_step,
                         "ratio_to_raw": on_disk / (n * steps) / raw_per_step,
                         "files_per_1000_trajectories": _files(target) * 1000 / n})
    rows.append({"format": "reference (dir per trajectory)", "compressor": "none", "bitround_keepbits": 0,
                 "bytes_per_trajectory_step": raw_per_step, "raw_fp16_bytes_per_trajectory_step": raw_per_step,
                 "ratio_to_raw": 1.0, "files_per_1000_trajectories": 2000})
    return rows


# ------------------------------------------------------------------------------------ lossy


def lossy_table(store: str | Path, adapters_out: str | Path, keepbits=(6, 3), train_params="params.yaml",
                trajectories: int = 400) -> list[dict]:
    """Train the default adapters on BitRound copies of the store and measure the gap they close
    (against adapters trained the same way on the lossless store)."""
    from agd_pipeline.config import TrainConfig, load_config
    from agd_pipeline.evaluation import gap_closed
    from agd_pipeline.training import train

    rows = []
    out = Path(adapters_out)
    for bits in (0, *keepbits):
        source = Path(store)
        if bits:
            source = out / f"store-bitround{bits}"
            convert_store(store, source, "zarr", None, bits, progress=False, log=lambda *a: None)
        adapters = out / f"adapters-bitround{bits}"
        config = load_config(TrainConfig, train_params, {"store": str(source), "out_dir": str(adapters)})
        train(config, progress=False, log=lambda *a: None)
        result = gap_closed(adapters, trajectories)
        size = folder_bytes(source)
        rows.append({"bitround_keepbits": bits, "store_mib": size / 2**20, "gap_closed": result["overall"],
                     "gap_closed_per_w_bin": result["per_w_bin"]})
    (out / "lossy.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


# ------------------------------------------------------------------------------ loader memory


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (shared pages split between their users), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def loader_memory_run(root: str, workers: int, epochs: int, batch: int) -> dict:
    """In a fresh process (see loader_memory_table): ``epochs`` epochs of the loader over the store
    at ``root`` with ``workers`` workers; the peak of the PSS of this process and its workers,
    sampled every 10 ms, and every worker process seen."""
    import threading

    from agd_pipeline.loader import StepBatches

    store = TrajectoryStore(root)
    loader = StepBatches(store, batch, seed=0, workers=workers)
    me = os.getpid()
    before = _pss(me)
    peak, seen, done = [before], set(), threading.Event()

    def sample():
        while not done.is_set():
            children = _children(me)
            seen.update(children)
            peak[0] = max(peak[0], _pss(me) + sum(_pss(c) for c in children))
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    batches = loader.from_step(0)
    for _ in range(epochs * loader.batches_per_epoch()):
        next(batches)
    seconds = time.perf_counter() - began
    batches.close()
    done.set()
    sampler.join()
    return {"workers": workers, "before_bytes": before, "peak_bytes": peak[0], "worker_processes": len(seen),
            "seconds": seconds, "buffer_units": loader.buffer_units, "units": len(loader.units)}


def loader_memory_table(config: str = "configs/sd-2.1.yaml", workers=(0, 2), trajectories: int = 0, epochs: int = 3,
                        workdir: str | None = None) -> list[dict]:
    """Peak memory of the training loader with 0 and N workers at a shipped config's layout (its
    shard size, chunk size and batch; random latents of its base's shape), each in a fresh process
    so every run starts from the same baseline: the PSS of the training process and its workers
    (shared pages counted once), over ``epochs`` epochs, and how many worker processes it started."""
    import subprocess
    import sys

    header, train = shipped_header(config, trajectories)
    shape, n = header["latent_shape"], header["num_trajectories"]
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        write_synthetic_store(Path(tmp) / "zarr", header)
        for count in workers:
            code = ("import json, sys; from benchmarks.data_path import loader_memory_run; "
                    f"print(json.dumps(loader_memory_run({str(Path(tmp) / 'zarr')!r}, {count}, {epochs}, "
                    f"{train['batch_size']})))")
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=Path(__file__).resolve().parents[1])
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"config": config, "latent": "x".join(map(str, shape)), "trajectories": n,
                         "epochs": epochs, **row})
    base = next((r["peak_bytes"] for r in rows if r["workers"] == 0), None)
    for r in rows:
        r["peak_over_0_workers"] = r["peak_bytes"] / base if base else None
    return rows
