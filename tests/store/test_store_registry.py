"""The store's registries (formats, the codecs each takes) and the choices derived from them; the
shard-reader protocol every format's reader satisfies; no format branch outside the formats."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import agd_pipeline.loader
import agd_pipeline.store as store
from agd_pipeline.config import GenerateConfig
from agd_pipeline.errors import StoreError
from agd_pipeline.store.formats import CODECS, FORMATS, ShardReader, codec_available, open_shard, resolve_compressor
from agd_pipeline.store.schema import DERIVED_ARRAYS, array_specs
from benchmarks.data_path import synthetic_arrays, synthetic_header, write_synthetic_store

PACKAGE = Path(agd_pipeline.loader.__file__).parent
# What the registries hold: a changed entry changes settings' choices, --help and messages.
REGISTRY = {"zarr": ["blosc-zstd", "zstd", "deflate", "none"], "webdataset": ["deflate", "none"]}


def test_the_registries_list_each_format_and_the_codecs_it_takes():
    assert {name: list(fmt.codecs) for name, fmt in FORMATS.items()} == REGISTRY
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.default_compressor in fmt.codecs
        assert resolve_compressor("auto", name) == fmt.default_compressor
        for codec in fmt.codecs:
            assert codec_available(codec, name) and resolve_compressor(codec, name) == codec
            assert fmt.codec(codec) is fmt.codecs[codec]


def test_the_codec_table_is_the_union_of_the_formats_codecs_in_a_stable_order():
    union = list(dict.fromkeys(codec for fmt in FORMATS.values() for codec in fmt.codecs))
    assert list(CODECS) == union == ["blosc-zstd", "zstd", "deflate", "none"]
    for codec, forms in CODECS.items():
        assert forms == {name: fmt.codecs[codec] for name, fmt in FORMATS.items() if codec in fmt.codecs}
    assert store.CODECS is CODECS


def test_the_settings_choices_come_from_the_registries():
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    assert fields["compressor"].metadata["choices"] == ("auto", *CODECS)
    assert fields["format"].metadata["choices"] == tuple(FORMATS)
    for name, fmt in FORMATS.items():
        for codec in CODECS:
            if codec in fmt.codecs:
                assert resolve_compressor(codec, name) == codec
            else:
                with pytest.raises(StoreError, match=f"allowed: auto, {', '.join(fmt.codecs)}"):
                    resolve_compressor(codec, name)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_formats_reader_satisfies_the_protocol(tmp_path, fmt):
    header = synthetic_header((4, 8, 8), 6, 3, 6, chunk_bytes=1024, fmt=fmt)
    trajectories = write_synthetic_store(tmp_path / fmt, header)
    name = trajectories.shards[0]["name"]
    specs = array_specs(trajectories.manifest, trajectories.shards[0]["trajectories"])
    expected = synthetic_arrays((4, 8, 8), 0, 6, 3)
    # the store's opener, and the one that tells the format by the shard's name
    for reader in (trajectories.open_shard(name), trajectories.open_shard(name, prepare=True),
                   open_shard(tmp_path / fmt / name, specs), open_shard(tmp_path / fmt / name, specs, fmt)):
        assert isinstance(reader, ShardReader), type(reader)
        assert reader.prepare() is None
        reader.prepare()  # idempotent
        data = set(reader.array_keys()) - set(DERIVED_ARRAYS)
        assert data == set(specs)
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(reader[key][:]), value, err_msg=f"{fmt} {key}")
    assert trajectories.problems(full=True) == []


@pytest.mark.bad_input
def test_open_shard_refuses_what_is_no_shard(tmp_path):
    with pytest.raises(StoreError, match="not a shard name"):
        open_shard(tmp_path / "notes.txt", {})


def test_the_package_exports_what_users_call():
    assert len(store.__all__) <= 25 and all(hasattr(store, name) for name in store.__all__)
    for name in ("TrajectoryStore", "StoreWriter", "convert_store", "open_shard", "ShardReader", "FORMATS", "CODECS",
                 "ZarrFormat", "WebDatasetFormat", "Manifest", "VERIFY_MODES", "Problem", "MANIFEST"):
        assert name in store.__all__
    # the verification cache keeps its old module name, as the same module object
    import agd_pipeline.store.verified as old
    import agd_pipeline.store.verified_cache as cache

    assert old is cache


def type_probes(path: Path) -> list[str]:
    """hasattr(...) and isinstance(...) calls in a module that probe a shard (or its reader or
    group) or ask for a format's attribute or class: a format branch in disguise."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "isinstance") and len(node.args) == 2):
            continue
        subject = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(node.args[0]) if isinstance(n, ast.Attribute)}
        probe = ast.get_source_segment(source, node.args[1])
        if any(word in name.lower() for name in subject for word in ("shard", "group", "reader")) \
                or any(word in probe for word in ("members", "Tar", "Zarr", "zarr", "prepare")):
            found.append(f"{path.name}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_format_branch_outside_the_formats_package():
    modules = [PACKAGE / "loader.py", *sorted((PACKAGE / "store").glob("*.py"))]
    assert [probe for path in modules for probe in type_probes(path)] == []
    loader = (PACKAGE / "loader.py").read_text()
    for word in ("members()", "TarShard", "ZarrShard", '"webdataset"', '"zarr"', "hasattr("):
        assert word not in loader, word
