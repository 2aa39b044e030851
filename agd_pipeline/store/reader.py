"""Read access to a complete store: its manifest, shards, checks, dask arrays and loader units."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError
from .formats import SHARD_PATTERN, ShardFormat, ShardReader, open_shard
from .manifest import as_manifest, read_manifest
from .schema import DERIVED_ARRAYS, array_specs, repair
from .verify import Problem, find_problems


class TrajectoryStore:
    """A store on disk. ``manifest`` (a Manifest, the typed view of manifest.json) says what it
    holds; its format object (``shard_format``) opens and checks the shards."""

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = as_manifest(manifest) if manifest is not None else read_manifest(self.root)

    @property
    def shards(self) -> list[dict]:
        return self.manifest.shards

    @property
    def num_steps(self) -> int:
        return self.manifest.num_steps

    @property
    def num_trajectories(self) -> int:
        return self.manifest.num_trajectories

    @property
    def format(self) -> str:
        return self.manifest.format

    @property
    def shard_format(self) -> ShardFormat:
        return self.manifest.shard_format

    def fingerprint(self) -> str:
        return self.manifest.fingerprint()

    def open_shard(self, name: str, prepare: bool = False) -> ShardReader:
        """The shard ``name`` of the manifest as a ShardReader (formats.base): a ZarrShard, or for
        a WebDataset store a TarShard. ``prepare``: its one-off preparation now (a tar's index)."""
        entry = self.manifest.shard(name) if SHARD_PATTERN.fullmatch(name) else None
        if entry is None:  # never a path outside the store
            raise StoreError(f"{self.root}: {name!r} is not a shard name")
        return open_shard(self.root / name, array_specs(self.manifest, entry["trajectories"]), self.shard_format,
                          prepare=prepare)

    def bytes_on_disk(self) -> int:
        return sum(self.shard_format.bytes_on_disk(self.root / s["name"]) for s in self.shards
                   if s.get("status") == "complete" and (self.root / s["name"]).exists())

    def problems(self, full: bool = False, only: set[str] | None = None, mode: str | None = None,
                 log=None) -> list[Problem]:
        """Every way the shards (or the ``only`` ones) disagree with the manifest. Cheap checks:
        the shard exists, every array with its shape and dtype, every chunk file, and the bytes of
        each array (a tar's size). ``full`` instead re-reads all data against the checksums (and
        for NaN/inf), which catches everything the cheap checks do and bytes changed in place.
        ``mode`` ("changed", "full" or "cheap"; see ``verify.find_problems``) uses and updates the
        record of shards verified in full, kept outside the store."""
        return find_problems(self.root, self.manifest, full=full, only=only, mode=mode, log=log)

    def check(self, full: bool = False, mode: str | None = None, log=None) -> None:
        """Raise StoreError naming every bad shard, with how to repair."""
        found = self.problems(full=full, mode=mode, log=log)
        if found:
            listing = "\n  ".join(str(p) for p in found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            raise StoreError(
                f"trajectory store {self.root} is not sound ({len(found)} problem(s)):\n  {listing}{more}\n"
                + repair())

    def dask_arrays(self, names=None) -> dict:
        """Every array as one dask array over all shards, chunked at the shards' own chunks.
        Latents are float16: reduce them in float32 (``x.astype("float32").mean()``)."""
        import dask.array as da

        out = {}
        groups = [(e, self.open_shard(e["name"])) for e in self.shards if e.get("status") == "complete"]
        if not groups:
            raise StoreError(f"{self.root}: no complete shards")
        names = names or sorted(set(groups[0][1].array_keys()) - set(DERIVED_ARRAYS))  # the data, per trajectory
        for array in names:
            out[array] = da.concatenate([self.shard_format.dask_array(g[array]) for _, g in groups], axis=0)
        return out

    def chunk_ranges(self) -> list[tuple[str, int, int]]:
        """(shard name, start, stop) of every unit the training loader reads: a Zarr chunk row, a
        whole tar shard (the format says)."""
        ranges = []
        for entry in self.shards:
            if entry.get("status") != "complete":
                continue
            for rows in self.shard_format.read_units(self.manifest, entry):
                ranges.append((entry["name"], rows.start, rows.stop))
        return ranges
