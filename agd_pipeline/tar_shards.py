"""The WebDataset form of the trajectory store: one tar shard per store shard, one sample per trajectory.

A sample's key is the trajectory index (``000000042``, no dots) and its one member,
``<key>.trajectory.npc``, holds every array of the trajectory, each compressed on its own with a
numcodecs codec (4-byte header length, a JSON header with the codec and each array's name, dtype,
shape and payload length, then the payloads). One member per trajectory keeps tar's 512-byte headers from dominating
small latents, so a tar shard is about as compact as a Zarr one.
The manifest is the same as the Zarr store's, with ``format: webdataset``; next to every finished
tar lies ``<shard>.json`` with its entry (checksums), written before the tar is renamed into place.

Checksums are computed over the stored values exactly as for Zarr shards, so converting a store
keeps every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
from pathlib import Path

import numcodecs
import numpy as np

from .errors import StoreError

EXTENSION = "trajectory.npc"
LATENT_ARRAYS = ("model_input", "guided_output", "cond_output", "uncond_output", "sample")


def numcodec(compressor: str):
    """The numcodecs codec matching the Zarr store's compressor names."""
    if compressor == "blosc-zstd":
        return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    if compressor == "zstd":
        return numcodecs.Zstd(level=5)
    if compressor == "none":
        return None
    raise StoreError(f"unknown compressor {compressor!r}; allowed: blosc-zstd, zstd, none")


def bitround(value: np.ndarray, keepbits: int) -> np.ndarray:
    """Keep ``keepbits`` mantissa bits of a float array (numcodecs' BitRound); 0 keeps everything."""
    if not keepbits or value.dtype.kind != "f":
        return value
    return np.asarray(numcodecs.BitRound(keepbits=keepbits).encode(value)).view(value.dtype).reshape(value.shape)


class ArrayHasher:
    """Checksums of a shard's arrays computed from the values as they are written, in order: the
    same digests as re-reading the stored arrays (``store.array_checksum``), without the re-read.
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


def encode_sample(arrays: dict[str, np.ndarray], codec) -> bytes:
    """Every array of one trajectory, each compressed on its own, in one blob. The header lists
    [name, dtype, shape, payload length] in payload order (compact: it is paid per trajectory)."""
    index, payloads = [], []
    for name, value in arrays.items():
        value = np.asarray(value, order="C")  # no copy when already contiguous; 0-d stays 0-d
        payload = bytes(codec.encode(value)) if codec is not None else value.tobytes()
        index.append([name, value.dtype.str, list(value.shape), len(payload)])
        payloads.append(payload)
    header = json.dumps({"codec": codec.get_config() if codec is not None else None, "arrays": index},
                        separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(payloads)


def decode_sample(blob: bytes, names=None) -> dict[str, np.ndarray]:
    (length,) = struct.unpack("<I", blob[:4])
    header = json.loads(blob[4:4 + length])
    codec = numcodecs.get_codec(header["codec"]) if header["codec"] is not None else None
    body = memoryview(blob)[4 + length:]
    out, offset = {}, 0
    for name, dtype, shape, size in header["arrays"]:
        if names is None or name in names:
            payload = body[offset:offset + size]
            raw = codec.decode(payload) if codec is not None else payload
            out[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        offset += size
    return out


def sidecar(final: Path) -> Path:
    return final.with_name(final.name + ".json")


class TarShardWriter:
    """Writes one tar shard under a temporary name, a sample per trajectory; ``finish`` publishes it."""

    def __init__(self, store, index: int):
        import webdataset as wds

        from .store import PARTIAL, array_specs, shard_name

        self.store, self.index = store, index
        self.start, self.stop = store.shard_range(index)
        self.final = store.root / shard_name(index, "webdataset")
        self.partial = store.root / (self.final.name + PARTIAL)
        for stale in (self.partial, self.final, sidecar(self.final)):
            stale.unlink(missing_ok=True)
        header = store.header
        self.codec = numcodec(header["compressor"])
        self.specs = array_specs(header, self.stop - self.start)
        self.hasher = ArrayHasher(self.specs, header.get("bitround_keepbits", 0))
        # A fixed integer mtime and plain ustar headers: no 1 KB pax header per member, and the same
        # trajectories give byte-identical tars.
        self.tar = wds.TarWriter(str(self.partial), mtime=0, format=tarfile.USTAR_FORMAT)
        self.written = 0

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
                            EXTENSION: encode_sample(stored, self.codec)})
        self.written += n

    def finish(self) -> dict:
        from .store import _write_json_atomic, combined_checksum

        expected = self.stop - self.start
        self.tar.close()
        if self.written != expected:
            raise StoreError(f"{self.partial}: {self.written} of {expected} trajectories written")
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        sums = self.hasher.checksums()
        entry = {"name": self.final.name, "first_trajectory": self.start, "trajectories": expected,
                 "status": "complete", "checksum": combined_checksum(sums), "checksums": sums,
                 "bytes": self.partial.stat().st_size}
        _write_json_atomic(sidecar(self.final), entry)
        os.replace(self.partial, self.final)  # the commit point, as for Zarr shards
        self.store.mark_complete(self.index, entry)
        return entry


def entry_on_disk(final: Path, trajectories: int) -> dict | None:
    """A published tar shard's entry (from its sidecar), if it is complete."""
    side = sidecar(final)
    if not final.is_file() or not side.is_file():
        return None
    try:
        entry = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("trajectories") != trajectories or entry.get("bytes") != final.stat().st_size:
        return None
    return entry


class TarShard:
    """Read side of one tar shard, shaped like a Zarr group: ``array_keys()`` and ``shard[name]``
    (an array with shape, dtype, chunks and slicing). The tar is read once, on first access; each
    array is decoded on demand, so a damaged member is named by its array."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple, str]]):
        self.path, self.specs = Path(path), specs
        self._members = None
        self._decoded = {}

    def __getstate__(self):  # dask ships shards to worker processes: ship the path, not the bytes
        return {"path": self.path, "specs": self.specs, "_members": None, "_decoded": {}}

    def array_keys(self):
        return list(self.specs)

    def __getitem__(self, name: str) -> "TarArray":
        if name not in self.specs:
            raise KeyError(name)
        return TarArray(self, name)

    def members(self) -> list[dict]:
        if self._members is None:
            import webdataset as wds

            # One named shard, read whole: our loader splits the work between processes and workers
            # itself, so WebDataset's node and worker splitters must pass the shard through.
            self._members = list(wds.WebDataset(str(self.path), shardshuffle=False, empty_check=False,
                                                nodesplitter=_all, workersplitter=_all))
            if len(self._members) != self.specs[next(iter(self.specs))][0][0]:
                raise StoreError(f"{self.path}: {len(self._members)} samples, the manifest says "
                                 f"{self.specs[next(iter(self.specs))][0][0]}")
        return self._members

    def decoded(self, name: str) -> np.ndarray:
        if name not in self._decoded:
            shape, dtype = self.specs[name]
            values = [decode_sample(sample[EXTENSION], [name])[name] for sample in self.members()]
            value = np.stack(values) if values else np.empty(shape, dtype)
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise StoreError(f"{self.path}/{name}: {value.dtype} {value.shape}, manifest implies {dtype} {shape}")
            self._decoded[name] = value
        return self._decoded[name]


def _all(urls, *args, **kwargs):
    return urls


class TarArray:
    def __init__(self, shard: TarShard, name: str):
        self.shard, self.name = shard, name
        shape, dtype = shard.specs[name]
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.chunks = self.shape  # a tar shard is read whole
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return self.shard.decoded(self.name)[index]
