"""Checks of a store's shards against its manifest: cheap ones (presence, shapes and dtypes, and
each format's own: a tar's size, Zarr's chunk files and bytes) or a full re-read of every array
against its checksums (and for NaN/inf)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import array_checksum, array_specs, combined_checksum


@dataclass
class Problem:
    shard: str
    array: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}/{self.array}" if self.array else self.shard
        return f"{where}: {self.message}"


def find_problems(root: Path, manifest, full: bool = False, only: set[str] | None = None) -> list[Problem]:
    """Every way the shards of ``manifest`` (a Manifest; or the ``only`` ones) disagree with it.
    ``full`` re-reads all data instead of the cheap per-array checks: it catches everything they
    do and bytes changed in place."""
    fmt = manifest.shard_format
    found = []
    for entry in manifest.shards:
        name = entry["name"]
        if only is not None and name not in only:
            continue
        path = root / name
        if entry.get("status") != "complete":
            found.append(Problem(name, None, "not finished (the run that wrote it stopped early)"))
            continue
        if not path.exists():
            found.append(Problem(name, None, "listed complete but missing on disk"))
            continue
        before_opening = fmt.file_problems(path, entry)
        if before_opening:
            found.extend(Problem(name, None, message) for message in before_opening)
            continue
        specs = array_specs(manifest, entry["trajectories"])
        try:
            shard = fmt.open_shard(path, specs)
        except Exception as err:  # noqa: BLE001 - zarr raises many kinds for broken metadata
            found.append(Problem(name, None, f"cannot open ({type(err).__name__}: {err})"))
            continue
        before = len(found)
        present = set(shard.array_keys())
        for array, (shape, dtype) in specs.items():
            if array not in present:
                found.append(Problem(name, array, "missing"))
            elif tuple(shard[array].shape) != tuple(shape) or np.dtype(shard[array].dtype) != np.dtype(dtype):
                found.append(Problem(name, array, f"{shard[array].dtype} {shard[array].shape}, the manifest "
                                     f"implies {dtype} {shape}"))
            elif not full:  # full: the contents themselves are checked
                found.extend(Problem(name, array, message)
                             for message in fmt.array_problems(path, array, shard[array], entry))
        if full and len(found) == before:
            found.extend(verify_contents(fmt, name, shard, entry))
    return found


def verify_contents(fmt, name: str, shard, entry: dict) -> list[Problem]:
    """Re-read every array of an open shard: name each one that is unreadable (truncated,
    corrupted), holds NaN or inf, or whose checksum differs from the manifest's."""
    whole = fmt.whole_shard_problem(shard)
    if whole is not None:
        return [Problem(name, None, whole)]
    found, sums = [], {}
    expected = entry.get("checksums") or {}
    for array in sorted(shard.array_keys()):
        try:
            sums[array], finite = array_checksum(shard[array], check_finite=True)
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
