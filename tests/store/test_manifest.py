"""The store's manifest (agd_pipeline.store.manifest): a lost manifest is rebuilt from the shards (Zarr)
or their sidecars (tar), a damaged shard is skipped and removed, and an edited manifest is a clear
error."""

from __future__ import annotations

import json

import pytest

from agd_pipeline.errors import StoreError
from agd_pipeline.generation import generate
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store

from conftest import generate_config, listing, run_cli


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


@pytest.mark.bad_input
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
