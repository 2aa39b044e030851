"""The WebDataset format: one tar shard per store shard, one sample per trajectory.

A sample's key is the trajectory index (``000000042``, no dots) and its one member,
``<key>.trajectory.npz``, is a standard NumPy ``.npz`` holding every array of the trajectory
(``model_input.npy``, ``guided_output.npy``, ...), stored or deflate-compressed. Plain
``webdataset.WebDataset(url).decode()`` turns it into a dict of arrays, and ``numpy.load`` reads
it too. One member per trajectory keeps tar's 512-byte headers from dominating small latents.
Since schema 4's standard-tools note, a sample also has ``<key>.json``: the trajectory's index,
seed, w (``guidance_scale``), condition (class, or prompt and negative prompt text with their
indices) and the timestep of each step (``schema.sample_metadata``), which webdataset decodes to a
dict. It is derived from the arrays and outside the checksums; tars written before lack it.
The manifest is the same as the Zarr store's, with ``format: webdataset``; next to every finished
tar lies ``<shard>.json`` with its entry (checksums) and the run's settings, written before the tar
is renamed into place.

Checksums are computed over the stored values exactly as for Zarr shards, so converting a store
keeps every checksum.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from ...errors import StoreError
from ..files import remove_path, write_json_atomic
from ..schema import (SHARD_INDEX, UNIT_CHECKSUMS, UNIT_ROWS, ArrayHasher, array_specs, combined_checksum, row_slices,
                      run_header, sample_metadata, same_run, shard_range, read_rows, stored_checksums)
from .base import ShardFormat, ShardWriter, check_before_publish

EXTENSION = "trajectory.npz"
METADATA = "json"  # the sample's metadata for standard tools (optional: older tars lack it)
# The only members a shard may hold: <key>.trajectory.npz and <key>.json, the key the trajectory
# index (no folder, no dots, nothing absolute); and only regular files, never a link or a device
MEMBER = re.compile(rf"[0-9]{{9,}}\.{re.escape(EXTENSION)}")
METADATA_MEMBER = re.compile(rf"[0-9]{{9,}}\.{METADATA}")
MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
                tarfile.BLKTYPE: "a device", tarfile.DIRTYPE: "a folder", tarfile.FIFOTYPE: "a FIFO"}
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
    # a member is a standard .npz, which numpy (and webdataset's decoder) read with deflate or
    # stored entries only: the zip compression method of each
    codecs = {"deflate": "deflate", "none": "stored"}
    default_compressor = "none"
    reuse_open_shards = True  # opening a tar maps it and indexes its members; rows are read on demand
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
        # the Zarr store's units: those whose digests were recorded
        return list(row_slices(entry["trajectories"], entry.get(UNIT_ROWS) or read_rows(manifest)))

    def rows_where(self, entry: dict, array, start: int, stop: int) -> str:
        first = entry["first_trajectory"]
        names = [f"{first + i:09d}.{EXTENSION}" for i in (start, max(start, stop - 1))]
        return f"member {names[0]}" if names[0] == names[1] else f"members {names[0]} to {names[1]}"

    def file_problems(self, path: Path, entry: dict) -> list[str]:
        size = path.stat().st_size if path.is_file() else None
        if size != entry.get("bytes"):
            return [f"{size} bytes on disk, the manifest says {entry.get('bytes')} (truncated or changed)"]
        return []

    def whole_shard_problem(self, shard: TarShard) -> str | None:
        try:
            shard.members()
        except StoreError as err:  # a member we refuse (named), or a truncated or damaged tar
            return str(err).removeprefix(f"{shard.path}: ")
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

    def shard_files(self, path: Path) -> list[Path]:
        """The tar and its sidecar (those of them on disk)."""
        return [p for p in (path, sidecar(path)) if p.is_file()]


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
        self.published = False

    def abort(self) -> None:
        """Close the tar without writing its end (the disk may be full: a flush would fail again,
        and again when the objects are collected, as "Exception ignored"), then remove the partial
        tar and a sidecar written for it."""
        tar, self.tar = self.tar, None
        if tar is not None:
            tar.tarstream.closed = True  # no end-of-archive blocks: the file is removed anyway
            stream = getattr(tar.tarstream, "fileobj", None)
            if stream is not None and hasattr(stream, "buf"):  # tarfile's stream buffer, unwritten
                stream.closed = True
            own = tar.own_fileobj
            if own is not None:
                with contextlib.suppress(OSError, ValueError):
                    own.close()  # flushes what it holds: may fail on a full disk, but closes
                raw = getattr(own, "raw", None)
                if raw is not None:
                    with contextlib.suppress(OSError, ValueError):
                        raw.close()
        with contextlib.suppress(OSError):
            remove_path(self.partial)
            if not self.published:
                remove_path(sidecar(self.final))
                remove_path(sidecar(self.final).with_name(sidecar(self.final).name + ".tmp"))

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
            meta = sample_metadata(self.store.header, stored)
            self.tar.write({"__key__": f"{self.start + offset + j:09d}",
                            EXTENSION: encode_sample(stored, self.compression),
                            METADATA: json.dumps(meta, ensure_ascii=False).encode()})
        self.written += n

    def finish(self, expected_checksums: dict | None = None) -> dict:
        try:
            self.tar.close()
        except BaseException:
            self.abort()
            raise
        self.tar = None
        self.check_all_written()
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        sums = self.hasher.checksums()
        # read the tar back before publishing it: its arrays must be the values written
        rows = read_rows(self.store.header)
        try:
            shard = TarShard(self.partial, self.specs)
            stored, per_unit = stored_checksums(shard, list(self.specs),
                                                list(row_slices(self.stop - self.start, rows)))
        except Exception as err:  # noqa: BLE001 - whatever the reader raises, the shard is not published
            remove_path(self.partial)
            raise StoreError(f"{self.partial}: unreadable right after it was written ({err}); not published") from None
        check_before_publish(self.partial, stored, sums, expected_checksums)
        entry = {"name": self.final.name, "first_trajectory": self.start, "trajectories": self.stop - self.start,
                 "status": "complete", "checksum": combined_checksum(sums), "checksums": sums,
                 "bytes": self.partial.stat().st_size, UNIT_ROWS: rows, UNIT_CHECKSUMS: per_unit}
        write_json_atomic(sidecar(self.final), {**entry, "store_header": run_header(self.store.header)})
        os.replace(self.partial, self.final)  # the commit point, as for Zarr shards
        self.published = True
        self.store.mark_complete(self.index, entry)
        return entry


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip entry's local file header (30 bytes)


class _Window(io.RawIOBase):
    """A read-only file over bytes [start, start + size) of a memory map: zipfile and numpy's
    header reader parse a member in place, without copying it out of the tar."""

    def __init__(self, buffer, start: int, size: int):
        self.buffer, self.start, self.size, self.position = buffer, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, target) -> int:
        n = max(0, min(len(target), self.size - self.position))
        begin = self.start + self.position
        target[:n] = self.buffer[begin:begin + n]
        self.position += n
        return n


class TarShard:
    """Read side of one tar shard (a ShardReader, shaped like a Zarr group): ``array_keys()`` and
    ``shard[name]`` (an array with shape, dtype, chunks and slicing), ``prepare()`` (the index).

    The tar is memory-mapped and indexed once, on first access: where each sample's arrays lie in
    the file. A stored (uncompressed) array is then a numpy view of the map, so reading rows copies
    their bytes once, into the result, and only the pages of those rows are read; a deflated one
    is decompressed on demand. A member that does not match the manifest is named by its array."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple, str]]):
        self.path, self.specs = Path(path), specs
        self._samples = None

    def __getstate__(self):  # dask ships shards to worker processes: ship the path, not the map
        return {"path": self.path, "specs": self.specs, "_samples": None}

    def array_keys(self):
        return list(self.specs)

    def __getitem__(self, name: str) -> TarArray:
        if name not in self.specs:
            raise KeyError(name)
        return TarArray(self, name)

    def prepare(self) -> None:
        """Index the tar now (see ``members``): once, before threads share this reader."""
        self.members()

    def members(self) -> list[dict]:
        """Each sample's arrays: name -> a view of the map (stored), or (zip, member) (deflated)."""
        if self._samples is None:
            expected = self.specs[next(iter(self.specs))][0][0]
            with open(self.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            samples = []
            try:
                with tarfile.open(self.path, mode="r:") as tar:
                    for info in tar:
                        # nothing is ever extracted; still, a link, a device or a name with a folder
                        # (../.., an absolute path) is no sample of ours: the tar is damaged or forged
                        if not info.isreg():
                            kind = MEMBER_KINDS.get(info.type, f"of tar type {info.type!r}")
                            raise StoreError(f"{self.path}: member {info.name!r} is {kind}, not a regular file "
                                             "(a forged or damaged tar)")
                        if METADATA_MEMBER.fullmatch(info.name) and info.size <= 1 << 20:
                            continue  # metadata for other tools; the arrays are the data
                        if not MEMBER.fullmatch(info.name):
                            raise StoreError(f"{self.path}: unexpected member {info.name!r} (a sample is "
                                             f"<trajectory index>.{EXTENSION} and <trajectory index>.{METADATA}, "
                                             "no folders; a forged or damaged tar)")
                        samples.append(self._index_sample(mapped, info.offset_data, info.size))
            except (tarfile.TarError, zipfile.BadZipFile, struct.error, ValueError, EOFError) as err:
                raise StoreError(f"{self.path}: sample {len(samples)} is unreadable ({type(err).__name__}: "
                                 f"{err}); the tar is truncated or damaged") from None
            if len(samples) != expected:
                raise StoreError(f"{self.path}: {len(samples)} samples, the manifest says {expected}")
            self._samples = samples
        return self._samples

    def _index_sample(self, mapped, start: int, size: int) -> dict:
        archive = zipfile.ZipFile(_Window(mapped, start, size))
        arrays = {}
        for info in archive.infolist():
            name = info.filename[:-4]
            if info.compress_type != zipfile.ZIP_STORED:
                arrays[name] = (archive, info.filename)
                continue
            signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack_from(
                mapped, start + info.header_offset)
            if signature != b"PK\x03\x04":
                raise StoreError(f"{self.path}: a damaged sample (bad zip header)")
            data = start + info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            member = _Window(mapped, data, info.file_size)
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise StoreError(f"{self.path}/{name}: .npy format version {version} (this tool writes 1.0)")
            shape, fortran, dtype = read_header(member)
            if dtype.hasobject or fortran:
                raise StoreError(f"{self.path}/{name}: not a plain C-ordered numeric array")
            count = int(np.prod(shape, dtype=np.int64))
            if member.tell() + count * dtype.itemsize > info.file_size:
                raise StoreError(f"{self.path}/{name}: a truncated member")
            arrays[name] = np.frombuffer(mapped, dtype, count, data + member.tell()).reshape(shape)
        return arrays

    def row(self, name: str, i: int) -> np.ndarray:
        """Sample ``i``'s array ``name`` (a view of the map where it is stored uncompressed)."""
        shape, dtype = self.specs[name]
        found = self.members()[i].get(name)
        if isinstance(found, tuple):
            archive, member = found
            with archive.open(member) as f:
                found = np.lib.format.read_array(f, allow_pickle=False)
        if found is None or found.shape != tuple(shape[1:]) or found.dtype != np.dtype(dtype):
            what = "missing" if found is None else f"{found.dtype} {found.shape}"
            raise StoreError(f"{self.path}/{name}: {what} in sample {i}, the manifest implies "
                             f"{dtype} {tuple(shape[1:])}")
        return found

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        shape, dtype = self.specs[name]
        out = np.empty((max(0, stop - start), *shape[1:]), dtype)
        for j, i in enumerate(range(start, stop)):
            out[j] = self.row(name, i)
        return out


class TarArray:
    def __init__(self, shard: TarShard, name: str):
        self.shard, self.name = shard, name
        shape, dtype = shard.specs[name]
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.chunks = (1, *self.shape[1:])  # a sample is read on its own
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = index[0], index[1:]
        if isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(self.shape[0])
            return self.shard.rows(self.name, start, max(start, stop))[(slice(None), *rest)]
        return self.shard.rows(self.name, 0, self.shape[0])[index]
