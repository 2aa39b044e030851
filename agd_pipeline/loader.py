"""The training loader: shuffled batches of (trajectory, step) samples from a store of either format.

Reads are contiguous: a *unit* is what the store's format reads at once (``read_units``): one chunk
row of the arrays (a block of whole trajectories with all their steps, about ``chunk_bytes``).
Each epoch, the units are put in an order drawn from (seed, epoch); the epoch's samples, in that
order, are split evenly between the ``world_size`` processes of a distributed run, so no sample is
dropped or seen twice within an epoch. Each process reads only the units its share touches,
``buffer_units`` at a time (fewer if they would exceed ``buffer_bytes``), shuffles the samples of a
buffer in memory, and cuts them into batches. Every process gets the same number of batches per
epoch (sizes differ by at most one sample), so data-parallel training never waits on a missing batch.

Reading runs ahead of training: while the batches of one buffer are gathered, the next buffer's
units are read, in a few threads of the training process or in DataLoader worker processes
(started once for the whole run, not per epoch; forked where the platform allows). At most two
buffers exist at a time, whatever the number of workers (a worker holds a unit or two, not a
buffer), so memory stays bounded. Each
batch gathers its samples from the buffer's per-unit arrays by (trajectory, step) index, so neither
the buffer nor the per-trajectory arrays (w, class, prompt embeddings) are copied whole or repeated
per step. The batches are a function of (seed, epoch, rank) whatever the number of workers.
"""

from __future__ import annotations

import collections
import itertools
import math
import multiprocessing
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import StoreError, command_line
from .store import Manifest, TrajectoryStore
from .store.schema import read_by_unit, repair
from .store.verify import read_problem

PER_STEP = ("model_input", "guided_output", "timesteps")
READ_THREADS = 4
LARGE_ROW_BYTES = 16 << 10  # rows larger than this are gathered sample by sample (no temporary copy)
BUFFER_BYTES = 2 << 30  # model inputs and targets of the two buffers in memory (one read ahead), at most
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
OPEN_SHARDS = 64  # opened shards kept for their next units (a tar's map holds a file descriptor)


class ChangedOnDisk(StoreError):
    """Data read from a store does not match the digest recorded when it was written."""


class UnitReader(Dataset):
    """Item (shard name, start, stop): the arrays of that unit, one row per trajectory. Used by the
    training process's reading threads and by worker processes."""

    def __init__(self, root, manifest: Manifest, names: tuple[str, ...], as_tensors: bool = False):
        self.root, self.manifest, self.names, self.as_tensors = root, manifest, names, as_tensors
        self._setup()

    def _setup(self) -> None:
        self._store = None
        self._open_shards = collections.OrderedDict()
        self._small = {}
        self._entries = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: self.__dict__[k] for k in ("root", "manifest", "names", "as_tensors")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    @property
    def store(self) -> TrajectoryStore:
        if self._store is None:  # opened lazily: in each worker process, after unpickling
            self._store = TrajectoryStore(self.root, self.manifest)
        return self._store

    def _open(self, name: str):
        # An opened shard (Zarr metadata, a tar's index) is kept for the shard's next units; the
        # least recently used ones are dropped beyond OPEN_SHARDS.
        with self._lock:
            if name in self._open_shards:
                self._open_shards.move_to_end(name)
                return self._open_shards[name]
            # prepared once (a tar's index), not by every thread that reads it
            shard = self.store.open_shard(name, prepare=True)
            self._open_shards[name] = shard
            while len(self._open_shards) > OPEN_SHARDS:
                old, _ = self._open_shards.popitem(last=False)
                self._small = {k: v for k, v in self._small.items() if k[0] != old}
            return shard

    def _entry(self, name: str) -> dict:
        if self._entries is None:
            self._entries = {entry["name"]: entry for entry in self.manifest.shards}
        return self._entries[name]

    def _checked(self, name: str, key: str, array, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array, checked against the digest recorded when the shard was
        written, as they are read (no pass over the data of its own): bytes changed on disk since
        any earlier check stop training here."""
        value = np.asarray(array[start:stop])
        problem = read_problem(self.manifest.shard_format, self._entry(name), key, array, start, stop, value)
        if problem is not None:
            raise ChangedOnDisk(f"{self.root}/{name}/{key}: {problem}; `{command_line('inspect')} {self.root} "
                                f"--verify` lists every damaged array. {repair()}")
        return value

    def _read(self, shard, name: str, key: str, start: int, stop: int) -> np.ndarray:
        array = shard[key]
        if read_by_unit(key, array.shape, array.dtype):
            return self._checked(name, key, array, start, stop)
        # Small per-trajectory arrays (w, class, timesteps) are one chunk per shard: read once,
        # checked against the array's checksum.
        if (name, key) not in self._small:
            self._small[(name, key)] = self._checked(name, key, array, 0, array.shape[0])
        return self._small[(name, key)][start:stop]

    def __getitem__(self, unit: tuple[str, int, int]) -> dict:
        name, start, stop = unit
        try:
            shard = self._open(name)
        except Exception as err:  # noqa: BLE001 - broken metadata fails in zarr or the tar reader
            raise StoreError(f"{self.root}/{name}: cannot open ({type(err).__name__}: {err}). {repair()}") from None
        out = {}
        for key in self.names:
            try:
                out[key] = self._read(shard, name, key, start, stop)
            except ChangedOnDisk:
                raise
            except Exception as err:  # noqa: BLE001 - a damaged chunk fails inside the codec
                raise StoreError(
                    f"{self.root}/{name}/{key}: cannot read trajectories {start}-{stop} "
                    f"({type(err).__name__}: {err}); `{command_line('inspect')} {self.root} --verify` "
                    f"lists every damaged array. {repair()}") from None
        if self.as_tensors:  # a worker's tensors reach the training process through shared memory
            out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in out.items()}
        return out


class _Units(Sampler):
    """The units of a run, in order: epoch after epoch (endless), each epoch's buffers in turn."""

    def __init__(self, batches: StepBatches, first_epoch: int):
        self.batches, self.first_epoch = batches, first_epoch

    def __iter__(self):
        for epoch in itertools.count(self.first_epoch):
            for buffer in self.batches.buffers(epoch):
                for unit, _, _ in buffer:
                    yield unit


class _ReadAhead:
    """Whole buffers of units, in order, read one buffer ahead of the consumer in a background
    thread; at most two buffers exist at once (the one in use and the next)."""

    def __init__(self, batches: StepBatches, first_epoch: int):
        names = (*PER_STEP, *batches.per_trajectory)
        self.reader = UnitReader(batches.store.root, batches.store.manifest, names, as_tensors=batches.workers > 0)
        units = _Units(batches, first_epoch)
        if batches.workers:
            # forked where the platform can (a worker then shares the training process's pages
            # instead of importing torch again: ~30 MiB each, not ~370), else spawned
            self._loader = DataLoader(self.reader, batch_size=None, sampler=units, num_workers=batches.workers,
                                      collate_fn=_as_is, multiprocessing_context=WORKER_START, prefetch_factor=2)
            self._units = iter(self._loader)
            self._pool = None
        else:  # a buffer's units are read in threads once the buffer may be read (_fill)
            self._pool = ThreadPoolExecutor(READ_THREADS)
            self._units = None
        self._plan = (buffer for epoch in itertools.count(first_epoch) for buffer in batches.buffers(epoch))
        self._slots = threading.Semaphore(2)
        self._ready = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="agd-read-ahead")
        self._thread.start()

    def _fill(self) -> None:
        try:
            for buffer in self._plan:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                if self._pool is not None:
                    futures = [self._pool.submit(self.reader.__getitem__, unit) for unit, _, _ in buffer]
                    parts = [future.result() for future in futures]
                else:
                    try:
                        parts = [next(self._units) for _ in buffer]
                    except StoreError as err:
                        raise _from_worker(err) from None
                data = {key: [np.asarray(part[key]) for part in parts] for key in parts[0]}
                self._ready.put((buffer, data))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._ready.put(err)

    def next_buffer(self):
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self) -> None:
        """The consumer is done with its buffer: the next one may be read."""
        self._slots.release()

    def close(self) -> None:
        """Stop reading ahead (the background thread finishes the buffer it is reading), then
        stop the reading threads or the worker processes."""
        self._stop.set()
        self._slots.release()
        self._thread.join(timeout=60)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        elif not self._thread.is_alive():
            self._units._shutdown_workers()  # not left to garbage collection, mid-run
        self._units = self._loader = None


def _from_worker(err: StoreError) -> StoreError:
    """A store error raised in a DataLoader worker process, as the one line it was there (torch
    re-raises it with the worker's traceback in its message)."""
    text = str(err).strip()
    if "\n" not in text:
        return err
    last = text.splitlines()[-1]  # "agd_pipeline.loader.ChangedOnDisk: <the message>"
    _, _, message = last.partition(": ")
    return type(err)(message or last)


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
        # up to buffer_units units per buffer, fewer where units are large (SDXL latents): the two
        # buffers' model inputs and targets (the one in use, the one read ahead) stay within buffer_bytes
        largest = max((stop - start for _, start, stop in self.units), default=1)
        unit_bytes = largest * self.steps * 2 * 2 * int(np.prod(store.manifest.latent_shape))
        self.buffer_units = max(1, min(buffer_units, buffer_bytes // 2 // max(1, unit_bytes)))
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
            if rows[:1].nbytes > LARGE_ROW_BYTES:  # one copy per sample, straight into the batch
                for i, (u, t, s) in enumerate(zip(unit.tolist(), local.tolist(), step.tolist())):
                    rows[i] = parts[u][t, s] if per_step else parts[u][t]
            else:  # small rows: a fancy-indexed gather per unit costs less than a loop
                for u, mask in masks:
                    if per_step:  # (trajectory, step) rows of a reshaped view of the unit
                        rows[mask] = parts[u].reshape(-1, *row_shape)[local[mask] * self.steps + step[mask]]
                    else:
                        rows[mask] = parts[u][local[mask]]
            out[key] = rows
        out["step_index"] = step.astype(np.int64)
        return out

    def buffers(self, epoch: int) -> list[list[tuple[tuple[str, int, int], int, int]]]:
        """This rank's buffers of ``epoch``: lists of (unit, first sample, end sample)."""
        share = self._share(epoch)
        return [share[i:i + self.buffer_units] for i in range(0, len(share), self.buffer_units)]

    def _epoch_batches(self, epoch: int, ahead: _ReadAhead):
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        sizes = iter(self.sizes)
        want = next(sizes)
        carry = None  # samples from the end of the previous buffer, fewer than a batch
        for _ in self.buffers(epoch):
            buffer, data = ahead.next_buffer()
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
            del data
            ahead.release()
        if want is not None or carry is not None:
            raise StoreError("internal: the epoch's samples did not fill its batches")

    def epoch(self, epoch: int):
        """The batches of one epoch."""
        ahead = _ReadAhead(self, epoch)
        try:
            yield from self._epoch_batches(epoch, ahead)
        finally:
            ahead.close()

    def from_step(self, step: int):
        """Endless batches starting at global step ``step`` (a resumed run's position); the
        reading threads or worker processes live as long as the iteration."""
        epoch, skip = divmod(step, self.batches_per_epoch())
        ahead = _ReadAhead(self, epoch)
        try:
            for current in itertools.count(epoch):
                batches = self._epoch_batches(current, ahead)
                if current == epoch:
                    for _ in range(skip):
                        next(batches)
                yield from batches
        finally:
            ahead.close()

    def __iter__(self):
        return self.from_step(0)
