"""Stage one at scale: killed with SIGKILL at random points, several writer processes, full or
read-only disks, damaged shards repaired by re-running generate."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from agd_pipeline.errors import StoreError
from agd_pipeline.store import MANIFEST, MANIFEST_LOG, TrajectoryStore, read_manifest
from agd_pipeline.store.formats.zarr import ZarrShardWriter

from conftest import REPO, STORE_SETTINGS, generate_store, read_all_shards, run_cli

# every test here kills, races or fills the disk under stage one and checks what survives
pytestmark = pytest.mark.crash

# 10 classes x 2 trajectories in 10 shards of 2: many commit points to die between.
SETTINGS = {**STORE_SETTINGS, "shard_size": 2, "batch_size": 2}


def assert_same_arrays(a, b) -> None:
    shards_a, shards_b = read_all_shards(a), read_all_shards(b)
    assert sorted(shards_a) == sorted(shards_b)
    for shard, arrays in shards_a.items():
        assert sorted(arrays) == sorted(shards_b[shard])
        for name, value in arrays.items():
            assert np.array_equal(value, shards_b[shard][name]), f"{shard}/{name} differs"
    manifest_a, manifest_b = (json.loads((r / MANIFEST).read_text()) for r in (a, b))
    assert [s["status"] for s in manifest_a["shards"]] == ["complete"] * len(manifest_b["shards"])
    assert [s["checksum"] for s in manifest_a["shards"]] == [s["checksum"] for s in manifest_b["shards"]]
    assert TrajectoryStore(a).problems(full=True) == []


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference") / "store"
    generate_store(tiny_base_dir, root, **{k: v for k, v in SETTINGS.items() if k != "seed"}, seed=0)
    return root


def chunk_file(root, shard: str, array: str):
    return next(p for p in sorted((root / shard / array / "c").rglob("*")) if p.is_file())


def params_file(path, base_dir, out_dir) -> str:
    path.write_text(json.dumps({"generate": {**SETTINGS, "base_model": str(base_dir), "out_dir": str(out_dir)}}))
    return str(path)


def generate_command(params: str) -> list[str]:
    return [sys.executable, "-m", "stages.generate", "--params", params, "--no-progress"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def complete_shards(root) -> int:
    return sum(1 for p in root.glob("shard-*.zarr") if p.is_dir())


def start_and_kill(params: str, root, shards_before_kill: int, extra_delay: float) -> None:
    """Start generate, wait until ``shards_before_kill`` shards are published, sleep a little more
    (to land inside a shard, or between its rename and the manifest update), then SIGKILL it."""
    process = subprocess.Popen(generate_command(params), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while complete_shards(root) < shards_before_kill and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tiny_base_dir, reference, tmp_path):
    rng = random.Random(20261125)
    kills = [(0, rng.uniform(0.0, 1.0))] + [(rng.randint(1, 9), rng.uniform(0.0, 0.05)) for _ in range(3)]
    root = tmp_path / "store"
    params = params_file(tmp_path / "params.yaml", tiny_base_dir, root)
    seen_partial_states, journaled = set(), 0
    for shards_before_kill, delay in sorted(kills):
        start_and_kill(params, root, shards_before_kill, delay)
        if (root / MANIFEST).exists():
            # the snapshot and its journal (manifest.log, a line per shard committed since; a line
            # torn by the kill is ignored), as every reader sees them
            manifest = read_manifest(root)
            journaled += (root / MANIFEST_LOG).exists()
            listed = {s["name"] for s in manifest["shards"] if s["status"] == "complete"}
            # nothing half-written is ever listed as complete
            assert all((root / name / "zarr.json").exists() for name in listed)
            assert TrajectoryStore(root).problems(full=True, only=listed) == []
            seen_partial_states.add(len(listed))
    assert len(seen_partial_states) >= 2, "the kills all landed at the same point"
    assert journaled, "no kill left a journal: the commits since the snapshot were never replayed"
    result = subprocess.run(generate_command(params), cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (root / MANIFEST_LOG).exists(), "the finished run left its journal"
    assert_same_arrays(root, reference)


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one(tiny_base_dir, reference, tmp_path):
    root = tmp_path / "store"
    params = params_file(tmp_path / "params.yaml", tiny_base_dir, root)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "stages.generate", "--params", params, "--no-progress"]
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    # each process owns whole shards: 10 shards split 5 + 5, none written twice
    assert "rank 0 wrote 5 shard(s), 10 trajectories" in output, output
    assert "rank 1 wrote 5 shard(s), 10 trajectories" in output, output
    assert_same_arrays(root, reference)
    # rank 0 consolidated the root once every rank's shards were in: all ten listed there
    root_metadata = json.loads((root / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert {key for key in root_metadata if "/" not in key} == {p.name for p in root.glob("shard-*.zarr")}
    # and a second run with two processes finds nothing to do
    again = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied")])
def test_disk_errors_stop_cleanly_and_keep_the_finished_shards(tiny_base_dir, reference, tmp_path, monkeypatch,
                                                               code, words):
    root = tmp_path / "store"
    original = ZarrShardWriter.write
    calls = []

    def failing_write(self, offset, arrays):
        calls.append(self.index)
        if self.index == 3:
            raise OSError(code, os.strerror(code))
        return original(self, offset, arrays)

    monkeypatch.setattr(ZarrShardWriter, "write", failing_write)
    with pytest.raises(StoreError, match=f"shard-000003.zarr: cannot write \\({words}\\).*intact.*resume"):
        generate_store(tiny_base_dir, root, **SETTINGS)
    assert not list(root.glob("*.partial")) and not list(root.glob("*.tmp"))  # the failed shard's files removed
    manifest = json.loads((root / MANIFEST).read_text())
    assert [s["status"] for s in manifest["shards"]][:4] == ["complete"] * 3 + ["pending"]
    done = {s["name"] for s in manifest["shards"] if s["status"] == "complete"}
    assert TrajectoryStore(root).problems(full=True, only=done) == []
    monkeypatch.undo()
    generate_store(tiny_base_dir, root, **SETTINGS)
    assert_same_arrays(root, reference)


def test_generate_verify_full_rewrites_only_damaged_shards(tiny_base_dir, reference, tmp_path, monkeypatch):
    import agd_pipeline.generation as generation

    root = tmp_path / "store"
    shutil.copytree(reference, root)
    chunk = chunk_file(root, "shard-000004.zarr", "model_input")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, so only a full check can see it
    chunk.write_bytes(bytes(data))
    result = run_cli("stages.train", "--store", root, "--out-dir", tmp_path / "adapters", "--steps", "1",
                     "--device", "cpu")
    assert result.returncode == 2
    assert "shard-000004.zarr/model_input: " in result.stderr
    assert "--verify full" in result.stderr and "Traceback" not in result.stderr

    written = []
    original = generation.record_batch
    monkeypatch.setattr(generation, "record_batch",
                        lambda *a, **k: written.append(a[1]["trajectory_index"].tolist()) or original(*a, **k))
    generate_store(tiny_base_dir, root, **SETTINGS)  # cheap check: files and sizes are fine, nothing rewritten
    assert written == []
    generate_store(tiny_base_dir, root, **SETTINGS, verify="full")
    assert written == [[8, 9]]  # shard 4 only
    assert_same_arrays(root, reference)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_generate_cheap_check_rewrites_truncated_or_missing_chunks(tiny_base_dir, reference, tmp_path, monkeypatch,
                                                                    damage):
    import agd_pipeline.generation as generation

    root = tmp_path / "store"
    shutil.copytree(reference, root)
    chunk = chunk_file(root, "shard-000003.zarr", "guided_output")
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:10])
    else:
        chunk.unlink()
    written, messages = [], []
    original = generation.record_batch
    monkeypatch.setattr(generation, "record_batch",
                        lambda *a, **k: written.append(a[1]["trajectory_index"].tolist()) or original(*a, **k))
    from agd_pipeline.config import GenerateConfig, load_config

    config = load_config(GenerateConfig, {**SETTINGS, "base_model": str(tiny_base_dir), "out_dir": str(root)})
    generation.generate(config, progress=False, log=messages.append)
    assert written == [[6, 7]]  # shard 3 only
    assert any("shard-000003.zarr: damaged" in m and "guided_output" in m for m in messages), messages
    assert_same_arrays(root, reference)


def test_verify_names_every_bad_array(reference, tmp_path):
    import zarr

    root = tmp_path / "store"
    shutil.copytree(reference, root)
    group = zarr.open_group(str(root / "shard-000002.zarr"), mode="r+")
    values = group["guided_output"][:]
    values[0, 0, 0, 0, 0] = np.nan
    group["guided_output"][:] = values
    group["timesteps"][0, 0] = 1.0  # a silent change
    chunk = chunk_file(root, "shard-000007.zarr", "sample")
    chunk.write_bytes(b"garbage")
    problems = {str(p) for p in TrajectoryStore(root).problems(full=True)}
    assert "shard-000002.zarr/guided_output: holds NaN or inf" in problems
    assert "shard-000002.zarr/guided_output: checksum differs from the manifest (data changed on disk)" in problems
    assert "shard-000002.zarr/timesteps: checksum differs from the manifest (data changed on disk)" in problems
    assert any(p.startswith("shard-000007.zarr/sample: unreadable") for p in problems)
    assert len(problems) == 4, problems
    result = run_cli("stages.inspect", root, "--verify")
    assert result.returncode == 1
    for line in ("shard-000002.zarr/guided_output", "shard-000002.zarr/timesteps", "shard-000007.zarr/sample"):
        assert line in result.stdout


def test_restart_on_mismatch_replaces_a_store_of_other_settings(tiny_base_dir, reference, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(reference, root)
    with pytest.raises(StoreError, match="restart_on_mismatch"):
        generate_store(tiny_base_dir, root, **{**SETTINGS, "seed": 1})
    generate_store(tiny_base_dir, root, **{**SETTINGS, "seed": 1}, restart_on_mismatch=True)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 1
    assert TrajectoryStore(root).problems(full=True) == []
