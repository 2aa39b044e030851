"""The store's deletion guard (agd_pipeline.store.ownership): restart replaces only a folder that holds
our store and nothing foreign, a folder without our marker is never deleted, and the temporaries of
our own writers are ours and nothing else is."""

from __future__ import annotations

import json

import pytest

from agd_pipeline.config import GenerateConfig
from agd_pipeline.errors import StoreError
from agd_pipeline.generation import generate
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store
from agd_pipeline.store.ownership import foreign_entries

from conftest import QUIET, REPO, generate_config, generate_store, listing


@pytest.mark.bad_input
def test_restart_refuses_a_folder_holding_a_foreign_file(tiny_base_dir, store_copy):
    (store_copy / "notes.txt").write_text("my thesis")
    before = listing(store_copy)
    with pytest.raises(StoreError, match=r"notes\.txt.*refusing to delete anything"):
        generate(generate_config(tiny_base_dir, store_copy, seed=5, restart_on_mismatch=True), **QUIET)
    assert listing(store_copy) == before
    assert (store_copy / "notes.txt").read_text() == "my thesis"


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.crash
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
