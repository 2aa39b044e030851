"""Nothing lost, nothing mixed, nothing corrupt passed on: the deletion guard, one writer per folder,
checkpoints bound to their store, verified conversion, manifest recovery, no unpickling from output
folders, and stores that plain zarr, xarray, webdataset and dask read without our code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import agd_pipeline.training as training
from agd_pipeline.config import GenerateConfig, load_config
from agd_pipeline.errors import AgdError, StoreError
from agd_pipeline.generation import generate
from agd_pipeline.locks import LOCK_FILE
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store
from agd_pipeline.store.ownership import foreign_entries

from conftest import REPO, STORE_SETTINGS, generate_store, read_all_shards, run_cli
from test_training import interrupted_training, kept_checkpoint, train_config

QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    return root


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != LOCK_FILE)


def generate_config(base, out, **overrides):
    return load_config(GenerateConfig, {**STORE_SETTINGS, "base_model": str(base), "out_dir": str(out), **overrides})


# ------------------------------------------------------------------------------ deletion guard


def test_restart_refuses_a_folder_holding_a_foreign_file(tiny_base_dir, store_copy):
    (store_copy / "notes.txt").write_text("my thesis")
    before = listing(store_copy)
    with pytest.raises(StoreError, match=r"notes\.txt.*refusing to delete anything"):
        generate(generate_config(tiny_base_dir, store_copy, seed=5, restart_on_mismatch=True), **QUIET)
    assert listing(store_copy) == before
    assert (store_copy / "notes.txt").read_text() == "my thesis"


def test_restart_refuses_a_foreign_folder_inside_a_shard(tiny_base_dir, store_copy):
    (store_copy / "shard-000001.zarr" / "my_results").mkdir()
    (store_copy / "shard-000001.zarr" / "my_results" / "table.csv").write_text("1,2\n")
    with pytest.raises(StoreError, match="refusing to delete anything"):
        generate(generate_config(tiny_base_dir, store_copy, seed=5, restart_on_mismatch=True), **QUIET)
    assert (store_copy / "shard-000001.zarr" / "my_results" / "table.csv").exists()


def test_restart_replaces_only_our_store_and_says_what_it_removed(tiny_base_dir, store_copy):
    messages = []
    generate(generate_config(tiny_base_dir, store_copy, seed=5, restart_on_mismatch=True), progress=False,
             log=messages.append)
    removal = [m for m in messages if "removing it as asked" in m]
    assert removal and "3 shard(s)" in removal[0] and "seed: 0 -> 5" in removal[0], messages
    assert json.loads((store_copy / MANIFEST).read_text())["seed"] == 5
    assert TrajectoryStore(store_copy).problems(full=True) == []


def test_other_settings_are_refused_by_default_naming_the_nested_key(tiny_base_dir, store_copy):
    before = listing(store_copy)
    with pytest.raises(StoreError, match=r"sampler\.num_steps: 4 -> 5.*--restart-on-mismatch"):
        generate(generate_config(tiny_base_dir, store_copy, num_steps=5), **QUIET)
    assert listing(store_copy) == before


def test_a_hand_run_on_params_yaml_never_deletes_a_store():
    """restart_on_mismatch is off in params.yaml and its built-in value; only dvc.yaml's command
    passes it."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not params["generate"].get("restart_on_mismatch", False)
    assert not params["train"].get("restart_on_mismatch", False)
    assert GenerateConfig().restart_on_mismatch is False
    commands = {name: stage["cmd"] for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
    assert "--restart-on-mismatch true" in commands["generate"]


@pytest.mark.parametrize("manifest", [
    {"shards": [], "schema_version": 3},                    # no marker: not provably ours
    {"store_type": "something-else", "shards": []},
])
def test_restart_never_deletes_a_folder_without_our_marker(tiny_base_dir, tmp_path, manifest):
    root = tmp_path / "store"
    root.mkdir()
    (root / MANIFEST).write_text(json.dumps(manifest))
    (root / "shard-000000.zarr").mkdir()
    with pytest.raises(StoreError):
        generate(generate_config(tiny_base_dir, root, restart_on_mismatch=True), **QUIET)
    assert (root / "shard-000000.zarr").is_dir() and (root / MANIFEST).exists()


def test_a_non_empty_folder_without_a_store_is_refused(tiny_base_dir, tmp_path):
    root = tmp_path / "my project"
    root.mkdir()
    (root / "data.csv").write_text("x\n")
    with pytest.raises(StoreError, match="holds no trajectory store"):
        generate(generate_config(tiny_base_dir, root, restart_on_mismatch=True), **QUIET)
    assert sorted(p.name for p in root.iterdir()) == ["data.csv"]  # not even a lock file left behind


def test_all_zero_chunks_are_written_so_a_fresh_store_checks_clean(tiny_base_dir, tmp_path):
    """One class (label 0 everywhere): the all-zero class_label chunk must exist on disk, or the
    cheap check would call a freshly written store damaged."""
    root = tmp_path / "store"
    generate_store(tiny_base_dir, root, classes=[0], trajectories_per_class=4, shard_size=4)
    chunks = sorted(p for p in (root / "shard-000000.zarr" / "class_label" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 1
    assert TrajectoryStore(root).problems(full=False) == []


def test_our_store_has_no_foreign_entries(tiny_store, tmp_path):
    assert foreign_entries(tiny_store) == []
    tar = tmp_path / "tar"
    convert_store(tiny_store, tar, "webdataset", progress=False, log=lambda *a: None)
    assert foreign_entries(tar) == []


def test_zarr_temporaries_left_by_a_killed_writer_are_ours_and_nothing_else_is(store_copy):
    """A run killed while zarr writes a metadata file leaves zarr.<uuid>.partial in a shard (or an
    array folder of it); the next run must recognise the shard as ours. A look-alike name stays foreign."""
    shard = sorted(store_copy.glob("shard-*.zarr"))[0]
    array = next(p for p in shard.iterdir() if p.is_dir())
    for folder in (shard, array):
        (folder / f"zarr.{'ab' * 16}.partial").write_bytes(b"{")
    assert foreign_entries(store_copy) == []
    (array / "zarr.notes.partial").write_text("mine")
    assert foreign_entries(store_copy) == [shard.name + "/"]


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_a_store_being_created_never_looks_foreign(tiny_base_dir, tmp_path, monkeypatch, fmt):
    """A second writer started while the first creates the store looks at the folder before it
    tries the lock: every file the first one has written by then (temporaries included) must be
    ours, or the second is refused as if the folder were the user's instead of being told who holds
    it. The folder is listed at every rename the writer makes (temporaries exist just before)."""
    import os

    root = tmp_path / "store"
    seen, real_replace = [], os.replace

    def watched_replace(src, dst):
        seen.append((os.path.basename(src), foreign_entries(root)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watched_replace)
    generate_store(tiny_base_dir, root, classes=[0], trajectories_per_class=4, shard_size=4, format=fmt)
    assert any(name.endswith(".tmp") for name, _ in seen), seen  # the watch saw the temporaries
    assert [(name, foreign) for name, foreign in seen if foreign] == []


# ------------------------------------------------------------------------------- one writer

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


def test_the_lock_is_released_when_its_holder_is_killed(store_copy, hold_lock):
    from agd_pipeline.locks import FolderLock

    holder = hold_lock(store_copy)
    holder.kill()
    holder.wait(timeout=30)
    with FolderLock(store_copy, "test"):
        pass


# ------------------------------------------------------------------- checkpoints and their store


def test_a_checkpoint_of_another_store_is_never_resumed(tiny_base_dir, tmp_path, monkeypatch):
    store, out = tmp_path / "store", tmp_path / "adapters"
    generate_store(tiny_base_dir, store)
    interrupted_training(store, out, monkeypatch)
    # the README's DVC flow: the store is replaced in place, train runs again
    generate_store(tiny_base_dir, store, seed=3, restart_on_mismatch=True)
    with pytest.raises(AgdError, match="trained on another store"):
        training.train(train_config(store, out, steps=6, checkpoint_every=2), **QUIET)
    messages = []
    training.train(train_config(store, out, steps=6, checkpoint_every=2, restart_on_mismatch=True),
                   progress=False, log=messages.append)
    assert any("trained on another store" in m and "starting over" in m for m in messages), messages
    assert not any("resuming from" in m for m in messages), messages
    recorded = json.loads((out / "adapter_config.json").read_text())["store"]
    assert recorded["fingerprint"] == TrajectoryStore(store).fingerprint()


CRAFTED_PICKLE = textwrap.dedent("""
    import os, pickle, sys
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[1],))
    for name in sys.argv[2:]:
        with open(name, "wb") as f:
            pickle.dump(Payload(), f)
""")


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_a_crafted_pickle_in_a_checkpoint_folder_is_never_executed(tiny_store, tmp_path, monkeypatch, layout):
    out = tmp_path / "adapters"
    marker = tmp_path / "pwned"
    checkpoint = out / training.CHECKPOINT
    if layout == "current":
        interrupted_training(tiny_store, out, monkeypatch)
        names = ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]
    else:  # an accelerate checkpoint, as earlier releases wrote them
        checkpoint.mkdir(parents=True)
        (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "config": {}}))
        names = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]
    subprocess.run([sys.executable, "-c", CRAFTED_PICKLE, str(marker), *(str(checkpoint / n) for n in names)],
                   check=True)
    assert not marker.exists()
    try:
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    except AgdError as err:  # the legacy checkpoint is refused, never loaded
        assert layout == "legacy" and "earlier release" in str(err)
    assert not marker.exists(), "a pickle from the output folder was executed"


def test_a_run_killed_while_swapping_checkpoints_resumes_from_the_new_one(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    interrupted_training(tiny_store, out, monkeypatch)
    checkpoint = out / training.CHECKPOINT
    checkpoint.rename(checkpoint.with_name("checkpoint.tmp"))  # the old one removed, the new one not yet renamed
    messages = []
    training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), progress=False, log=messages.append)
    assert any(f"resuming from {checkpoint} at step 2" in m for m in messages), messages
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == \
        ["README.md", "adapter_config.json", "adapters.safetensors", "checkpoint", "loss.csv", "resolved_config.json"]
    assert kept_checkpoint(out) == 6 and not checkpoint.with_name("checkpoint.tmp").exists()


PICKLED_V2_SHARD = textwrap.dedent("""
    import json, os, pathlib, sys
    import numcodecs, numpy as np
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))
    shard = pathlib.Path(sys.argv[1])
    metadata = {".zgroup": {"zarr_format": 2}, ".zattrs": {}}
    (shard / ".zgroup").write_text(json.dumps(metadata[".zgroup"]))
    for name in ("guided_output", "model_input"):
        (shard / name).mkdir()
        array = {"zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None,
                 "fill_value": None, "order": "C", "filters": [{"id": "pickle", "protocol": 4}]}
        (shard / name / ".zarray").write_text(json.dumps(array))
        metadata[name + "/.zarray"] = array
        values = np.empty(1, dtype=object)
        values[0] = Payload()
        (shard / name / "0").write_bytes(numcodecs.Pickle().encode(values))
    # consolidated, as our shards are, so that a reader that accepts Zarr v2 would open it
    (shard / ".zmetadata").write_text(json.dumps({"zarr_consolidated_format": 1, "metadata": metadata}))
""")


def test_a_zarr_v2_shard_with_a_pickle_filter_is_never_read(store_copy, tmp_path):
    """zarr 3.1 itself refuses pickled object arrays; shards are opened as Zarr v3 only, so this
    holds with a zarr that reads them too. Either way the shard is reported, never decoded."""
    marker = tmp_path / "pwned"
    shard = store_copy / "shard-000001.zarr"
    shutil.rmtree(shard)
    shard.mkdir()
    subprocess.run([sys.executable, "-c", PICKLED_V2_SHARD, str(shard), str(marker)], check=True)
    for full in (False, True):
        problems = TrajectoryStore(store_copy).problems(full=full)
        assert any(p.shard == "shard-000001.zarr" for p in problems), problems
    with pytest.raises(StoreError, match="shard-000001.zarr"):
        training.train(train_config(store_copy, tmp_path / "adapters", verify="cheap"), **QUIET)
    assert not marker.exists(), "a pickle inside a store was executed"


def test_a_damaged_checkpoint_is_a_one_line_error(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    interrupted_training(tiny_store, out, monkeypatch)
    (out / training.CHECKPOINT / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AgdError, match="checkpoint is damaged"):
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)


def test_a_full_disk_at_the_checkpoint_stops_with_a_message(tiny_store, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "adapters"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "save_file", full_disk)
    with pytest.raises(AgdError, match="cannot write the training checkpoint at step 2 .the disk is full"):
        training.train(train_config(tiny_store, out, steps=6, checkpoint_every=2), **QUIET)
    assert not (out / "checkpoint.tmp").exists()


# ---------------------------------------------------------------------------------- convert


def test_convert_refuses_a_damaged_source_and_publishes_nothing_of_it(store_copy, tmp_path):
    chunk = sorted(p for p in (store_copy / "shard-000001.zarr" / "guided_output" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a full check sees it
    chunk.write_bytes(bytes(data))
    target = tmp_path / "tar"
    with pytest.raises(StoreError, match=r"shard-000001.zarr is damaged .*guided_output"):
        convert_store(store_copy, target, "webdataset", progress=False, log=lambda *a: None)
    manifest = json.loads((target / MANIFEST).read_text())
    assert [s["status"] for s in manifest["shards"]] == ["complete", "pending", "pending"]
    assert not (target / "shard-000001.tar").exists()
    assert TrajectoryStore(target).problems(full=True)[0].message.startswith("not finished")


def test_convert_publishes_a_shard_only_when_it_matches_the_source(tiny_store, tmp_path, monkeypatch):
    from agd_pipeline.store.formats.webdataset import TarShardWriter

    original = TarShardWriter.write

    def altering_write(self, offset, arrays):
        arrays = dict(arrays)
        if self.index == 2:
            arrays["guidance_scale"] = arrays["guidance_scale"] + 1  # what a failing copy would do
        return original(self, offset, arrays)

    monkeypatch.setattr(TarShardWriter, "write", altering_write)
    target = tmp_path / "tar"
    with pytest.raises(StoreError, match="shard-000002.tar.partial: arrays .*guidance_scale.* differ from the source"):
        convert_store(tiny_store, target, "webdataset", progress=False, log=lambda *a: None)
    assert not (target / "shard-000002.tar").exists() and not (target / "shard-000002.tar.partial").exists()
    monkeypatch.undo()
    convert_store(tiny_store, target, "webdataset", progress=False, log=lambda *a: None)  # resumes
    assert TrajectoryStore(target).problems(full=True) == []


def test_convert_refuses_a_foreign_target_folder_untouched(tiny_store, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreError, match="holds no trajectory store"):
        convert_store(tiny_store, target, "webdataset", progress=False, log=lambda *a: None)
    assert sorted(p.name for p in target.iterdir()) == ["cat.jpg"]


def test_convert_refuses_its_own_source_as_target(tiny_store):
    with pytest.raises(StoreError, match="must not be the source"):
        convert_store(tiny_store, tiny_store / "inner", "webdataset", progress=False, log=lambda *a: None)


# --------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_lost_manifest_is_rebuilt_from_the_shards(tiny_base_dir, tiny_store, store_copy, damage):
    if damage == "deleted":
        (store_copy / MANIFEST).unlink()
    else:
        (store_copy / MANIFEST).write_text('{"shards": [')
        (store_copy / "manifest.log").write_text('{"name": "shard-000000.zarr"}\n')  # its journal
    with pytest.raises(StoreError, match="--rebuild-manifest"):
        TrajectoryStore(store_copy)
    messages = []
    summary = generate(generate_config(tiny_base_dir, store_copy), progress=False, log=messages.append)
    assert summary["written_shards"] == 0, "shards were written again instead of being recovered"
    assert any("rebuilt manifest.json from the shards: 3 verified complete" in m for m in messages), messages
    assert json.loads((store_copy / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())
    # a repaired store holds exactly the files of an uninterrupted one (a DVC output's hash is the same)
    assert listing(store_copy) == listing(tiny_store)
    kept = sorted(store_copy.parent.glob("store.manifest-damaged-*"))
    if damage == "garbage":  # the damaged file and its journal are kept next to the store, not deleted
        assert [p.name.rsplit(".", 1)[1] for p in kept] == ["json", "log"], kept
        assert kept[0].read_text() == '{"shards": ['
        assert any(f"kept the unreadable manifest as {kept[0]}" in m for m in messages), messages
    else:
        assert kept == []


def test_rebuild_manifest_command_needs_no_settings(tiny_store, store_copy):
    (store_copy / MANIFEST).unlink()
    result = run_cli("stages.generate", "--rebuild-manifest", "--out-dir", store_copy)
    assert result.returncode == 0, result.stderr
    assert json.loads((store_copy / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())


def test_a_tar_store_manifest_is_rebuilt_from_the_sidecars(tiny_store, tmp_path):
    from agd_pipeline.generation import rebuild_manifest

    tar = tmp_path / "tar"
    convert_store(tiny_store, tar, "webdataset", progress=False, log=lambda *a: None)
    expected = json.loads((tar / MANIFEST).read_text())
    (tar / MANIFEST).unlink()
    assert rebuild_manifest(str(tar), log=lambda *a: None) == {"complete_shards": 3, "shards": 3}
    assert json.loads((tar / MANIFEST).read_text()) == expected


def test_rebuild_skips_and_removes_a_damaged_shard(tiny_base_dir, tiny_store, store_copy):
    (store_copy / MANIFEST).unlink()
    chunk = sorted(p for p in (store_copy / "shard-000002.zarr" / "model_input" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(chunk.read_bytes()[::-1])
    messages = []
    summary = generate(generate_config(tiny_base_dir, store_copy), progress=False, log=messages.append)
    assert summary["written_shards"] == 1
    assert any("removed damaged: shard-000002.zarr" in m for m in messages), messages
    assert TrajectoryStore(store_copy).problems(full=True) == []
    assert [s["checksum"] for s in TrajectoryStore(store_copy).shards] == \
        [s["checksum"] for s in TrajectoryStore(tiny_store).shards]


@pytest.mark.parametrize("edit, message", [
    (lambda m: [m], "holds a JSON list"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "'shards' is None"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "name": "../outside.zarr"}, *m["shards"][1:]]},
     "shard 0 is named '../outside.zarr'"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "name": "/etc"}, *m["shards"][1:]]}, "shard 0 is named '/etc'"),
    (lambda m: {**m, "num_trajectories": "20"}, "'num_trajectories' is '20'"),
    (lambda m: {**m, "latent_shape": [1, -8, 8]}, "'latent_shape'"),
    (lambda m: {**m, "sampler": {}}, "'sampler.num_steps' is None"),
])
def test_an_edited_manifest_is_a_clear_error(store_copy, edit, message):
    manifest = json.loads((store_copy / MANIFEST).read_text())
    (store_copy / MANIFEST).write_text(json.dumps(edit(manifest)))
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        TrajectoryStore(store_copy)
    result = run_cli("stages.inspect", store_copy)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "--rebuild-manifest" in result.stderr


# ------------------------------------------------------------------------- standard tools


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component of a Zarr hierarchy")
def test_plain_xarray_and_zarr_open_the_store(tiny_store):
    import xarray as xr
    import zarr

    group = zarr.open_group(str(tiny_store), mode="r")  # the root is a group, the shards its children
    assert sorted(name for name, _ in group.members()) == [f"shard-00000{i}.zarr" for i in range(3)]
    shards = [str(tiny_store / f"shard-00000{i}.zarr") for i in range(3)]
    dataset = xr.open_mfdataset(shards, engine="zarr", combine="nested", concat_dim="trajectory")
    assert dict(dataset.sizes) == {"trajectory": 20, "step": 4, "channel": 1, "y": 8, "x": 8}
    ours = np.concatenate([read_all_shards(tiny_store)[s.split("/")[-1]]["guided_output"] for s in shards])
    np.testing.assert_array_equal(dataset["guided_output"].values, ours)
    assert dataset["class_label"].dims == ("trajectory",)


def test_plain_webdataset_decodes_the_tar_shards(tiny_store, tmp_path):
    import webdataset as wds

    tar = tmp_path / "tar"
    convert_store(tiny_store, tar, "webdataset", progress=False, log=lambda *a: None)
    urls = [str(tar / f"shard-00000{i}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == 20
    ours = np.concatenate([read_all_shards(tiny_store)[f"shard-00000{i}.zarr"]["model_input"] for i in range(3)])
    for i, sample in enumerate(samples):
        arrays = sample["trajectory.npz"]
        assert isinstance(arrays["model_input"], np.ndarray), type(arrays["model_input"])
        np.testing.assert_array_equal(arrays["model_input"], ours[i])
        assert int(arrays["trajectory_index"]) == i == int(sample["__key__"])


def test_the_readme_dask_snippet_reduces_in_float32(tiny_store, monkeypatch):
    readme = (REPO / "docs" / "store.md").read_text()  # the store's page of the docs site
    snippet = readme.split("Read a store from Python with dask:")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tiny_store.parent)
    (tiny_store.parent / "data").mkdir(exist_ok=True)
    link = tiny_store.parent / "data" / "trajectories"
    if not link.exists():
        link.symlink_to(tiny_store)
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - the README's own code, run as a user would
    value = float(namespace["mean"])
    exact = np.concatenate([a["guided_output"][:, -1].astype(np.float64)
                            for a in read_all_shards(tiny_store).values()]).mean()
    assert abs(value - exact) < 1e-6 * max(1.0, abs(exact)), (value, exact)


def test_inspect_reports_the_real_size_of_a_tar_store(tiny_store, tmp_path):
    tar = tmp_path / "tar"
    convert_store(tiny_store, tar, "webdataset", progress=False, log=lambda *a: None)
    result = run_cli("stages.inspect", tar, "--json", tmp_path / "summary.json")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in tar.glob("shard-*.tar"))
    assert summary["compression_ratio"] == pytest.approx(summary["bytes_raw"] / summary["bytes_on_disk"])
    assert "0.00 MiB" not in result.stdout


def test_a_zarr_temporary_renamed_while_the_folder_is_listed_is_still_ours(tmp_path, monkeypatch):
    """zarr renames its metadata temporaries from worker threads: a name listed a moment ago may be
    gone when it is looked at. Such a name is ours (it made a store being written look foreign, at
    random, in a fresh clone's test run)."""
    from pathlib import Path

    from agd_pipeline.store.ownership import foreign_entries

    shard = tmp_path / "shard-000000.zarr.partial"
    (shard / "model_input").mkdir(parents=True)
    (shard / "zarr.json").write_text("{}")
    phantom = shard / "model_input" / ("zarr." + "0" * 32 + ".partial")  # listed, then renamed away
    real_iterdir = Path.iterdir

    def listing(self):
        yield from real_iterdir(self)
        if self == phantom.parent:
            yield phantom

    monkeypatch.setattr(Path, "iterdir", listing)
    assert foreign_entries(tmp_path) == []
