"""WebDataset tar shards, conversion, lossy BitRound, and the training loader (even DDP shares,
DataLoader workers, training from either format)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch

import agd_pipeline.training as training
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.errors import StoreError
from agd_pipeline.loader import StepBatches, batch_sizes
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store

from conftest import REPO, STORE_SETTINGS, generate_store, read_all_shards, run_cli, run_main

QUIET = dict(progress=False, log=lambda *a, **k: None)
# chunks as large as shards: a Zarr chunk row and a tar shard are then the same loader unit
SETTINGS = {**STORE_SETTINGS, "chunk_bytes": 4096}


@pytest.fixture(scope="module")
def zarr_store(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "zarr"
    generate_store(tiny_base_dir, root, **SETTINGS)
    return root


@pytest.fixture(scope="module")
def tar_store(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "tar"
    generate_store(tiny_base_dir, root, **SETTINGS, format="webdataset")
    return root


def test_tar_shards_hold_the_same_arrays_as_zarr(zarr_store, tar_store):
    assert sorted(p.name for p in tar_store.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    a, b = TrajectoryStore(zarr_store), TrajectoryStore(tar_store)
    assert [s["checksums"] for s in a.shards] == [s["checksums"] for s in b.shards]
    assert b.problems(full=True) == []
    for name, value in a.dask_arrays().items():
        np.testing.assert_array_equal(value.compute(), b.dask_arrays()[name].compute(), err_msg=name)
    # a plain WebDataset reader sees one sample per trajectory, keyed by its index
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(str(tar_store / "shard-000001.tar"), shardshuffle=False,
                                                 empty_check=False)]
    assert keys == [f"{i:09d}" for i in range(8, 16)]


def test_convert_zarr_to_webdataset_and_back(zarr_store, tar_store, tmp_path):
    result = run_cli("stages.convert", zarr_store, tmp_path / "converted", "--no-progress")
    assert result.returncode == 0, result.stderr
    converted = json.loads((tmp_path / "converted" / MANIFEST).read_text())
    assert converted["format"] == "webdataset"
    assert [s["checksum"] for s in converted["shards"]] == \
        [s["checksum"] for s in json.loads((tar_store / MANIFEST).read_text())["shards"]]
    back = convert_store(tmp_path / "converted", tmp_path / "back", "zarr", **QUIET)
    assert back["converted_shards"] == 3
    for shard, arrays in read_all_shards(tmp_path / "back").items():
        for name, value in arrays.items():
            np.testing.assert_array_equal(value, read_all_shards(zarr_store)[shard][name])
    again = run_cli("stages.convert", zarr_store, tmp_path / "converted", "--no-progress")
    assert again.returncode == 0 and "(already complete)" in again.stdout


@pytest.mark.bad_input
def test_damaged_tar_shards_are_named(tar_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tar_store, root)
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])  # truncated
    problems = [str(p) for p in TrajectoryStore(root).problems()]  # the cheap check sees the size
    recorded = json.loads((tar_store / MANIFEST).read_text())["shards"][1]["bytes"]
    assert problems == [f"shard-000001.tar: 3000 bytes on disk, the manifest says {recorded} (truncated or changed)"]
    # a flipped byte inside a compressed payload: same size, caught by the full check, named by array
    shutil.copy(tar_store / "shard-000001.tar", tar)
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as archive:  # the first sample's arrays (its json member comes before them)
        start = next(m.offset_data for m in archive if m.name.endswith(".trajectory.npz"))
    data[start + 1024] ^= 0xFF  # inside the first sample's .npz member, past its zip and .npy headers
    tar.write_bytes(bytes(data))
    assert TrajectoryStore(root).problems() == []
    full = TrajectoryStore(root).problems(full=True)
    assert full and {p.shard for p in full} == {"shard-000001.tar"} and all(p.array for p in full), full


def test_bitround_is_lossy_the_same_way_in_both_formats(tiny_base_dir, zarr_store, tmp_path):
    generate_store(tiny_base_dir, tmp_path / "z", **SETTINGS, bitround_keepbits=3)
    generate_store(tiny_base_dir, tmp_path / "t", **SETTINGS, bitround_keepbits=3, format="webdataset")
    lossy_z, lossy_t = TrajectoryStore(tmp_path / "z"), TrajectoryStore(tmp_path / "t")
    assert [s["checksums"] for s in lossy_z.shards] == [s["checksums"] for s in lossy_t.shards]
    # checksums are taken from the values as written: re-reading the stored (rounded) arrays agrees
    assert lossy_z.problems(full=True) == [] and lossy_t.problems(full=True) == []
    exact = TrajectoryStore(zarr_store).dask_arrays()["guided_output"].compute().astype(np.float32)
    rounded = lossy_z.dask_arrays()["guided_output"].compute().astype(np.float32)
    relative = np.abs(rounded - exact) / np.maximum(np.abs(exact), 1e-3)
    assert 0 < relative.max() <= 2.0 ** -4  # 3 mantissa bits kept: error at most half a unit in the 4th
    assert np.array_equal(lossy_z.dask_arrays()["timesteps"].compute(),
                          TrajectoryStore(zarr_store).dask_arrays()["timesteps"].compute())  # only latents
    assert sum(s["bytes"] for s in lossy_z.shards) < sum(s["bytes"] for s in TrajectoryStore(zarr_store).shards)


# ----------------------------------------------------------------------------------- loader


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


# ------------------------------------------------------------------------------ hostile tars


def test_a_tar_shard_replaced_by_another_of_the_same_size_stops_training(tar_store, tmp_path):
    """Same size, a sound tar: the cheap check passes it; the digests checked as the loader reads
    its units do not."""
    root = tmp_path / "store"
    shutil.copytree(tar_store, root)
    shutil.copy(root / "shard-000000.tar", root / "shard-000001.tar")
    assert (root / "shard-000000.tar").stat().st_size == (root / "shard-000001.tar").stat().st_size
    assert TrajectoryStore(root).problems() == []
    with pytest.raises(StoreError, match=r"shard-000001\.tar/\w+: trajectories \d+-\d+ .*do not match the digest "
                                         r"recorded.*stages.generate --verify full"):
        training.train(load_config(TrainConfig, {
            "store": str(root), "out_dir": str(tmp_path / "adapters"), "steps": 6, "batch_size": 16, "width": 8,
            "embed_dim": 16, "device": "cpu", "checkpoint_every": 0, "seed": 0, "validate_every": -1,
            "verify": "cheap"}), **QUIET)


def rewrite_tar(root, shard: str, change) -> None:
    """Write ``shard`` again member for member, ``change(members)`` altering the list of (TarInfo,
    bytes); the manifest and the sidecar then record the new size, as a forger would."""
    path = root / shard
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    change(members)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    size = path.stat().st_size
    manifest = json.loads((root / MANIFEST).read_text())
    next(s for s in manifest["shards"] if s["name"] == shard)["bytes"] = size
    (root / MANIFEST).write_text(json.dumps(manifest))
    side = root / (shard + ".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "bytes": size}))


def _special(kind, linkname=""):
    def add(members):
        info = tarfile.TarInfo("000000099.trajectory.npz")
        info.type, info.linkname = kind, linkname
        members.append((info, b""))
    return add


def _renamed(name):
    def rename(members):
        members[0][0].name = name
    return rename


@pytest.mark.parametrize("change, member", [
    (_renamed("../../EVIL_000000008.trajectory.npz"), "../../EVIL_000000008.trajectory.npz"),
    (_renamed("/tmp/EVIL_000000008.trajectory.npz"), "/tmp/EVIL_000000008.trajectory.npz"),
    (_special(tarfile.SYMTYPE, "/etc/passwd"), "000000099.trajectory.npz"),
    (_special(tarfile.LNKTYPE, "000000008.trajectory.npz"), "000000099.trajectory.npz"),
    (_special(tarfile.CHRTYPE), "000000099.trajectory.npz"),
], ids=["parent-path", "absolute-path", "symlink", "hardlink", "device"])
def test_a_tar_member_outside_the_store_or_not_a_file_is_corruption(tar_store, tmp_path, change, member):
    root = tmp_path / "store"
    shutil.copytree(tar_store, root)
    rewrite_tar(root, "shard-000001.tar", change)
    for mode in ("full", "cheap"):  # inspect --verify, and train's checks
        problems = [str(p) for p in TrajectoryStore(root).problems(mode=mode)]
        assert len(problems) == 1 and problems[0].startswith("shard-000001.tar: "), (mode, problems)
        assert repr(member) in problems[0] and "\n" not in problems[0], (mode, problems)
    result = run_main("stages.inspect", root, "--verify")
    assert result.returncode == 1 and "shard-000001.tar: " in result.stdout and repr(member) in result.stdout
    assert not list(tmp_path.rglob("EVIL_*"))  # nothing extracted


FULL_DISK = textwrap.dedent("""
    import errno, io, sys
    import webdataset.writer

    class FullDisk(io.FileIO):  # the disk fills up after 4 KiB
        written = 0

        def write(self, data):
            if FullDisk.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            FullDisk.written += len(data)
            return super().write(data)

    webdataset.writer.gopen = lambda path, mode="rb", **kw: io.BufferedWriter(FullDisk(path, "wb"))
    from stages.generate import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.crash
def test_a_full_disk_during_a_tar_shard_is_one_error_line_and_leaves_nothing_behind(tiny_base_dir, tmp_path):
    out = tmp_path / "store"
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"generate": {**SETTINGS, "base_model": str(tiny_base_dir), "out_dir": str(out),
                                               "format": "webdataset"}}))
    result = subprocess.run([sys.executable, "-c", FULL_DISK, "--params", str(params), "--no-progress"], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the disk is full" in lines[0], result.stderr
    assert "Exception ignored" not in result.stderr
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.endswith((".partial", ".tmp")) or name.startswith("shard-")], left
