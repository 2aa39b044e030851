"""The registry of shard formats. Adding a format: a module implementing ``ShardFormat`` (see
base.py, with the codecs it takes in ``codecs``) and one line in ``FORMATS`` below; the codec
table (``CODECS``) and the settings' choices follow from the registry."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import StoreError
from ..schema import SHARD_INDEX
from .base import ShardFormat, ShardReader, ShardWriter, check_before_publish
from .webdataset import WebDatasetFormat
from .zarr import ZarrFormat

FORMATS: dict[str, ShardFormat] = {fmt.name: fmt for fmt in (
    ZarrFormat(),
    WebDatasetFormat(),
)}
# The one codec table: codec name -> {format name: that format's form of it}, the union of the
# formats' own tables in registry order (its keys, with "auto", are the compressor setting's choices).
CODECS: dict[str, dict[str, object]] = {}
for _fmt in FORMATS.values():
    for _codec, _form in _fmt.codecs.items():
        CODECS.setdefault(_codec, {})[_fmt.name] = _form
del _fmt, _codec, _form
# A shard of any format: shard-NNNNNN.<extension>, the number its index.
SHARD_PATTERN = re.compile(rf"{SHARD_INDEX}\.({'|'.join(re.escape(f.extension) for f in FORMATS.values())})")


def get_format(name: str) -> ShardFormat:
    if name not in FORMATS:
        raise StoreError(f"unknown store format {name!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[name]


def codec_available(name, fmt: str) -> bool:
    """Whether shards of format ``fmt`` can use the codec ``name``."""
    return name in CODECS and fmt in CODECS[name]


def format_of_shard(name: str) -> ShardFormat:
    """The format of a shard, from its name (which must match SHARD_PATTERN)."""
    extension = SHARD_PATTERN.fullmatch(name).group(2)
    return next(fmt for fmt in FORMATS.values() if fmt.extension == extension)


def open_shard(path: str | os.PathLike, specs: dict[str, tuple[tuple, str]], fmt: ShardFormat | str | None = None,
               prepare: bool = False) -> ShardReader:
    """The shard at ``path`` as a ShardReader (``specs``: schema.array_specs of its manifest entry).
    Its format is ``fmt`` (an object or a name; a store's manifest says it) or else told by the
    shard's name (SHARD_PATTERN). ``prepare``: do the reader's one-off preparation now (a tar's index)."""
    path = Path(path)
    if fmt is None:
        if not SHARD_PATTERN.fullmatch(path.name):
            extensions = "|".join(f.extension for f in FORMATS.values())
            raise StoreError(f"{path}: not a shard name (shard-NNNNNN.<{extensions}>)")
        fmt = format_of_shard(path.name)
    elif isinstance(fmt, str):
        fmt = get_format(fmt)
    reader = fmt.open_shard(path, specs)
    if prepare:
        reader.prepare()
    return reader


def shard_name(index: int, fmt: str = "zarr") -> str:
    return get_format(fmt).shard_name(index)


def resolve_compressor(name: str, fmt: str) -> str:
    """The codec a store of format ``fmt`` uses for ``name`` ("auto": the format's default)."""
    if name in ("", "auto", None):
        return get_format(fmt).default_compressor
    if name not in CODECS:
        raise StoreError(f"unknown compressor {name!r}; allowed: auto, {', '.join(CODECS)}")
    if fmt not in CODECS[name]:
        allowed = [c for c, spec in CODECS.items() if fmt in spec]
        note = get_format(fmt).codec_note
        raise StoreError(f"compressor {name!r} is not available for {fmt} shards{f' ({note})' if note else ''}; "
                         f"allowed: auto, {', '.join(allowed)}")
    return name


__all__ = ["CODECS", "FORMATS", "SHARD_PATTERN", "ShardFormat", "ShardReader", "ShardWriter", "check_before_publish",
           "codec_available", "format_of_shard", "get_format", "open_shard", "resolve_compressor", "shard_name"]
