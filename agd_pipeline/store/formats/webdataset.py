"""The WebDataset format: one tar shard per store shard, one sample per trajectory.

A sample's key is the trajectory index (``000000042``, no dots) and its one member,
``<key>.trajectory.npz``, is a standard NumPy ``.npz`` holding every array of the trajectory
(``model_input.npy``, ``guided_output.npy``, ...), stored or deflate-compressed. Plain
``webdataset.WebDataset(url).decode()`` turns it into a dict of arrays, and ``numpy.load`` reads
it too. One member per trajectory keeps tar's 512-byte headers from dominating small latents.
The manifest is the same as the Zarr store's, with ``format: webdataset``; next to every finished
tar lies ``<shard>.json`` with its entry (checksums) and the run's settings, written before the tar
is renamed into place.

Checksums are computed over the stored values exactly as for Zarr shards, so converting a store
keeps every checksum.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from ...errors import StoreError
from ..files import remove_path, write_json_atomic
from ..schema import (SHARD_INDEX, ArrayHasher, array_checksum, array_specs, combined_checksum, row_slices, run_header,
                      same_run, shard_range)
from .base import ShardFormat, ShardWriter, check_before_publish

EXTENSION = "trajectory.npz"
# a fixed timestamp in every zip entry: the same trajectories give byte-identical shards
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def encode_sample(arrays: dict[str, np.ndarray], compression: str) -> bytes:
    """Every array of one trajectory as one .npz (a zip of .npy files)."""
    method = zipfile.ZIP_DEFLATED if compression == "deflate" else zipfile.ZIP_STORED
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = method
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    return buffer.getvalue()


def decode_sample(blob: bytes, names=None) -> dict[str, np.ndarray]:
    """The arrays (or the ``names`` among them) of one trajectory's .npz member; never unpickles."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {entry[:-4]: np.lib.format.read_array(archive.open(entry), allow_pickle=False)
                for entry in archive.namelist() if names is None or entry[:-4] in names}


def sidecar(final: Path) -> Path:
    return final.with_name(final.name + ".json")


class WebDatasetFormat(ShardFormat):
    name = "webdataset"
    extension = "tar"
    default_compressor = "none"
    reuse_open_shards = False  # a tar is read whole into memory: kept only while its unit is read
    codec_note = "their members are standard .npz files"

    def begin_shard(self, store, index: int) -> TarShardWriter:
        return TarShardWriter(store, index, self)

    def shard_entry(self, final: Path, header: dict, index: int) -> dict | None:
        """A published tar shard's entry (from its sidecar), if it is complete and of this run."""
        side = sidecar(final)
        if not final.is_file() or not side.is_file():
            return None
        try:
            record = json.loads(side.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        start, stop = shard_range(header, index)
        n = stop - start
        stored_header = record.pop("store_header", None)
        if record.get("name") != final.name or record.get("trajectories") != n \
                or record.get("bytes") != final.stat().st_size or record.get("status") != "complete" \
                or not isinstance(stored_header, dict) or not same_run(stored_header, header):
            return None
        return record

    def shard_header(self, path: Path) -> dict | None:
        try:
            return json.loads(sidecar(path).read_text()).get("store_header")
        except (OSError, ValueError, AttributeError):
            return None

    def open_shard(self, path: Path, specs: dict[str, tuple[tuple, str]]) -> TarShard:
        return TarShard(path, specs)

    def read_units(self, manifest, entry: dict) -> list[slice]:
        return list(row_slices(entry["trajectories"], entry["trajectories"]))  # a tar shard is read whole

    def file_problems(self, path: Path, entry: dict) -> list[str]:
        size = path.stat().st_size if path.is_file() else None
        if size != entry.get("bytes"):
            return [f"{size} bytes on disk, the manifest says {entry.get('bytes')} (truncated or changed)"]
        return []

    def whole_shard_problem(self, shard: TarShard) -> str | None:
        try:
            shard.members()
        except Exception as err:  # noqa: BLE001 - a broken tar fails in the tar reader
            return f"unreadable tar ({type(err).__name__}: {err})"
        return None

    def owns(self, entry: Path) -> bool:
        """A tar shard, its partial, its sidecar or the sidecar's temporary."""
        return entry.is_file() and bool(
            re.fullmatch(rf"{SHARD_INDEX}\.{self.extension}(\.partial|\.json|\.json\.tmp)?", entry.name))

    def remove_shard(self, path: Path) -> None:
        remove_path(path)
        remove_path(sidecar(path))


class TarShardWriter(ShardWriter):
    """Writes one tar shard under a temporary name, a sample per trajectory; ``finish`` verifies
    and publishes it."""

    def __init__(self, store, index: int, fmt: WebDatasetFormat):
        import webdataset as wds

        super().__init__(store, index, fmt)
        header = store.header
        self.compression = fmt.codec(header["compressor"])
        self.specs = array_specs(header, self.stop - self.start)
        self.hasher = ArrayHasher(self.specs, header.get("bitround_keepbits", 0))
        # A fixed integer mtime and plain ustar headers: no 1 KB pax header per member, and the same
        # trajectories give byte-identical tars.
        self.tar = wds.TarWriter(str(self.partial), mtime=0, format=tarfile.USTAR_FORMAT)

    def write(self, offset: int, arrays: dict[str, np.ndarray]) -> None:
        """Write trajectories [offset, offset + n) of this shard, in order."""
        n = len(next(iter(arrays.values())))
        if offset != self.written:
            raise StoreError(f"{self.partial}: trajectories must arrive in order (got {offset}, expected "
                             f"{self.written})")
        values = {name: np.asarray(arrays[name], dtype=self.specs[name][1]) for name in self.specs}
        for j in range(n):
            stored = {}
            for name, value in values.items():
                stored[name] = self.hasher.stored(name, value[j])
                self.hasher.update(name, stored[name])
            self.tar.write({"__key__": f"{self.start + offset + j:09d}",
                            EXTENSION: encode_sample(stored, self.compression)})
        self.written += n

    def finish(self, expected_checksums: dict | None = None) -> dict:
        self.tar.close()
        self.check_all_written()
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        sums = self.hasher.checksums()
        # read the tar back before publishing it: its arrays must be the values written
        try:
            shard = TarShard(self.partial, self.specs)
            stored = {name: array_checksum(shard[name])[0] for name in self.specs}
        except Exception as err:  # noqa: BLE001 - whatever the reader raises, the shard is not published
            remove_path(self.partial)
            raise StoreError(f"{self.partial}: unreadable right after it was written ({err}); not published") from None
        check_before_publish(self.partial, stored, sums, expected_checksums)
        entry = {"name": self.final.name, "first_trajectory": self.start, "trajectories": self.stop - self.start,
                 "status": "complete", "checksum": combined_checksum(sums), "checksums": sums,
                 "bytes": self.partial.stat().st_size}
        write_json_atomic(sidecar(self.final), {**entry, "store_header": run_header(self.store.header)})
        os.replace(self.partial, self.final)  # the commit point, as for Zarr shards
        self.store.mark_complete(self.index, entry)
        return entry


class TarShard:
    """Read side of one tar shard, shaped like a Zarr group: ``array_keys()`` and ``shard[name]``
    (an array with shape, dtype, chunks and slicing). The tar is read once, on first access; each
    array is decoded on demand, so a damaged member is named by its array."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple, str]]):
        self.path, self.specs = Path(path), specs
        self._archives = None
        self._decoded = {}

    def __getstate__(self):  # dask ships shards to worker processes: ship the path, not the bytes
        return {"path": self.path, "specs": self.specs, "_archives": None, "_decoded": {}}

    def array_keys(self):
        return list(self.specs)

    def __getitem__(self, name: str) -> TarArray:
        if name not in self.specs:
            raise KeyError(name)
        return TarArray(self, name)

    def members(self) -> list[zipfile.ZipFile]:
        """Each trajectory's .npz, opened once (its index parsed once for every array)."""
        if self._archives is None:
            expected = self.specs[next(iter(self.specs))][0][0]
            archives = []
            with tarfile.open(self.path, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    if not info.name.endswith("." + EXTENSION):
                        raise StoreError(f"{self.path}: unexpected member {info.name!r}")
                    archives.append(zipfile.ZipFile(io.BytesIO(tar.extractfile(info).read())))
            if len(archives) != expected:
                raise StoreError(f"{self.path}: {len(archives)} samples, the manifest says {expected}")
            self._archives = archives
        return self._archives

    def decoded(self, name: str) -> np.ndarray:
        if name not in self._decoded:
            shape, dtype = self.specs[name]
            rows = np.empty(shape, dtype)
            for i, archive in enumerate(self.members()):
                with archive.open(f"{name}.npy") as member:
                    value = np.lib.format.read_array(member, allow_pickle=False)
                if value.shape != tuple(shape[1:]) or value.dtype != np.dtype(dtype):
                    raise StoreError(f"{self.path}/{name}: {value.dtype} {value.shape} in sample {i}, "
                                     f"the manifest implies {dtype} {tuple(shape[1:])}")
                rows[i] = value
            self._decoded[name] = rows
        return self._decoded[name]


class TarArray:
    def __init__(self, shard: TarShard, name: str):
        self.shard, self.name = shard, name
        shape, dtype = shard.specs[name]
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.chunks = self.shape  # a tar shard is read whole
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return self.shard.decoded(self.name)[index]
