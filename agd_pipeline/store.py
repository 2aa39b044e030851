"""The trajectory store: sharded Zarr v3 groups (or WebDataset tars) plus a JSON manifest.

Layout (schema version 2)::

    <root>/manifest.json             settings of the run and one entry per shard (status, checksums)
    <root>/shard-000000.zarr/        one self-describing group per shard, written by one process
    <root>/shard-000000.tar          ... or, with format webdataset, a tar (see tar_shards)

Sections below: naming and schema, checksums, writer (one shard, then the store), reader
(manifest, checks, dask arrays, loader units), conversion between formats.

A shard is written under ``<name>.partial`` and renamed into place only once every trajectory in it
is written, its metadata consolidated and its checksums computed; the rename is the commit point,
and the manifest (itself written to a temporary file and renamed) catches up. Anything else found
on resume is rewritten.
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
import zarr.codecs.numcodecs

from .errors import StoreError
from .tar_shards import LATENT_ARRAYS, ArrayHasher, TarShard, TarShardWriter, entry_on_disk as tar_entry_on_disk

# We write consolidated metadata on purpose (one read opens a shard); zarr warns that v3 has no spec for it.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
# BitRound (the lossy option) is a numcodecs codec, which zarr flags as outside the v3 specification.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

SCHEMA_VERSION = 2  # 2: condition arrays in the header, a checksum per array
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
            "output_channels", "record_branches", "compressor", "chunk_trajectories", "format",
            "bitround_keepbits")


FORMATS = ("zarr", "webdataset")


REPAIR = ("Repair: re-run `python -m stages.generate --verify full` with the same settings; it rewrites "
          "only the shards that are missing, unfinished or damaged.")


def shard_name(index: int, fmt: str = "zarr") -> str:
    return f"shard-{index:06d}." + ("tar" if fmt == "webdataset" else "zarr")


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


def array_checksum(arr, check_finite: bool = False) -> tuple[str, bool]:
    """SHA-256 of an array's decoded contents (dtype, shape, bytes), read chunk-row by chunk-row so
    a large shard never sits in memory whole; and whether every value is finite (if asked)."""
    digest = hashlib.sha256(f"{arr.dtype}|{arr.shape}".encode())
    finite = True
    for sl in _iter_slices(arr.shape[0], arr.chunks[0]):
        block = np.ascontiguousarray(arr[sl])
        digest.update(block.tobytes())
        if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
            finite = False
    return digest.hexdigest(), finite


def array_checksums(group: zarr.Group) -> dict[str, str]:
    return {name: array_checksum(group[name])[0] for name in sorted(group.array_keys())}


def combined_checksum(sums: dict[str, str]) -> str:
    """One checksum for a shard, from its arrays' checksums."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(sums.items())).encode()).hexdigest()


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
        _remove(self.final)
        header = store.header
        self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=3,
                                     attributes={"schema_version": SCHEMA_VERSION, "shard": index,
                                                 "first_trajectory": self.start})
        compressors = compressors_for(header["compressor"])
        chunk = min(header["chunk_trajectories"], self.stop - self.start)
        keepbits = header.get("bitround_keepbits", 0)
        self.dtypes = {}
        specs = array_specs(header, self.stop - self.start)
        self.hasher = ArrayHasher(specs, keepbits)
        self.hashed = 0  # trajectories hashed in order so far (None: written out of order, re-read)
        for name, (shape, dtype) in specs.items():
            lossy = keepbits and name in LATENT_ARRAYS
            filters = [zarr.codecs.numcodecs.BitRound(keepbits=keepbits)] if lossy else None
            self.group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                                    compressors=compressors, filters=filters)
            self.dtypes[name] = dtype
        self.written = 0

    def write(self, offset: int, arrays: dict[str, np.ndarray]) -> None:
        """Write trajectories [offset, offset + n) of this shard (offset is shard-relative)."""
        n = len(next(iter(arrays.values())))
        in_order = self.hashed is not None and offset == self.hashed and set(arrays) == set(self.dtypes)
        for name, value in arrays.items():
            value = np.asarray(value, dtype=self.dtypes[name])
            self.group[name][offset:offset + n] = value
            if in_order:
                self.hasher.update(name, self.hasher.stored(name, value))
        self.hashed = self.hashed + n if in_order else None
        self.written += n

    def finish(self) -> dict:
        expected = self.stop - self.start
        if self.written != expected:
            raise StoreError(f"{self.partial}: {self.written} of {expected} trajectories written")
        # checksums of the values as written; written out of order, the stored arrays are re-read
        sums = self.hasher.checksums() if self.hashed == expected else array_checksums(self.group)
        self.group.attrs.update({"checksum": combined_checksum(sums), "checksums": sums,
                                 "trajectories": expected})
        zarr.consolidate_metadata(str(self.partial))
        # The rename is the commit point: a shard under its final name is complete, whatever
        # happens to the process afterwards (the manifest catches up on the next run).
        os.replace(self.partial, self.final)
        entry = self.store.entry_on_disk(self.index)
        self.store.mark_complete(self.index, entry)
        return entry


class StoreWriter:
    """Creates or resumes a store. ``pending()`` lists the shards still to write.

    Several processes may write one store: process ``rank`` of ``world_size`` owns the shards whose
    index is ``rank`` modulo ``world_size`` (``owned``). Only rank 0 creates and rewrites the manifest;
    the others' finished shards are picked up from disk (``refresh``). The caller makes rank 0 open
    the store before the others do.
    """

    def __init__(self, root: str | os.PathLike, header: dict, rank: int = 0, world_size: int = 1,
                 restart_on_mismatch: bool = False):
        self.root = Path(root)
        self.header = {"schema_version": SCHEMA_VERSION, "format": "zarr", "bitround_keepbits": 0, **header}
        self.format = self.header["format"]
        self.rank, self.world_size = rank, world_size
        total, size = self.header["num_trajectories"], self.header["shard_size"]
        self.num_shards = -(-total // size)
        self.manifest = self._open(restart_on_mismatch)

    def shard_range(self, index: int) -> tuple[int, int]:
        size = self.header["shard_size"]
        return index * size, min(self.header["num_trajectories"], (index + 1) * size)

    def _open(self, restart_on_mismatch: bool) -> dict:
        path = self.root / MANIFEST
        if path.exists():
            manifest = read_manifest(self.root, any_version=restart_on_mismatch)
            differing = [k for k in RUN_KEYS if manifest.get(k) != self.header.get(k)]
            if not differing:
                return manifest
            details = "; ".join(f"{k}: store has {_short(manifest.get(k))}, run asks {_short(self.header.get(k))}"
                                for k in differing[:3])
            if not restart_on_mismatch:
                raise StoreError(
                    f"{self.root} holds a store written with other settings ({details}). Resuming would "
                    "mix two runs: choose another out_dir, delete this one to start over, or set "
                    "generate.restart_on_mismatch to let the run replace it."
                )
            if self.rank == 0:
                shutil.rmtree(self.root)
        elif self.root.exists() and any(self.root.iterdir()):
            raise StoreError(f"{self.root} exists, is not empty and has no {MANIFEST}: refusing to write "
                             "a store into it; choose another out_dir")
        if self.rank != 0:
            raise StoreError(f"{self.root}: rank {self.rank} found no usable manifest; rank 0 creates it first")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {**self.header, "shards": [
            {"name": shard_name(i, self.format), "first_trajectory": self.shard_range(i)[0],
             "trajectories": self.shard_range(i)[1] - self.shard_range(i)[0], "status": "pending"}
            for i in range(self.num_shards)]}
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        try:
            _write_json_atomic(self.root / MANIFEST, manifest)
        except OSError as err:
            raise StoreError(f"{self.root / MANIFEST}: cannot write ({err.strerror or err})") from None

    def entry_on_disk(self, index: int) -> dict | None:
        """The manifest entry of a shard that is complete under its final name, else None."""
        final = self.root / shard_name(index, self.format)
        if self.format == "webdataset":
            return tar_entry_on_disk(final, self.shard_range(index)[1] - self.shard_range(index)[0])
        if not final.is_dir():
            return None
        try:
            attrs = dict(zarr.open_group(str(final), mode="r", use_consolidated=True).attrs)
        except Exception:  # noqa: BLE001 - unreadable: not complete
            return None
        start, stop = self.shard_range(index)
        if "checksum" not in attrs or attrs.get("trajectories") != stop - start:
            return None
        return {"name": shard_name(index, self.format), "first_trajectory": start, "trajectories": stop - start,
                "status": "complete", "checksum": attrs["checksum"], "checksums": attrs.get("checksums", {}),
                "bytes": _folder_bytes(final)}

    def refresh(self) -> list[int]:
        """Reconcile the manifest with the shards on disk; return the indices not complete.

        A shard renamed into place by a run that died before updating the manifest (or by another
        process) counts as complete; a shard the manifest lists but the disk lacks does not.
        """
        todo, changed = [], False
        for i, entry in enumerate(self.manifest["shards"]):
            listed = entry.get("status") == "complete"
            found = self.entry_on_disk(i) if not listed or not (self.root / entry["name"]).exists() else entry
            if found is None:
                todo.append(i)
                if listed:
                    self.manifest["shards"][i] = {**entry, "status": "pending"}
                    changed = True
            elif not listed:
                self.manifest["shards"][i] = found
                changed = True
        if changed and self.rank == 0:
            self._write_manifest(self.manifest)
        return todo

    def pending(self, verify: str = "cheap") -> list[int]:
        """Shards still to write: those not complete on disk, plus those of ours that fail the
        check (``cheap``: presence and shapes; ``full``: every array re-read against its checksum),
        whose folders are removed so they are written again."""
        todo = set(self.refresh())
        done = [i for i in self.owned(range(self.num_shards)) if i not in todo]
        names = {shard_name(i, self.format): i for i in done}
        damaged = {names[p.shard] for p in TrajectoryStore(self.root, self.manifest).problems(
            full=verify == "full", only=set(names))}
        for index in damaged:
            _remove(self.root / shard_name(index, self.format))
        if damaged:
            self.refresh()
        return sorted(todo | damaged)

    def owned(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world_size == self.rank]

    def begin_shard(self, index: int):
        return TarShardWriter(self, index) if self.format == "webdataset" else ShardWriter(self, index)

    def mark_complete(self, index: int, entry: dict) -> None:
        self.manifest["shards"][index] = entry
        if self.rank == 0:
            self._write_manifest(self.manifest)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------- reader


def read_manifest(root: str | os.PathLike, any_version: bool = False) -> dict:
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
    if version != SCHEMA_VERSION and not any_version:
        raise StoreError(f"{path}: store schema version {version!r}, this tool reads {SCHEMA_VERSION}; "
                         "re-run `python -m stages.generate` into a new out_dir")
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

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest if manifest is not None else read_manifest(self.root)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_steps(self) -> int:
        return self.manifest["sampler"]["num_steps"]

    @property
    def num_trajectories(self) -> int:
        return self.manifest["num_trajectories"]

    @property
    def format(self) -> str:
        return self.manifest.get("format", "zarr")

    def open_shard(self, name: str):
        """A Zarr group, or for a WebDataset store a TarShard that reads like one."""
        if self.format == "webdataset":
            entry = next(e for e in self.shards if e["name"] == name)
            return TarShard(self.root / name, array_specs(self.manifest, entry["trajectories"]))
        return zarr.open_group(str(self.root / name), mode="r", use_consolidated=True)

    def problems(self, full: bool = False, only: set[str] | None = None) -> list[Problem]:
        """Every way the shards (or the ``only`` ones) disagree with the manifest. ``full`` re-reads
        all data."""
        found = []
        for entry in self.shards:
            name = entry["name"]
            if only is not None and name not in only:
                continue
            if entry.get("status") != "complete":
                found.append(Problem(name, None, "not finished (the run that wrote it stopped early)"))
                continue
            if not (self.root / name).exists():
                found.append(Problem(name, None, "listed complete but missing on disk"))
                continue
            if self.format == "webdataset" and (self.root / name).stat().st_size != entry.get("bytes"):
                found.append(Problem(name, None, f"{(self.root / name).stat().st_size} bytes on disk, the "
                                     f"manifest says {entry.get('bytes')} (truncated or changed)"))
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
        """Re-read every array: name each one that is unreadable (truncated, corrupted), holds NaN
        or inf, or whose checksum differs from the manifest's."""
        found, sums = [], {}
        expected = entry.get("checksums") or {}
        if isinstance(group, TarShard):
            try:
                group.members()
            except Exception as err:  # noqa: BLE001 - a broken tar fails in the tar reader
                return [Problem(name, None, f"unreadable tar ({type(err).__name__}: {err})")]
        for array in sorted(group.array_keys()):
            try:
                sums[array], finite = array_checksum(group[array], check_finite=True)
            except Exception as err:  # noqa: BLE001 - truncated chunks fail in the codec
                found.append(Problem(name, array, f"unreadable ({type(err).__name__}: {err})"))
                continue
            if not finite:
                found.append(Problem(name, array, "holds NaN or inf"))
            if array in expected and sums[array] != expected[array]:
                found.append(Problem(name, array, "checksum differs from the manifest (data changed on disk)"))
        if not found and combined_checksum(sums) != entry.get("checksum"):
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
                + REPAIR)

    def dask_arrays(self, names=None) -> dict:
        """Every array as one dask array over all shards, chunked at the shards' own chunks."""
        import dask.array as da

        out = {}
        groups = [(e, self.open_shard(e["name"])) for e in self.shards if e.get("status") == "complete"]
        if not groups:
            raise StoreError(f"{self.root}: no complete shards")
        names = names or sorted(groups[0][1].array_keys())
        for array in names:
            if self.format == "webdataset":
                parts = [da.from_array(g[array], chunks=g[array].chunks, asarray=True) for _, g in groups]
            else:
                parts = [da.from_zarr(g[array], chunks=g[array].chunks) for _, g in groups]
            out[array] = da.concatenate(parts, axis=0)
        return out

    def chunk_ranges(self) -> list[tuple[str, int, int]]:
        """(shard name, start, stop) of every chunk row: the unit the training loader reads."""
        ranges = []
        for entry in self.shards:
            if entry.get("status") != "complete":
                continue
            # a tar shard is read whole; a Zarr shard by chunk rows
            rows = entry["trajectories"] if self.format == "webdataset" else self.manifest["chunk_trajectories"]
            for sl in _iter_slices(entry["trajectories"], rows):
                ranges.append((entry["name"], sl.start, sl.stop))
        return ranges


# ------------------------------------------------------------------------------------- convert


def convert_store(source: str | os.PathLike, target: str | os.PathLike, fmt: str = "webdataset",
                  compressor: str | None = None, bitround_keepbits: int | None = None,
                  progress: bool = True, log=print) -> dict:
    """Copy a complete store into another format (or compressor), shard for shard. The target is
    written like stage one writes (partial shards renamed into place, resumable); lossless copies
    keep every checksum, which is verified shard by shard."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise StoreError(f"unknown store format {fmt!r}; allowed: {', '.join(FORMATS)}")
    src = TrajectoryStore(source)
    src.check(full=False)
    header = {k: v for k, v in src.manifest.items() if k not in ("shards", "schema_version")}
    header.update(format=fmt)
    if compressor is not None:
        compressors_for(compressor)  # validates the name
        header["compressor"] = compressor
    if bitround_keepbits is not None:
        header["bitround_keepbits"] = bitround_keepbits
    lossless = header.get("bitround_keepbits", 0) == src.manifest.get("bitround_keepbits", 0)
    writer = StoreWriter(target, header)
    pending = writer.pending()
    for index in tqdm(pending, desc=f"convert to {fmt}", unit="shard", disable=not progress):
        entry = src.shards[index]
        group = src.open_shard(entry["name"])
        shard = writer.begin_shard(index)
        rows = src.manifest["chunk_trajectories"] if src.format == "zarr" else entry["trajectories"]
        for sl in _iter_slices(entry["trajectories"], rows):
            shard.write(sl.start, {name: group[name][sl] for name in group.array_keys()})
        written = shard.finish()
        if lossless and written["checksums"] != entry.get("checksums"):
            raise StoreError(f"{target}/{written['name']}: the converted arrays differ from {source}/{entry['name']}")
    log(f"{target}: {len(pending)} shard(s) converted to {fmt}" + ("" if pending else " (already complete)"))
    return {"converted_shards": len(pending), "shards": writer.num_shards}
