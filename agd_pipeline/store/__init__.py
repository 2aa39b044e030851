"""The trajectory store: sharded Zarr v3 groups (or WebDataset tars) plus a JSON manifest.

Layout (schema version 3)::

    <root>/manifest.json             store type and schema, settings of the run, one entry per shard
    <root>/manifest.log              while a run writes: the entries of shards committed since (journal)
    <root>/zarr.json                 Zarr format: the root is a Zarr group, the shards its children
                                     (consolidated once every shard is complete: see formats/zarr.py)
    <root>/shard-000000.zarr/        one self-describing group per shard, written by one process
    <root>/shard-000000.tar          ... or, with format webdataset, a tar (formats/webdataset.py)
    <root>/.agd.lock                 held by the one process writing the store (see agd_pipeline.locks)

Modules: ``schema`` (names, arrays, codecs, checksums), ``files``, ``formats`` (the format protocol,
its Zarr and WebDataset implementations and their registry), ``manifest`` (typed view, validation,
recovery), ``journal`` (manifest.log), ``ownership``, ``verified_cache`` (the record of shards
verified in full, kept outside the store), ``verify`` (the checks), ``reader`` (TrajectoryStore), ``writer``
(StoreWriter), ``convert``. Each imports only the ones below it; this file only re-exports.
"""

from .convert import convert_store
from .files import folder_bytes, remove_path, write_json_atomic
from .formats import (CODECS, FORMATS, SHARD_PATTERN, ShardFormat, codec_available, format_of_shard, get_format,
                      resolve_compressor,
                      shard_name)
from .formats.webdataset import TarShard, TarShardWriter, WebDatasetFormat, decode_sample, encode_sample
from .formats.zarr import ZarrFormat, ZarrShardWriter
from .journal import MANIFEST_LOG
from .manifest import (Manifest, as_manifest, differences, new_manifest, read_manifest, recover_manifest,
                       validate_manifest)
from .ownership import foreign_entries, refuse_foreign_folder, remove_store
from .reader import TrajectoryStore
from .schema import (ARRAY_DTYPES, CLASS_CONDITION, LATENT_ARRAYS, MANIFEST, PARTIAL, RUN_KEYS,
                     SCHEMA_VERSION, STORE_TYPE, ArrayHasher, array_checksum, array_shapes, array_specs, bitround,
                     combined_checksum, condition_arrays, dimension_names, repair, run_header,
                     store_fingerprint)
from .verified_cache import VerifiedShards
from .verify import VERIFY_MODES, Problem
from .writer import StoreWriter

__all__ = [
    "ARRAY_DTYPES", "CLASS_CONDITION", "CODECS", "FORMATS", "LATENT_ARRAYS", "MANIFEST", "MANIFEST_LOG", "PARTIAL",
    "RUN_KEYS", "SCHEMA_VERSION", "SHARD_PATTERN", "STORE_TYPE", "VERIFY_MODES", "ArrayHasher",
    "Manifest", "Problem", "ShardFormat", "StoreWriter", "TarShard", "TarShardWriter", "TrajectoryStore",
    "VerifiedShards", "WebDatasetFormat", "ZarrFormat", "ZarrShardWriter", "array_checksum", "array_shapes",
    "array_specs", "as_manifest", "bitround", "codec_available", "combined_checksum", "condition_arrays",
    "convert_store", "decode_sample", "differences", "dimension_names", "encode_sample", "folder_bytes",
    "foreign_entries", "format_of_shard", "get_format", "new_manifest", "read_manifest", "recover_manifest",
    "refuse_foreign_folder", "remove_path", "remove_store", "repair", "resolve_compressor", "run_header", "shard_name",
    "store_fingerprint", "validate_manifest", "write_json_atomic",
]
