"""The manifest: a typed view of it, validation, reading, new manifests, and rebuilding a lost one
from the shards. The file on disk is plain JSON (see the README's "The trajectory store"), plus the
journal of shards committed since it was written (manifest.log, journal.py)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ..errors import StoreError, command_line
from .files import write_json_atomic
from .formats import (FORMATS, SHARD_PATTERN, ShardFormat, codec_available, format_of_shard, get_format,
                      shard_name)
from .schema import (ARRAY_DTYPES, MANIFEST, RUN_KEYS, SCHEMA_VERSION, STORE_TYPE, UNIT_CHECKSUMS, UNIT_ROWS,
                     condition_arrays, run_header, store_fingerprint)
from .journal import MANIFEST_LOG, log_path, replay
from .verify import find_problems


class Manifest(dict):
    """A store's manifest: the JSON object as on disk (a dict, so it is written back unchanged),
    with typed read-only properties, so callers need not know its nesting."""

    @property
    def format(self) -> str:
        return self.get("format", "zarr")

    @property
    def shard_format(self) -> ShardFormat:
        return get_format(self.format)

    @property
    def compressor(self) -> str:
        return self["compressor"]

    @property
    def bitround_keepbits(self) -> int:
        return self.get("bitround_keepbits", 0)

    @property
    def num_trajectories(self) -> int:
        return self["num_trajectories"]

    @property
    def shard_size(self) -> int:
        return self["shard_size"]

    @property
    def chunk_bytes(self) -> int:
        return self["chunk_bytes"]

    @property
    def sampler(self) -> dict:
        return self["sampler"]

    @property
    def num_steps(self) -> int:
        return self["sampler"]["num_steps"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self["latent_shape"])

    @property
    def output_channels(self) -> int:
        return self["output_channels"]

    @property
    def record_branches(self) -> bool:
        return self["record_branches"]

    @property
    def guidance(self) -> dict:
        return self["guidance"]

    @property
    def guidance_min(self) -> float:
        return self["guidance"]["min"]

    @property
    def guidance_max(self) -> float:
        return self["guidance"]["max"]

    @property
    def base_model(self) -> dict:
        return self["base_model"]

    @property
    def negative_prompt(self) -> str:
        return self.get("negative_prompt", "")

    @property
    def condition_arrays(self) -> dict[str, dict]:
        """Per-trajectory condition arrays: name -> {"dtype", "shape" (without the trajectory axis)}."""
        return condition_arrays(self)

    @property
    def shards(self) -> list[dict]:
        return self["shards"]

    def shard(self, name: str) -> dict | None:
        """The entry of the shard named ``name``, or None."""
        return next((entry for entry in self["shards"] if entry["name"] == name), None)

    def run_header(self) -> dict:
        return run_header(self)

    def fingerprint(self) -> str:
        return store_fingerprint(self)


def as_manifest(manifest: dict) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest(manifest)


# ---------------------------------------------------------------------------------- validation


def _fail(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}. The manifest is damaged or was edited; "
                      f"`{command_line('generate')} --rebuild-manifest --out-dir {path.parent}` rebuilds it from "
                      "the shards")


def _check_marker(manifest, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise _fail(path, f"holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("store_type") != STORE_TYPE:
        if "shards" in manifest and "schema_version" in manifest:
            raise StoreError(f"{path}: store schema version {manifest.get('schema_version')!r} (an older release), "
                             f"this tool reads {SCHEMA_VERSION}; write the store again with "
                             f"`{command_line('generate')}` into a new out_dir (or delete this one yourself first)")
        raise StoreError(f"{path}: not a trajectory store manifest (no store_type {STORE_TYPE!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema version {manifest.get('schema_version')!r}, this tool reads "
                         f"{SCHEMA_VERSION}; re-run `{command_line('generate')}` into a new out_dir")


def validate_manifest(manifest, path: Path) -> dict:
    """Check a manifest's structure before anything trusts it: types, ranges, and shard names that
    are exactly ``shard-NNNNNN.<extension>`` in order (so no entry can point outside the store)."""
    _check_marker(manifest, path)

    def need(key, kind, ok=lambda v: True, what=""):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not ok(value):
            raise _fail(path, f"'{key}' is {value!r}, expected {what or kind.__name__}")
        return value

    # ---- run settings
    def positive(value) -> bool:
        return value > 0

    need("format", str, lambda v: v in FORMATS, f"one of {tuple(FORMATS)}")
    need("compressor", str, lambda v: codec_available(v, manifest["format"]), "a codec of the format")
    total = need("num_trajectories", int, positive, "a positive integer")
    size = need("shard_size", int, positive, "a positive integer")
    need("chunk_bytes", int, positive, "a positive integer (bytes)")
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

    # ---- shard list
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
        if UNIT_CHECKSUMS in entry or UNIT_ROWS in entry:  # absent in entries written before them
            rows, units = entry.get(UNIT_ROWS), entry.get(UNIT_CHECKSUMS)
            count = -(-entry["trajectories"] // rows) if isinstance(rows, int) and rows > 0 else None
            if count is None or isinstance(rows, bool) or not isinstance(units, dict) or not all(
                    isinstance(v, list) and len(v) == count and all(isinstance(d, str) for d in v)
                    for v in units.values()):
                raise _fail(path, f"shard {expected} has malformed {UNIT_ROWS}/{UNIT_CHECKSUMS}")
    return manifest


# ------------------------------------------------------------------------------ read and create


def read_manifest(root: str | os.PathLike) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a trajectory store folder")
    if not path.exists():
        if root.is_dir() and any(SHARD_PATTERN.fullmatch(p.name) for p in root.iterdir()):
            hint = (f"the shards are there: `{command_line('generate')} --rebuild-manifest --out-dir {root}` "
                    "rebuilds it from them")
        elif log_path(root).exists():
            hint = (f"only its {MANIFEST_LOG} is there, no shards: run `{command_line('generate')}` to write the "
                    "store again")
        elif root.exists():
            hint = "it is not a trajectory store, or stage one was never started there"
        else:
            hint = f"run `{command_line('generate')}` to write it"
        raise StoreError(f"no trajectory store at {root}: {MANIFEST} is missing ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"is not valid JSON ({err})") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read ({err.strerror or err})") from None
    validate_manifest(manifest, path)
    if log_path(root).exists():  # the shards committed since the snapshot (journal.py)
        manifest = validate_manifest(replay(root, manifest, _fail), path)
    return Manifest(manifest)


def new_manifest(header: dict) -> Manifest:
    """The manifest of a store not yet written: the run's settings, every shard pending."""
    total, size = header["num_trajectories"], header["shard_size"]
    fmt = get_format(header["format"])
    shards = []
    for i in range(-(-total // size)):
        start, stop = i * size, min(total, (i + 1) * size)
        shards.append({"name": fmt.shard_name(i), "first_trajectory": start,
                       "trajectories": stop - start, "status": "pending"})
    return Manifest({"store_type": STORE_TYPE, "schema_version": SCHEMA_VERSION, **run_header(header),
                     "shards": shards})


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


# ------------------------------------------------------------------------------------ recovery


def damaged_copy(root: Path, stamp: int, suffix: str) -> Path:
    """Where recovery keeps a damaged manifest (``json``) or journal (``log``): next to the store
    folder, ``<store>.manifest-damaged-<unix time>.<suffix>`` (numbered if that name is taken)."""
    root = Path(os.path.abspath(root))
    kept = root.with_name(f"{root.name}.manifest-damaged-{stamp}.{suffix}")
    number = 1
    while kept.exists():
        number += 1
        kept = root.with_name(f"{root.name}.manifest-damaged-{stamp}-{number}.{suffix}")
    return kept


def recover_manifest(root: Path, log=print) -> Manifest | None:
    """Rebuild a lost or damaged manifest from the shards' own metadata (each carries its run's
    settings and checksums). Every shard is re-read against its checksums; damaged ones are
    removed so they are written again. Returns the manifest written, or None without usable shards."""
    runs = _shards_by_run(root)
    if not runs:
        return None
    if len(runs) > 1:
        raise StoreError(f"{root}: the manifest is missing or damaged and the shards come from {len(runs)} "
                         "different runs; cannot tell which store this is. Keep the shards you want in a "
                         "folder of their own, or delete the folder to start over.")
    shards = next(iter(runs.values()))
    try:
        manifest = new_manifest(shards[0][1])
        validate_manifest(manifest, root / MANIFEST)
    except (StoreError, KeyError, TypeError) as err:
        raise StoreError(f"{root}: the manifest is missing or damaged and the shards' own settings are unusable "
                         f"({err})") from None
    # the damaged manifest is kept for inspection (nothing is lost), and its journal with it (never
    # replayed onto the new one): both NEXT TO the store, so a repaired store holds exactly the files
    # of one never damaged (a DVC output's hash is the same; a store's parent folder is no output)
    stamp = int(time.time())
    for path, kept, what in ((root / MANIFEST, damaged_copy(root, stamp, "json"), "the unreadable manifest"),
                             (log_path(root), damaged_copy(root, stamp, "log"), "the manifest's journal")):
        if path.exists():
            try:
                os.replace(path, kept)
            except OSError as err:
                raise StoreError(f"{path}: damaged; cannot move it out of the store to {kept} "
                                 f"({err.strerror or err}); move it away yourself, then run again") from None
            log(f"{root}: kept {what} as {kept}")

    # ---- every shard of the run re-read against its own checksums; damaged ones removed
    fmt, header = manifest.shard_format, manifest.run_header()
    good, bad = 0, []
    for index, _ in shards:
        if index >= len(manifest.shards):
            bad.append(fmt.shard_name(index))
            continue
        name = manifest.shards[index]["name"]
        entry = fmt.shard_entry(root / name, header, index)
        problems = [] if entry is None else find_problems(root, Manifest({**manifest, "shards": [
            entry if i == index else s for i, s in enumerate(manifest.shards)]}), full=True, only={name})
        if entry is None or problems:
            bad.append(name)
            continue
        manifest.shards[index] = entry
        good += 1
    for name in bad:
        fmt.remove_shard(root / name)
    write_json_atomic(root / MANIFEST, manifest)
    log(f"{root}: rebuilt {MANIFEST} from the shards: {good} verified complete, "
        f"{len(manifest.shards) - good} still to write" + (f" (removed damaged: {', '.join(bad[:5])})" if bad else ""))
    return manifest


def _shards_by_run(root: Path) -> dict[str, list[tuple[int, dict]]]:
    """The shards in a folder that carry readable run settings: (index, settings), grouped by run."""
    found = {}
    for path in sorted(root.iterdir()):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            header = format_of_shard(path.name).shard_header(path)
            if isinstance(header, dict) and "num_trajectories" in header:
                found.setdefault(json.dumps({k: header.get(k) for k in RUN_KEYS}, sort_keys=True), []).append(
                    (int(match.group(1)), header))
    return found

