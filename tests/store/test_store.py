"""The trajectory store: schema, content, resume, refusal of mixed runs, integrity checks."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import agd_pipeline.generation as generation
import agd_pipeline.training as training
from agd_pipeline.adapters import ADAPTER_WEIGHTS
from agd_pipeline.errors import ConfigError, StoreError
from agd_pipeline.generation import trajectory_plan
from agd_pipeline.models import load_base_model
from agd_pipeline.sampling import generators_for, initial_noise
from agd_pipeline.locks import LOCK_FILE
from agd_pipeline.store import MANIFEST, StoreWriter, TrajectoryStore
from agd_pipeline.store.schema import PARTIAL

from conftest import STORE_SETTINGS, generate_store, read_all_shards, run_cli

QUIET = dict(progress=False, log=lambda *a, **k: None)

NUM_CLASSES = 10
N = NUM_CLASSES * STORE_SETTINGS["trajectories_per_class"]  # 20
S = STORE_SETTINGS["num_steps"]  # 4
SHARD_SIZES = [8, 8, 4]
SHARD_NAMES = [f"shard-{i:06d}.zarr" for i in range(3)]
EXPECTED_ARRAYS = {  # name -> (dtype, shape without the trajectory axis)
    "model_input": ("float16", (S, 1, 8, 8)),
    "guided_output": ("float16", (S, 1, 8, 8)),
    "timesteps": ("float32", (S,)),
    "guidance_scale": ("float32", ()),
    "seed": ("int64", ()),
    "class_label": ("int64", ()),
    "trajectory_index": ("int64", ()),
    "sample": ("float16", (1, 8, 8)),
}


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def shards(tiny_store):
    return read_all_shards(tiny_store)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    return root


def concatenated(shards: dict, name: str) -> np.ndarray:
    return np.concatenate([shards[s][name] for s in SHARD_NAMES])


class Interrupted(Exception):
    pass


def fail_after(monkeypatch, target, attribute, calls_allowed: int) -> list:
    """Let ``calls_allowed`` calls of target.attribute through, then raise (a killed run)."""
    original = getattr(target, attribute)
    calls = []

    def wrapper(*args, **kwargs):
        if len(calls) >= calls_allowed:
            raise Interrupted(f"{attribute} interrupted after {calls_allowed} calls")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapper)
    return calls


def assert_same_store(a: Path, b: Path) -> None:
    shards_a, shards_b = read_all_shards(a), read_all_shards(b)
    assert sorted(shards_a) == sorted(shards_b)
    for shard in shards_a:
        assert sorted(shards_a[shard]) == sorted(shards_b[shard])
        for name in shards_a[shard]:
            assert np.array_equal(shards_a[shard][name], shards_b[shard][name]), f"{shard}/{name} differs"
    manifest_a = json.loads((a / MANIFEST).read_text())
    manifest_b = json.loads((b / MANIFEST).read_text())
    assert [s["checksum"] for s in manifest_a["shards"]] == [s["checksum"] for s in manifest_b["shards"]]
    assert all(s["status"] == "complete" for s in manifest_a["shards"])


# ---------------------------------------------------------------------------------- round trip


def test_manifest_and_schema(tiny_store, shards):
    store = TrajectoryStore(tiny_store)
    assert store.num_trajectories == N and store.num_steps == S
    assert [s["name"] for s in store.shards] == SHARD_NAMES
    assert [s["trajectories"] for s in store.shards] == SHARD_SIZES
    assert [s["first_trajectory"] for s in store.shards] == [0, 8, 16]
    assert all(s["status"] == "complete" and s["checksum"] for s in store.shards)
    assert store.manifest["classes"] == list(range(NUM_CLASSES))
    assert store.problems(full=True) == []
    for name, size in zip(SHARD_NAMES, SHARD_SIZES):
        assert sorted(shards[name]) == sorted(EXPECTED_ARRAYS)  # no branches unless asked for
        for array, (dtype, shape) in EXPECTED_ARRAYS.items():
            value = shards[name][array]
            assert value.dtype == np.dtype(dtype), f"{name}/{array}"
            assert value.shape == (size, *shape), f"{name}/{array}"
        assert store.open_shard(name).attrs["checksum"] == store.shards[SHARD_NAMES.index(name)]["checksum"]
    assert not list(Path(tiny_store).glob("*" + PARTIAL))


def test_the_manifest_view_is_the_json_on_disk(tiny_store):
    from agd_pipeline.store import Manifest, read_manifest

    text = (tiny_store / MANIFEST).read_text()
    raw = json.loads(text)
    manifest = read_manifest(tiny_store)
    assert isinstance(manifest, Manifest) and manifest == raw
    assert json.dumps(manifest, indent=2) + "\n" == text  # written back, it is the same file
    assert (manifest.format, manifest.compressor, manifest.num_trajectories, manifest.shard_size) == (
        raw["format"], raw["compressor"], raw["num_trajectories"], raw["shard_size"])
    assert manifest.num_steps == raw["sampler"]["num_steps"] == S
    assert manifest.latent_shape == tuple(raw["latent_shape"])
    assert (manifest.guidance_min, manifest.guidance_max) == (raw["guidance"]["min"], raw["guidance"]["max"])
    assert manifest.base_model == raw["base_model"] and manifest.shards == raw["shards"]
    assert manifest.condition_arrays == raw["condition_arrays"]
    assert manifest.shard(SHARD_NAMES[1]) == raw["shards"][1] and manifest.shard("shard-000009.zarr") is None


def test_every_registered_format_implements_the_protocol():
    from agd_pipeline.store import FORMATS, ShardFormat
    from agd_pipeline.store.formats import SHARD_PATTERN

    required = ("begin_shard", "shard_entry", "shard_header", "open_shard", "read_units", "owns")
    for name, fmt in FORMATS.items():
        assert fmt.name == name and isinstance(fmt, ShardFormat)
        assert SHARD_PATTERN.fullmatch(fmt.shard_name(7))
        missing = [m for m in required if getattr(type(fmt), m) is getattr(ShardFormat, m)]
        assert not missing, f"{name} does not implement {missing}"


def test_trajectories_follow_the_plan(shards):
    plan = trajectory_plan(STORE_SETTINGS["seed"], range(N), list(range(NUM_CLASSES)),
                           STORE_SETTINGS["guidance_min"], STORE_SETTINGS["guidance_max"])
    for key in ("trajectory_index", "seed", "class_label", "guidance_scale"):
        assert np.array_equal(concatenated(shards, key), plan[key]), key
    assert np.array_equal(concatenated(shards, "trajectory_index"), np.arange(N))
    # every class gets the same number of trajectories; w spread over the range
    assert np.bincount(concatenated(shards, "class_label")).tolist() == [2] * NUM_CLASSES
    w = concatenated(shards, "guidance_scale")
    assert w.min() >= 1.0 and w.max() <= 6.0 and len(set(w.tolist())) == N


def test_plan_depends_only_on_seed_and_index():
    classes = list(range(NUM_CLASSES))
    whole = trajectory_plan(3, range(12), classes, 1.0, 6.0)
    pieces = [trajectory_plan(3, r, classes, 1.0, 6.0) for r in (range(0, 5), range(5, 12))]
    for key in whole:
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in pieces]))
    other = trajectory_plan(4, range(12), classes, 1.0, 6.0)
    assert not np.array_equal(whole["seed"], other["seed"])


def test_recorded_steps_are_the_cfg_outputs(base, shards):
    """guided_output equals cfg_predict re-run on the stored input; inputs chain through the scheduler."""
    scheduler = base.scheduler.__class__.from_config(base.scheduler.config)
    scheduler.set_timesteps(S)
    for name in SHARD_NAMES:
        data = shards[name]
        assert np.array_equal(data["timesteps"], np.tile(scheduler.timesteps.numpy().astype(np.float32),
                                                         (len(data["seed"]), 1)))
        labels = torch.from_numpy(data["class_label"])
        w = torch.from_numpy(data["guidance_scale"])
        noise = initial_noise(base, generators_for(data["seed"].tolist()))
        np.testing.assert_array_equal(data["model_input"][:, 0], noise.numpy().astype(np.float16))
        for step in range(S):
            x = torch.from_numpy(data["model_input"][:, step]).float()
            t = torch.from_numpy(data["timesteps"][:, step])
            assert (t == t[0]).all()
            t = t[0]  # one timestep per step (per-sample t: see test_sampling's cfg_predict test)
            with torch.no_grad():
                guided, cond, uncond = base.cfg_predict(x, t, labels, w)
            stored = data["guided_output"][:, step].astype(np.float32)
            np.testing.assert_allclose(stored, guided.numpy(), atol=2e-2, rtol=1e-2,
                                       err_msg=f"{name} step {step}")
            # the tolerance is far below what the guidance changes: not a vacuous comparison
            assert np.abs(stored - cond.numpy()).max() > 0.1 or (w - 1).abs().max() < 0.1
            x_next = scheduler.step(torch.from_numpy(stored), int(t), x).prev_sample
            following = data["model_input"][:, step + 1] if step + 1 < S else data["sample"]
            np.testing.assert_allclose(following.astype(np.float32), x_next.numpy(), atol=2e-2, rtol=1e-2)


def test_record_branches(tiny_base_dir, tmp_path):
    root = tmp_path / "branches"
    generate_store(tiny_base_dir, root, classes=[2, 7], trajectories_per_class=2, record_branches=True,
                   guidance_min=2.0, guidance_max=5.0)
    data = read_all_shards(root)["shard-000000.zarr"]
    assert {"cond_output", "uncond_output"} <= set(data)
    cond, uncond = data["cond_output"].astype(np.float32), data["uncond_output"].astype(np.float32)
    w = data["guidance_scale"][:, None, None, None, None]
    assert np.abs(cond - uncond).max() > 1e-2
    np.testing.assert_allclose(data["guided_output"].astype(np.float32), uncond + w * (cond - uncond),
                               atol=2e-2, rtol=1e-2)
    assert sorted(set(data["class_label"].tolist())) == [2, 7]


def test_dask_arrays_concatenate_all_shards(tiny_store, shards):
    arrays = TrajectoryStore(tiny_store).dask_arrays()
    assert set(arrays) == set(EXPECTED_ARRAYS)
    for name, array in arrays.items():
        assert array.shape[0] == N
        assert np.array_equal(array.compute(), concatenated(shards, name)), name
    # read at the shards' own chunks: never one chunk across two shards
    assert sum(arrays["model_input"].chunks[0]) == N
    boundaries = np.cumsum(arrays["model_input"].chunks[0]).tolist()
    assert 8 in boundaries and 16 in boundaries


# -------------------------------------------------------------------------------------- resume


@pytest.mark.crash
def test_interrupted_run_resumes_to_the_uninterrupted_store(tiny_base_dir, tiny_store, tmp_path, monkeypatch):
    root = tmp_path / "resumed"
    # batches of 4: shard 0 = calls 1-2, shard 1 = calls 3-4; die in shard 1's second batch
    fail_after(monkeypatch, generation, "record_batch", 3)
    with pytest.raises(Interrupted):
        generate_store(tiny_base_dir, root)
    manifest = json.loads((root / MANIFEST).read_text())
    assert [s["status"] for s in manifest["shards"]] == ["complete", "pending", "pending"]
    assert not (root / SHARD_NAMES[1]).exists(), "an unfinished shard was published under its final name"
    # a .partial folder may be left behind; it is never trusted (rewritten on resume, removed after)
    store = TrajectoryStore(root)
    named = {p.shard for p in store.problems()}
    assert named == {SHARD_NAMES[1], SHARD_NAMES[2]}
    with pytest.raises(StoreError, match="generate"):
        store.check()
    monkeypatch.undo()

    calls = fail_after(monkeypatch, generation, "record_batch", 10**6)
    _, summary = generate_store(tiny_base_dir, root)
    assert summary["written_shards"] == 2
    assert len(calls) == 3, "the resumed run re-sampled a shard that was already complete"
    assert not list(root.glob("*" + PARTIAL))
    assert_same_store(root, tiny_store)


@pytest.mark.crash
def test_kill_between_publish_and_manifest_adopts_the_published_shard(tiny_base_dir, tiny_store, tmp_path,
                                                                      monkeypatch):
    root = tmp_path / "resumed"
    fail_after(monkeypatch, StoreWriter, "mark_complete", 1)  # shard 1 renamed in place, manifest not updated
    with pytest.raises(Interrupted):
        generate_store(tiny_base_dir, root)
    assert (root / SHARD_NAMES[1]).is_dir()
    assert json.loads((root / MANIFEST).read_text())["shards"][1]["status"] == "pending"
    # readers trust the manifest: the shard is not usable until generate has looked at it
    assert SHARD_NAMES[1] in {p.shard for p in TrajectoryStore(root).problems()}
    monkeypatch.undo()
    calls = fail_after(monkeypatch, generation, "record_batch", 10**6)
    generate_store(tiny_base_dir, root)
    assert len(calls) == 1, "the published shard 1 was sampled again instead of adopted"  # shard 2 only
    assert_same_store(root, tiny_store)


@pytest.mark.parametrize("verify", ["cheap", "full"])
def test_rerun_on_complete_store_writes_nothing(tiny_base_dir, store_copy, monkeypatch, verify):
    # the lock file (ignored by DVC) is the one file a run touches; no file appears or disappears
    names = sorted(p.name for p in store_copy.rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in store_copy.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    manifest = (store_copy / MANIFEST).read_text()
    fail_after(monkeypatch, generation, "record_batch", 0)
    messages = []
    from agd_pipeline.config import GenerateConfig, load_config

    config = load_config(GenerateConfig, {**STORE_SETTINGS, "base_model": str(tiny_base_dir),
                                          "out_dir": str(store_copy), "verify": verify})
    summary = generation.generate(config, progress=False, log=messages.append)
    assert summary["written_shards"] == 0
    assert any("nothing to do" in m for m in messages)
    assert sorted(p.name for p in store_copy.rglob("*")) == names
    assert (store_copy / MANIFEST).read_text() == manifest
    assert {p: p.stat().st_mtime_ns for p in store_copy.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before


@pytest.mark.bad_input
@pytest.mark.parametrize("change", [{"seed": 1}, {"num_steps": 5}, {"guidance_max": 4.0},
                                    {"trajectories_per_class": 3}, {"shard_size": 4}])
def test_other_settings_into_same_store_are_refused(tiny_base_dir, store_copy, change):
    manifest = (store_copy / MANIFEST).read_text()
    with pytest.raises(StoreError, match="other settings") as err:
        generate_store(tiny_base_dir, store_copy, **change)
    assert str(store_copy) in str(err.value)
    assert (store_copy / MANIFEST).read_text() == manifest, "a refused run changed the manifest"


@pytest.mark.bad_input
def test_other_base_weights_into_same_store_are_refused(tmp_path, store_copy, tiny_base_dir):
    from conftest import make_base_folder

    other = make_base_folder(tmp_path / "other", seed=5)
    with pytest.raises(StoreError, match="base_model"):
        generate_store(other, store_copy)


@pytest.mark.bad_input
def test_non_store_folder_is_refused(tiny_base_dir, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        generate_store(tiny_base_dir, folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_batch_size_does_not_change_the_trajectories(tiny_base_dir, shards, tmp_path):
    """Seeds, classes and w are per trajectory; batching may only change float rounding."""
    root = tmp_path / "batch8"
    generate_store(tiny_base_dir, root, batch_size=8)
    other = read_all_shards(root)
    for shard in SHARD_NAMES:
        for name in ("seed", "class_label", "guidance_scale", "trajectory_index", "timesteps"):
            assert np.array_equal(other[shard][name], shards[shard][name]), f"{shard}/{name}"
        for name in ("model_input", "guided_output", "sample"):
            np.testing.assert_allclose(other[shard][name].astype(np.float32),
                                       shards[shard][name].astype(np.float32), atol=1e-2, rtol=1e-2,
                                       err_msg=f"{shard}/{name}")


# ---------------------------------------------------------------------------------- integrity


def chunk_files(root: Path, shard: str, array: str) -> list[Path]:
    files = sorted(p for p in (root / shard / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk files under {root / shard / array}"
    return files


def overwrite_garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [overwrite_garbage, truncate], ids=["garbage", "truncated"])
def test_corrupted_chunk_is_named(store_copy, damage):
    damage(chunk_files(store_copy, SHARD_NAMES[1], "guided_output")[0])
    problems = TrajectoryStore(store_copy).problems(full=True)
    assert {p.shard for p in problems} == {SHARD_NAMES[1]}, [str(p) for p in problems]
    with pytest.raises(StoreError) as err:
        TrajectoryStore(store_copy).check(full=True)
    assert SHARD_NAMES[1] in str(err.value) and SHARD_NAMES[0] not in str(err.value)

    result = run_cli("stages.inspect", store_copy, "--verify")
    assert result.returncode == 1, result.stdout + result.stderr
    assert SHARD_NAMES[1] in result.stdout
    assert SHARD_NAMES[0] not in result.stdout and SHARD_NAMES[2] not in result.stdout


def test_silently_changed_value_fails_the_checksum(tiny_base_dir, tmp_path):
    """An uncompressed chunk with one changed value still decodes: only the checksum can tell."""
    root = tmp_path / "raw"
    generate_store(tiny_base_dir, root, classes=[0, 1], trajectories_per_class=2, shard_size=2, batch_size=2,
                   compressor="none")
    assert TrajectoryStore(root).problems(full=True) == []
    chunk = chunk_files(root, SHARD_NAMES[1], "guided_output")[0]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01  # flip the lowest mantissa bit of one float16 value
    chunk.write_bytes(bytes(data))
    problems = TrajectoryStore(root).problems(full=True)
    assert [p.shard for p in problems] == [SHARD_NAMES[1]]
    assert "checksum" in str(problems[0])


@pytest.fixture(scope="module")
def raw_store(tiny_base_dir, tmp_path_factory):
    """Uncompressed chunks (a changed byte still decodes: only a digest can tell), 2 shards of 2."""
    root = tmp_path_factory.mktemp("raw") / "store"
    generate_store(tiny_base_dir, root, classes=[0, 1], trajectories_per_class=2, shard_size=2, batch_size=2,
                   compressor="none")
    return root


def flip_two_bytes(path: Path, keep_mtime: bool = False) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    data[301] ^= 0x40
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_flipped_bytes_in_an_uncompressed_chunk_stop_training_under_verify_cheap(raw_store, tmp_path):
    """The cheap check sees sizes only; every unit the loader reads is checked against the digest
    recorded when it was written, as it is read."""
    from test_training import train_config

    root = tmp_path / "store"
    shutil.copytree(raw_store, root)
    flip_two_bytes(chunk_files(root, SHARD_NAMES[1], "model_input")[0])
    assert TrajectoryStore(root).problems() == []  # same sizes: the cheap check cannot see it
    expected = re.escape(f"{root}/{SHARD_NAMES[1]}/model_input: trajectories 0-2 do not match the digest recorded")
    with pytest.raises(StoreError, match=expected + r".*stages.generate --verify full") as err:
        training.train(train_config(root, tmp_path / "adapters", verify="cheap"), **QUIET)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "adapters" / ADAPTER_WEIGHTS).exists()


def test_a_changed_unit_read_in_a_worker_process_is_one_line_too(raw_store, tmp_path):
    from agd_pipeline.loader import StepBatches

    root = tmp_path / "store"
    shutil.copytree(raw_store, root)
    flip_two_bytes(chunk_files(root, SHARD_NAMES[1], "model_input")[0])
    with pytest.raises(StoreError) as err:
        for _ in zip(range(100), StepBatches(TrajectoryStore(root), 4, seed=0, workers=1)):
            pass
    assert str(err.value).startswith(f"{root}/{SHARD_NAMES[1]}/model_input: trajectories 0-2 do not match the "
                                     "digest recorded"), str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_bytes_changed_with_their_mtime_put_back_never_reach_training(raw_store, tmp_path):
    """verify=changed trusts a shard whose files look as when it passed a full re-read; bytes
    flipped behind its back are caught by the digests checked as the loader reads."""
    from test_training import train_config

    root = tmp_path / "store"
    shutil.copytree(raw_store, root)
    assert TrajectoryStore(root).problems(mode="changed") == []  # re-read in full, recorded
    flip_two_bytes(chunk_files(root, SHARD_NAMES[0], "guided_output")[0], keep_mtime=True)
    with pytest.raises(StoreError, match=rf"{SHARD_NAMES[0]}/guided_output: trajectories 0-2 do not match"):
        training.train(train_config(root, tmp_path / "adapters"), **QUIET)  # the default: verify=changed
    assert not (tmp_path / "adapters" / ADAPTER_WEIGHTS).exists()


def test_a_store_written_before_read_time_digests_is_read_and_re_read_under_verify_changed(store_copy):
    """Entries without unit_checksums (written by an earlier release) are still read; their record
    in the verification cache is not trusted (the loader cannot check their units as it reads)."""
    from agd_pipeline.loader import StepBatches

    manifest = json.loads((store_copy / MANIFEST).read_text())
    assert all("unit_checksums" in s and "unit_rows" in s for s in manifest["shards"])
    for entry in manifest["shards"]:
        del entry["unit_checksums"], entry["unit_rows"]
    (store_copy / MANIFEST).write_text(json.dumps(manifest))
    store, messages = TrajectoryStore(store_copy), []
    for _ in range(2):
        store.check(mode="changed", log=messages.append)
    assert messages[1].startswith("store: 0 shard(s) verified earlier and unchanged, 3 re-read"), messages
    assert messages[1].endswith("; 3 written before read-time digests are re-read at every start (write the "
                                "store again with this release to record them)"), messages
    assert sum(1 for _ in zip(range(5), StepBatches(store, 4, seed=0))) == 5


@pytest.mark.bad_input
def test_an_edited_read_time_digest_is_found_by_the_full_check(store_copy):
    """The digests the loader checks are themselves checked by a full re-read (inspect --verify)."""
    manifest = json.loads((store_copy / MANIFEST).read_text())
    digests = manifest["shards"][2]["unit_checksums"]["guided_output"]
    digests[0] = "0" * 32
    (store_copy / MANIFEST).write_text(json.dumps(manifest))
    assert [str(p) for p in TrajectoryStore(store_copy).problems(full=True)] == [
        f"{SHARD_NAMES[2]}/guided_output: the manifest's unit_checksums differ from the data (the manifest was "
        "edited or damaged)"]


@pytest.mark.bad_input
def test_malformed_read_time_digests_are_a_clear_error(store_copy):
    manifest = json.loads((store_copy / MANIFEST).read_text())
    manifest["shards"][1]["unit_checksums"]["model_input"] = ["0" * 32] * 7
    (store_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"shard {SHARD_NAMES[1]} has malformed unit_rows/unit_checksums.*"
                                         "--rebuild-manifest"):
        TrajectoryStore(store_copy)


def test_a_json_write_that_fails_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from agd_pipeline.store import files
    from agd_pipeline.store.files import write_json_atomic

    (tmp_path / "m.json").write_text("{}")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    assert (tmp_path / "m.json").read_text() == "{}"


def test_sound_store_passes_inspect(tiny_store):
    result = run_cli("stages.inspect", tiny_store, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trajectories: 20" in result.stdout and "all arrays finite" in result.stdout


def test_inspect_statistics_are_the_same_on_a_distributed_cluster(tiny_store, tmp_path):
    """dask.distributed LocalCluster (worker processes) against the default threaded scheduler."""
    local, distributed = tmp_path / "local.json", tmp_path / "distributed.json"
    assert run_cli("stages.inspect", tiny_store, "--json", local).returncode == 0
    result = run_cli("stages.inspect", tiny_store, "--json", distributed, "--scheduler", "distributed",
                     "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = json.loads(local.read_text()), json.loads(distributed.read_text())
    assert a["trajectories"] == b["trajectories"] == 20
    np.testing.assert_allclose(a["per_step"]["guided_output"]["std"], b["per_step"]["guided_output"]["std"],
                               rtol=1e-6)
    assert a["guidance_histogram"] == b["guidance_histogram"]


def test_deleted_shard_is_caught_by_the_cheap_check(tiny_base_dir, tiny_store, store_copy):
    shutil.rmtree(store_copy / SHARD_NAMES[2])
    problems = TrajectoryStore(store_copy).problems(full=False)
    assert [p.shard for p in problems] == [SHARD_NAMES[2]]
    with pytest.raises(StoreError, match=SHARD_NAMES[2]):
        TrajectoryStore(store_copy).check()
    result = run_cli("stages.inspect", store_copy)
    assert result.returncode == 1 and SHARD_NAMES[2] in result.stdout
    # and generate repairs it
    _, summary = generate_store(tiny_base_dir, store_copy)
    assert summary["written_shards"] == 1
    assert_same_store(store_copy, tiny_store)


def test_missing_store_is_reported(tmp_path):
    with pytest.raises(StoreError, match="generate"):
        TrajectoryStore(tmp_path / "nowhere")
    result = run_cli("stages.inspect", tmp_path / "nowhere")
    assert result.returncode == 2 and "error:" in result.stderr


def test_classes_file_selects_the_classes(tiny_base_dir, tmp_path):
    (tmp_path / "classes.txt").write_text("3, 8\n")
    generate_store(tiny_base_dir, tmp_path / "store", classes_file=str(tmp_path / "classes.txt"),
                   trajectories_per_class=2)
    data = read_all_shards(tmp_path / "store")["shard-000000.zarr"]
    assert data["class_label"].tolist() == [3, 8, 3, 8]
    (tmp_path / "bad.txt").write_text("3 eight\n")
    with pytest.raises(ConfigError, match="bad.txt.*not a class id"):
        generate_store(tiny_base_dir, tmp_path / "other", classes_file=str(tmp_path / "bad.txt"))
    (tmp_path / "big.txt").write_text("3 12\n")
    with pytest.raises(ConfigError, match=r"generate.classes: \[12\] are not classes of the base model \(0..9\)"):
        generate_store(tiny_base_dir, tmp_path / "other", classes_file=str(tmp_path / "big.txt"))
