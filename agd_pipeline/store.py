"""The trajectory store: sharded Zarr v3 groups plus a JSON manifest.

Layout (schema version 1)::

    <root>/manifest.json             settings of the run and one entry per shard (status, checksum)
    <root>/shard-000000.zarr/        one self-describing group per shard, written by one process

A shard is written under ``<name>.partial`` and renamed into place only once every trajectory in it
is written, its metadata consolidated and its checksum computed; then the manifest (itself written
to a temporary file and renamed) marks it complete. Anything else found on resume is rewritten.
Trajectory i's seed, class and w depend on (run seed, i) only, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from .errors import StoreError

# We write consolidated metadata on purpose (one read opens a shard); zarr warns that v3 has no spec for it.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial"

# On-disk dtype of the arrays every store has (condition arrays: see the header's condition_arrays).
# fp16 for latents: Zarr has no bfloat16.
ARRAY_DTYPES = {
    "model_input": "float16",
    "guided_output": "float16",
    "cond_output": "float16",
    "uncond_output": "float16",
    "timesteps": "float32",
    "guidance_scale": "float32",
    "seed": "int64",
    "trajectory_index": "int64",
    "sample": "float16",
}
# Class-conditional stores written before condition_arrays was recorded hold class labels.
CLASS_CONDITION = {"class_label": {"dtype": "int64", "shape": []}}
# Settings that must agree between a store on disk and a run that wants to resume it.
RUN_KEYS = ("schema_version", "base_model", "sampler", "guidance", "seed", "conditioning", "classes", "prompts",
            "negative_prompt", "condition_arrays", "num_trajectories", "shard_size", "latent_shape",
            "output_channels", "record_branches", "compressor", "chunk_trajectories")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.zarr"


def compressors_for(name: str):
    if name == "blosc-zstd":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=5)]
    if name == "none":
        return None
    raise StoreError(f"unknown compressor {name!r}; allowed: blosc-zstd, zstd, none")


def condition_arrays(header: dict) -> dict[str, dict]:
    """Per-trajectory condition arrays (class label, or prompt index and prompt embeddings)."""
    return header.get("condition_arrays") or CLASS_CONDITION


def array_specs(header: dict, n: int) -> dict[str, tuple[tuple, str]]:
    """Name -> (shape, dtype) of every array in a shard of ``n`` trajectories."""
    steps = header["sampler"]["num_steps"]
    latent = tuple(header["latent_shape"])
    out = (header["output_channels"], *latent[1:])
    shapes = {
        "model_input": (n, steps, *latent),
        "guided_output": (n, steps, *out),
        "timesteps": (n, steps),
        "guidance_scale": (n,),
        "seed": (n,),
        "trajectory_index": (n,),
        "sample": (n, *latent),
    }
    if header["record_branches"]:
        shapes["cond_output"] = shapes["uncond_output"] = shapes["guided_output"]
    specs = {name: (shape, ARRAY_DTYPES[name]) for name, shape in shapes.items()}
    for name, spec in condition_arrays(header).items():
        specs[name] = ((n, *spec["shape"]), spec["dtype"])
    return specs


def array_shapes(header: dict, n: int) -> dict[str, tuple]:
    return {name: shape for name, (shape, _) in array_specs(header, n).items()}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _iter_slices(length: int, step: int):
    for start in range(0, length, max(1, step)):
        yield slice(start, min(length, start + step))


def shard_checksum(group: zarr.Group, check_finite: bool = False) -> tuple[str, list[str]]:
    """SHA-256 of every array's decoded contents (name, dtype, shape, bytes), read chunk-row by
    chunk-row so a large shard never sits in memory whole. Also returns non-finite arrays."""
    digest = hashlib.sha256()
    non_finite = []
    for name in sorted(group.array_keys()):
        arr = group[name]
        digest.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        finite = True
        for sl in _iter_slices(arr.shape[0], arr.chunks[0]):
            block = np.ascontiguousarray(arr[sl])
            digest.update(block.tobytes())
            if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
                finite = False
        if not finite:
            non_finite.append(name)
    return digest.hexdigest(), non_finite


# --------------------------------------------------------------------------------------- writer


class ShardWriter:
    """Writes one shard under a temporary name; ``finish`` publishes it."""

    def __init__(self, store: "StoreWriter", index: int):
        self.store = store
        self.index = index
        self.start, self.stop = store.shard_range(index)
        self.final = store.root / shard_name(index)
        self.partial = store.root / (shard_name(index) + PARTIAL)
        shutil.rmtree(self.partial, ignore_errors=True)
        shutil.rmtree(self.final, ignore_errors=True)
        header = store.header
        self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=3,
                                     attributes={"schema_version": SCHEMA_VERSION, "shard": index,
                                                 "first_trajectory": self.start})
        compressors = compressors_for(header["compressor"])
        chunk = min(header["chunk_trajectories"], self.stop - self.start)
        self.dtypes = {}
        for name, (shape, dtype) in array_specs(header, self.stop - self.start).items():
            self.group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                                    compressors=compressors)
            self.dtypes[name] = dtype
        self.written = 0

    def write(self, offset: int, arrays: dict[str, np.ndarray]) -> None:
        """Write trajectories [offset, offset + n) of this shard (offset is shard-relative)."""
        n = len(next(iter(arrays.values())))
        for name, value in arrays.items():
            self.group[name][offset:offset + n] = np.asarray(value, dtype=self.dtypes[name])
        self.written += n

    def finish(self) -> dict:
        expected = self.stop - self.start
        if self.written != expected:
            raise StoreError(f"{self.partial}: {self.written} of {expected} trajectories written")
        checksum, _ = shard_checksum(self.group)
        self.group.attrs["checksum"] = checksum
        zarr.consolidate_metadata(str(self.partial))
        os.replace(self.partial, self.final)
        entry = {"name": shard_name(self.index), "first_trajectory": self.start, "trajectories": expected,
                 "status": "complete", "checksum": checksum, "bytes": _folder_bytes(self.final)}
        self.store.mark_complete(self.index, entry)
        return entry


class StoreWriter:
    """Creates or resumes a store. ``pending()`` lists the shards still to write."""

    def __init__(self, root: str | os.PathLike, header: dict):
        self.root = Path(root)
        self.header = {"schema_version": SCHEMA_VERSION, **header}
        total, size = self.header["num_trajectories"], self.header["shard_size"]
        self.num_shards = -(-total // size)
        self.manifest = self._open()

    def shard_range(self, index: int) -> tuple[int, int]:
        size = self.header["shard_size"]
        return index * size, min(self.header["num_trajectories"], (index + 1) * size)

    def _open(self) -> dict:
        path = self.root / MANIFEST
        if path.exists():
            manifest = read_manifest(self.root)
            differing = [k for k in RUN_KEYS if manifest.get(k) != self.header.get(k)]
            if differing:
                details = "; ".join(f"{k}: store has {manifest.get(k)!r}, run asks {self.header.get(k)!r}"
                                    for k in differing[:3])
                raise StoreError(
                    f"{self.root} holds a store written with other settings ({details}). Resuming would "
                    "mix two runs: choose another out_dir, or delete this one to start over."
                )
            return manifest
        if self.root.exists() and any(self.root.iterdir()):
            raise StoreError(f"{self.root} exists, is not empty and has no {MANIFEST}: refusing to write "
                             "a store into it; choose another out_dir")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {**self.header, "shards": [
            {"name": shard_name(i), "first_trajectory": self.shard_range(i)[0],
             "trajectories": self.shard_range(i)[1] - self.shard_range(i)[0], "status": "pending"}
            for i in range(self.num_shards)]}
        _write_json_atomic(path, manifest)
        return manifest

    def pending(self) -> list[int]:
        todo = []
        for i, entry in enumerate(self.manifest["shards"]):
            if entry["status"] != "complete" or not (self.root / entry["name"]).is_dir():
                todo.append(i)
        for leftover in self.root.glob("*" + PARTIAL):  # from a killed run: never trusted
            shutil.rmtree(leftover, ignore_errors=True)
        return todo

    def begin_shard(self, index: int) -> ShardWriter:
        return ShardWriter(self, index)

    def mark_complete(self, index: int, entry: dict) -> None:
        self.manifest["shards"][index] = entry
        _write_json_atomic(self.root / MANIFEST, self.manifest)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------- reader


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        hint = "run `python -m stages.generate` to write it" if not root.exists() else \
            "it is not a trajectory store, or stage one was never started there"
        raise StoreError(f"no trajectory store at {root}: {MANIFEST} is missing ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is not valid JSON ({err}); re-run `python -m stages.generate`") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {version!r}, this tool reads {SCHEMA_VERSION}")
    return manifest


@dataclass
class Problem:
    shard: str
    array: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}/{self.array}" if self.array else self.shard
        return f"{where}: {self.message}"


class TrajectoryStore:
    """Read access to a complete store: manifest, shards, checks, dask arrays."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_steps(self) -> int:
        return self.manifest["sampler"]["num_steps"]

    @property
    def num_trajectories(self) -> int:
        return self.manifest["num_trajectories"]

    def open_shard(self, name: str) -> zarr.Group:
        return zarr.open_group(str(self.root / name), mode="r", use_consolidated=True)

    def problems(self, full: bool = False) -> list[Problem]:
        """Every way the shards disagree with the manifest. ``full`` re-reads all data."""
        found = []
        for entry in self.shards:
            name = entry["name"]
            if entry.get("status") != "complete":
                found.append(Problem(name, None, "not finished (the run that wrote it stopped early)"))
                continue
            if not (self.root / name).is_dir():
                found.append(Problem(name, None, "listed complete but missing on disk"))
                continue
            try:
                group = self.open_shard(name)
            except Exception as err:  # noqa: BLE001 - zarr raises many kinds for broken metadata
                found.append(Problem(name, None, f"cannot open ({type(err).__name__}: {err})"))
                continue
            expected = array_shapes(self.manifest, entry["trajectories"])
            present = set(group.array_keys())
            for array, shape in expected.items():
                if array not in present:
                    found.append(Problem(name, array, "missing"))
                elif tuple(group[array].shape) != tuple(shape):
                    found.append(Problem(name, array, f"shape {group[array].shape}, manifest implies {shape}"))
            if full and not any(p.shard == name for p in found):
                found.extend(self._verify_contents(name, group, entry))
        return found

    def _verify_contents(self, name: str, group: zarr.Group, entry: dict) -> list[Problem]:
        try:
            checksum, non_finite = shard_checksum(group, check_finite=True)
        except Exception as err:  # noqa: BLE001 - truncated chunks fail in the codec
            return [Problem(name, _failing_array(group), f"unreadable: {type(err).__name__}: {err}")]
        found = [Problem(name, a, "holds NaN or inf") for a in non_finite]
        if checksum != entry.get("checksum"):
            found.append(Problem(name, None, "checksum differs from the manifest (data changed on disk)"))
        return found

    def check(self, full: bool = False) -> None:
        """Raise StoreError naming every bad shard, with how to repair."""
        found = self.problems(full=full)
        if found:
            listing = "\n  ".join(str(p) for p in found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            raise StoreError(
                f"trajectory store {self.root} is not sound ({len(found)} problem(s)):\n  {listing}{more}\n"
                "Repair: re-run `python -m stages.generate` with the same settings; it rewrites only "
                "the shards that are not complete (delete a corrupted shard's folder first so it is "
                "regenerated)."
            )

    def dask_arrays(self, names=None) -> dict:
        """Every array as one dask array over all shards, chunked at the shards' own chunks."""
        import dask.array as da

        out = {}
        groups = [(e, self.open_shard(e["name"])) for e in self.shards if e.get("status") == "complete"]
        if not groups:
            raise StoreError(f"{self.root}: no complete shards")
        names = names or sorted(groups[0][1].array_keys())
        for array in names:
            parts = [da.from_zarr(g[array], chunks=g[array].chunks) for _, g in groups]
            out[array] = da.concatenate(parts, axis=0)
        return out

    def chunk_ranges(self) -> list[tuple[str, int, int]]:
        """(shard name, start, stop) of every chunk row: the unit the training loader reads."""
        ranges = []
        for entry in self.shards:
            if entry.get("status") != "complete":
                continue
            rows = self.manifest["chunk_trajectories"]
            for sl in _iter_slices(entry["trajectories"], rows):
                ranges.append((entry["name"], sl.start, sl.stop))
        return ranges


def _failing_array(group: zarr.Group) -> str | None:
    for name in sorted(group.array_keys()):
        try:
            group[name][:]
        except Exception:  # noqa: BLE001
            return name
    return None
