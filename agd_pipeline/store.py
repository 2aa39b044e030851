"""The trajectory store: sharded Zarr v3 groups (or WebDataset tars) plus a JSON manifest.

Layout (schema version 3)::

    <root>/manifest.json             store type and schema, settings of the run, one entry per shard
    <root>/zarr.json                 Zarr format: the root is a Zarr group, the shards its children
    <root>/shard-000000.zarr/        one self-describing group per shard, written by one process
    <root>/shard-000000.tar          ... or, with format webdataset, a tar (see tar_shards)
    <root>/.agd.lock                 held by the one process writing the store (see locks)

Sections below: naming and schema, codecs, checksums, manifest (validation, ownership, recovery),
writer (one shard, then the store), reader (checks, dask arrays, loader units), conversion.

A shard is written under ``<name>.partial``, re-read and compared with the checksums of the values
written, and only then renamed into place; the rename is the commit point, and the manifest
(itself written to a temporary file and renamed) catches up. Every shard carries the settings of
its run and its checksums, so a lost manifest is rebuilt from the shards. Trajectory i's seed, class
and w depend on (run seed, i) only, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs
import zarr.codecs.numcodecs

from .errors import StoreError
from .locks import LOCK_FILE

# We write consolidated metadata on purpose (one read opens a shard); zarr warns that v3 has no spec for it.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
# BitRound (the lossy option) is a numcodecs codec, which zarr flags as outside the v3 specification.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

STORE_TYPE = "agd-trajectory-store"  # the manifest's marker: a folder holding it is one of ours
SCHEMA_VERSION = 3  # 3: store type marker, run settings in every shard, dimension names, .npz tar members
MANIFEST = "manifest.json"
PARTIAL = ".partial"
SHARD_PATTERN = re.compile(r"shard-(\d{6})\.(zarr|tar)")
# Everything a store folder may hold besides shards; anything else is the user's, never deleted.
OWN_FILES = (MANIFEST, MANIFEST + ".tmp", "zarr.json", LOCK_FILE)
OWN_PATTERN = re.compile(r"(shard-\d{6}\.(zarr|tar)(\.partial|\.json|\.json\.tmp)?|manifest\.json\.damaged(-\d+)?)")

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
LATENT_ARRAYS = ("model_input", "guided_output", "cond_output", "uncond_output", "sample")
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


# --------------------------------------------------------------------------------------- codecs

# One table for both formats. Zarr shards take any of them; a tar shard's members are standard
# .npz files, which numpy (and webdataset's decoder) read with deflate or stored entries only.
CODECS = {
    "blosc-zstd": {"zarr": lambda: [zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]},
    "zstd": {"zarr": lambda: [zarr.codecs.ZstdCodec(level=5)]},
    "deflate": {"zarr": lambda: [zarr.codecs.GzipCodec(level=6)], "webdataset": "deflate"},
    "none": {"zarr": lambda: None, "webdataset": "stored"},
}
DEFAULT_COMPRESSOR = {"zarr": "blosc-zstd", "webdataset": "none"}


def resolve_compressor(name: str, fmt: str) -> str:
    """The codec a store of format ``fmt`` uses for ``name`` ("auto": the format's default)."""
    if name in ("", "auto", None):
        return DEFAULT_COMPRESSOR[fmt]
    if name not in CODECS:
        raise StoreError(f"unknown compressor {name!r}; allowed: auto, {', '.join(CODECS)}")
    if fmt not in CODECS[name]:
        allowed = [c for c, spec in CODECS.items() if fmt in spec]
        raise StoreError(f"compressor {name!r} is not available for {fmt} shards (their members are standard "
                         f".npz files); allowed: auto, {', '.join(allowed)}")
    return name


def compressors_for(name: str):
    """Zarr v3 compressors for a codec name."""
    return CODECS[resolve_compressor(name, "zarr")]["zarr"]()


# ------------------------------------------------------------------------------ array schema


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


# Names of each array's axes, so xarray and other tools read a shard without our code.
_CONDITION_DIMS = {"prompt_embeds": ("token", "text_embedding"), "pooled_prompt_embeds": ("pooled_embedding",),
                   "add_time_ids": ("time_id",)}


def dimension_names(header: dict, name: str, ndim: int) -> tuple[str, ...]:
    spatial = ("y", "x") if len(header["latent_shape"]) == 3 else tuple(
        f"latent_{i}" for i in range(1, len(header["latent_shape"])))
    out_channel = "channel" if header["output_channels"] == header["latent_shape"][0] else "output_channel"
    dims = {
        "model_input": ("trajectory", "step", "channel", *spatial),
        "guided_output": ("trajectory", "step", out_channel, *spatial),
        "timesteps": ("trajectory", "step"),
        "sample": ("trajectory", "channel", *spatial),
    }
    dims["cond_output"] = dims["uncond_output"] = dims["guided_output"]
    if name in dims:
        return dims[name]
    rest = _CONDITION_DIMS.get(name, tuple(f"{name}_{i}" for i in range(1, ndim)))
    return ("trajectory", *rest)[:ndim] if len(rest) == ndim - 1 else ("trajectory", *(f"{name}_{i}" for i in range(1, ndim)))


# ---------------------------------------------------------------------------------- checksums


def _write_json_atomic(path: Path, data) -> None:
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


def bitround(value: np.ndarray, keepbits: int) -> np.ndarray:
    """Keep ``keepbits`` mantissa bits of a float array (numcodecs' BitRound); 0 keeps everything."""
    if not keepbits or value.dtype.kind != "f":
        return value
    import numcodecs

    return np.asarray(numcodecs.BitRound(keepbits=keepbits).encode(value)).view(value.dtype).reshape(value.shape)


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


def combined_checksum(sums: dict[str, str]) -> str:
    """One checksum for a shard, from its arrays' checksums."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(sums.items())).encode()).hexdigest()


class ArrayHasher:
    """Checksums of a shard's arrays computed from the values as they are written, in order: the
    same digests as re-reading the stored arrays (``array_checksum``), without the re-read.
    Latent arrays are hashed after BitRound, as they are stored."""

    def __init__(self, specs: dict[str, tuple[tuple, str]], keepbits: int):
        self.keepbits = keepbits
        self.digests = {name: hashlib.sha256(f"{np.dtype(dtype)}|{tuple(shape)}".encode())
                        for name, (shape, dtype) in specs.items()}

    def stored(self, name: str, value: np.ndarray) -> np.ndarray:
        """The values as the store keeps them."""
        value = np.array(value, order="C", copy=True)
        return bitround(value, self.keepbits) if name in LATENT_ARRAYS else value

    def update(self, name: str, stored: np.ndarray) -> None:
        self.digests[name].update(np.ascontiguousarray(stored).tobytes())

    def checksums(self) -> dict[str, str]:
        return {name: digest.hexdigest() for name, digest in sorted(self.digests.items())}


def store_fingerprint(manifest: dict) -> str:
    """One digest of a complete store: its run settings and every shard's checksum. A training
    checkpoint records it, so a changed store is never resumed silently."""
    run = {k: manifest.get(k) for k in RUN_KEYS}
    shards = [(s["name"], s.get("checksum")) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([run, shards], sort_keys=True, default=str).encode()).hexdigest()[:32]


def differences(old, new, prefix: str = "", limit: int = 6) -> list[str]:
    """Where two settings trees differ, as ``key.sub.key: <old> -> <new>`` lines (the nested key,
    not just the top-level one)."""
    found = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found += differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.", limit)
            if len(found) >= limit:
                break
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and len(old) <= 64:
        for i, (a, b) in enumerate(zip(old, new)):
            found += differences(a, b, f"{prefix}{i}.", limit)
            if len(found) >= limit:
                break
    elif old != new:
        found.append(f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}")
    return found[:limit]


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items]"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _bytes(path: Path) -> int:
    """Bytes on disk of a shard: a tar file, or every file of a Zarr folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


folder_bytes = _bytes


# ------------------------------------------------------------------------------------ manifest


def _fail(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}. The manifest is damaged or was edited; "
                      "`python -m stages.generate --rebuild-manifest --out-dir "
                      f"{path.parent}` rebuilds it from the shards")


def validate_manifest(manifest, path: Path) -> dict:
    """Check a manifest's structure before anything trusts it: types, ranges, and shard names that
    are exactly ``shard-NNNNNN.zarr|tar`` in order (so no entry can point outside the store)."""
    if not isinstance(manifest, dict):
        raise _fail(path, f"holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("store_type") != STORE_TYPE:
        if "shards" in manifest and "schema_version" in manifest:
            raise StoreError(f"{path}: store schema version {manifest.get('schema_version')!r} (an older release), "
                             f"this tool reads {SCHEMA_VERSION}; write the store again with `python -m stages.generate` "
                             "into a new out_dir (or delete this one yourself first)")
        raise StoreError(f"{path}: not a trajectory store manifest (no store_type {STORE_TYPE!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {manifest.get('schema_version')!r}, this tool reads "
                         f"{SCHEMA_VERSION}; re-run `python -m stages.generate` into a new out_dir")

    def need(key, kind, ok=lambda v: True, what=""):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not ok(value):
            raise _fail(path, f"'{key}' is {value!r}, expected {what or kind.__name__}")
        return value

    positive = (lambda v: v > 0)
    need("format", str, lambda v: v in FORMATS, f"one of {FORMATS}")
    need("compressor", str, lambda v: v in CODECS and manifest["format"] in CODECS[v], "a codec of the format")
    total = need("num_trajectories", int, positive, "a positive integer")
    size = need("shard_size", int, positive, "a positive integer")
    need("chunk_trajectories", int, positive, "a positive integer")
    need("output_channels", int, positive, "a positive integer")
    need("record_branches", bool)
    need("bitround_keepbits", int, lambda v: 0 <= v <= 10, "an integer in [0, 10]")
    need("latent_shape", list, lambda v: len(v) >= 2 and all(isinstance(d, int) and d > 0 for d in v),
         "a list of positive integers")
    sampler = need("sampler", dict)
    if not isinstance(sampler.get("num_steps"), int) or sampler["num_steps"] <= 0:
        raise _fail(path, f"'sampler.num_steps' is {sampler.get('num_steps')!r}, expected a positive integer")
    need("guidance", dict, lambda v: all(isinstance(v.get(k), (int, float)) for k in ("min", "max")),
         "min and max numbers")
    need("base_model", dict)
    arrays = manifest.get("condition_arrays") or {}
    if not isinstance(arrays, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", k) and k not in ARRAY_DTYPES
            and isinstance(v, dict) and v.get("dtype") in ("int64", "float16", "float32")
            and isinstance(v.get("shape"), list) and all(isinstance(d, int) and d > 0 for d in v["shape"])
            for k, v in arrays.items()):
        raise _fail(path, "'condition_arrays' is malformed")
    shards = need("shards", list)
    if len(shards) != -(-total // size):
        raise _fail(path, f"lists {len(shards)} shards, {total} trajectories in shards of {size} make "
                    f"{-(-total // size)}")
    for i, entry in enumerate(shards):
        expected = shard_name(i, manifest["format"])
        if not isinstance(entry, dict) or entry.get("name") != expected:
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise _fail(path, f"shard {i} is named {name!r}, expected {expected!r}")
        if entry.get("first_trajectory") != i * size or entry.get("trajectories") != min(size, total - i * size):
            raise _fail(path, f"shard {expected} has the wrong trajectory range")
        if entry.get("status") not in ("complete", "pending"):
            raise _fail(path, f"shard {expected} has status {entry.get('status')!r}")
        if entry["status"] == "complete" and not (isinstance(entry.get("checksum"), str)
                                                  and isinstance(entry.get("checksums"), dict)):
            raise _fail(path, f"shard {expected} is complete but has no checksums")
    return manifest


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a trajectory store folder")
    if not path.exists():
        if root.is_dir() and any(SHARD_PATTERN.fullmatch(p.name) for p in root.iterdir()):
            hint = (f"the shards are there: `python -m stages.generate --rebuild-manifest --out-dir {root}` "
                    "rebuilds it from them")
        elif root.exists():
            hint = "it is not a trajectory store, or stage one was never started there"
        else:
            hint = "run `python -m stages.generate` to write it"
        raise StoreError(f"no trajectory store at {root}: {MANIFEST} is missing ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"is not valid JSON ({err})") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read ({err.strerror or err})") from None
    return validate_manifest(manifest, path)


def new_manifest(header: dict) -> dict:
    total, size = header["num_trajectories"], header["shard_size"]
    shards = []
    for i in range(-(-total // size)):
        start, stop = i * size, min(total, (i + 1) * size)
        shards.append({"name": shard_name(i, header["format"]), "first_trajectory": start,
                       "trajectories": stop - start, "status": "pending"})
    return {"store_type": STORE_TYPE, "schema_version": SCHEMA_VERSION, **run_header(header), "shards": shards}


def run_header(manifest: dict) -> dict:
    """The run settings of a manifest (everything but the marker and the shard list)."""
    return {k: v for k, v in manifest.items() if k not in ("store_type", "shards")}


def _same_run(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in RUN_KEYS)


def foreign_entries(root: Path) -> list[str]:
    """Names in a store folder that are not ours: our files are the manifest and its temporaries,
    the root group's zarr.json, the lock, and shards (Zarr folders holding only zarr.json and
    array folders, tars, their sidecars and partials)."""
    foreign = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name in OWN_FILES or (entry.is_file() and OWN_PATTERN.fullmatch(name) and not name.endswith((".zarr", ".zarr.partial"))):
            continue
        if entry.is_dir() and not entry.is_symlink() and re.fullmatch(r"shard-\d{6}\.zarr(\.partial)?", name) \
                and _zarr_shard_is_ours(entry):
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def refuse_foreign_folder(root: Path) -> None:
    """A folder that holds files but no store is someone else's: refused before anything (not
    even a lock file) is written into it."""
    root = Path(root)
    if root.is_dir() and not (root / MANIFEST).exists():
        foreign = foreign_entries(root)
        if foreign:
            raise StoreError(f"{root} exists, is not empty ({', '.join(foreign[:5])}) and holds no trajectory "
                             "store: refusing to write a store into it; choose another out_dir")


def _zarr_shard_is_ours(folder: Path) -> bool:
    for entry in folder.iterdir():
        if entry.name == "zarr.json" and entry.is_file():
            continue
        if not entry.is_dir() or entry.is_symlink() or not re.fullmatch(r"[a-z_][a-z0-9_]*", entry.name):
            return False
        if not {p.name for p in entry.iterdir()} <= {"zarr.json", "c"}:
            return False
    return True


def remove_store(root: Path, reason: str, log=print) -> None:
    """Delete a store that is provably ours (a valid marker, or shards only) and nothing else: a
    folder holding any file of the user's is refused, naming the files."""
    foreign = foreign_entries(root)
    if foreign:
        raise StoreError(
            f"{root} {reason}, but it also holds files that are not part of a trajectory store "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): refusing to delete anything. "
            "Move those files away or choose another out_dir.")
    ours = [p for p in sorted(root.iterdir()) if p.name != LOCK_FILE]
    shards = [p for p in ours if SHARD_PATTERN.fullmatch(p.name)]
    size = sum(_bytes(p) for p in ours)
    log(f"{root}: {reason}; removing it as asked (restart_on_mismatch): {len(shards)} shard(s) and "
        f"{len(ours) - len(shards)} other file(s) of the store, {size / 2**20:.1f} MiB")
    for path in ours:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------- zarr shards


class ShardWriter:
    """Writes one Zarr shard under a temporary name; ``finish`` verifies and publishes it."""

    def __init__(self, store: "StoreWriter", index: int):
        self.store = store
        self.index = index
        self.start, self.stop = store.shard_range(index)
        self.final = store.root / shard_name(index)
        self.partial = store.root / (shard_name(index) + PARTIAL)
        _remove(self.partial)
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
            # every chunk is written, even all-zero ones, so a missing chunk file is always damage
            self.group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                                    compressors=compressors, filters=filters, fill_value=0,
                                    dimension_names=dimension_names(header, name, len(shape)),
                                    config={"write_empty_chunks": True})
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

    def finish(self, expected_checksums: dict | None = None) -> dict:
        """Verify the shard as stored against the checksums of the values written (and, when
        given, against ``expected_checksums``), then publish it by renaming it into place."""
        expected = self.stop - self.start
        if self.written != expected:
            raise StoreError(f"{self.partial}: {self.written} of {expected} trajectories written")
        stored = {name: array_checksum(self.group[name])[0] for name in sorted(self.group.array_keys())}
        sums = self.hasher.checksums() if self.hashed == expected else stored
        _check_before_publish(self.partial, stored, sums, expected_checksums)
        self.group.attrs.update({"checksum": combined_checksum(sums), "checksums": sums, "trajectories": expected,
                                 "store_header": run_header(self.store.header)})
        zarr.consolidate_metadata(str(self.partial))
        # The rename is the commit point: a shard under its final name is complete, whatever
        # happens to the process afterwards (the manifest catches up on the next run).
        os.replace(self.partial, self.final)
        entry = zarr_entry(self.final, self.store.header, self.index)
        if entry is None:
            raise StoreError(f"{self.final}: unreadable right after it was written (is the disk failing?)")
        self.store.mark_complete(self.index, entry)
        return entry


def _check_before_publish(partial: Path, stored: dict, written: dict, expected: dict | None) -> None:
    bad = sorted(k for k in written if stored.get(k) != written[k])
    if expected is not None:
        bad += sorted(k for k in expected if written.get(k) != expected[k] and k not in bad)
    if bad:
        _remove(partial)
        raise StoreError(f"{partial}: arrays {bad} do not read back as written"
                         + (" / differ from the source" if expected is not None else "")
                         + "; the shard was not published (is the disk failing?)")


def _array_files(folder: Path) -> tuple[int, int]:
    """(chunk files, bytes of every file) of one Zarr array folder."""
    files = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            files += path.name != "zarr.json" or path.parent != folder
    return files, size


def zarr_entry(final: Path, header: dict, index: int) -> dict | None:
    """The manifest entry of a Zarr shard that is complete under its final name and belongs to
    the run ``header`` describes, else None."""
    if not final.is_dir():
        return None
    try:
        attrs = dict(zarr.open_group(str(final), mode="r", zarr_format=3, use_consolidated=True).attrs)
    except Exception:  # noqa: BLE001 - unreadable: not complete
        return None
    start = index * header["shard_size"]
    n = min(header["num_trajectories"], start + header["shard_size"]) - start
    stored_header = attrs.get("store_header")
    if "checksum" not in attrs or attrs.get("trajectories") != n or not isinstance(stored_header, dict) \
            or not _same_run(stored_header, header):
        return None
    return {"name": final.name, "first_trajectory": start, "trajectories": n, "status": "complete",
            "checksum": attrs["checksum"], "checksums": attrs.get("checksums", {}), "bytes": _bytes(final),
            "array_bytes": {name: _array_files(final / name)[1] for name in attrs.get("checksums", {})}}


def shard_header(path: Path) -> dict | None:
    """The run settings a shard on disk carries (for rebuilding a lost manifest), or None."""
    if path.suffix == ".tar":
        from .tar_shards import sidecar

        try:
            return json.loads(sidecar(path).read_text()).get("store_header")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        return dict(zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=True).attrs).get("store_header")
    except Exception:  # noqa: BLE001 - unreadable metadata
        return None


# ----------------------------------------------------------------------------------- writer


class StoreWriter:
    """Creates or resumes a store. ``pending()`` lists the shards still to write.

    Several processes may write one store: process ``rank`` of ``world_size`` owns the shards whose
    index is ``rank`` modulo ``world_size`` (``owned``). Only rank 0 creates, recovers or replaces
    the manifest; the others' finished shards are picked up from disk (``refresh``). The caller
    makes rank 0 open the store before the others do, and holds the folder's lock.
    """

    def __init__(self, root: str | os.PathLike, header: dict, rank: int = 0, world_size: int = 1,
                 restart_on_mismatch: bool = False, log=print):
        self.root = Path(root)
        fmt = header.get("format", "zarr")
        self.header = {"schema_version": SCHEMA_VERSION, "format": fmt, "bitround_keepbits": 0, **header}
        self.header["compressor"] = resolve_compressor(self.header.get("compressor"), fmt)
        self.header.pop("store_type", None)
        self.header.pop("shards", None)
        self.format = fmt
        self.rank, self.world_size = rank, world_size
        self.log = log
        total, size = self.header["num_trajectories"], self.header["shard_size"]
        self.num_shards = -(-total // size)
        self.manifest = self._open(restart_on_mismatch)

    def shard_range(self, index: int) -> tuple[int, int]:
        size = self.header["shard_size"]
        return index * size, min(self.header["num_trajectories"], (index + 1) * size)

    def _open(self, restart_on_mismatch: bool) -> dict:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is a file: the out_dir of a trajectory store must be a folder")
        if self.rank != 0:
            return read_manifest(self.root)
        existing = self._existing()
        if existing is not None:
            changed = differences({k: existing.get(k) for k in RUN_KEYS}, {k: self.header.get(k) for k in RUN_KEYS})
            if not changed:
                return existing
            details = "; ".join(changed)
            if not restart_on_mismatch:
                raise StoreError(
                    f"{self.root} holds a store written with other settings ({details}; store -> this run). "
                    "Resuming would mix two runs: choose another out_dir, delete this one to start over, or "
                    "pass --restart-on-mismatch true to let this run replace it.")
            remove_store(self.root, f"holds a store written with other settings ({details})", self.log)
        else:
            refuse_foreign_folder(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(self.header)
        if self.format == "zarr":  # the store root opens as a Zarr group whose children are the shards
            _write_json_atomic(self.root / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {
                "store_type": STORE_TYPE, "schema_version": SCHEMA_VERSION, "manifest": MANIFEST}})
        self._write_manifest(manifest)
        return manifest

    def _existing(self) -> dict | None:
        """The store already in the folder: its manifest, or one rebuilt from its shards when the
        manifest is missing or damaged. None for an empty folder or one without our shards."""
        path = self.root / MANIFEST
        if not self.root.exists():
            return None
        if path.exists():
            try:
                return read_manifest(self.root)
            except StoreError as err:
                if "schema version" in str(err) or "not a trajectory store" in str(err):
                    raise
                damaged = err
        else:
            damaged = None
        if not any(SHARD_PATTERN.fullmatch(p.name) for p in self.root.iterdir()):
            if damaged is not None:
                raise damaged
            return None
        manifest = recover_manifest(self.root, self.log)
        if manifest is None and damaged is not None:
            raise damaged
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
            from .tar_shards import tar_entry

            return tar_entry(final, self.header, index)
        return zarr_entry(final, self.header, index)

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
                    self.manifest["shards"][i] = {k: v for k, v in entry.items() if k in (
                        "name", "first_trajectory", "trajectories")} | {"status": "pending"}
                    changed = True
            elif not listed:
                self.manifest["shards"][i] = found
                changed = True
        if changed and self.rank == 0:
            self._write_manifest(self.manifest)
        return todo

    def pending(self, verify: str = "cheap") -> list[int]:
        """Shards still to write: those not complete on disk, plus those of ours that fail the
        check (``cheap``: presence, shapes, every chunk file and its size; ``full``: every array
        re-read against its checksum), whose folders are removed so they are written again."""
        todo = set(self.refresh())
        done = [i for i in self.owned(range(self.num_shards)) if i not in todo]
        names = {shard_name(i, self.format): i for i in done}
        found = TrajectoryStore(self.root, self.manifest).problems(full=verify == "full", only=set(names))
        damaged = {names[p.shard] for p in found}
        for index in sorted(damaged):
            self.log(f"{self.root / shard_name(index, self.format)}: damaged "
                     f"({'; '.join(str(p) for p in found if p.shard == shard_name(index, self.format))}); "
                     "writing it again")
            _remove(self.root / shard_name(index, self.format))
            if self.format == "webdataset":
                from .tar_shards import sidecar

                sidecar(self.root / shard_name(index, self.format)).unlink(missing_ok=True)
        if damaged:
            self.refresh()
        return sorted(todo | damaged)

    def owned(self, indices) -> list[int]:
        return [i for i in indices if i % self.world_size == self.rank]

    def begin_shard(self, index: int):
        if self.format == "webdataset":
            from .tar_shards import TarShardWriter

            return TarShardWriter(self, index)
        return ShardWriter(self, index)

    def mark_complete(self, index: int, entry: dict) -> None:
        self.manifest["shards"][index] = entry
        if self.rank == 0:
            self._write_manifest(self.manifest)


def recover_manifest(root: Path, log=print) -> dict | None:
    """Rebuild a lost or damaged manifest from the shards' own metadata (each carries its run's
    settings and checksums). Every shard is re-read against its checksums; damaged ones are
    removed so they are written again. Returns the manifest written, or None without usable shards."""
    found = {}
    for path in sorted(root.iterdir()):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            header = shard_header(path)
            if isinstance(header, dict) and "num_trajectories" in header:
                found.setdefault(json.dumps({k: header.get(k) for k in RUN_KEYS}, sort_keys=True), []).append(
                    (int(match.group(1)), header))
    if not found:
        return None
    if len(found) > 1:
        raise StoreError(f"{root}: the manifest is missing or damaged and the shards come from {len(found)} "
                         "different runs; cannot tell which store this is. Keep the shards you want in a "
                         "folder of their own, or delete the folder to start over.")
    shards = next(iter(found.values()))
    try:
        manifest = new_manifest(shards[0][1])
        validate_manifest(manifest, root / MANIFEST)
    except (StoreError, KeyError, TypeError) as err:
        raise StoreError(f"{root}: the manifest is missing or damaged and the shards' own settings are unusable "
                         f"({err})") from None
    damaged_manifest = root / MANIFEST
    if damaged_manifest.exists():  # keep the damaged one for inspection: nothing is lost
        kept = root / f"{MANIFEST}.damaged-{int(time.time())}"
        os.replace(damaged_manifest, kept)
        log(f"{root}: kept the unreadable manifest as {kept.name}")
    header = run_header(manifest)
    good, bad = 0, []
    for index, _ in shards:
        if index >= len(manifest["shards"]):
            bad.append(shard_name(index, manifest["format"]))
            continue
        name = manifest["shards"][index]["name"]
        entry = (zarr_entry(root / name, header, index) if manifest["format"] == "zarr"
                 else _tar_entry(root / name, header, index))
        problems = [] if entry is None else TrajectoryStore(root, {**manifest, "shards": [
            entry if i == index else s for i, s in enumerate(manifest["shards"])]}).problems(full=True, only={name})
        if entry is None or problems:
            bad.append(name)
            continue
        manifest["shards"][index] = entry
        good += 1
    for name in bad:
        _remove(root / name)
        if name.endswith(".tar"):
            _remove(root / (name + ".json"))
    _write_json_atomic(root / MANIFEST, manifest)
    log(f"{root}: rebuilt {MANIFEST} from the shards: {good} verified complete, "
        f"{len(manifest['shards']) - good} still to write" + (f" (removed damaged: {', '.join(bad[:5])})" if bad else ""))
    return manifest


def _tar_entry(path: Path, header: dict, index: int):
    from .tar_shards import tar_entry

    return tar_entry(path, header, index)


# --------------------------------------------------------------------------------------- reader


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

    def fingerprint(self) -> str:
        return store_fingerprint(self.manifest)

    def open_shard(self, name: str):
        """A Zarr group, or for a WebDataset store a TarShard that reads like one."""
        if not SHARD_PATTERN.fullmatch(name):  # never a path outside the store
            raise StoreError(f"{self.root}: {name!r} is not a shard name")
        if self.format == "webdataset":
            from .tar_shards import TarShard

            entry = next(e for e in self.shards if e["name"] == name)
            return TarShard(self.root / name, array_specs(self.manifest, entry["trajectories"]))
        # Zarr v3 only: a v2 array could carry numcodecs' pickle filter, which would unpickle on read
        return zarr.open_group(str(self.root / name), mode="r", zarr_format=3, use_consolidated=True)

    def bytes_on_disk(self) -> int:
        return sum(_bytes(self.root / s["name"]) for s in self.shards
                   if s.get("status") == "complete" and (self.root / s["name"]).exists())

    def problems(self, full: bool = False, only: set[str] | None = None) -> list[Problem]:
        """Every way the shards (or the ``only`` ones) disagree with the manifest. Cheap checks:
        the shard exists, every array with its shape and dtype, every chunk file, and the bytes of
        each array (a tar's size). ``full`` instead re-reads all data against the checksums (and
        for NaN/inf), which catches everything the cheap checks do and bytes changed in place."""
        found = []
        for entry in self.shards:
            name = entry["name"]
            if only is not None and name not in only:
                continue
            path = self.root / name
            if entry.get("status") != "complete":
                found.append(Problem(name, None, "not finished (the run that wrote it stopped early)"))
                continue
            if not path.exists():
                found.append(Problem(name, None, "listed complete but missing on disk"))
                continue
            if self.format == "webdataset":
                size = path.stat().st_size if path.is_file() else None
                if size != entry.get("bytes"):
                    found.append(Problem(name, None, f"{size} bytes on disk, the manifest says {entry.get('bytes')} "
                                         "(truncated or changed)"))
                    continue
            try:
                group = self.open_shard(name)
            except Exception as err:  # noqa: BLE001 - zarr raises many kinds for broken metadata
                found.append(Problem(name, None, f"cannot open ({type(err).__name__}: {err})"))
                continue
            before = len(found)
            specs = array_specs(self.manifest, entry["trajectories"])
            present = set(group.array_keys())
            for array, (shape, dtype) in specs.items():
                if array not in present:
                    found.append(Problem(name, array, "missing"))
                elif tuple(group[array].shape) != tuple(shape) or np.dtype(group[array].dtype) != np.dtype(dtype):
                    found.append(Problem(name, array, f"{group[array].dtype} {group[array].shape}, the manifest "
                                         f"implies {dtype} {shape}"))
                elif self.format == "zarr" and not full:  # full: the contents themselves are checked
                    found.extend(self._chunk_problems(name, array, group[array], entry))
            if full and len(found) == before:
                found.extend(self._verify_contents(name, group, entry))
        return found

    def _chunk_problems(self, name: str, array: str, arr, entry: dict) -> list[Problem]:
        """Every chunk file present (all are written, even all-zero ones) and the array's bytes
        as recorded: a deleted or truncated chunk is caught without decoding anything."""
        files, size = _array_files(self.root / name / array)
        expected = math.prod(-(-s // c) for s, c in zip(arr.shape, arr.chunks))
        if files != expected:
            return [Problem(name, array, f"{files} of {expected} chunk files on disk (deleted or added)")]
        recorded = (entry.get("array_bytes") or {}).get(array)
        if recorded is not None and size != recorded:
            return [Problem(name, array, f"{size} bytes on disk, the manifest says {recorded} (truncated or changed)")]
        return []

    def _verify_contents(self, name: str, group, entry: dict) -> list[Problem]:
        """Re-read every array: name each one that is unreadable (truncated, corrupted), holds NaN
        or inf, or whose checksum differs from the manifest's."""
        from .tar_shards import TarShard

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
        """Every array as one dask array over all shards, chunked at the shards' own chunks.
        Latents are float16: reduce them in float32 (``x.astype("float32").mean()``)."""
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
    written like stage one writes (partial shards verified, then renamed into place; resumable).
    Every source shard is re-read against its checksums before it is copied, and a lossless copy
    is published only once its checksums equal the source's."""
    from tqdm.auto import tqdm

    from .locks import FolderLock

    if fmt not in FORMATS:
        raise StoreError(f"unknown store format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if bitround_keepbits is not None and not 0 <= bitround_keepbits <= 10:
        raise StoreError(f"bitround_keepbits must lie in [0, 10] (float16 has 10 mantissa bits; 0 = lossless), "
                         f"got {bitround_keepbits}")
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise StoreError(f"the target {target} must not be the source {source} or lie inside it")
    refuse_foreign_folder(target)
    with FolderLock(source, "convert (reading)", shared=True, create=False), FolderLock(target, "convert"):
        src = TrajectoryStore(source)
        src.check(full=False)
        header = run_header(src.manifest)
        header.update(format=fmt)
        keep = src.manifest["compressor"] if fmt in CODECS[src.manifest["compressor"]] else "auto"
        header["compressor"] = resolve_compressor(compressor if compressor is not None else keep, fmt)
        if bitround_keepbits is not None:
            header["bitround_keepbits"] = bitround_keepbits
        lossless = header.get("bitround_keepbits", 0) == src.manifest.get("bitround_keepbits", 0)
        writer = StoreWriter(target, header, log=log)
        pending = writer.pending()
        for index in tqdm(pending, desc=f"convert to {fmt}", unit="shard", disable=not progress):
            entry = src.shards[index]
            damaged = src.problems(full=True, only={entry["name"]})
            if damaged:
                raise StoreError(f"source shard {source / entry['name']} is damaged ({'; '.join(map(str, damaged[:3]))}); "
                                 f"nothing of it was converted. Repair the source first. {REPAIR}")
            group = src.open_shard(entry["name"])
            shard = writer.begin_shard(index)
            rows = src.manifest["chunk_trajectories"] if src.format == "zarr" else entry["trajectories"]
            for sl in _iter_slices(entry["trajectories"], rows):
                try:
                    arrays = {name: group[name][sl] for name in group.array_keys()}
                except Exception as err:  # noqa: BLE001 - a chunk damaged since the check
                    raise StoreError(f"{source / entry['name']}: cannot read trajectories {sl.start}-{sl.stop} "
                                     f"({type(err).__name__}: {err}). {REPAIR}") from None
                shard.write(sl.start, arrays)
            shard.finish(expected_checksums=entry.get("checksums") if lossless else None)
        log(f"{target}: {len(pending)} shard(s) converted to {fmt}" + ("" if pending else " (already complete)"))
        return {"converted_shards": len(pending), "shards": writer.num_shards}
