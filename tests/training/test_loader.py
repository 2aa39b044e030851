"""The training loader (agd_pipeline.loader): batches of whole read units at most one buffer ahead,
independent of the read-ahead and of epoch boundaries, DataLoader workers spawned once, even DDP
shares, a read error named, and training from either store format (one and two processes, resumed
after a kill)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

import agd_pipeline.training as training
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.errors import StoreError
from agd_pipeline.loader import StepBatches, UnitReader, batch_sizes
from agd_pipeline.store import TrajectoryStore
from agd_pipeline.store import schema

from conftest import QUIET, REPO, read_all_shards
from test_chunk_layout import small_chunk_store


@pytest.fixture
def single_row_units(monkeypatch):
    """Read units of one trajectory, so a 12-trajectory store has 12 of them."""
    monkeypatch.setattr(schema, "READ_BYTES", 1)


def test_reading_runs_at_most_one_buffer_ahead(tmp_path, single_row_units, monkeypatch):
    """While the first batch is held, the reader fills the next buffer and then waits."""
    store = small_chunk_store(tmp_path / "store", n=12)
    reads = []
    original = UnitReader.__getitem__
    monkeypatch.setattr(UnitReader, "__getitem__", lambda self, unit: reads.append(unit) or original(self, unit))
    batches = StepBatches(store, 4, seed=0, buffer_units=2)
    iterator = batches.from_step(0)
    next(iterator)
    time.sleep(0.5)
    assert len(reads) == 4  # the buffer in use and the one read ahead: 2 units each
    wanted = 3 * batches.batches_per_epoch()  # on across epoch boundaries, reading ahead all the way
    assert sum(1 for _ in zip(range(wanted), iterator)) == wanted
    iterator.close()


def test_batches_do_not_depend_on_read_ahead_or_epochs_boundaries(tmp_path, single_row_units):
    store = small_chunk_store(tmp_path / "store", n=12)
    batches = StepBatches(store, 5, seed=3, buffer_units=3)
    per_epoch = batches.batches_per_epoch()
    endless = [b for _, b in zip(range(3 * per_epoch), batches.from_step(0))]
    by_epoch = [b for e in range(3) for b in batches.epoch(e)]
    resumed = [b for _, b in zip(range(per_epoch + 2), batches.from_step(2 * per_epoch - 2))]
    for a, b in zip(endless, by_epoch):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(endless[2 * per_epoch - 2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_workers_are_spawned_once_for_the_whole_run(tmp_path, single_row_units):
    store = small_chunk_store(tmp_path / "store", n=12)
    batches = StepBatches(store, 6, seed=1, buffer_units=2, workers=2)
    alone = StepBatches(store, 6, seed=1, buffer_units=2)
    per_epoch = batches.batches_per_epoch()
    pids, got = set(), []
    for _, batch in zip(range(3 * per_epoch), batches.from_step(0)):
        got.append(batch)
        pids |= {p.pid for p in multiprocessing.active_children()}
    assert len(pids) == 2, pids  # three epochs, the same two workers
    expected = [b for _, b in zip(range(3 * per_epoch), alone.from_step(0))]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_read_error_reaches_the_training_loop_with_the_shard_named(tmp_path):
    store = small_chunk_store(tmp_path / "store", n=12)
    data = next(p for p in (store.root / "shard-000000.zarr" / "model_input").rglob("*")
                if p.is_file() and p.name != "zarr.json")
    data.write_bytes(b"garbage")
    with pytest.raises(StoreError, match="shard-000000.zarr"):
        for _ in StepBatches(store, 4, seed=0).epoch(0):
            pass


# ------------------------------------------------- both formats, DataLoader workers, DDP ranks


@pytest.mark.parametrize("total,batch,world", [(80, 16, 2), (81, 16, 2), (97, 16, 3), (33, 16, 2), (5, 4, 5)])
def test_batch_sizes_split_every_sample_once_into_equal_batch_counts(total, batch, world):
    sizes = batch_sizes(total, batch, world)
    assert sum(map(sum, sizes)) == total
    assert len({len(s) for s in sizes}) == 1
    assert all(0 < b <= batch for s in sizes for b in s)


@pytest.mark.parametrize("fmt", ["zarr", "tar"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_covers_every_sample_once_across_ranks(zarr_store, tar_store, fmt, world):
    store = TrajectoryStore(zarr_store if fmt == "zarr" else tar_store)
    loaders = [StepBatches(store, 7, seed=3, buffer_units=2, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        seen, counts = [], []
        for loader in loaders:
            batches = list(loader.epoch(epoch))
            counts.append(len(batches))
            for b in batches:
                seen += list(zip(b["trajectory_index"].tolist(), b["step_index"].tolist()))
        assert len(set(counts)) == 1, counts
        assert sorted(seen) == [(i, s) for i in range(20) for s in range(4)]
    one = list(loaders[0].epoch(0))
    assert [b["timesteps"].tolist() for b in one] == [b["timesteps"].tolist() for b in loaders[0].epoch(0)]


def test_batches_match_their_samples_in_the_store(zarr_store):
    """Every gathered sample is the store's (trajectory, step) row, with its own w and class."""
    shards = read_all_shards(zarr_store)
    data = {k: np.concatenate([shards[s][k] for s in sorted(shards)]) for k in shards["shard-000000.zarr"]}
    batch = next(iter(StepBatches(TrajectoryStore(zarr_store), 16, seed=0)))
    t, s = batch["trajectory_index"].numpy(), batch["step_index"].numpy()
    np.testing.assert_array_equal(batch["model_input"].numpy(), data["model_input"][t, s])
    np.testing.assert_array_equal(batch["guided_output"].numpy(), data["guided_output"][t, s])
    np.testing.assert_array_equal(batch["guidance_scale"].numpy(), data["guidance_scale"][t])
    np.testing.assert_array_equal(batch["class_label"].numpy(), data["class_label"][t])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "tar"])
def test_spawned_workers_give_the_same_batches(zarr_store, tar_store, fmt):
    store = TrajectoryStore(zarr_store if fmt == "zarr" else tar_store)
    alone = list(StepBatches(store, 8, seed=1, buffer_units=1).epoch(0))
    workers = list(StepBatches(store, 8, seed=1, buffer_units=1, workers=2).epoch(0))
    assert len(alone) == len(workers)
    for a, b in zip(alone, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_config(store, out, **overrides):
    return load_config(TrainConfig, {"store": str(store), "out_dir": str(out), "steps": 12, "batch_size": 16,
                                     "width": 8, "embed_dim": 16, "device": "cpu", "learning_rate": 0.01,
                                     **overrides})


def test_training_from_tar_equals_training_from_zarr(zarr_store, tar_store, tmp_path):
    from safetensors.torch import load_file

    training.train(train_config(zarr_store, tmp_path / "z"), **QUIET)
    training.train(train_config(tar_store, tmp_path / "t"), **QUIET)
    a, b = (load_file(tmp_path / d / "adapters.safetensors") for d in ("z", "t"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchrun_train(params, out, **settings) -> list[str]:
    params.write_text(json.dumps({"train": {"out_dir": str(out), "batch_size": 8, "width": 8, "embed_dim": 16,
                                            "device": "cpu", **settings}}))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "stages.train", "--params", str(params), "--no-progress"]


TORCHRUN_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def checkpoint_step(out) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.crash
@pytest.mark.slow
def test_two_process_training_checkpoints_every_step_and_resumes_after_a_kill(tar_store, tmp_path):
    """Two processes checkpoint at every step (each checkpoint a chance for the ranks to race on
    the folder); a run killed after a checkpoint resumes to the uninterrupted run's adapters."""
    from safetensors.torch import load_file

    settings = {"store": str(tar_store), "steps": 40, "checkpoint_every": 1}
    whole = tmp_path / "whole"
    result = subprocess.run(torchrun_train(tmp_path / "whole.yaml", whole, **settings), cwd=REPO,
                            env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes, 5 batches each per epoch" in result.stdout + result.stderr
    rows = (whole / "loss.csv").read_text().splitlines()
    assert len(rows) == 41  # header + 40 steps, written once
    # the last step's checkpoint stays (marked finished), no temporary beside it
    assert json.loads((whole / "checkpoint" / "state.json").read_text())["finished"] is True
    assert not (whole / "checkpoint.tmp").exists()

    killed = tmp_path / "killed"
    command = torchrun_train(tmp_path / "killed.yaml", killed, **settings)
    process = subprocess.Popen(command, cwd=REPO, env=TORCHRUN_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while checkpoint_step(killed) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    # torchrun starts its workers in sessions of their own: kill them first, then torchrun
    # (a worker may exit between the listing and its signal: that is not a failure of the test)
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for worker in workers:
        try:
            worker.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    step = checkpoint_step(killed)
    assert 5 <= step < 40 and not (killed / "adapters.safetensors").exists(), f"the kill landed at step {step}"
    result = subprocess.run(command, cwd=REPO, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout + result.stderr
    assert (killed / "loss.csv").read_text().splitlines()[0] == rows[0]
    assert len((killed / "loss.csv").read_text().splitlines()) == 41
    a, b = (load_file(d / "adapters.safetensors") for d in (whole, killed))
    assert a.keys() == b.keys()
    for name in a:  # gloo's all-reduce of two ranks adds in a fixed order: equal, within float noise at most
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_process_training_run_again_has_nothing_to_do(tar_store, tmp_path):
    """The same command on finished adapters: rank 0 finds nothing to do, and rank 1 stops with it instead
    of waiting for it at a barrier (a hang until the process group's timeout)."""
    command = torchrun_train(tmp_path / "p.yaml", tmp_path / "out", store=str(tar_store), steps=4)
    for run in ("first", "again"):
        result = subprocess.run(command, cwd=REPO, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, (run, result.stdout + result.stderr)
    assert "nothing to do" in result.stdout + result.stderr
    runtime = json.loads((tmp_path / "out" / "resolved_config.json").read_text())["runtime"]
    assert (runtime["num_processes"], runtime["distributed_type"]) == (2, "MULTI_CPU"), runtime


def test_large_units_shrink_the_buffer(tar_store):
    """Whole tar shards of big latents are held a few at a time, within the memory budget."""
    store = TrajectoryStore(tar_store)
    small = StepBatches(store, 7, seed=3, buffer_bytes=1)
    assert small.buffer_units == 1 and StepBatches(store, 7, seed=3).buffer_units == 16
    seen = sorted((i, s) for b in small.epoch(0)
                  for i, s in zip(b["trajectory_index"].tolist(), b["step_index"].tolist()))
    assert seen == [(i, s) for i in range(20) for s in range(4)]
