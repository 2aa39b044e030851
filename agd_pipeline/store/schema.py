"""What a store holds, whatever its format: markers and names, the arrays of a shard (shapes, dtypes,
dimension names), and the checksums every format computes the same way."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import command_line

STORE_TYPE = "agd-trajectory-store"  # the manifest's marker: a folder holding it is one of ours
SCHEMA_VERSION = 4  # 3: store type marker, run settings in every shard, dimension names, .npz tar members;
# 4: chunks sized in bytes (chunk_bytes replaces chunk_trajectories), Zarr arrays sharded into few files.
# Format note, still 4 (optional additions; readers accept shards with and without them, and the version
# is a run setting, so a bump would refuse to resume every existing store): Zarr shards hold the derived
# arrays of DERIVED_ARRAYS and a CF "coordinates" attribute, a finished Zarr root holds consolidated
# metadata, and a tar sample has a <key>.json member. None of them is in a checksum.
MANIFEST = "manifest.json"
PARTIAL = ".partial"
SHARD_INDEX = r"shard-(\d{6})"  # a shard's name: this, a dot, and its format's extension
# Settings that must agree between a store on disk and a run that wants to resume it.
RUN_KEYS = ("schema_version", "base_model", "sampler", "guidance", "seed", "conditioning", "classes", "prompts",
            "negative_prompt", "condition_arrays", "num_trajectories", "shard_size", "latent_shape",
            "output_channels", "record_branches", "compressor", "chunk_bytes", "format",
            "bitround_keepbits", "source")
# Run keys that older stores lack (absent means the default: a CFG trajectory store). The
# fingerprint leaves them out while absent, so it stays what it was for every store written before.
OPTIONAL_RUN_KEYS = ("source",)

def repair() -> str:
    """How to repair a damaged store, naming the generate command as the user runs it."""
    return (f"Repair: re-run `{command_line('generate')} --verify full` with the same settings; it rewrites "
            "only the shards that are missing, unfinished or damaged.")


def run_header(manifest: dict) -> dict:
    """The run settings of a manifest (everything but the marker and the shard list)."""
    return {k: v for k, v in manifest.items() if k not in ("store_type", "shards")}


def same_run(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in RUN_KEYS)


def shard_range(header: dict, index: int) -> tuple[int, int]:
    """The trajectories [start, stop) of shard ``index``."""
    size = header["shard_size"]
    return index * size, min(header["num_trajectories"], (index + 1) * size)


def row_slices(length: int, step: int):
    """Slices of ``step`` rows (the last one shorter) covering ``length`` rows."""
    for start in range(0, length, max(1, step)):
        yield slice(start, min(length, start + step))


# ------------------------------------------------------------------------------ array schema

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


# ------------------------------------------------------------------------------ chunk layout

CHUNK_BYTES = 4 << 20  # default target of one chunk: a few MB reads at disk speed, decodes in a few ms
FILE_BYTES = 256 << 20  # at most this much of one array per file (and held by a Zarr writer at once)
SMALL_ROW_BYTES = 4096  # per-trajectory arrays with rows up to this size are one chunk per shard
PER_STEP_ARRAYS = ("model_input", "guided_output", "cond_output", "uncond_output", "timesteps")


def _row_bytes(shape, dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize


def unit_rows(header: dict) -> int:
    """Trajectories per chunk of the per-step latent arrays: the unit the loader reads at once,
    as many whole trajectories as fit in ``chunk_bytes`` (at least one)."""
    specs = array_specs(header, 1)
    row = max(_row_bytes(*specs[name]) for name in PER_STEP_ARRAYS if name in specs and name != "timesteps")
    return max(1, min(header["shard_size"], header["chunk_bytes"] // row))


READ_BYTES = 32 << 20  # the loader's read unit: whole chunks of every latent array, about this much


def read_rows(header: dict) -> int:
    """Trajectories the loader reads at once: whole chunk rows, about READ_BYTES of latents in all
    (one zarr call reads a unit's chunks concurrently; one call per chunk would not)."""
    specs = array_specs(header, 1)
    trajectory = sum(_row_bytes(*specs[name]) for name in PER_STEP_ARRAYS if name in specs and name != "timesteps")
    rows = unit_rows(header)
    return min(header["shard_size"], rows * max(1, READ_BYTES // (rows * trajectory)))


def chunk_layout(header: dict, n: int) -> dict[str, tuple[tuple, tuple | None]]:
    """Name -> (chunk shape, Zarr shard shape or None) of every array of a shard of ``n``
    trajectories, chosen from the data so no setting has to be tuned:

    - per-step latent arrays and per-trajectory arrays with large rows (prompt embeddings, the
      final sample) are chunked by ``unit_rows`` trajectories (all their steps; a trajectory larger
      than ``chunk_bytes`` is split along its steps), so the loader's unit is one chunk row of each;
    - small per-trajectory arrays (w, seed, class, timesteps) are one chunk for the whole shard;
    - an array of more than one chunk is stored in files of up to ``FILE_BYTES`` (zarr v3 sharding:
      a chunk is a byte range inside one file), so a shard is a handful of files.

    Computed from the shard size rather than ``n``, so every shard of a store shares its chunks."""
    size, rows = header["shard_size"], unit_rows(header)
    layout = {}
    for name, (shape, dtype) in array_specs(header, n).items():
        row = _row_bytes(shape, dtype)
        if name == "timesteps" or (name not in PER_STEP_ARRAYS and row <= SMALL_ROW_BYTES):
            layout[name] = ((max(1, min(size, n)), *shape[1:]), None)
            continue
        inner = [min(rows, n), *shape[1:]]
        if name in PER_STEP_ARRAYS and rows == 1 and row > header["chunk_bytes"]:
            steps = shape[1]
            pieces = -(-row // header["chunk_bytes"])
            inner[1] = -(-steps // min(steps, pieces))
        inner = tuple(inner)
        per_file = max(1, FILE_BYTES // (inner[0] * row))  # blocks of inner[0] whole trajectories
        outer_rows = min(-(-n // inner[0]), per_file) * inner[0]
        outer = (outer_rows, *(-(-d // c) * c for d, c in zip(shape[1:], inner[1:])))
        layout[name] = (inner, None if outer == inner else outer)
    return layout


# Names of each array's axes, so xarray and other tools read a shard without our code.
_CONDITION_DIMS = {"prompt_embeds": ("token", "text_embedding"), "pooled_prompt_embeds": ("pooled_embedding",),
                   "add_time_ids": ("time_id",), "negative_prompt_embeds": ("token", "text_embedding"),
                   "negative_pooled_prompt_embeds": ("pooled_embedding",)}


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
    numbered = tuple(f"{name}_{i}" for i in range(1, ndim))
    rest = _CONDITION_DIMS.get(name, numbered)
    return ("trajectory", *rest)[:ndim] if len(rest) == ndim - 1 else ("trajectory", *numbered)


# ------------------------------------------------------------------ metadata for standard tools

# Arrays a Zarr shard holds for xarray and other tools besides the data (added in the schema 4
# format, optional: shards written before lack them, and every reader of ours ignores them).
# They are derived from the data and the run's settings (``derived_arrays``), so they are outside
# the shard's checksums: the checksums, and the store's fingerprint, are those of the data alone.
# ``trajectory`` (global trajectory indices) and ``step`` (0..num_steps-1) are the index
# coordinates of their dimensions; ``prompt`` and ``negative_prompt`` (text stores) the text of
# each trajectory's prompts, which otherwise only the manifest's prompt list holds.
DERIVED_ARRAYS = ("trajectory", "step", "prompt", "negative_prompt")
# Per-trajectory arrays that label the data rather than being it: the group's CF ``coordinates``
# attribute names them, so xarray opens them as (non-index) coordinates.
LABEL_ARRAYS = ("trajectory_index", "guidance_scale", "seed", "timesteps", "class_label", "prompt_index",
                "negative_prompt_index", "prompt", "negative_prompt")


def prompt_texts(header: dict, arrays: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """For a text store, each trajectory's prompt and negative prompt, from its ``prompt_index``
    (and ``negative_prompt_index``, -1 being the pipeline's default: the empty prompt) in
    ``arrays``; nothing for a class store."""
    if "prompt_index" not in arrays:
        return {}
    prompts, indices = header.get("prompts") or [], np.asarray(arrays["prompt_index"]).reshape(-1)
    out = {"prompt": [prompts[int(i)] for i in indices]}
    negatives = (header.get("guidance") or {}).get("negative_prompts")
    if negatives and "negative_prompt_index" in arrays:
        chosen = np.asarray(arrays["negative_prompt_index"]).reshape(-1)
        out["negative_prompt"] = [negatives[int(i)] if i >= 0 else "" for i in chosen]
    else:
        out["negative_prompt"] = [header.get("negative_prompt") or ""] * len(indices)
    return out


def sample_metadata(header: dict, arrays: dict[str, np.ndarray]) -> dict:
    """What a person or tool needs to know of one trajectory without our code (a WebDataset
    sample's ``json`` member): its index, seed, w, condition (class, or prompt and negative
    prompt with their indices) and the timestep of each step. ``arrays``: that trajectory's
    arrays as stored (scalars and per-step rows)."""
    meta = {"trajectory_index": int(arrays["trajectory_index"]), "seed": int(arrays["seed"]),
            "guidance_scale": float(arrays["guidance_scale"])}
    for name in ("class_label", "prompt_index", "negative_prompt_index"):
        if name in arrays:
            meta[name] = int(arrays[name])
    meta.update({name: texts[0] for name, texts in prompt_texts(
        header, {k: np.reshape(v, (1,)) for k, v in arrays.items() if k.endswith("prompt_index")}).items()})
    meta["timesteps"] = [float(t) for t in np.asarray(arrays["timesteps"]).reshape(-1)]
    return meta


# ---------------------------------------------------------------------------------- checksums


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
    for sl in row_slices(arr.shape[0], arr.chunks[0]):
        block = np.ascontiguousarray(arr[sl])
        digest.update(block.tobytes())
        if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
            finite = False
    return digest.hexdigest(), finite


# ------------------------------------------------------------------------- read-time digests

# A shard's entry also records, for every array the loader reads unit by unit, a digest of each
# unit's decoded values (``unit_checksums``: array -> one digest per unit of ``unit_rows``
# trajectories). The loader checks every unit against it as it reads it, and an array it reads
# whole against the array's checksum, so data changed on disk never reaches training, whatever
# check ran before (verify=cheap, or a record of the verification cache). Entries written before
# this lack both fields: their whole-read arrays are still checked, their unit-read arrays not.
UNIT_CHECKSUMS = "unit_checksums"
UNIT_ROWS = "unit_rows"


def read_by_unit(name: str, shape, dtype) -> bool:
    """Whether the loader reads array ``name`` unit by unit (model inputs, targets, large rows such
    as prompt embeddings) rather than whole, once per shard (w, class, timesteps, ...)."""
    return name in ("model_input", "guided_output") or _row_bytes(shape, dtype) > SMALL_ROW_BYTES


def unit_checksum(block: np.ndarray) -> str:
    """Digest of one unit of an array as decoded: dtype, shape and values (128 bits, hex)."""
    block = np.ascontiguousarray(block)
    digest = hashlib.sha256(f"{block.dtype}|{block.shape}".encode())
    digest.update(block.reshape(-1).view(np.uint8))
    return digest.hexdigest()[:32]


def whole_checksum(value: np.ndarray) -> str:
    """``array_checksum`` of an array already in memory (what the loader reads whole)."""
    value = np.ascontiguousarray(value)
    digest = hashlib.sha256(f"{value.dtype}|{value.shape}".encode())
    digest.update(value.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def unit_checksums(arr, units: list[slice], check_finite: bool = False) -> tuple[str, list[str], bool]:
    """Re-read an array unit by unit: (its checksum, as ``array_checksum``; the digest of each
    unit; whether every value is finite, if asked). One pass over the data."""
    digest, per_unit, finite = hashlib.sha256(f"{arr.dtype}|{arr.shape}".encode()), [], True
    for rows in units:
        block = np.ascontiguousarray(arr[rows])
        digest.update(block.reshape(-1).view(np.uint8))
        per_unit.append(unit_checksum(block))
        if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
            finite = False
    return digest.hexdigest(), per_unit, finite


def stored_checksums(shard, names, units: list[slice]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Re-read the arrays ``names`` of an open shard: (checksum of each, as ``array_checksum``;
    the digest of each read unit of the arrays read by unit). One pass over the data."""
    sums, per_unit = {}, {}
    for name in names:
        arr = shard[name]
        if read_by_unit(name, arr.shape, arr.dtype):
            sums[name], per_unit[name], _ = unit_checksums(arr, units)
        else:
            sums[name] = array_checksum(arr)[0]
    return sums, per_unit


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
    run = {k: manifest.get(k) for k in RUN_KEYS if k in manifest or k not in OPTIONAL_RUN_KEYS}
    shards = [(s["name"], s.get("checksum")) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([run, shards], sort_keys=True, default=str).encode()).hexdigest()[:32]
