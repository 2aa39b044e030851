"""The data path at scale: the record of shards verified in full (a cache outside the store, so
an unchanged store is not re-read at every start of stage two), and the manifest's journal
(manifest.log: a commit appends one line instead of rewriting manifest.json)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import agd_pipeline.store.verified_cache as verified
import agd_pipeline.store.verify as verify
from agd_pipeline.errors import StoreError
from agd_pipeline.store import MANIFEST, MANIFEST_LOG, StoreWriter, TrajectoryStore, convert_store, read_manifest
from agd_pipeline.store.files import write_json_atomic
from agd_pipeline.store.ownership import foreign_entries, refuse_foreign_folder
from agd_pipeline.store.schema import DERIVED_ARRAYS
from agd_pipeline.store.journal import log_path
from agd_pipeline.store.verified_cache import record_file

from conftest import run_main

QUIET = dict(progress=False, log=lambda *a, **k: None)


def settle(root: Path, seconds: float = 10.0) -> None:
    """Date every file of a store a little in the past, as a store written earlier is (files
    modified within the last 50 ms are never recorded as verified: see verified.RACY_NS)."""
    when = time.time_ns() - int(seconds * 1e9)
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(when, when))


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    settle(root)
    return root


@pytest.fixture
def reads(monkeypatch):
    """The shards re-read in full (verify_contents calls), by name (in the order the threads got
    to them)."""
    seen = []
    original = verify.verify_contents

    def counting(fmt, name, shard, entry):
        seen.append(name)
        return original(fmt, name, shard, entry)

    monkeypatch.setattr(verify, "verify_contents", counting)
    return seen


def chunk_files(root: Path, shard: str, array: str) -> list[Path]:
    files = sorted(p for p in (root / shard / array).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert files, f"no chunk files under {root / shard / array}"
    return files


def flip_bytes(path: Path, keep_mtime: bool) -> None:
    """Bytes changed in place, up to 1 KB in the middle (so not all of it can be a tar's padding):
    same size; with ``keep_mtime`` the modification time put back."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 512)
    for i in range(start, min(len(data), start + 1024)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def names(store) -> list[str]:
    return [s["name"] for s in store.shards]


# ------------------------------------------------------------------------ the verification cache


def test_a_second_check_skips_the_shards_verified_before(store_copy, reads, tiny_store):
    store, messages = TrajectoryStore(store_copy), []
    before = sorted(p.name for p in store_copy.rglob("*"))
    store.check(mode="changed", log=messages.append)
    assert sorted(reads) == names(store)  # nothing recorded yet: every shard re-read
    assert len(messages) == 1 and messages[0].startswith(
        "store: 0 shard(s) verified earlier and unchanged, 3 re-read"), messages
    reads.clear()
    store.check(mode="changed", log=messages.append)
    assert reads == []
    assert messages[-1].startswith("store: 3 shard(s) verified earlier and unchanged, 0 re-read"), messages
    # the record lives in the session's cache folder, never in the store (a DVC output)
    assert record_file(store_copy).is_file()
    assert Path(os.environ["AGD_CACHE_DIR"]) in record_file(store_copy).parents
    assert sorted(p.name for p in store_copy.rglob("*")) == before
    # another store (the original the copy came from) has records of its own
    assert record_file(tiny_store) != record_file(store_copy)


def test_bytes_changed_in_place_with_the_mtime_kept_need_mode_full(store_copy, reads):
    """The documented limit of mode "changed": same size and modification time look unchanged, so
    the check before training does not re-read the shard; the loader then stops at the changed
    unit, whose digest it checks as it reads it (so such bytes never reach training)."""
    from agd_pipeline.loader import StepBatches

    store = TrajectoryStore(store_copy)
    assert store.problems(mode="changed") == []
    flip_bytes(chunk_files(store_copy, "shard-000001.zarr", "guided_output")[0], keep_mtime=True)
    reads.clear()
    assert store.problems(mode="changed") == []  # not re-read: its files look as they were
    assert reads == []
    # (these compressed chunks no longer decode; an uncompressed one decodes, and fails its digest:
    # test_store.test_bytes_changed_with_their_mtime_put_back_never_reach_training)
    with pytest.raises(StoreError, match=r"shard-000001.zarr/guided_output: .*--verify"):
        for _ in zip(range(100), StepBatches(store, 4, seed=0)):
            pass
    found = store.problems(mode="full")
    assert sorted(reads) == names(store)
    assert {p.shard for p in found} == {"shard-000001.zarr"}, found
    # a shard found damaged loses its record: "changed" re-reads it from now on
    reads.clear()
    assert {p.shard for p in store.problems(mode="changed")} == {"shard-000001.zarr"}
    assert reads == ["shard-000001.zarr"]
    with pytest.raises(StoreError, match="shard-000001.zarr"):
        store.check(mode="changed")


@pytest.mark.parametrize("change", ["mtime", "bytes", "truncate", "extra file", "deleted file"])
def test_a_changed_file_means_a_re_read(store_copy, reads, change):
    store = TrajectoryStore(store_copy)
    assert store.problems(mode="changed") == []
    chunk = chunk_files(store_copy, "shard-000002.zarr", "model_input")[0]
    if change == "mtime":  # touched only: re-read, and sound
        os.utime(chunk, ns=(chunk.stat().st_atime_ns, chunk.stat().st_mtime_ns + 1))
        chunk = None
    elif change == "bytes":
        flip_bytes(chunk, keep_mtime=False)
    elif change == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:10])
    elif change == "extra file":  # no damage to the data (a cheap check would count it): re-read, and sound
        (chunk.parent / "extra").write_bytes(b"0")
        chunk = None
    else:
        chunk.unlink()
    reads.clear()
    found = store.problems(mode="changed")
    assert reads == ["shard-000002.zarr"]  # the others are as recorded
    if chunk is None:
        assert found == []
        time.sleep(0.1)  # a file modified just now is recorded only once settled
        assert store.problems(mode="changed") == []
        reads.clear()
        assert store.problems(mode="changed") == [] and reads == []  # and recorded again
    else:
        assert found and {p.shard for p in found} == {"shard-000002.zarr"}, found


def test_another_manifest_entry_means_a_re_read(store_copy, reads):
    """A record belongs to the manifest's entry of the shard, not only to its files: the same
    files under a manifest that says something else (another store's checksums) are re-read."""
    store = TrajectoryStore(store_copy)
    assert store.problems(mode="changed") == []
    manifest = json.loads((store_copy / MANIFEST).read_text())
    manifest["shards"][0]["checksum"] = "0" * 64
    write_json_atomic(store_copy / MANIFEST, manifest)
    reads.clear()
    found = TrajectoryStore(store_copy).problems(mode="changed")
    assert reads == ["shard-000000.zarr"]
    assert [str(p) for p in found] == ["shard-000000.zarr: checksum differs from the manifest (data changed on disk)"]


@pytest.mark.parametrize("content", [b"\x00garbage{", b"[]", b'{"version": 1, "shards": []}',
                                     b'{"version": 1, "shards": {"shard-000000.zarr": 5}}',
                                     b'{"version": 99, "shards": {}}'])
def test_a_corrupted_cache_file_is_ignored(store_copy, reads, content):
    record_file(store_copy).parent.mkdir(parents=True, exist_ok=True)
    record_file(store_copy).write_bytes(content)
    store = TrajectoryStore(store_copy)
    assert store.problems(mode="changed") == []
    assert sorted(reads) == names(store)  # nothing trusted from it
    data = json.loads(record_file(store_copy).read_text())  # and written anew, whole
    assert sorted(data["shards"]) == names(store)
    reads.clear()
    assert store.problems(mode="changed") == [] and reads == []


def test_a_cache_folder_that_cannot_be_written_warns_once_and_goes_on(store_copy, reads, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AGD_CACHE_DIR", str(blocker))
    monkeypatch.setattr(verified, "_warned", set())
    store, messages = TrajectoryStore(store_copy), []
    store.check(mode="changed", log=messages.append)
    store.check(mode="changed", log=messages.append)
    assert sorted(reads) == sorted(names(store) * 2)  # nothing could be recorded: re-read each time
    warnings = [m for m in messages if "cannot write the verification cache" in m]
    assert len(warnings) == 1 and "AGD_CACHE_DIR" in warnings[0], messages


def test_mode_full_re_reads_everything_and_renews_the_records(store_copy, reads):
    store = TrajectoryStore(store_copy)
    store.check(mode="changed")
    reads.clear()
    store.check(mode="full")
    assert sorted(reads) == names(store)
    reads.clear()
    store.check(mode="changed")
    assert reads == []
    # cheap, and the plain full=True of the existing callers, neither read nor write records
    record_file(store_copy).unlink()
    store.check(mode="cheap")
    store.check(full=True)
    assert not record_file(store_copy).exists()


def test_a_file_modified_just_now_is_not_recorded(store_copy, reads):
    """On a coarse file-system clock a second change within the same tick would keep the mtime:
    a shard with a file modified within the last moment is re-read next time too."""
    chunk = chunk_files(store_copy, "shard-000000.zarr", "sample")[0]
    chunk.write_bytes(chunk.read_bytes())  # same bytes, modified now
    store = TrajectoryStore(store_copy)
    assert store.problems(mode="changed") == []
    reads.clear()
    time.sleep(0.1)
    assert store.problems(mode="changed") == []
    assert reads == ["shard-000000.zarr"]  # now settled, and recorded
    reads.clear()
    assert store.problems(mode="changed") == [] and reads == []


@pytest.fixture(scope="module")
def ten_shards(tiny_base_dir, tmp_path_factory):
    from conftest import generate_store

    root = tmp_path_factory.mktemp("ten") / "store"
    generate_store(tiny_base_dir, root, shard_size=2, batch_size=2)
    return root


def test_the_parallel_check_reports_what_a_sequential_one_does_in_shard_order(ten_shards, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(ten_shards, root)
    store = TrajectoryStore(root)
    assert len(store.shards) == 10
    flip_bytes(chunk_files(root, "shard-000007.zarr", "guided_output")[0], keep_mtime=False)
    chunk_files(root, "shard-000002.zarr", "timesteps")[0].unlink()
    truncated = chunk_files(root, "shard-000005.zarr", "model_input")[0]
    truncated.write_bytes(truncated.read_bytes()[:10])
    shutil.rmtree(root / "shard-000009.zarr")
    for mode in ("cheap", "full"):
        parallel = store.problems(mode=mode)
        sequential = [p for name in names(store) for p in store.problems(mode=mode, only={name})]  # one at a time
        assert parallel == sequential, mode
        shards = [p.shard for p in parallel]
        assert shards == sorted(shards) and {"shard-000002.zarr", "shard-000005.zarr", "shard-000009.zarr"} <= set(
            shards), parallel
    assert "shard-000007.zarr" in {p.shard for p in store.problems(mode="full")}


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_each_format_lists_the_files_of_a_shard(tiny_store, tmp_path, reads, fmt):
    root = tmp_path / fmt
    if fmt == "zarr":
        shutil.copytree(tiny_store, root)
    else:
        convert_store(tiny_store, root, "webdataset", progress=False, log=lambda *a: None)
    settle(root)
    store = TrajectoryStore(root)
    name = store.shards[1]["name"]
    files = store.shard_format.shard_files(root / name)
    if fmt == "zarr":
        assert files == sorted(p for p in (root / name).rglob("*") if p.is_file())
    else:
        assert files == [root / name, root / (name + ".json")]  # the tar and its sidecar
    assert store.problems(mode="changed") == []
    reads.clear()
    os.utime(files[-1], ns=(files[-1].stat().st_atime_ns, files[-1].stat().st_mtime_ns + 10**9))
    assert store.problems(mode="changed") == [] and reads == [name]
    reads.clear()
    flip_bytes(files[0], keep_mtime=False)
    assert {p.shard for p in store.problems(mode="changed")} == {name} and reads == [name]


def test_train_re_reads_only_what_changed_and_inspect_verify_everything(store_copy, tmp_path):
    import agd_pipeline.training as training

    from test_training import train_config

    def train(out, **overrides):
        messages = []
        training.train(train_config(store_copy, tmp_path / out, steps=1, **overrides), progress=False,
                       log=messages.append)
        return [m for m in messages if m.startswith("store: ")]

    assert train("a")[0].startswith("store: 0 shard(s) verified earlier and unchanged, 3 re-read")
    assert train("b")[0].startswith("store: 3 shard(s) verified earlier and unchanged, 0 re-read")
    assert train("c", verify="full")[0].startswith("store: 3 shard(s) re-read against their checksums")
    assert train("d", verify="cheap") == []
    # stages.inspect --verify re-reads everything, whatever is recorded, and records what passes
    record_file(store_copy).unlink()
    result = run_main("stages.inspect", store_copy, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "store: 3 shard(s) re-read against their checksums" in result.stdout
    assert train("e")[0].startswith("store: 3 shard(s) verified earlier and unchanged, 0 re-read")


def test_the_train_verify_option_documents_its_modes_and_limit():
    import dataclasses

    from agd_pipeline.config import TrainConfig

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "verify")
    assert field.default == "changed" and field.metadata["choices"] == ("changed", "full", "cheap")
    text = field.metadata["help"]
    assert all(word in text for word in ("changed", "full", "cheap", "modification time", "AGD_CACHE_DIR"))


# --------------------------------------------------------------------------- the manifest's journal


def shard_arrays(root: Path, index: int) -> dict[str, np.ndarray]:
    store = TrajectoryStore(root)
    group = store.open_shard(store.shards[index]["name"])
    return {name: group[name][:] for name in group.array_keys() if name not in DERIVED_ARRAYS}


def write_shard(writer: StoreWriter, index: int, source: Path) -> dict:
    shard = writer.begin_shard(index)
    shard.write(0, shard_arrays(source, index))
    return shard.finish()


@pytest.fixture
def half_written(tiny_store, tmp_path):
    """A store of tiny_store's settings with shard 0 of 3 committed: its entry in the journal only."""
    root = tmp_path / "store"
    header = TrajectoryStore(tiny_store).manifest.run_header()
    writer = StoreWriter(root, header, **QUIET_LOG)
    write_shard(writer, 0, tiny_store)
    return root, header


QUIET_LOG = dict(log=lambda *a, **k: None)


def test_a_commit_appends_a_line_and_leaves_manifest_json_alone(tiny_store, tmp_path):
    root = tmp_path / "store"
    header = TrajectoryStore(tiny_store).manifest.run_header()
    writer = StoreWriter(root, header, **QUIET_LOG)
    snapshot = (root / MANIFEST).read_bytes()
    mtime = (root / MANIFEST).stat().st_mtime_ns
    for index in (0, 1):
        entry = write_shard(writer, index, tiny_store)
        assert (root / MANIFEST).read_bytes() == snapshot and (root / MANIFEST).stat().st_mtime_ns == mtime
        lines = log_path(root).read_text().splitlines()
        assert len(lines) == index + 1 and json.loads(lines[-1]) == entry
        assert [s["status"] for s in read_manifest(root).shards] == ["complete"] * (index + 1) + ["pending"] * (
            2 - index)
    write_shard(writer, 2, tiny_store)  # the last one: the whole manifest is written, the journal folded in
    assert not log_path(root).exists()
    assert json.loads((root / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())


def test_read_manifest_replays_the_journal_and_compaction_keeps_it_equal(half_written, tiny_store):
    root, header = half_written
    merged = read_manifest(root)
    assert [s["status"] for s in merged.shards] == ["complete", "pending", "pending"]
    assert merged.shards[0] == read_manifest(tiny_store).shards[0]
    assert json.loads((root / MANIFEST).read_text())["shards"][0]["status"] == "pending"  # the snapshot
    # a crash between writing the new snapshot and removing the journal: replaying it again is harmless
    write_json_atomic(root / MANIFEST, merged)
    assert read_manifest(root) == merged
    writer = StoreWriter(root, header, **QUIET_LOG)
    writer.compact()
    assert not log_path(root).exists()
    assert json.loads((root / MANIFEST).read_text()) == merged == read_manifest(root)
    mtime = (root / MANIFEST).stat().st_mtime_ns
    writer.compact()  # nothing to fold: nothing written
    assert (root / MANIFEST).stat().st_mtime_ns == mtime


@pytest.mark.crash
def test_a_torn_last_line_is_ignored_and_the_next_writer_cuts_it_off(half_written, tiny_store):
    root, header = half_written
    entry = json.loads(log_path(root).read_text().splitlines()[0])
    torn = json.dumps({**entry, "name": "shard-000001.zarr", "first_trajectory": 8})[:57]  # killed mid-append
    with open(log_path(root), "a") as f:
        f.write(torn)
    assert [s["status"] for s in read_manifest(root).shards] == ["complete", "pending", "pending"]
    writer = StoreWriter(root, header, **QUIET_LOG)
    assert writer.pending() == [1, 2]
    write_shard(writer, 1, tiny_store)
    lines = log_path(root).read_text().splitlines()
    assert len(lines) == 2 and torn not in lines  # the torn tail cut off before the append
    assert [s["status"] for s in read_manifest(root).shards] == ["complete", "complete", "pending"]
    write_shard(writer, 2, tiny_store)
    assert json.loads((root / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())


def test_a_whole_last_entry_without_its_newline_is_kept(half_written, tiny_store):
    root, header = half_written
    text = log_path(root).read_text()
    log_path(root).write_text(text.rstrip("\n"))  # killed after the entry, before its newline
    assert read_manifest(root).shards[0]["status"] == "complete"
    writer = StoreWriter(root, header, **QUIET_LOG)
    write_shard(writer, 1, tiny_store)
    assert [s["status"] for s in read_manifest(root).shards] == ["complete", "complete", "pending"]


@pytest.mark.bad_input
@pytest.mark.parametrize("bad, message", [
    ("not json at all", "line 1 is not JSON"),
    ('{"name": "../outside.zarr", "status": "complete"}', "which the manifest does not list"),
    ('{"name": "shard-000007.zarr", "status": "complete"}', "which the manifest does not list"),
    ('["shard-000001.zarr"]', "which the manifest does not list"),
    ("RANGE", "wrong trajectory range"),
    ("PENDING", "has status 'pending'"),
    ("NO_CHECKSUMS", "has no checksums"),
])
def test_a_bad_line_is_refused_with_the_repair(half_written, bad, message):
    root, _ = half_written
    good = log_path(root).read_text()
    entry = json.loads(good)
    bad = {"RANGE": json.dumps({**entry, "first_trajectory": 3}),
           "PENDING": json.dumps({**entry, "status": "pending"}),
           "NO_CHECKSUMS": json.dumps({k: v for k, v in entry.items() if k not in ("checksum", "checksums")}),
           }.get(bad, bad)
    log_path(root).write_text(bad + "\n" + good)  # a bad line in the middle
    with pytest.raises(StoreError, match=message) as err:
        read_manifest(root)
    assert MANIFEST_LOG in str(err.value) and f"--rebuild-manifest --out-dir {root}" in str(err.value)
    log_path(root).write_text(good + bad + "\n")  # as the last line
    if message.endswith("is not JSON"):  # what a writer killed mid-append leaves: ignored
        assert read_manifest(root).shards[0]["status"] == "complete"
    else:  # an entry that parses is no torn line: damage wherever it is
        with pytest.raises(StoreError, match=message):
            read_manifest(root)


def test_a_damaged_journal_is_kept_and_the_manifest_rebuilt_from_the_shards(half_written):
    from agd_pipeline.generation import rebuild_manifest

    root, _ = half_written
    log_path(root).write_text("garbage\n" + log_path(root).read_text())
    summary = rebuild_manifest(str(root), log=lambda *a: None)
    assert summary == {"complete_shards": 1, "shards": 3}
    assert not log_path(root).exists()
    # kept next to the store, with the manifest it belongs to, not inside it (a DVC output)
    kept = sorted(root.parent.glob(root.name + ".manifest-damaged-*"))
    assert [p.name.rsplit(".", 1)[1] for p in kept] == ["json", "log"], kept
    assert kept[1].read_text().startswith("garbage\n")
    assert not list(root.glob("*damaged*"))
    assert [s["status"] for s in read_manifest(root).shards] == ["complete", "pending", "pending"]
    assert foreign_entries(root) == []


def test_a_folder_holding_only_a_journal_is_ours_and_never_replayed_onto_a_new_store(half_written, tmp_path):
    root, header = half_written
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(log_path(root), log_path(alone))  # a journal claiming shard 0 complete, no shards
    assert foreign_entries(alone) == []
    refuse_foreign_folder(alone)  # not refused: nothing of the user's
    with pytest.raises(StoreError, match=f"only its {MANIFEST_LOG} is there"):
        read_manifest(alone)
    StoreWriter(alone, header, **QUIET_LOG)
    assert not log_path(alone).exists()
    assert [s["status"] for s in read_manifest(alone).shards] == ["pending"] * 3
    (alone / "notes.txt").write_text("mine")  # beside a journal, a file of the user's is still foreign
    assert foreign_entries(alone) == ["notes.txt"]


def test_replacing_a_store_removes_its_journal(half_written):
    root, header = half_written
    messages = []
    StoreWriter(root, {**header, "seed": 5}, restart_on_mismatch=True, log=messages.append)
    assert any("removing it as asked" in m and "1 shard(s)" in m for m in messages), messages
    assert not log_path(root).exists()
    assert [s["status"] for s in read_manifest(root).shards] == ["pending"] * 3


def test_only_rank_0_appends_and_refresh_picks_up_the_others(tiny_store, tmp_path):
    root = tmp_path / "store"
    header = TrajectoryStore(tiny_store).manifest.run_header()
    first = StoreWriter(root, header, rank=0, world_size=2, **QUIET_LOG)
    second = StoreWriter(root, header, rank=1, world_size=2, **QUIET_LOG)
    write_shard(second, 1, tiny_store)
    assert not log_path(root).exists()
    write_shard(first, 0, tiny_store)
    write_shard(first, 2, tiny_store)
    assert len(log_path(root).read_text().splitlines()) == 2
    assert first.refresh() == []  # shard 1 adopted from disk: the whole manifest written
    assert not log_path(root).exists()
    assert json.loads((root / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())


@pytest.mark.crash
def test_generate_stopped_by_an_error_leaves_a_plain_manifest_and_resumes(tiny_base_dir, tiny_store, tmp_path,
                                                                         monkeypatch):
    import agd_pipeline.generation as generation

    from conftest import generate_store

    root = tmp_path / "store"
    calls = []
    original = generation.record_batch

    def dying(*args, **kwargs):
        if len(calls) == 3:  # in shard 1's second batch
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "record_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_store(tiny_base_dir, root)
    assert not log_path(root).exists()  # compacted on the way out
    assert [s["status"] for s in json.loads((root / MANIFEST).read_text())["shards"]] == [
        "complete", "pending", "pending"]
    monkeypatch.undo()
    generate_store(tiny_base_dir, root)
    assert not log_path(root).exists()
    assert json.loads((root / MANIFEST).read_text()) == json.loads((tiny_store / MANIFEST).read_text())


# ------------------------------------------------------------------------------------ benchmarks


def test_the_store_benchmarks_run_on_small_inputs(tmp_path):
    from benchmarks.store import manifest_commit_table, verify_cache_table

    rows = verify_cache_table(shards=4, workdir=str(tmp_path))
    assert [r["check"] for r in rows] == ["first (full re-read)", "second (unchanged)", "cheap checks, for comparison"]
    assert rows[0]["shards_re_read"] == 4 and rows[1]["shards_re_read"] == 0 and rows[1]["shards_skipped"] == 4
    rows = manifest_commit_table(shards=(50,), commits=3, workdir=str(tmp_path))
    assert rows[0]["shards"] == 50 and rows[0]["append_seconds"] > 0 and rows[0]["rewrite_seconds"] > 0
