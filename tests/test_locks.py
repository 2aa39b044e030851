"""One writer per folder (agd_pipeline.locks): a second generate or train on a folder is refused naming
the holder, two generates started at once never mix, a store being read is not rewritten, and a killed
holder's lock is released."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import agd_pipeline.training as training
from agd_pipeline.errors import AgdError
from agd_pipeline.generation import generate
from agd_pipeline.locks import LOCK_FILE, FolderLock
from agd_pipeline.store import TrajectoryStore

from conftest import QUIET, REPO, generate_config, generate_store, listing, run_cli
from test_training import train_config


HOLD_LOCK = textwrap.dedent("""
    import sys
    from agd_pipeline.locks import FolderLock
    lock = FolderLock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared").acquire()
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def hold_lock():
    """Hold a folder's lock in another process (as a second run would) until the test ends."""
    held = []

    def start(folder, purpose="stages.generate", shared=False):
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), purpose,
                                    "shared" if shared else "exclusive"], cwd=REPO, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        held.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in held:
        process.stdin.close()
        process.wait(timeout=30)


@pytest.mark.bad_input
def test_a_second_generate_is_refused_naming_the_holder(tiny_base_dir, store_copy, hold_lock):
    holder = hold_lock(store_copy)
    result = run_cli("stages.generate", "--base-model", tiny_base_dir, "--out-dir", store_copy,
                     "--trajectories-per-class", 2, "--num-steps", 4, "--shard-size", 8, "--device", "cpu")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {holder.pid}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_two_generates_started_at_once_never_mix(tiny_base_dir, tmp_path):
    """Two real processes on one out_dir: one writes, the other is refused (or, if it starts after
    the first finished, finds nothing to do); the store is the same as one run's."""
    import os

    root = tmp_path / "store"
    settings = ["--base-model", tiny_base_dir, "--out-dir", root, "--trajectories-per-class", 4, "--num-steps", 8,
                "--shard-size", 4, "--batch-size", 4, "--device", "cpu", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "stages.generate", *map(str, settings)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, _, err in results:
        if code == 2:
            assert "in use by stages.generate (pid" in err and len(err.strip().splitlines()) == 1, err
    reference = tmp_path / "reference"
    generate_store(tiny_base_dir, reference, trajectories_per_class=4, num_steps=8, shard_size=4, batch_size=4)
    assert TrajectoryStore(root).problems(full=True) == []
    assert [s["checksum"] for s in TrajectoryStore(root).shards] == \
        [s["checksum"] for s in TrajectoryStore(reference).shards]


@pytest.mark.bad_input
def test_a_second_train_on_one_out_dir_is_refused(tiny_store, tmp_path, hold_lock):
    out = tmp_path / "adapters"
    hold_lock(out, "stages.train")
    with pytest.raises(AgdError, match=r"in use by stages\.train \(pid"):
        training.train(train_config(tiny_store, out), **QUIET)
    assert listing(out) == []


def test_a_store_being_read_by_train_is_not_rewritten(tiny_base_dir, store_copy, hold_lock):
    hold_lock(store_copy, "stages.train (reading the store)", shared=True)
    before = listing(store_copy)
    with pytest.raises(AgdError, match="in use by another process reading it"):
        generate(generate_config(tiny_base_dir, store_copy, seed=5, restart_on_mismatch=True), **QUIET)
    assert listing(store_copy) == before


@pytest.mark.crash
def test_the_lock_is_released_when_its_holder_is_killed(store_copy, hold_lock):
    from agd_pipeline.locks import FolderLock

    holder = hold_lock(store_copy)
    holder.kill()
    holder.wait(timeout=30)
    with FolderLock(store_copy, "test"):
        pass


def test_a_sibling_lock_leaves_nothing_behind_and_a_removed_one_is_not_held(tmp_path):
    from agd_pipeline.locks import LockError

    sibling = dict(lock_file=f".derived{LOCK_FILE}")
    with FolderLock(tmp_path, "stages.finetune", **sibling):
        with pytest.raises(LockError, match="derived is in use by stages.finetune"):
            FolderLock(tmp_path, "stages.finetune", **sibling).acquire()
    assert list(tmp_path.iterdir()) == []  # released: no lock file left beside the folder
    late = FolderLock(tmp_path, "stages.finetune", **sibling)
    late._file = open(tmp_path / sibling["lock_file"], "a+")  # opened, then the holder released and removed it
    (tmp_path / sibling["lock_file"]).unlink()
    assert not late._still_linked()
    late._file.close()
    late._file = None
