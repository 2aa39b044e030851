"""The Zarr format: one self-describing Zarr v3 group per shard, the store root a group of them.

A shard's arrays are chunked as ``schema.chunk_layout`` says (chunks of about ``chunk_bytes``,
sized from the data); an array of several chunks is a zarr v3 *sharded* array, its chunks byte
ranges inside one file (or a few), so a shard is a handful of files. The loader reads one chunk row
(a block of whole trajectories) at a time. The group's attributes carry the shard's checksums and
the settings of its run, so a lost manifest is rebuilt from the shards.

Standard tools read a shard without our code: every array carries its ``dimension_names``, the
shard holds index coordinates ``trajectory`` and ``step`` and (text stores) the ``prompt`` and
``negative_prompt`` text of each trajectory, and the group's CF ``coordinates`` attribute makes w,
seed, timesteps and the condition coordinates, so ``xr.open_zarr(shard)`` gives a labelled Dataset.
Once every shard is complete the root's metadata is consolidated (``seal_root``): zarr and
``xr.open_datatree(root, engine="zarr")`` then read the hierarchy from the root's zarr.json instead
of listing the folder, whose manifest.json and lock file are no Zarr nodes.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs.numcodecs

from ...errors import StoreError
from ..files import folder_bytes, write_json_atomic
from ..schema import (LABEL_ARRAYS, LATENT_ARRAYS, MANIFEST, SCHEMA_VERSION, SHARD_INDEX, STORE_TYPE, UNIT_CHECKSUMS,
                      UNIT_ROWS, ArrayHasher, array_specs, chunk_layout, combined_checksum, dimension_names,
                      prompt_texts, row_slices, run_header, same_run, shard_range, read_rows, stored_checksums)
from .base import ShardFormat, ShardWriter, check_before_publish

# We write consolidated metadata on purpose (one read opens a shard); zarr warns that v3 has no spec for it.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", module="zarr")
# BitRound (the lossy option) is a numcodecs codec, which zarr flags as outside the v3 specification.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

ARRAY_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# zarr's local store writes each metadata file as zarr.<uuid4 hex>.partial, then renames it: a
# writer in progress (or one killed mid-write) leaves these next to the metadata
ZARR_TEMPORARY = re.compile(r"zarr\.[0-9a-f]{32}\.partial")


def open_group(path: Path):
    # Zarr v3 only: a v2 array could carry numcodecs' pickle filter, which would unpickle on read
    return zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=True)


class ZarrShard:
    """Read side of one Zarr shard (a ShardReader): its read-only group, whose arrays ``shard[name]``
    are Zarr arrays. ``prepare`` has nothing to do (opening read the consolidated metadata); any
    other attribute is the group's (``attrs``, ``members()``, ...), for callers that want Zarr's API."""

    def __init__(self, group):
        self.group = group

    def array_keys(self):
        return self.group.array_keys()

    def __getitem__(self, name: str):
        return self.group[name]

    def prepare(self) -> None:
        return None

    @property
    def attrs(self):
        return self.group.attrs

    def __getattr__(self, name: str):
        if name == "group" or name.startswith("__"):  # not yet set (while unpickling), or a protocol of Python's
            raise AttributeError(name)
        return getattr(self.group, name)


def array_files(folder: Path) -> tuple[int, int]:
    """(chunk files, bytes of every file) of one Zarr array folder."""
    files = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            files += path.name != "zarr.json" or path.parent != folder
    return files, size


class ZarrFormat(ShardFormat):
    name = "zarr"
    extension = "zarr"
    # any codec: a factory of Zarr v3 compressors
    codecs = {
        "blosc-zstd": lambda: [zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
        "zstd": lambda: [zarr.codecs.ZstdCodec(level=5)],
        "deflate": lambda: [zarr.codecs.GzipCodec(level=6)],
        "none": lambda: None,
    }
    default_compressor = "blosc-zstd"
    reuse_open_shards = True  # opening reads metadata only; the data is read by chunk rows

    def prepare_root(self, root: Path) -> None:
        """The store root opens as a Zarr group whose children are the shards. Written plain (not
        consolidated) whenever shards are to be written, so no stale list of shards outlives them."""
        write_json_atomic(root / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {
            "store_type": STORE_TYPE, "schema_version": SCHEMA_VERSION, "manifest": MANIFEST}})

    def seal_root(self, root: Path) -> None:
        """Once every shard is complete: consolidate the metadata of the whole hierarchy into the
        root's zarr.json, so zarr and xarray open the root (``xr.open_datatree(root, engine="zarr")``)
        without listing its folder, where manifest.json, manifest.log and the lock file would each
        raise zarr's "not recognized as a component of a Zarr hierarchy" warning. Only the root's
        zarr.json is written; the shards' files are untouched."""
        self.prepare_root(root)
        for stale in root.glob("zarr.*.partial"):  # left by a run killed while consolidating (we hold the lock)
            if ZARR_TEMPORARY.fullmatch(stale.name) and stale.is_file():
                stale.unlink(missing_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # this one listing does meet our non-Zarr files
            zarr.consolidate_metadata(str(root), zarr_format=3)

    def root_sealed(self, root: Path) -> bool:
        """The root's zarr.json holds consolidated metadata (``prepare_root`` writes it without).
        A complete store written before sealing existed is sealed by the next run on it."""
        try:
            return "consolidated_metadata" in json.loads((root / "zarr.json").read_text())
        except (OSError, ValueError, TypeError):
            return False

    def begin_shard(self, store, index: int) -> ZarrShardWriter:
        return ZarrShardWriter(store, index, self)

    def shard_entry(self, final: Path, header: dict, index: int) -> dict | None:
        if not final.is_dir():
            return None
        try:
            attrs = dict(open_group(final).attrs)
        except Exception:  # noqa: BLE001 - unreadable: not complete
            return None
        start, stop = shard_range(header, index)
        n = stop - start
        stored_header = attrs.get("store_header")
        if "checksum" not in attrs or attrs.get("trajectories") != n or not isinstance(stored_header, dict) \
                or not same_run(stored_header, header):
            return None
        entry = {"name": final.name, "first_trajectory": start, "trajectories": n, "status": "complete",
                 "checksum": attrs["checksum"], "checksums": attrs.get("checksums", {}), "bytes": folder_bytes(final),
                 "array_bytes": {name: array_files(final / name)[1] for name in attrs.get("checksums", {})}}
        if UNIT_CHECKSUMS in attrs:  # shards written before read-time digests lack them
            entry.update({UNIT_ROWS: attrs.get(UNIT_ROWS), UNIT_CHECKSUMS: attrs[UNIT_CHECKSUMS]})
        return entry

    def shard_header(self, path: Path) -> dict | None:
        try:
            return dict(open_group(path).attrs).get("store_header")
        except Exception:  # noqa: BLE001 - unreadable metadata
            return None

    def open_shard(self, path: Path, specs: dict[str, tuple[tuple, str]]) -> ZarrShard:
        return ZarrShard(open_group(path))

    def dask_array(self, array):
        import dask.array as da

        return da.from_zarr(array, chunks=array.chunks)

    def read_units(self, manifest, entry: dict) -> list[slice]:
        # the units whose digests were recorded (the same as read_rows, unless that rule changed since)
        return list(row_slices(entry["trajectories"], entry.get(UNIT_ROWS) or read_rows(manifest)))

    def array_problems(self, path: Path, name: str, array, entry: dict) -> list[str]:
        """Every chunk (or shard) file present (all are written, even all-zero ones) and the
        array's bytes as recorded: a deleted or truncated file is caught without decoding anything."""
        files, size = array_files(path / name)
        expected = math.prod(-(-s // c) for s, c in zip(array.shape, array.shards or array.chunks))
        if files != expected:
            return [f"{files} of {expected} chunk files on disk (deleted or added)"]
        recorded = (entry.get("array_bytes") or {}).get(name)
        if recorded is not None and size != recorded:
            return [f"{size} bytes on disk, the manifest says {recorded} (truncated or changed)"]
        return []

    def owns(self, entry: Path) -> bool:
        """The root group's zarr.json (or its temporary, while another writer is creating the
        store; or zarr's own, while it consolidates the root), or a shard folder (or its partial)
        holding only zarr.json and array folders of ours."""
        if entry.name in ("zarr.json", "zarr.json.tmp") and entry.is_file():
            return True
        if ZARR_TEMPORARY.fullmatch(entry.name):  # may be renamed away since it was listed
            return not entry.is_dir()
        if not entry.is_dir() or entry.is_symlink() \
                or not re.fullmatch(rf"{SHARD_INDEX}\.{self.extension}(\.partial)?", entry.name):
            return False
        def metadata(child: Path) -> bool:
            # zarr writes metadata from worker threads: a temporary listed a moment ago may already be
            # renamed away, so its name alone makes it ours (unless it is a folder)
            if ZARR_TEMPORARY.fullmatch(child.name):
                return not child.is_dir()
            return child.name == "zarr.json" and child.is_file()

        for child in entry.iterdir():
            if metadata(child):
                continue
            if not child.is_dir() or child.is_symlink() or not ARRAY_NAME.fullmatch(child.name):
                return False
            if not all(metadata(p) or (p.name == "c" and p.is_dir()) for p in child.iterdir()):
                return False
        return True

    def shard_files(self, path: Path) -> list[Path]:
        """Every file below the shard's folder (metadata and chunk files), in name order. scandir's
        entry types, not a stat per folder: at thousands of shards this runs at every train start."""
        files, folders = [], [os.fspath(path)]
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    (folders if entry.is_dir(follow_symlinks=False) else files).append(entry.path)
        return [Path(name) for name in sorted(files)]


class ZarrShardWriter(ShardWriter):
    """Writes one Zarr shard under a temporary name; ``finish`` verifies and publishes it.

    Rows written in order are held until they fill a whole file of their array (a zarr shard, at
    most FILE_BYTES) and written then: a partial write into a sharded array would rewrite the whole
    file each time. Rows written out of order go straight to the array."""

    def __init__(self, store, index: int, fmt: ZarrFormat):
        super().__init__(store, index, fmt)
        self.format = fmt
        header = store.header
        n = self.stop - self.start
        self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=3,
                                     attributes={"schema_version": SCHEMA_VERSION, "shard": index,
                                                 "first_trajectory": self.start})
        compressors = fmt.codec(header["compressor"])()
        keepbits = header.get("bitround_keepbits", 0)
        self.dtypes, self.arrays, self.file_rows, self.held = {}, {}, {}, {}
        specs = array_specs(header, n)
        layout = chunk_layout(header, n)
        self.hasher = ArrayHasher(specs, keepbits)
        self.hashed = 0  # trajectories hashed in order so far (None: written out of order, re-read)
        for name, (shape, dtype) in specs.items():
            lossy = keepbits and name in LATENT_ARRAYS
            filters = [zarr.codecs.numcodecs.BitRound(keepbits=keepbits)] if lossy else None
            chunks, shards = layout[name]
            # every chunk is written, even all-zero ones, so a missing chunk file is always damage;
            # writes go through the array created here (reopened by name it would forget that setting)
            self.arrays[name] = self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                                        compressors=compressors, filters=filters, fill_value=0,
                                                        dimension_names=dimension_names(header, name, len(shape)),
                                                        config={"write_empty_chunks": True})
            self.dtypes[name] = dtype
            self.file_rows[name] = (shards or chunks)[0]
            self.held[name] = []  # (first row, values) not yet written
        # index coordinates for xarray (derived, outside the checksums: see schema.DERIVED_ARRAYS)
        self.group.create_array("trajectory", data=np.arange(self.start, self.stop, dtype=np.int64),
                                chunks=(max(1, n),), dimension_names=("trajectory",))
        steps = header["sampler"]["num_steps"]
        self.group.create_array("step", data=np.arange(steps, dtype=np.int64), chunks=(max(1, steps),),
                                dimension_names=("step",))

    def _flush(self, name: str, whole_files_only: bool) -> None:
        """Write the held rows of ``name``: those that fill whole files (or all of them)."""
        held = self.held[name]
        if not held:
            return
        first = held[0][0]
        end = held[-1][0] + len(held[-1][1])
        stop = end if not whole_files_only else max(first, end - (end % self.file_rows[name]))
        if end == self.stop - self.start:
            stop = end  # the shard's last rows complete its last file
        if stop <= first:
            return
        values = np.concatenate([v for _, v in held]) if len(held) > 1 else held[0][1]
        self.arrays[name][first:stop] = values[:stop - first]
        self.held[name] = [(stop, values[stop - first:])] if stop < end else []

    def write(self, offset: int, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        in_order = self.hashed is not None and offset == self.hashed and set(arrays) == set(self.dtypes)
        for name, value in arrays.items():
            value = np.asarray(value, dtype=self.dtypes[name])
            if in_order:
                self.hasher.update(name, self.hasher.stored(name, value))
                self.held[name].append((offset, np.array(value, copy=True)))
                self._flush(name, whole_files_only=True)
            else:
                self._flush(name, whole_files_only=False)
                self.arrays[name][offset:offset + n] = value
        self.hashed = self.hashed + n if in_order else None
        self.written += n

    def finish(self, expected_checksums: dict | None = None) -> dict:
        """Verify the shard as stored against the checksums of the values written (and, when
        given, against ``expected_checksums``), then publish it by renaming it into place."""
        for name in self.held:
            self._flush(name, whole_files_only=False)
        self.check_all_written()
        expected = self.stop - self.start
        rows = read_rows(self.store.header)
        stored, per_unit = stored_checksums(self.group, sorted(self.dtypes), list(row_slices(expected, rows)))
        sums = self.hasher.checksums() if self.hashed == expected else stored
        check_before_publish(self.partial, stored, sums, expected_checksums)
        self._write_prompt_texts(expected)
        labels = [name for name in LABEL_ARRAYS if name in self.group.array_keys()]
        self.group.attrs.update({"checksum": combined_checksum(sums), "checksums": sums, "trajectories": expected,
                                 UNIT_ROWS: rows, UNIT_CHECKSUMS: per_unit,
                                 "store_header": run_header(self.store.header),
                                 "coordinates": " ".join(labels)})  # CF: xarray opens these as coordinates
        zarr.consolidate_metadata(str(self.partial))
        # The rename is the commit point: a shard under its final name is complete, whatever
        # happens to the process afterwards (the manifest catches up on the next run).
        os.replace(self.partial, self.final)
        entry = self.format.shard_entry(self.final, self.store.header, self.index)
        if entry is None:
            raise StoreError(f"{self.final}: unreadable right after it was written (is the disk failing?)")
        self.store.mark_complete(self.index, entry)
        return entry

    def _write_prompt_texts(self, n: int) -> None:
        """A text store's prompt and negative prompt of each trajectory, as string arrays (from the
        prompt indices as stored, so they say what the data was conditioned on)."""
        indices = {name: self.group[name][:] for name in ("prompt_index", "negative_prompt_index")
                   if name in self.dtypes}
        for name, texts in prompt_texts(self.store.header, indices).items():
            # dtype str: zarr's variable-length UTF-8 strings, with numpy 1.26 as with 2.x
            array = self.group.create_array(name, shape=(n,), dtype=str, chunks=(max(1, n),),
                                            dimension_names=("trajectory",))
            array[:] = np.array(texts, dtype=object)
