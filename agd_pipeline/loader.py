"""The training loader: shuffled batches of (trajectory, step) samples from a store of either format.

Reads are contiguous: a *unit* is what the store's format reads at once (``read_units``): a Zarr
chunk row (a block of trajectories with all their steps) or a whole tar shard. Each epoch, the
units are put in an order drawn from (seed, epoch); the epoch's samples, in that order, are split
evenly between the ``world_size`` processes of a distributed run, so no sample is dropped or seen
twice within an epoch. Each process reads only the units its share touches, ``buffer_units`` at a
time (fewer if they would exceed 2 GiB), shuffles the samples of a buffer in memory, and cuts them
into batches. Every process gets the same number of batches per epoch (sizes differ by at most one
sample), so data-parallel training never waits on a missing batch.

A buffer's units are read in a few threads and kept as separate arrays; each batch gathers its
samples from them by (trajectory, step) index, so neither the buffer nor the per-trajectory arrays
(w, class, prompt embeddings) are ever copied or repeated per step in memory. Reading can run in
DataLoader worker processes (spawned), which only read and decode; the order stays a function of
(seed, epoch, rank) whatever the number of workers.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import StoreError
from .store import REPAIR, Manifest, TrajectoryStore

PER_STEP = ("model_input", "guided_output", "timesteps")
SMALL_ROW_BYTES = 4096  # per-trajectory arrays up to this size are read whole, once per shard
READ_THREADS = 4
BUFFER_BYTES = 2 << 30  # model inputs and targets held in memory for shuffling, at most


class UnitReader(Dataset):
    """Item g: the arrays of the g-th buffer of units, one row per trajectory (runs in workers)."""

    def __init__(self, root, manifest: Manifest, buffers: list[list[tuple[str, int, int]]], names: tuple[str, ...]):
        self.root, self.manifest, self.buffers, self.names = root, manifest, buffers, names
        self._store = None
        self._open_shards = {}
        self._small = {}

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "_open_shards": {}, "_small": {}}

    def __len__(self) -> int:
        return len(self.buffers)

    @property
    def store(self) -> TrajectoryStore:
        if self._store is None:  # opened lazily: in each worker process, after unpickling
            self._store = TrajectoryStore(self.root, self.manifest)
        return self._store

    def _open(self, name: str):
        # A Zarr group is kept for the shard's next chunk rows; a tar is read whole and not kept,
        # so only a buffer's worth of shards is ever in memory.
        if not self.store.shard_format.reuse_open_shards:
            return self._store.open_shard(name)
        if name not in self._open_shards:
            self._open_shards[name] = self._store.open_shard(name)
        return self._open_shards[name]

    def _read(self, shard, name: str, key: str, start: int, stop: int) -> np.ndarray:
        array = shard[key]
        if int(np.prod(array.shape[1:])) * array.dtype.itemsize > SMALL_ROW_BYTES:
            return np.asarray(array[start:stop])
        # Small per-trajectory arrays (w, class, timesteps) are read once per shard: every Zarr
        # read costs milliseconds of overhead, far more than these bytes.
        if (name, key) not in self._small:
            self._small[(name, key)] = np.asarray(array[:])
        return self._small[(name, key)][start:stop]

    def __getitem__(self, index: int) -> dict[str, list[np.ndarray]]:
        """{array name: [the array's rows of each unit]}: kept per unit, not concatenated (a batch
        gathers its rows from the units directly, so the buffer is never copied whole)."""
        units = self.buffers[index]

        def read(unit) -> dict[str, np.ndarray]:
            name, start, stop = unit
            shard = self._open(name)  # a tar shard is read once here, for all its arrays
            out = {}
            for key in self.names:
                try:
                    out[key] = self._read(shard, name, key, start, stop)
                except Exception as err:  # noqa: BLE001 - a damaged chunk fails inside the codec
                    raise StoreError(
                        f"{self.root}/{name}/{key}: cannot read trajectories {start}-{stop} "
                        f"({type(err).__name__}: {err}); `python -m stages.inspect {self.root} --verify` "
                        f"lists every damaged array. {REPAIR}") from None
            return out

        if self.store.shard_format.reuse_open_shards:
            for name, _, _ in units:  # open each kept shard once, before the threads share it
                self._open(name)
        # Units are read and decoded in a few threads (the codecs release the GIL).
        with ThreadPoolExecutor(READ_THREADS) as pool:
            per_unit = list(pool.map(read, units))
        return {key: [unit[key] for unit in per_unit] for key in self.names}


def _as_is(item):
    """Keep the reader's numpy arrays as they are (DataLoader would turn them into tensors)."""
    return item


def rank_shares(total: int, world_size: int) -> list[int]:
    """How many of an epoch's ``total`` samples each rank gets: as even as possible, the first
    ``total % world_size`` ranks one more."""
    return [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]


def batch_sizes(total: int, batch_size: int, world_size: int) -> list[list[int]]:
    """Batch sizes of each rank for one epoch of ``total`` samples: the samples split as evenly as
    possible, and every rank given the same number of batches."""
    shares = rank_shares(total, world_size)
    if min(shares) == 0:
        raise StoreError(f"the store holds {total} samples, fewer than the {world_size} processes")
    count = math.ceil(max(shares) / batch_size)
    sizes = []
    for share in shares:
        rank_sizes = [batch_size] * (count - 1) + [share - (count - 1) * batch_size]
        if rank_sizes[-1] == 0:  # one sample short of the largest share: split the last two
            rank_sizes[-2:] = [batch_size - 1, 1]
        sizes.append(rank_sizes)
    return sizes


class StepBatches:
    """Endless batches (dicts of tensors) for one process; see the module docstring."""

    def __init__(self, store: TrajectoryStore, batch_size: int, seed: int, buffer_units: int = 16,
                 rank: int = 0, world_size: int = 1, workers: int = 0, buffer_bytes: int = BUFFER_BYTES):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.units = store.chunk_ranges()
        self.steps = store.num_steps
        # up to buffer_units units in memory at once, fewer where units are large (whole tar shards
        # of SDXL latents): the buffer's model inputs and targets stay within buffer_bytes
        largest = max((stop - start for _, start, stop in self.units), default=1)
        unit_bytes = largest * self.steps * 2 * 2 * int(np.prod(store.manifest.latent_shape))
        self.buffer_units = max(1, min(buffer_units, buffer_bytes // max(1, unit_bytes)))
        self.per_trajectory = ("guidance_scale", "trajectory_index", *store.manifest.condition_arrays)
        self.total = sum(stop - start for _, start, stop in self.units) * self.steps
        self.sizes = batch_sizes(self.total, batch_size, world_size)[rank]

    def batches_per_epoch(self) -> int:
        return len(self.sizes)

    def _share(self, epoch: int) -> list[tuple[tuple[str, int, int], int, int]]:
        """This rank's part of the epoch: (unit, first sample, end sample) within each unit touched."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        shares = rank_shares(self.total, self.world_size)
        lo = sum(shares[:self.rank])
        hi = lo + shares[self.rank]
        parts, position = [], 0
        for u in order:
            name, start, stop = self.units[u]
            size = (stop - start) * self.steps
            a, b = max(lo, position), min(hi, position + size)
            if a < b:
                parts.append((self.units[u], a - position, b - position))
            position += size
        return parts

    def _gather(self, data: dict, first_trajectory: np.ndarray, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The samples ``flat`` (trajectory * steps + step, counted over the buffer) from the
        buffer's per-unit arrays; ``first_trajectory`` is each unit's first trajectory in the buffer."""
        traj, step = np.divmod(flat, self.steps)
        unit = np.searchsorted(first_trajectory, traj, side="right") - 1
        local = traj - first_trajectory[unit]
        masks = [(u, unit == u) for u in np.unique(unit)]
        out = {}
        for key, parts in data.items():
            per_step = key in PER_STEP
            row_shape = parts[0].shape[2:] if per_step else parts[0].shape[1:]
            rows = np.empty((len(flat), *row_shape), parts[0].dtype)
            for u, mask in masks:
                if per_step:  # (trajectory, step) rows of a reshaped view of the unit
                    rows[mask] = parts[u].reshape(-1, *row_shape)[local[mask] * self.steps + step[mask]]
                else:
                    rows[mask] = parts[u][local[mask]]
            out[key] = rows
        out["step_index"] = step.astype(np.int64)
        return out

    def epoch(self, epoch: int):
        share = self._share(epoch)
        buffers = [share[i:i + self.buffer_units] for i in range(0, len(share), self.buffer_units)]
        reader = UnitReader(self.store.root, self.store.manifest, [[unit for unit, _, _ in b] for b in buffers],
                            (*PER_STEP, *self.per_trajectory))
        loader = DataLoader(reader, batch_size=None, shuffle=False, num_workers=self.workers, collate_fn=_as_is,
                            multiprocessing_context="spawn" if self.workers else None)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        sizes = iter(self.sizes)
        want = next(sizes)
        carry = None  # samples from the end of the previous buffer, fewer than a batch
        for buffer, data in zip(buffers, loader):
            first_trajectory = np.cumsum([0] + [stop - start for (_, start, stop), _, _ in buffer])[:-1]
            flat = np.concatenate([first_trajectory[i] * self.steps + np.arange(a, b)
                                   for i, (_, a, b) in enumerate(buffer)])
            order = flat[rng.permutation(len(flat))]
            position = 0
            while want is not None and position < len(order):
                have = 0 if carry is None else len(carry["timesteps"])
                piece = self._gather(data, first_trajectory, order[position:position + want - have])
                position += want - have
                carry = piece if carry is None else {k: np.concatenate([carry[k], piece[k]]) for k in piece}
                if len(carry["timesteps"]) == want:
                    yield {k: torch.from_numpy(v) for k, v in carry.items()}
                    carry, want = None, next(sizes, None)
        if want is not None or carry is not None:
            raise StoreError("internal: the epoch's samples did not fill its batches")

    def from_step(self, step: int):
        """Endless batches starting at global step ``step`` (a resumed run's position)."""
        epoch, skip = divmod(step, self.batches_per_epoch())
        batches = self.epoch(epoch)
        for _ in range(skip):
            next(batches)
        yield from batches
        for later in itertools.count(epoch + 1):
            yield from self.epoch(later)

    def __iter__(self):
        return self.from_step(0)
