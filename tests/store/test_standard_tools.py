"""The store read by standard tools, without our code: xarray opens a Zarr shard as a labelled
Dataset (named dimensions, index coordinates trajectory and step, w, timesteps and the prompt text
as coordinates), the root as a DataTree, zarr lists the hierarchy without warnings, and every
WebDataset sample carries a ``json`` member with its prompt, negative prompt, w, seed and indices.
The added metadata leaves the data and its checksums as they were."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from agd_pipeline.config import GenerateConfig, load_config
from agd_pipeline.generation import generate
from agd_pipeline.store import StoreWriter, TrajectoryStore, convert_store
from agd_pipeline.store.schema import DERIVED_ARRAYS

from conftest import REPO, generate_store, read_all_shards, run_cli

xr = pytest.importorskip("xarray")
zarr = pytest.importorskip("zarr")

PROMPTS = ["a red cat", "blue sky", "an old oak"]
NEGATIVES = ["blurry", "low quality"]
QUIET = dict(progress=False, log=lambda *a, **k: None)
TEXT_SETTINGS = dict(trajectories_per_prompt=2, guidance_min=2.0, guidance_max=12.0, num_steps=3, batch_size=4,
                     shard_size=4, device="cpu", seed=0, empty_negative_probability=0.3)
DATA = {"model_input", "guided_output", "sample"}  # what stays a data variable of a class shard


@contextmanager
def no_warnings():
    """Any warning raised inside is an error (the issue: zarr warned on every listing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture(scope="module")
def text_stores(text_pipeline_dirs, tmp_path_factory):
    """A tiny SD store with per-trajectory negative prompts, in both formats."""
    root = tmp_path_factory.mktemp("standard_tools_text")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "negatives.txt").write_text("\n".join(NEGATIVES) + "\n")
    stores = {}
    for fmt in ("zarr", "webdataset"):
        config = load_config(GenerateConfig, {**TEXT_SETTINGS, "base_model": str(text_pipeline_dirs["sd"]),
                                              "out_dir": str(root / fmt), "prompts_file": str(root / "prompts.txt"),
                                              "negative_prompts_file": str(root / "negatives.txt"), "format": fmt})
        generate(config, **QUIET)
        stores[fmt] = root / fmt
    return stores


def expected_texts(arrays: dict) -> tuple[list[str], list[str]]:
    prompts = [PROMPTS[i] for i in arrays["prompt_index"]]
    negatives = [NEGATIVES[i] if i >= 0 else "" for i in arrays["negative_prompt_index"]]
    return prompts, negatives


# ------------------------------------------------------------------------------------ Zarr shards


def test_xarray_opens_a_class_shard_with_named_dims_and_coordinates(tiny_store):
    data = read_all_shards(tiny_store)
    for entry in TrajectoryStore(tiny_store).shards:
        with no_warnings():
            ds = xr.open_zarr(tiny_store / entry["name"])
            arrays = data[entry["name"]]
            assert set(ds.data_vars) == DATA
            assert ds["model_input"].dims == ("trajectory", "step", "channel", "y", "x")
            assert ds["guided_output"].dims[:2] == ("trajectory", "step")
            assert {"trajectory", "step"} <= set(ds.indexes)
            np.testing.assert_array_equal(ds["trajectory"].values, arrays["trajectory_index"])
            np.testing.assert_array_equal(ds["step"].values, np.arange(ds.sizes["step"]))
            for name in ("guidance_scale", "timesteps", "seed", "class_label", "trajectory_index"):
                assert name in ds.coords, name
                np.testing.assert_array_equal(ds[name].values, arrays[name], err_msg=name)
            assert ds["guidance_scale"].dims == ("trajectory",) and ds["timesteps"].dims == ("trajectory", "step")
            # the data as our reader reads it, labelled: trajectory i of the store is ds.sel(trajectory=i)
            first = entry["first_trajectory"]
            np.testing.assert_array_equal(ds["model_input"].sel(trajectory=first + 1).values,
                                          arrays["model_input"][1])


def test_zarr_lists_the_root_and_xarray_opens_it_as_a_datatree_without_warnings(tiny_store):
    names = {entry["name"] for entry in TrajectoryStore(tiny_store).shards}
    with no_warnings():
        members = dict(zarr.open_group(str(tiny_store), mode="r").members())
        assert set(members) == names
        tree = xr.open_datatree(tiny_store, engine="zarr")
        assert set(tree.children) == names
        for name in names:
            node = tree[name]
            assert set(node.data_vars) == DATA and {"trajectory", "step", "guidance_scale"} <= set(node.coords)
        # the whole store as one Dataset along trajectory (the README's recipe)
        shards = sorted(str(tiny_store / name) for name in names)
        whole = xr.open_mfdataset(shards, engine="zarr", combine="nested", concat_dim="trajectory",
                                  combine_attrs="drop_conflicts")
        assert xr.open_zarr(tiny_store).attrs["store_type"] == "agd-trajectory-store"  # no arrays at the root
    manifest = TrajectoryStore(tiny_store).manifest
    assert "store_header" in whole.attrs and "checksum" not in whole.attrs  # a shard's own attributes differ
    np.testing.assert_array_equal(whole["trajectory"].values, np.arange(manifest.num_trajectories))
    np.testing.assert_array_equal(
        whole["guidance_scale"].values,
        np.concatenate([read_all_shards(tiny_store)[n]["guidance_scale"] for n in sorted(names)]))


def test_the_root_is_consolidated_only_while_the_store_is_complete(tiny_base_dir, tiny_store, tmp_path):
    """A resumed run first makes the root plain again (its list of shards would be stale), then
    consolidates it when every shard is back; the rewritten shard opens like the others."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    assert "consolidated_metadata" in json.loads((root / "zarr.json").read_text())
    shutil.rmtree(root / "shard-000001.zarr")
    writer = StoreWriter(root, TrajectoryStore(tiny_store).manifest.run_header(), log=lambda *a, **k: None)
    assert writer.pending() == [1]
    assert json.loads((root / "zarr.json").read_text()).get("consolidated_metadata") is None
    generate_store(tiny_base_dir, root)
    with no_warnings():
        tree = xr.open_datatree(root, engine="zarr")
    assert "shard-000001.zarr" in tree.children and "trajectory" in tree["shard-000001.zarr"].coords


def test_a_complete_store_with_a_plain_root_is_sealed_once(tiny_base_dir, tiny_store, tmp_path):
    """A store whose root was never consolidated (written before this release, or a run killed
    after its last shard) is sealed by the next run; a rerun after that writes nothing."""
    from agd_pipeline.store.formats.zarr import ZarrFormat

    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    ZarrFormat().prepare_root(root)
    with pytest.warns(UserWarning, match="not recognized as a component of a Zarr hierarchy"):
        dict(zarr.open_group(str(root), mode="r").members())
    generate_store(tiny_base_dir, root)
    sealed = (root / "zarr.json").stat().st_mtime_ns
    with no_warnings():
        assert len(dict(zarr.open_group(str(root), mode="r").members())) == 3
    generate_store(tiny_base_dir, root)
    assert (root / "zarr.json").stat().st_mtime_ns == sealed


def test_the_derived_metadata_leaves_data_and_checksums_alone(tiny_store, tmp_path):
    """The coordinates are outside the checksums; a shard without them (written before they
    existed) verifies and loads as before."""
    store = TrajectoryStore(tiny_store)
    group = store.open_shard("shard-000000.zarr")
    assert {"trajectory", "step"} <= set(group.array_keys())
    assert not set(store.shards[0]["checksums"]) & set(DERIVED_ARRAYS)
    assert store.problems(full=True) == []
    assert set(store.dask_arrays()) == set(store.shards[0]["checksums"])
    # an older shard: no derived arrays, no coordinates attribute
    old = tmp_path / "old"
    shutil.copytree(tiny_store, old)
    for shard in sorted(old.glob("shard-*.zarr")):
        for name in ("trajectory", "step"):
            shutil.rmtree(shard / name)
        meta = json.loads((shard / "zarr.json").read_text())
        meta["attributes"].pop("coordinates")
        for name in ("trajectory", "step"):
            meta["consolidated_metadata"]["metadata"].pop(name)
        (shard / "zarr.json").write_text(json.dumps(meta))
    (old / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    old_store = TrajectoryStore(old)
    assert old_store.problems(full=True) == []
    assert old_store.fingerprint() == store.fingerprint()
    for name, arrays in read_all_shards(old).items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, read_all_shards(tiny_store)[name][key], err_msg=key)


def test_verify_checks_the_derived_arrays_against_the_manifest(tiny_store, tmp_path):
    """The derived arrays are outside the checksums, so verify recomputes them from the manifest: a
    changed value or shape is a problem naming the shard and the array (the data itself is untouched)."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    first = zarr.open_group(str(root / "shard-000000.zarr"), mode="r+")
    first["trajectory"][0] = 99
    second = zarr.open_group(str(root / "shard-000001.zarr"), mode="r+")
    second["step"][:] = second["step"][:][::-1]
    third = zarr.open_group(str(root / "shard-000002.zarr"), mode="r+")
    third.create_array("trajectory", data=np.arange(3, dtype=np.int64), overwrite=True)
    zarr.consolidate_metadata(str(root / "shard-000002.zarr"))
    store = TrajectoryStore(root)
    problems = {str(p) for p in store.problems(full=True)}
    assert "shard-000000.zarr/trajectory: 1 of 8 value(s) differ from what the manifest implies (row 0: 99, " \
        "expected 0); derived from the manifest, outside the checksums" in problems, problems
    assert any(p.startswith("shard-000001.zarr/step: ") and "differ from what the manifest implies" in p
               for p in problems), problems
    assert "shard-000002.zarr/trajectory: int64 (3,), the manifest implies int64 (4,)" in problems, problems
    assert len(problems) == 3, problems
    # the cheap check (no reading) sees the shape
    assert {str(p) for p in store.problems(full=False)} == {
        "shard-000002.zarr/trajectory: int64 (3,), the manifest implies int64 (4,)"}


def test_verify_checks_a_text_shards_prompt_text(text_stores, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(text_stores["zarr"], root)
    group = zarr.open_group(str(root / "shard-000000.zarr"), mode="r+")
    texts = group["negative_prompt"][:].tolist()
    group["negative_prompt"][1] = texts[1] + " (edited)"
    problems = [str(p) for p in TrajectoryStore(root).problems(full=True)]
    assert len(problems) == 1 and problems[0].startswith(
        "shard-000000.zarr/negative_prompt: 1 of 4 value(s) differ from what the manifest implies (row 1: "), problems


def test_a_text_shard_carries_its_prompt_text(text_stores):
    root = text_stores["zarr"]
    data = read_all_shards(root)
    for name, arrays in data.items():
        with no_warnings():
            ds = xr.open_zarr(root / name)
            prompts, negatives = expected_texts(arrays)
            assert ds["prompt"].dims == ("trajectory",) and "prompt" in ds.coords
            assert ds["prompt"].values.tolist() == prompts
            assert ds["negative_prompt"].values.tolist() == negatives
            assert "prompt_embeds" in ds.data_vars and ds["prompt_embeds"].dims == ("trajectory", "token",
                                                                                   "text_embedding")
    used = {n for arrays in data.values() for n in arrays["negative_prompt_index"]}
    assert -1 in used and used & {0, 1}, "the plan must use the default and a listed negative prompt"
    assert TrajectoryStore(root).problems(full=True) == []


# ------------------------------------------------------------------------------------ WebDataset


def webdataset_samples(root: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(p) for p in sorted(root.glob("shard-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    return list(dataset)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_webdataset_samples_carry_a_json_member(kind, tiny_base_dir, text_stores, tmp_path):
    if kind == "class":
        root = tmp_path / "tar"
        generate_store(tiny_base_dir, root, format="webdataset")
    else:
        root = text_stores["webdataset"]
    data = read_all_shards(root)
    arrays = {k: np.concatenate([shard[k] for shard in data.values()]) for k in next(iter(data.values()))}
    samples = webdataset_samples(root)
    assert len(samples) == len(arrays["seed"])
    prompts, negatives = expected_texts(arrays) if kind == "text" else ([], [])
    for i, sample in enumerate(samples):
        meta = sample["json"]
        assert sample["__key__"] == f"{arrays['trajectory_index'][i]:09d}"
        assert meta["trajectory_index"] == arrays["trajectory_index"][i]
        assert meta["seed"] == arrays["seed"][i]
        assert np.float32(meta["guidance_scale"]) == arrays["guidance_scale"][i]
        assert meta["timesteps"] == arrays["timesteps"][i].tolist()
        assert np.array_equal(sample["trajectory.npz"]["guided_output"], arrays["guided_output"][i])
        if kind == "class":
            assert meta["class_label"] == arrays["class_label"][i] and "prompt" not in meta
        else:
            assert meta["prompt_index"] == arrays["prompt_index"][i]
            assert meta["negative_prompt_index"] == arrays["negative_prompt_index"][i]
            assert (meta["prompt"], meta["negative_prompt"]) == (prompts[i], negatives[i])
    assert TrajectoryStore(root).problems(full=True) == []


# ------------------------------------------------------------ the tools a user reads the store with


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
