"""The store's chunk layout (chosen from the data, in bytes), Zarr shards of a handful of files,
tar shards read in place, and the thread policy (the loader's read-ahead and persistent workers:
training/test_loader.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agd_pipeline.errors import StoreError
from agd_pipeline.store import StoreWriter, TrajectoryStore
from agd_pipeline.store.schema import CLASS_CONDITION, FILE_BYTES, array_specs, chunk_layout, read_rows, unit_rows
from benchmarks.data_path import synthetic_arrays, synthetic_header, write_synthetic_store

from conftest import REPO

TEXT = {"prompt_index": {"dtype": "int64", "shape": []},
        "prompt_embeds": {"dtype": "float16", "shape": [77, 1024]}}


def header_for(latent, steps, shard_size, conditions=CLASS_CONDITION, chunk_bytes=4 << 20, trajectories=1000):
    return synthetic_header(latent, trajectories, steps, shard_size, chunk_bytes=chunk_bytes, conditions=conditions)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("latent, steps, shard, conditions", [
    ((4, 32, 32), 50, 200, CLASS_CONDITION),  # DiT-XL/2 at 256 px
    ((4, 96, 96), 50, 250, TEXT),  # SD 2.1 at 768 px
    ((4, 128, 128), 50, 250, TEXT),  # SDXL at 1024 px: a trajectory is larger than a chunk
    ((1, 8, 8), 32, 200, CLASS_CONDITION),  # the embedded default
])
def test_chunks_are_sized_in_bytes_and_files_are_few(latent, steps, shard, conditions):
    header = header_for(latent, steps, shard, conditions)
    layout = chunk_layout(header, shard)
    specs = array_specs(header, shard)
    rows = unit_rows(header)
    trajectory = nbytes(specs["model_input"][0][1:], "float16")
    assert rows == max(1, min(shard, (4 << 20) // trajectory))
    for name, (shape, dtype) in specs.items():
        chunks, shards = layout[name]
        assert len(chunks) == len(shape)
        if name in ("model_input", "guided_output"):
            assert chunks[0] == rows
            assert nbytes(chunks, dtype) <= max(4 << 20, nbytes(chunks[:1] + chunks[1:], dtype))
            assert nbytes(chunks, dtype) <= 4 << 20 or chunks[1] == 1
            if trajectory > 4 << 20:  # split along steps, into pieces of at most a chunk
                assert chunks[1] < steps and nbytes(chunks, dtype) <= 4 << 20
        if shards is not None:  # a sharded array: whole chunks per file, files of at most FILE_BYTES
            assert all(s % c == 0 for s, c in zip(shards, chunks))
            assert nbytes(shards, dtype) <= max(FILE_BYTES, nbytes(chunks, dtype))
        if name in ("guidance_scale", "seed", "trajectory_index", "timesteps", "class_label", "prompt_index"):
            assert chunks[0] == shard and shards is None  # small: one chunk per shard
    files = sum(math.prod(-(-d // c) for d, c in zip(specs[n][0], (s or c))) for n, (c, s) in layout.items())
    # data files + a zarr.json per array and the group's: the bound is 200 per 1,000 trajectories
    assert 1000 * (files + len(specs) + 1) / shard <= 200


def test_the_loader_reads_whole_chunks_of_about_read_bytes():
    dit, sd = header_for((4, 32, 32), 50, 200), header_for((4, 96, 96), 50, 250, TEXT)
    assert (unit_rows(dit), read_rows(dit)) == (10, 40)  # 2 arrays x 400 KiB a trajectory: 32 MiB
    assert (unit_rows(sd), read_rows(sd)) == (1, 4)  # 2 arrays x 3.5 MiB
    assert read_rows(header_for((1, 8, 8), 32, 200)) == 200  # the default: a whole shard


def test_a_short_last_shard_keeps_the_store_s_unit():
    header = header_for((4, 32, 32), 50, 200)
    assert chunk_layout(header, 7)["model_input"][0][0] == 7
    assert unit_rows(header) == 10


# --------------------------------------------------------------------- Zarr shards on disk


def small_chunk_store(root: Path, fmt: str = "zarr", n: int = 12, **overrides) -> TrajectoryStore:
    """4x8x8 latents, 6 steps: 3 KiB per trajectory per array; chunks of 1 KiB: 2 steps of one."""
    header = synthetic_header((4, 8, 8), n, 6, 12, chunk_bytes=1024, fmt=fmt, **overrides)
    return write_synthetic_store(root, header)


def test_a_zarr_shard_of_many_chunks_is_a_handful_of_files(tmp_path):
    store = small_chunk_store(tmp_path / "store")
    shard = tmp_path / "store" / "shard-000000.zarr"
    group = store.open_shard("shard-000000.zarr")
    assert group["model_input"].chunks[0] == 1 and group["model_input"].shards[0] == 12
    data_files = [p for p in (shard / "model_input").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(data_files) == 1  # 12 chunks, one file
    expected = synthetic_arrays((4, 8, 8), 0, 12, 6)
    for name, value in expected.items():
        np.testing.assert_array_equal(group[name][:], value, err_msg=name)
    # the loader's unit: whole chunks, about READ_BYTES of latents (here all 12 rows)
    assert store.chunk_ranges() == [("shard-000000.zarr", 0, 12)]
    assert store.problems(full=True) == []


def test_writes_in_any_pieces_store_the_same_shard(tmp_path):
    """Rows held until they fill a file, rows written out of order, one write: the same arrays."""
    header = synthetic_header((4, 8, 8), 12, 6, 12, chunk_bytes=1024)
    values = synthetic_arrays((4, 8, 8), 0, 12, 6)
    sums = []
    for label, pieces in (("whole", [(0, 12)]), ("in-order", [(0, 5), (5, 7), (7, 12)]),
                          ("out-of-order", [(7, 12), (0, 7)])):
        writer = StoreWriter(tmp_path / label, header, log=lambda *a: None)
        shard = writer.begin_shard(0)
        for a, b in pieces:
            shard.write(a, {k: v[a:b] for k, v in values.items()})
        sums.append(shard.finish()["checksums"])
        group = TrajectoryStore(tmp_path / label).open_shard("shard-000000.zarr")
        np.testing.assert_array_equal(group["model_input"][:], values["model_input"], err_msg=label)
    assert sums[0] == sums[1] == sums[2]


def test_damage_to_a_sharded_array_is_found(tmp_path):
    store = small_chunk_store(tmp_path / "store")
    data = next(p for p in (tmp_path / "store" / "shard-000000.zarr" / "guided_output").rglob("*")
                if p.is_file() and p.name != "zarr.json")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte of one chunk, in place: only the full check sees it
    data.write_bytes(bytes(raw))
    assert TrajectoryStore(store.root).problems(full=False) == []
    found = TrajectoryStore(store.root).problems(full=True)
    assert [(p.shard, p.array) for p in found] == [("shard-000000.zarr", "guided_output")]
    data.write_bytes(bytes(raw[:-100]))  # truncated: the cheap check sees it
    found = TrajectoryStore(store.root).problems(full=False)
    assert found and "guided_output" in str(found[0]) and "bytes" in str(found[0])
    data.unlink()
    found = TrajectoryStore(store.root).problems(full=False)
    assert found and "0 of 1 chunk files" in str(found[0])


@pytest.mark.bad_input
def test_an_older_store_schema_is_refused_with_what_to_do(tmp_path):
    import json

    store = small_chunk_store(tmp_path / "store")
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["schema_version"] = 3
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="schema version 3.*reads 4"):
        TrajectoryStore(store.root)


# ------------------------------------------------------------------------- tar shards


@pytest.mark.parametrize("compressor", ["none", "deflate"])
def test_tar_rows_are_read_in_place_and_match_the_zarr_store(tmp_path, compressor):
    tar = small_chunk_store(tmp_path / "tar", fmt="webdataset", compressor=compressor)
    zarr_store = small_chunk_store(tmp_path / "zarr")
    assert [u[1:] for u in tar.chunk_ranges()] == [u[1:] for u in zarr_store.chunk_ranges()]
    shard, group = tar.open_shard("shard-000000.tar"), zarr_store.open_shard("shard-000000.zarr")
    for name in shard.array_keys():  # the data (a Zarr shard also holds derived coordinates)
        np.testing.assert_array_equal(shard[name][3:7], group[name][3:7], err_msg=name)
        np.testing.assert_array_equal(shard[name][:], group[name][:], err_msg=name)
    row = shard.row("model_input", 2)
    if compressor == "none":  # a view of the memory map, not a copy
        assert not row.flags.owndata and not row.flags.writeable
    assert tar.problems(full=True) == []


def test_a_damaged_tar_is_named(tmp_path):
    store = small_chunk_store(tmp_path / "tar", fmt="webdataset")
    path = store.root / "shard-000000.tar"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    found = TrajectoryStore(store.root).problems(full=False)
    assert found and "bytes on disk" in str(found[0])
    with pytest.raises(StoreError):
        store.open_shard("shard-000000.tar").members()


# ------------------------------------------------------------------------- thread policy


def threads_in_a_command(env: dict) -> subprocess.CompletedProcess:
    code = ("import sys; from agd_pipeline.cli import run_command\n"
            "def body():\n    import torch; print(torch.get_num_threads())\n"
            "sys.exit(run_command(body))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "AGD_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env, expected", [({}, "1"), ({"AGD_NUM_THREADS": "2"}, "2"),
                                           ({"OMP_NUM_THREADS": "2"}, "2"),
                                           ({"AGD_NUM_THREADS": "all"}, str(len(os.sched_getaffinity(0))))])
def test_every_command_sets_torch_threads_by_the_policy(env, expected):
    result = threads_in_a_command(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.bad_input
def test_a_bad_thread_count_is_one_clear_error():
    result = threads_in_a_command({"AGD_NUM_THREADS": "many"})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: AGD_NUM_THREADS='many': expected a positive integer or 'all'"


def test_a_store_of_an_older_schema_is_replaced_only_when_asked(tmp_path):
    import json

    small_chunk_store(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    manifest["schema_version"] = 3
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    header = synthetic_header((4, 8, 8), 12, 6, 12, chunk_bytes=1024)
    with pytest.raises(StoreError, match="schema version 3.*--restart-on-mismatch true"):
        StoreWriter(tmp_path / "store", header, log=lambda *a: None)
    assert (tmp_path / "store" / "shard-000000.zarr").is_dir()  # nothing removed
    said = []
    writer = StoreWriter(tmp_path / "store", header, restart_on_mismatch=True, log=said.append)
    assert writer.pending() == [0] and "schema version 3 (an older release)" in said[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"schema_version": 3, "mine": True}))
    with pytest.raises(StoreError, match="not a trajectory store"):  # not ours: never removed
        StoreWriter(tmp_path / "other", header, restart_on_mismatch=True, log=lambda *a: None)
    assert (tmp_path / "other" / "manifest.json").exists()
