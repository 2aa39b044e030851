"""The trajectory store: sharded Zarr v3 groups (or WebDataset tars) plus a JSON manifest.

Layout (schema version 3)::

    <root>/manifest.json             store type and schema, settings of the run, one entry per shard
    <root>/manifest.log              while a run writes: the entries of shards committed since (journal)
    <root>/zarr.json                 Zarr format: the root is a Zarr group, the shards its children
                                     (consolidated once every shard is complete: see formats/zarr.py)
    <root>/shard-000000.zarr/        one self-describing group per shard, written by one process
    <root>/shard-000000.tar          ... or, with format webdataset, a tar (formats/webdataset.py)
    <root>/.agd.lock                 held by the one process writing the store (see agd_pipeline.locks)

Modules: ``schema`` (names, arrays, checksums), ``files``, ``formats`` (the format and
shard-reader protocols, the Zarr and WebDataset implementations, their registry and the codec
table), ``manifest`` (typed view, validation, recovery), ``journal`` (manifest.log),
``ownership``, ``verified_cache`` (the record of shards verified in full, kept outside the store),
``verify`` (the checks), ``reader`` (TrajectoryStore), ``writer`` (StoreWriter), ``convert``. Each
imports only the ones below it; this file only re-exports what users of the store call
(``__all__``); everything else is imported from its module.
"""

from .convert import convert_store
from .formats import CODECS, FORMATS, ShardFormat, ShardReader, get_format, open_shard
from .formats.webdataset import WebDatasetFormat
from .formats.zarr import ZarrFormat
from .journal import MANIFEST_LOG
from .manifest import Manifest, read_manifest
from .reader import TrajectoryStore
from .schema import MANIFEST, SCHEMA_VERSION, STORE_TYPE
from .verify import VERIFY_MODES, Problem
from .writer import StoreWriter

__all__ = [
    # reading and writing a store, converting one
    "TrajectoryStore", "StoreWriter", "convert_store",
    # shards of any format: the registry, the protocols, one opener
    "FORMATS", "CODECS", "ShardFormat", "ShardReader", "ZarrFormat", "WebDatasetFormat", "get_format", "open_shard",
    # the manifest
    "Manifest", "read_manifest", "MANIFEST", "MANIFEST_LOG", "SCHEMA_VERSION", "STORE_TYPE",
    # verification (TrajectoryStore.problems / check)
    "VERIFY_MODES", "Problem",
]
