"""Verified conversion between store formats (agd_pipeline.store.convert): a damaged source is refused, a
shard is published only when it matches its source, and a foreign or identical target is refused
untouched."""

from __future__ import annotations

import json

import pytest

from agd_pipeline.errors import StoreError
from agd_pipeline.store import MANIFEST, TrajectoryStore, convert_store



@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_convert_refuses_a_foreign_target_folder_untouched(tiny_store, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreError, match="holds no trajectory store"):
        convert_store(tiny_store, target, "webdataset", progress=False, log=lambda *a: None)
    assert sorted(p.name for p in target.iterdir()) == ["cat.jpg"]


@pytest.mark.bad_input
def test_convert_refuses_its_own_source_as_target(tiny_store):
    with pytest.raises(StoreError, match="must not be the source"):
        convert_store(tiny_store, tiny_store / "inner", "webdataset", progress=False, log=lambda *a: None)
