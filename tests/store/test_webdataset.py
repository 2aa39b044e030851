"""WebDataset tar shards, conversion, lossy BitRound and hostile tars (the training loader over both
formats, its DDP shares and DataLoader workers: training/test_loader.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

import agd_pipeline.training as training
from agd_pipeline.config import TrainConfig, load_config
from agd_pipeline.errors import StoreError
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store

from conftest import REPO, SETTINGS, generate_store, read_all_shards, run_cli, run_main

QUIET = dict(progress=False, log=lambda *a, **k: None)


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
